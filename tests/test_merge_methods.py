"""Method registry and the whole plain-PyTorch pipeline on a tiny model: planted perms recovered, zero barrier."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from lightning_merge.errors import ArchitectureMismatch, ConfigError, UnknownNameError
from lightning_merge.merge.features import collect_statistics
from lightning_merge.merge.interpolate import InterpolationPath, lambda_grid, loss_barrier
from lightning_merge.merge.methods import METHODS, PAPER, get_method, known_names
from lightning_merge.merge.permute import apply_permutations, invert_permutation, random_permutations
from lightning_merge.merge.spec import spec_for_model


def test_named_and_parsed_methods():
    assert get_method("vanilla").groups == () and get_method("vanilla").function_preserving
    full = get_method("permute")
    assert (full.groups, full.attention, full.residual, full.reference) == (
        ("ff", "attn", "res"),
        "head_perm",
        "all",
        PAPER,
    )
    assert get_method("ff+attn").attention == "head_perm"
    assert get_method("ff+attn").canonical_name == "ff+attn[head_perm]"
    assert get_method("ff+attn[monotonic]").attention == "monotonic"
    assert not get_method("ff+attn[ignore_heads]").function_preserving
    assert get_method("res[last]").canonical_name == "res[last]"
    assert get_method(" res[first] + ff ").groups == ("ff", "res")
    assert get_method("ff+attn+res").canonical_name == get_method("permute").canonical_name
    assert set(METHODS) >= {"vanilla", "permute"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("zip", "unknown merge method 'zip'; known: vanilla, permute; or groups ff, attn"),
        ("ff+mlp", "unknown merge method"),
        ("attn[sideways]", "unknown variant 'sideways' of group 'attn'.*head_perm, monotonic, ignore_heads"),
        ("res[middle]", "variants: all, first, last"),
        ("ff[x]", "variants: none"),
        ("ff+ff", "names group 'ff' twice"),
        ("", "unknown merge method"),
    ],
)
def test_unknown_names_list_known_ones(name, message):
    with pytest.raises(UnknownNameError, match=message):
        get_method(name)
    assert "res[all|first|last]" in known_names()


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )


def batches(count: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 40, (8, 16), generator=generator)
        attention_mask = (torch.arange(16) < torch.randint(6, 17, (8, 1), generator=generator)).long()
        out.append(dict(input_ids=input_ids, attention_mask=attention_mask))
    return out


@pytest.fixture(scope="module")
def planted_pair():
    torch.manual_seed(0)
    model_a = BertForMaskedLM(tiny_config()).double().eval()
    spec = spec_for_model(model_a)
    planted = random_permutations(spec, torch.Generator().manual_seed(7))
    model_b = BertForMaskedLM(tiny_config()).double().eval()
    model_b.load_state_dict(apply_permutations(model_a.state_dict(), spec, planted))
    statistics = collect_statistics(model_a, model_b, batches(), spec)
    return model_a, model_b, spec, planted, statistics


@pytest.mark.parametrize(
    "name", ["permute", "ff", "ff+attn[monotonic]", "attn[ignore_heads]", "res[first]", "res[last]"]
)
def test_fit_recovers_planted_permutations(planted_pair, name):
    _, _, spec, planted, statistics = planted_pair
    method = get_method(name)
    perms = method.fit(statistics, spec)
    assert set(perms) == set(method.group_names(spec))
    for group, perm in perms.items():
        if method.attention == "monotonic" and group.startswith("attn"):
            continue  # monotonic cannot undo a head shuffle; it is checked below
        assert torch.equal(perm, invert_permutation(planted[group])), group


def test_monotonic_finds_within_head_order_when_heads_are_in_place(planted_pair):
    model_a, _, spec, _, _ = planted_pair
    inner_only = random_permutations(spec, torch.Generator().manual_seed(8), ("attn",))
    for name, perm in inner_only.items():  # keep heads in place, shuffle dims within each
        heads = perm.reshape(4, 8) % 8 + torch.arange(4)[:, None] * 8
        inner_only[name] = heads.reshape(-1)
    model_b = BertForMaskedLM(tiny_config()).double().eval()
    model_b.load_state_dict(apply_permutations(model_a.state_dict(), spec, inner_only))
    statistics = collect_statistics(model_a, model_b, batches(2), spec, groups=spec.groups_of_kind(["attn"]))
    perms = get_method("attn[monotonic]").fit(statistics, spec)
    assert all(torch.equal(perms[name], invert_permutation(inner_only[name])) for name in inner_only)


def test_vanilla_returns_no_perms(planted_pair):
    _, _, spec, _, statistics = planted_pair
    assert get_method("vanilla").fit(statistics, spec) == {}


@torch.no_grad()
def test_realigned_copy_has_zero_barrier(planted_pair):
    model_a, model_b, spec, _, statistics = planted_pair
    perms = get_method("permute").fit(statistics, spec)
    path = InterpolationPath.from_state_dicts(
        model_a.state_dict(), apply_permutations(model_b.state_dict(), spec, perms)
    )
    batch = batches(1, seed=5)[0]
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    grid = lambda_grid(0.25)
    losses = [
        torch.func.functional_call(model_a, path.at(lam), (), dict(batch, labels=labels)).loss.item() for lam in grid
    ]
    assert loss_barrier(grid, losses)["barrier"] <= 1e-6
    assert max(losses) - min(losses) <= 1e-10  # flat: every point of the path is model A
    vanilla = InterpolationPath.from_state_dicts(model_a.state_dict(), model_b.state_dict())
    losses = [
        torch.func.functional_call(model_a, vanilla.at(lam), (), dict(batch, labels=labels)).loss.item() for lam in grid
    ]
    assert max(losses) - min(losses) > 1e-3  # without alignment the path leaves the function (not vacuous)


def test_fit_refuses_statistics_of_another_spec(planted_pair):
    _, _, spec, _, statistics = planted_pair
    other = spec_for_model(BertForSequenceClassification(tiny_config()))
    with pytest.raises(
        ArchitectureMismatch, match="architecture: 'BertForMaskedLM' vs 'BertForSequenceClassification'"
    ):
        get_method("permute").fit(statistics, other)
    partial = collect_statistics(planted_pair[0], planted_pair[1], batches(1), spec, groups=["ff.0"])
    with pytest.raises(ConfigError, match="no group 'ff.1'"):
        get_method("ff").fit(partial, spec)


def test_fit_a_subset_of_groups(planted_pair):
    _, _, spec, planted, statistics = planted_pair
    perms = get_method("ff").fit(statistics, spec, groups=["ff.1"])
    assert list(perms) == ["ff.1"] and torch.equal(perms["ff.1"], invert_permutation(planted["ff.1"]))
    with pytest.raises(ConfigError, match="does not permute group 'res'"):
        get_method("ff").fit(statistics, spec, groups=["res"])


def test_fit_methods_solves_each_shared_assignment_once_and_matches_fit(monkeypatch):
    from lightning_merge.merge import methods as methods_module

    torch.manual_seed(1)
    model_a, model_b = (BertForMaskedLM(tiny_config()).double().eval() for _ in range(2))
    spec = spec_for_model(model_a)
    statistics = collect_statistics(model_a, model_b, batches(2), spec)
    names = ["vanilla", "ff", "ff+attn[monotonic]", "ff+attn[head_perm]", "res[first]", "res[all]", "permute"]
    chosen = {name: get_method(name) for name in names}
    matchers = dict(methods_module.GROUP_MATCHERS)
    expected = {
        name: {g: matchers[spec.groups[g].kind](m, statistics, spec.groups[g]) for g in m.group_names(spec)}
        for name, m in chosen.items()
    }
    solved = []
    for kind, matcher in matchers.items():
        monkeypatch.setitem(
            methods_module.GROUP_MATCHERS, kind,
            lambda method, stats, group, matcher=matcher: solved.append(group.name) or matcher(method, stats, group),
        )
    fitted = methods_module.fit_methods(chosen, statistics, spec, workers=3)
    assert fitted.keys() == expected.keys() and fitted["vanilla"] == {}
    for name in names:
        assert fitted[name].keys() == expected[name].keys(), name
        for group, perm in expected[name].items():
            assert torch.equal(fitted[name][group], perm), (name, group)
    assert fitted["ff"]["ff.0"] is not fitted["permute"]["ff.0"]  # shared work, but no aliased tensors
    # ff.0/ff.1 once; attn.* once per variant (monotonic, head_perm); res once per variant (first, all)
    assert sorted(solved) == sorted(["ff.0", "ff.1", "attn.0", "attn.1", "attn.0", "attn.1", "res", "res"])

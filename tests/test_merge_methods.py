"""Method registry, grammar and interface, and every method on a tiny planted pair: planted permutations recovered,
declared function preservation true of the alignments, realigned copy flat along the path."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config as family_config
from torch.func import functional_call
from transformers import BertForMaskedLM, BertForSequenceClassification, PretrainedConfig

from lightning_merge.errors import ArchitectureMismatch, ConfigError, UnknownNameError
from lightning_merge.merge.activation_matching import PAPER, ActivationMatching
from lightning_merge.merge.alignment import Permutation, apply_alignments, permutations
from lightning_merge.merge.features import collect_statistics
from lightning_merge.merge.interpolate import interpolate_state_dicts, lambda_grid, load_state_dict_tied, loss_barrier
from lightning_merge.merge.learned import Learned
from lightning_merge.merge.method import LOSS, STATISTICS, WEIGHTS, FitInputs, MergeMethod, TrainingLoss
from lightning_merge.merge.methods import METHODS, fit_methods, get_method, known_names
from lightning_merge.merge.permute import invert_permutation, random_permutations
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.weight_matching import GIT_RE_BASIN, WeightMatching
from lightning_merge.objectives import MaskedLMObjective

PERMUTATION_METHODS = ["permute", "ff", "ff+attn[monotonic]", "attn[ignore_heads]", "res[first]", "res[last]",
                       "weight_matching", "learned[init=permute,steps=3,lr=1e-6]"]


def test_named_and_parsed_methods():
    assert get_method("vanilla").needs == frozenset() and get_method("vanilla").function_preserving
    full = get_method("permute")
    assert (full.variants, full.reference, full.needs) == ({"ff": "", "attn": "head_perm", "res": "all"}, PAPER,
                                                            {STATISTICS})
    assert get_method("ff+attn[linear]+res").reference.startswith(PAPER + "; Schönemann")
    assert get_method("ff+attn").canonical_name == "ff+attn[head_perm]"
    assert get_method("ff+attn[monotonic]").variants["attn"] == "monotonic"
    assert not get_method("ff+attn[ignore_heads]").function_preserving
    assert get_method("ff+attn[linear]+res").function_preserving
    assert get_method(" res[first] + ff ").kinds == ("ff", "res")
    assert get_method("ff+attn+res").canonical_name == full.canonical_name
    weights = get_method("weight_matching")
    assert (weights.needs, weights.reference, weights.options.max_passes) == ({WEIGHTS}, GIT_RE_BASIN, 100)
    learned = get_method("learned[init=ff+attn[linear]+res, steps=20, lr=0.01, attn=linear]")
    assert isinstance(learned, Learned) and learned.needs == {STATISTICS, WEIGHTS, LOSS}
    assert (learned.options.steps, learned.options.lr, learned.init.name) == (20, 0.01, "ff+attn[linear]+res")
    assert set(METHODS) >= {"vanilla", "permute", "weight_matching", "learned"}
    assert learned.describe()["options"]["init"] == "ff+attn[linear]+res"
    assert get_method("learned").init.name == "permute"  # the default start follows the attention mode
    assert get_method("learned[attn=linear]").init.name == "ff+attn[linear]+res"


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("zipit", UnknownNameError, "unknown merge method .zipit.; known: vanilla, permute, weight_matching, learned"),
        ("ff+mlp", UnknownNameError, "unknown merge method"),
        ("attn[sideways]", UnknownNameError, "unknown variant 'sideways' of group 'attn'.*head_perm, .*linear"),
        ("res[middle]", UnknownNameError, "variants: all, first, last"),
        ("ff[x]", UnknownNameError, "variants: none"),
        ("ff+ff", UnknownNameError, "names group 'ff' twice"),
        ("", UnknownNameError, "unknown merge method"),
        ("learned[budget=3]", UnknownNameError, "unknown option 'budget=3'; options: init, steps, lr"),
        ("learned[steps=ten]", ConfigError, "option steps='ten' is not a valid int"),
        ("learned[steps=0]", ConfigError, "steps=0 must be at least 1"),
        ("learned[steps=-5]", ConfigError, "steps=-5 must be at least 1"),
        ("learned[lr=0]", ConfigError, "lr=0.0 must be a positive number"),
        ("learned[lr=nan]", ConfigError, "lr=nan must be a positive number"),
        ("learned[steps=2,steps=7]", ConfigError, "option 'steps' is given twice"),
        ("learned[attn=dense]", ConfigError, "attn='dense'; choose one of perm, linear"),
        ("learned[init=attn[ignore_heads]]", ConfigError, "must be a function-preserving, non-learned method"),
        ("learned[init=learned]", ConfigError, "must be a function-preserving, non-learned method"),
        ("learned[init=nothing]", UnknownNameError, "unknown merge method 'nothing'"),
        ("weight_matching+ff", UnknownNameError, "unknown merge method 'weight_matching\\+ff'"),
        ("vanilla[x=1]", UnknownNameError, "unknown option 'x=1'; options: none"),
        ("ff[linear]+attn", ConfigError, "group 'ff' cannot take a linear alignment: the GELU .*; use ff$"),
        ("res[linear]", ConfigError, "group 'res' cannot take a linear alignment: .*LayerNorm.*; use res\\[all"),
    ],
)
def test_bad_names_and_options_name_the_problem(name, error, message):
    with pytest.raises(error, match=message):
        get_method(name)
    assert "attn[head_perm|monotonic|ignore_heads|linear]" in known_names()


def tiny_config() -> PretrainedConfig:
    return family_config("bert", hidden_size=32, intermediate_size=48)  # head_dim 8: within-head orders to recover


def batches(count: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 40, (8, 16), generator=generator)
        attention_mask = (torch.arange(16) < torch.randint(6, 17, (8, 1), generator=generator)).long()
        out.append(dict(input_ids=input_ids, attention_mask=attention_mask))
    return out


def labelled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100))


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters()}


def plain_training(model: BertForMaskedLM) -> TrainingLoss:
    """The loss and a plain Adam loop, standing in for the trainer's Lightning loop."""
    objective = MaskedLMObjective(model)

    def loss(params, batch):
        loss_sum, count = functional_call(objective, {f"model.{k}": v for k, v in params.items()}, (batch,))
        return loss_sum / count

    def optimise(module: torch.nn.Module, steps: int, lr: float, name: str) -> None:
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        for step in range(steps):
            optimizer.zero_grad()
            module(labelled(batches(1, seed=100 + step)[0])).backward()
            optimizer.step()

    return TrainingLoss(loss, optimise)


def fit_inputs(model_a, model_b, statistics=None, spec=None) -> FitInputs:
    spec = spec or spec_for_model(model_a)
    return FitInputs(spec, parameters(model_a), parameters(model_b), statistics, plain_training(model_a))


@pytest.fixture(scope="module")
def planted_pair():
    torch.manual_seed(0)
    model_a = BertForMaskedLM(tiny_config()).double().eval()
    spec = spec_for_model(model_a)
    planted = random_permutations(spec, torch.Generator().manual_seed(7))
    model_b = BertForMaskedLM(tiny_config()).double().eval()
    load_state_dict_tied(model_b, apply_alignments(model_a.state_dict(), spec, permutations(planted)))
    features = [f"{g}/{p}" for g in spec.groups_of_kind(["attn"]) for p in ("query", "key", "value")]
    statistics = collect_statistics(model_a, model_b, batches(), spec, groups=[*spec.groups, *features])
    return model_a, model_b, spec, planted, statistics


@pytest.mark.parametrize("name", PERMUTATION_METHODS)
def test_fit_recovers_planted_permutations(planted_pair, name):
    model_a, model_b, spec, planted, statistics = planted_pair
    method = get_method(name)
    alignments = method.fit(fit_inputs(model_a, model_b, statistics))
    assert alignments and all(isinstance(a, Permutation) for a in alignments.values())
    for group, alignment in alignments.items():
        if name == "ff+attn[monotonic]" and group.startswith("attn"):
            continue  # monotonic cannot undo a head shuffle; it is checked below
        assert torch.equal(alignment.perm, invert_permutation(planted[group])), group


def test_monotonic_finds_within_head_order_when_heads_are_in_place(planted_pair):
    model_a, _, spec, _, _ = planted_pair
    inner_only = random_permutations(spec, torch.Generator().manual_seed(8), ("attn",))
    for name, perm in inner_only.items():  # keep heads in place, shuffle dims within each
        heads = perm.reshape(4, 8) % 8 + torch.arange(4)[:, None] * 8
        inner_only[name] = heads.reshape(-1)
    model_b = BertForMaskedLM(tiny_config()).double().eval()
    load_state_dict_tied(model_b, apply_alignments(model_a.state_dict(), spec, permutations(inner_only)))
    statistics = collect_statistics(model_a, model_b, batches(2), spec, groups=spec.groups_of_kind(["attn"]))
    found = get_method("attn[monotonic]").fit(FitInputs(spec, statistics=statistics))
    assert all(torch.equal(found[name].perm, invert_permutation(inner_only[name])) for name in inner_only)


def test_linear_attention_realigns_a_planted_pair_exactly(planted_pair):
    model_a, model_b, spec, _, statistics = planted_pair
    alignments = get_method("ff+attn[linear]+res").fit(FitInputs(spec, statistics=statistics))
    assert {type(a).__name__ for g, a in alignments.items() if g.startswith("attn")} == {"HeadLinear"}
    aligned = apply_alignments(model_b.state_dict(), spec, alignments)
    for name, value in model_a.state_dict().items():
        assert (aligned[name] - value).abs().max().item() <= 1e-10, name  # maps are the planted within-head perms


def test_vanilla_returns_no_alignment(planted_pair):
    _, _, spec, _, statistics = planted_pair
    assert get_method("vanilla").fit(FitInputs(spec)) == {}


@pytest.mark.parametrize("name", [*PERMUTATION_METHODS, "vanilla", "ff+attn[linear]+res",
                                  "learned[init=permute,steps=3,attn=linear,lr=0.05]", "ot", "zip",
                                  "ff+attn+res+repair", "ff+attn[linear]+res+regmean"])
@torch.no_grad()
def test_declared_function_preservation_holds_for_the_fitted_alignments(name):
    """Each method's declaration is checked on an unrelated pair (nothing planted): outputs of B unchanged."""
    torch.manual_seed(3)
    model_a, model_b = (BertForMaskedLM(tiny_config()).double().eval() for _ in range(2))
    with torch.no_grad():  # sharper attention than at init, so that a cross-head move would show
        for layer in model_b.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(30)
    spec = spec_for_model(model_a)
    method = get_method(name)
    statistics = collect_statistics(model_a, model_b, batches(2), spec, groups=method.statistics_features(spec),
                                    own_groups=method.own_features(spec))
    with torch.enable_grad():
        alignments = method.fit(fit_inputs(model_a, model_b, statistics))
    aligned = BertForMaskedLM(tiny_config()).double().eval()
    load_state_dict_tied(aligned, apply_alignments(model_b.state_dict(), spec, alignments))
    batch = batches(1, seed=9)[0]
    difference = (aligned(**batch).logits - model_b(**batch).logits).abs().max().item()
    declared = all(a.preserves_function(spec.groups[g]) for g, a in alignments.items())
    assert declared == method.function_preserving
    assert (difference <= 1e-10) == method.function_preserving, difference


@torch.no_grad()
def test_realigned_copy_has_zero_barrier(planted_pair):
    model_a, model_b, spec, _, statistics = planted_pair
    alignments = get_method("permute").fit(FitInputs(spec, statistics=statistics))
    aligned = apply_alignments(model_b.state_dict(), spec, alignments)
    params_a = dict(model_a.named_parameters())  # the curves' path: interpolated parameters, functional_call
    batch = labelled(batches(1, seed=5)[0])
    grid = lambda_grid(0.25)

    def losses(params_b):
        return [functional_call(model_a, interpolate_state_dicts(params_a, params_b, lam), (), batch).loss.item()
                for lam in grid]

    aligned_losses = losses({name: aligned[name] for name in params_a})
    assert loss_barrier(grid, aligned_losses)["barrier"] <= 1e-6
    assert max(aligned_losses) - min(aligned_losses) <= 1e-10  # flat: every point of the path is model A
    vanilla = losses({name: model_b.state_dict()[name] for name in params_a})
    assert max(vanilla) - min(vanilla) > 1e-3  # without alignment the path leaves the function (not vacuous)


def test_fit_refuses_statistics_of_another_spec(planted_pair):
    model_a, model_b, spec, _, statistics = planted_pair
    other = spec_for_model(BertForSequenceClassification(tiny_config()))
    with pytest.raises(
        ArchitectureMismatch, match="architecture: 'BertForMaskedLM' vs 'BertForSequenceClassification'"
    ):
        get_method("permute").fit(FitInputs(other, statistics=statistics))
    partial = collect_statistics(model_a, model_b, batches(1), spec, groups=["ff.0"])
    with pytest.raises(ConfigError, match="no feature set 'ff.1'"):
        get_method("ff").fit(FitInputs(spec, statistics=partial))
    with pytest.raises(ConfigError, match="no feature set 'attn.0/query'"):
        get_method("attn[linear]").fit(FitInputs(spec, statistics=statistics_without_projections(planted_pair)))


def statistics_without_projections(planted_pair):
    model_a, model_b, spec, _, _ = planted_pair
    return collect_statistics(model_a, model_b, batches(1), spec)


def test_a_method_gets_only_what_it_declared(planted_pair):
    model_a, model_b, spec, _, statistics = planted_pair
    with pytest.raises(ConfigError, match="this fit was given no statistics"):
        get_method("permute").fit(FitInputs(spec))
    with pytest.raises(ConfigError, match="given no weights"):
        get_method("weight_matching").fit(FitInputs(spec, statistics=statistics))
    with pytest.raises(ConfigError, match="given no loss"):
        weights = parameters(model_a), parameters(model_b)
        get_method("learned[init=permute]").fit(FitInputs(spec, *weights, statistics=statistics))


def test_a_method_sees_only_what_it_declared_even_when_others_need_more(planted_pair):
    model_a, model_b, spec, _, statistics = planted_pair

    class Sneaky(MergeMethod):
        reference = summary = "a test"
        needs = frozenset({STATISTICS})
        function_preserving = True

        def fit(self, inputs: FitInputs) -> dict:
            inputs.weights  # undeclared: given to the run for weight_matching, not to this method
            return {}

    inputs = fit_inputs(model_a, model_b, statistics)  # everything, as for a run with weight_matching in it
    with pytest.raises(ConfigError, match="a method read weights without declaring 'weights' in its needs"):
        fit_methods({"weight_matching": get_method("weight_matching"), "sneaky": Sneaky("sneaky")}, inputs)


def test_fit_a_subset_of_groups(planted_pair):
    _, _, spec, planted, statistics = planted_pair
    method = get_method("ff")
    found = method.fit(FitInputs(spec, statistics=statistics), groups=["ff.1"])
    assert list(found) == ["ff.1"] and torch.equal(found["ff.1"].perm, invert_permutation(planted["ff.1"]))
    with pytest.raises(ConfigError, match="does not align group 'res'"):
        method.fit(FitInputs(spec, statistics=statistics), groups=["res"])


def test_fit_methods_solves_each_shared_assignment_once_and_fits_an_init_once(monkeypatch, planted_pair):
    from lightning_merge.merge import activation_matching

    model_a, model_b, spec, _, statistics = planted_pair
    names = ["vanilla", "ff", "ff+attn[monotonic]", "ff+attn[head_perm]", "res[first]", "res[all]", "permute",
             "weight_matching", "learned[init=weight_matching,steps=1,lr=1e-9]"]
    chosen = {name: get_method(name) for name in names}
    expected = {name: method.fit(fit_inputs(model_a, model_b, statistics)) for name, method in chosen.items()}
    solved = []
    for kind, variants in activation_matching.GROUP_ALIGNERS.items():
        for variant, aligner in variants.items():
            counted = lambda stats, group, fit=aligner.fit: solved.append(group.name) or fit(stats, group)  # noqa: E731
            monkeypatch.setitem(variants, variant, activation_matching.GroupAligner(
                counted, aligner.features, aligner.function_preserving, aligner.summary))
    weight_fits = []
    fit = WeightMatching.fit
    monkeypatch.setattr(WeightMatching, "fit", lambda self, i: weight_fits.append(1) or fit(self, i))
    timings: dict[str, float] = {}
    fitted = fit_methods(chosen, fit_inputs(model_a, model_b, statistics), timings)
    assert fitted.keys() == expected.keys() == timings.keys() and fitted["vanilla"] == {}
    for name in names:
        assert fitted[name].keys() == expected[name].keys(), name
        for group, alignment in expected[name].items():
            assert torch.equal(fitted[name][group].perm, alignment.perm), (name, group)
    # ff.0/ff.1 once; attn.* once per variant (monotonic, head_perm); res once per variant (first, all)
    assert sorted(solved) == sorted(["ff.0", "ff.1", "attn.0", "attn.1", "attn.0", "attn.1", "res", "res"])
    assert len(weight_fits) == 1  # learned starts from weight_matching's fit, not a second one


def test_a_new_method_is_one_class_and_a_registry_entry(monkeypatch, planted_pair):
    """The worked example of docs/architecture.md: a method that only reverses the FF units of every layer."""

    class ReversedFF(MergeMethod):
        reference = "docs/architecture.md, worked example"
        summary = "reverse every FF layer's units"
        needs = frozenset()
        function_preserving = True

        def fit(self, inputs: FitInputs) -> dict[str, Permutation]:
            groups = inputs.spec.groups_of_kind(["ff"])
            return {name: Permutation(torch.arange(inputs.spec.groups[name].size).flip(0)) for name in groups}

    monkeypatch.setitem(METHODS, "reversed_ff", ReversedFF)
    _, _, spec, _, _ = planted_pair
    method = get_method("reversed_ff")
    assert isinstance(method, ReversedFF) and "reversed_ff" in known_names()
    assert set(method.fit(FitInputs(spec))) == {"ff.0", "ff.1"}
    assert isinstance(get_method("ff"), ActivationMatching)

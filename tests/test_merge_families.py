"""Every family record, through one tiny-model factory: its spec covers the model, random alignments of every group
(alone and together) leave every output unchanged in float64, planted permutations are recovered, and a pair of two
families is refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import family_tasks, tiny_batch, tiny_config, tiny_model

from lightning_merge.errors import ArchitectureMismatch, UnsupportedModel
from lightning_merge.merge.alignment import HeadLinear, apply_alignments, permutations
from lightning_merge.merge.families import ARCHITECTURES, FAMILIES, LM_TASKS, model_inputs
from lightning_merge.merge.features import collect_statistics
from lightning_merge.merge.interpolate import load_state_dict_tied
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.permute import invert_permutation, random_permutations
from lightning_merge.merge.spec import spec_for_model, spec_for_pair

TOLERANCE = 1e-10
KINDS = [("ff",), ("attn",), ("res",), ("ff", "attn", "res")]
FAMILY_TASKS = family_tasks()
LM_FAMILIES = [(name, task) for name, task in FAMILY_TASKS if task in LM_TASKS]


def random_model(family: str, task: str) -> torch.nn.Module:
    """A tiny float64 model with every weight moved well away from its init (sharp attention, LayerNorm gains
    and biases far from 1 and 0), so that a wrong move of any axis shows in the outputs."""
    model = tiny_model(family, task).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def outputs(model: torch.nn.Module, family: str) -> torch.Tensor:
    return model(**model_inputs(tiny_batch(family), FAMILIES[family]))[0]


def aligned_copy(model: torch.nn.Module, alignments: dict) -> torch.nn.Module:
    copy = type(model)(model.config).double().eval()
    load_state_dict_tied(copy, apply_alignments(model.state_dict(), spec_for_model(model), alignments))
    return copy


def random_head_linear(spec, generator: torch.Generator) -> dict[str, HeadLinear]:
    out = {}
    for name in spec.groups_of_kind(["attn"]):
        group = spec.groups[name]
        heads, dim = group.num_heads, group.head_dim
        perm = (torch.randperm(heads, generator=generator)[:, None] * dim + torch.arange(dim)).reshape(-1)
        maps = {s: torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64) + 2 * torch.eye(dim)
                for s in group.subspaces}
        out[name] = HeadLinear(perm, maps)
    return out


@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
def test_spec_covers_every_floating_weight_and_names_real_modules(family, task):
    model = tiny_model(family, task)
    spec = spec_for_model(model)
    split = spec.split(model.state_dict())
    assert {name for name, t in split.items() if torch.is_floating_point(t)} == set(spec.axes)
    assert spec.groups["ff.1"].size == 24 and spec.groups["res"].size == 16 and spec.groups["attn.0"].num_heads == 4
    for points in spec.points.values():
        for point in points:
            model.get_submodule(point.module)
    assert len(spec.points["res"]) == 2 * 2 + 1  # the stream after (post-LN) or before (pre-LN) every LayerNorm
    assert spec.join(split).keys() == model.state_dict().keys()
    assert all(torch.equal(spec.join(split)[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("kinds", KINDS, ids="+".join)
@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
@torch.no_grad()
def test_random_permutation_preserves_outputs(family, task, kinds):
    model = random_model(family, task)
    spec = spec_for_model(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(1), kinds)
    permuted = aligned_copy(model, permutations(perms))
    moved = [name for name, value in model.state_dict().items() if not torch.equal(permuted.state_dict()[name], value)]
    assert moved  # the check below is not vacuous
    expected = outputs(model, family)
    if task == "base" and "res" in perms:  # a bare base model outputs the residual stream itself, permuted
        expected = expected.index_select(-1, perms["res"])
    assert (outputs(permuted, family) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
@torch.no_grad()
def test_random_head_linear_maps_preserve_outputs(family, task):
    model = random_model(family, task)
    aligned = aligned_copy(model, random_head_linear(spec_for_model(model), torch.Generator().manual_seed(2)))
    assert (outputs(aligned, family) - outputs(model, family)).abs().max().item() <= TOLERANCE


def lm_batches(family: str, count: int = 6) -> list[dict[str, torch.Tensor]]:
    return [tiny_batch(family, seed=seed) for seed in range(count)]


@pytest.mark.parametrize("method", ["ff+attn+res", "weight_matching"])
@pytest.mark.parametrize(("family", "task"), LM_FAMILIES)
@torch.no_grad()
def test_planted_permutations_are_recovered(family, task, method):
    model_a = random_model(family, task)
    spec = spec_for_model(model_a)
    planted = random_permutations(spec, torch.Generator().manual_seed(7))
    model_b = aligned_copy(model_a, permutations(planted))
    statistics = collect_statistics(model_a, model_b, lm_batches(family), spec)
    weights = ({n: p.detach() for n, p in m.named_parameters()} for m in (model_a, model_b))
    found = get_method(method).fit(FitInputs(spec, *weights, statistics))
    for group, alignment in found.items():
        assert torch.equal(alignment.perm, invert_permutation(planted[group])), group


def test_pairs_of_two_families_are_refused_naming_both():
    with pytest.raises(ArchitectureMismatch, match="differ in family: 'bert' vs 'roberta'"):
        spec_for_pair(tiny_model("bert"), tiny_model("roberta"))
    with pytest.raises(ArchitectureMismatch, match="differ in family: 'gpt2' vs 'distilbert'"):
        spec_for_pair(tiny_model("gpt2", "causal_lm"), tiny_model("distilbert", "masked_lm"))


def test_unsupported_class_lists_the_supported_ones():
    from transformers import ElectraConfig, ElectraForMaskedLM

    model = ElectraForMaskedLM(ElectraConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=24, embedding_size=16))
    with pytest.raises(UnsupportedModel, match="no permutation spec for ElectraForMaskedLM; supported: BertModel, .*"
                                               "GPT2LMHeadModel"):
        spec_for_model(model)
    assert {family.name for family in ARCHITECTURES.values()} == set(FAMILIES)


def test_fused_projection_parts_are_the_query_key_and_value_slices():
    model = tiny_model("gpt2", "causal_lm")
    spec = spec_for_model(model)
    fused = model.state_dict()["transformer.h.0.attn.c_attn.weight"]  # Conv1D: (in, 3 * out)
    parts = spec.split(model.state_dict())
    assert torch.equal(parts["transformer.h.0.attn.c_attn.weight#key"], fused[:, 16:32])
    assert spec.axes["transformer.h.0.attn.c_attn.weight#key"][1].role == "in"  # keys read the qk subspace
    assert spec.points["attn.1/value"][0].key == "transformer.h.1.attn.c_attn:output[2/3]"


def test_tiny_configs_differ_only_where_families_do():
    assert tiny_config("gpt2").n_inner == tiny_config("bert").intermediate_size == 24


def test_a_new_family_is_one_record(monkeypatch):
    """docs/architecture.md's worked example: ELECTRA's generator as one record, exact with no other code."""
    from dataclasses import replace

    from transformers import ElectraConfig, ElectraForMaskedLM

    from lightning_merge.merge import families
    from lightning_merge.merge.families import BASE, BERT, MASKED_LM, RESIDUAL, Decoder, Dense, Norm

    electra = replace(
        BERT, name="electra", model_type="electra", base="electra",
        classes={BASE: "ElectraModel", MASKED_LM: "ElectraForMaskedLM"},
        class_heads={"ElectraModel": (), "ElectraForMaskedLM": ("mlm",)},
        heads={"mlm": (Dense("generator_predictions.dense", RESIDUAL, RESIDUAL),
                       Norm("generator_predictions.LayerNorm"), Decoder("generator_lm_head"))},
        lm_head=("generator_predictions", "generator_lm_head"),
    )
    monkeypatch.setitem(families.FAMILIES, "electra", electra)
    monkeypatch.setitem(families.ARCHITECTURES, "ElectraForMaskedLM", electra)
    config = ElectraConfig(vocab_size=40, embedding_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=24, max_position_embeddings=24)
    model = ElectraForMaskedLM(config).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    spec = spec_for_model(model)
    permuted = aligned_copy(model, permutations(random_permutations(spec, torch.Generator().manual_seed(1))))
    batch = tiny_batch("bert")
    assert (permuted(**batch).logits - model(**batch).logits).abs().max().item() <= TOLERANCE

"""Folding LayerNorm gains into their readers keeps a pre-LN model's function, and then an orthogonal map of the
residual stream (fixing the all-ones direction) is exact; families where it cannot be are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Orthogonal, apply_alignments, permutations
from lightning_merge.merge.families import FAMILIES, model_inputs
from lightning_merge.merge.fold import fold_layer_norms
from lightning_merge.merge.interpolate import load_state_dict_tied
from lightning_merge.merge.matching import procrustes_fixing_ones
from lightning_merge.merge.permute import random_orthogonal_fixing_ones, random_permutations
from lightning_merge.merge.spec import spec_for_model

TOLERANCE = 1e-10
TASKS = ["causal_lm", "sequence_classification"]


def random_gpt2(task: str) -> torch.nn.Module:
    model = tiny_model("gpt2", task).double().eval()
    with torch.no_grad():  # gains far from 1, sharp attention: a wrong fold or map shows
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def outputs(model: torch.nn.Module) -> torch.Tensor:
    return model(**model_inputs(tiny_batch("gpt2"), FAMILIES["gpt2"]))[0]


def untied_model(model: torch.nn.Module, state: dict, untied: list[str]) -> torch.nn.Module:
    config = model.config.__class__.from_dict({**model.config.to_dict(), "tie_word_embeddings": not untied})
    copy = type(model)(config).double().eval()
    load_state_dict_tied(copy, state)
    return copy


@pytest.mark.parametrize("task", TASKS)
@torch.no_grad()
def test_folding_keeps_the_function_and_unties_a_reader_behind_the_final_norm(task):
    model = random_gpt2(task)
    spec = spec_for_model(model)
    state, folded_spec, untied = fold_layer_norms(model.state_dict(), spec)
    assert untied == (["lm_head.weight"] if task == "causal_lm" else [])
    assert torch.equal(state["transformer.h.1.ln_2.weight"], torch.ones(16, dtype=torch.float64))
    folded = untied_model(model, state, untied)
    assert (outputs(folded) - outputs(model)).abs().max().item() <= TOLERANCE
    assert folded_spec.norms_folded and "lm_head.weight" not in folded_spec.ties


@pytest.mark.parametrize("task", TASKS)
@torch.no_grad()
def test_orthogonal_residual_map_with_permutations_is_exact_on_folded_norms(task):
    model = random_gpt2(task)
    state, spec, untied = fold_layer_norms(model.state_dict(), spec_for_model(model))
    generator = torch.Generator().manual_seed(4)
    alignments = {**permutations(random_permutations(spec, generator, ("ff", "attn"))),
                  "res": Orthogonal(random_orthogonal_fixing_ones(16, generator))}
    aligned = untied_model(model, apply_alignments(state, spec, alignments), untied)
    assert (outputs(aligned) - outputs(model)).abs().max().item() <= TOLERANCE
    moved = aligned.state_dict()["transformer.h.0.attn.c_attn.weight"] - state["transformer.h.0.attn.c_attn.weight"]
    assert moved.abs().max() > 0.1  # not vacuous


def test_an_orthogonal_map_refuses_unfolded_gains():
    model = tiny_model("gpt2", "causal_lm")
    spec = spec_for_model(model)
    with pytest.raises(ConfigError, match="cannot act on a LayerNorm gain; fold the gains"):
        apply_alignments(model.state_dict(), spec, {"res": Orthogonal(random_orthogonal_fixing_ones(16))})
    base = tiny_model("gpt2", "base")  # its final LayerNorm has no reader to fold into: its output is the output
    state, folded, _ = fold_layer_norms(base.state_dict(), spec_for_model(base))
    with pytest.raises(ConfigError, match="cannot act on a LayerNorm gain"):
        apply_alignments(state, folded, {"res": Orthogonal(random_orthogonal_fixing_ones(16))})


@pytest.mark.parametrize(("family", "reason"), [
    ("bert", "bert is post-LayerNorm: .* use res \\(a permutation\\)"),
    ("distilbert", "distilbert is post-LayerNorm"),
    ("roberta-prelayernorm", "normalizes the summed embeddings with a LayerNorm \\(embeddings.LayerNorm\\)"),
])
def test_families_whose_norms_touch_the_stream_are_refused_with_the_reason(family, reason):
    model = tiny_model(family, "masked_lm")
    with pytest.raises(ConfigError, match=reason):
        fold_layer_norms(model.state_dict(), spec_for_model(model))


def test_orthogonal_checks_its_matrix():
    group = spec_for_model(tiny_model("gpt2", "causal_lm")).groups["res"]
    Orthogonal(random_orthogonal_fixing_ones(16)).check(group)
    rotation = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64)).Q  # orthogonal, but moves the ones
    with pytest.raises(ConfigError, match="not orthogonal with the all-ones direction fixed"):
        Orthogonal(rotation).check(group)
    with pytest.raises(ConfigError, match="not a finite 16x16"):
        Orthogonal(torch.eye(15)).check(group)


def test_procrustes_fixing_ones_recovers_a_planted_map():
    planted = random_orthogonal_fixing_ones(12, torch.Generator().manual_seed(5))
    features_b = torch.randn(500, 12, dtype=torch.float64)
    features_b -= features_b.mean(dim=1, keepdim=True)  # LayerNorm-centred tokens, as the stream is read
    features_a = features_b @ planted.T
    found = procrustes_fixing_ones(features_a.T @ features_b / 500)
    assert (found - planted).abs().max() < 1e-10


def test_learned_cannot_start_from_an_orthogonal_residual_map():
    from lightning_merge.merge.methods import get_method

    with pytest.raises(ConfigError, match="cannot start from; use res or res\\[all\\]"):
        get_method("learned[init=ff+attn+res[orthogonal]]")
    with pytest.raises(ConfigError, match="bert is post-LayerNorm"):
        get_method("res[fold]").check_spec(spec_for_model(tiny_model("bert", "masked_lm")))

"""Learned alignments (straight-through estimator, per-head linear maps): gradients reach every trainable tensor,
training lowers the loss of the interpolated model, starting points are kept exactly, and B stays exact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config as family_config
from torch.func import functional_call
from transformers import BertForMaskedLM, PretrainedConfig

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import HeadLinear, Permutation, apply_alignments, permutations
from lightning_merge.merge.interpolate import interpolate_state_dicts, load_state_dict_tied
from lightning_merge.merge.learned import LearnedAlignment, starting_head_linear
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.objectives import MaskedLMObjective

VOCAB = 40


def tiny_config() -> PretrainedConfig:
    return family_config("bert", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, max_position_embeddings=32,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def token_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (16, 12), generator=generator)
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.3, input_ids, -100)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)


def trained(seed: int) -> BertForMaskedLM:
    """A tiny MLM overfitted on one fixed batch, so that a midpoint of two such models costs loss."""
    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = token_batch()
    for _ in range(80):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    model_a, model_b = trained(1), trained(2)
    objective = MaskedLMObjective(model_a)

    def loss(params, batch):
        loss_sum, count = functional_call(objective, {f"model.{k}": v for k, v in params.items()}, (batch,))
        return loss_sum / count

    weights = tuple({n: p.detach() for n, p in m.named_parameters()} for m in (model_a, model_b))
    return model_a, model_b, spec_for_model(model_a), weights, loss


def midpoint_loss(pair, alignments) -> float:
    model_a, model_b, spec, (weights_a, _), loss = pair
    aligned = apply_alignments(model_b.state_dict(), spec, alignments)
    with torch.no_grad():
        return loss(interpolate_state_dicts(weights_a, {n: aligned[n] for n in weights_a}, 0.5), token_batch()).item()


@pytest.mark.parametrize("linear", [False, True], ids=["perm", "linear"])
def test_every_trainable_tensor_gets_a_gradient(pair, linear):
    _, _, spec, (weights_a, weights_b), loss = pair
    start = get_method("weight_matching").fit(FitInputs(spec, weights_a, weights_b))
    module = LearnedAlignment(spec, weights_a, weights_b, start, loss, linear_attention=linear)
    module(token_batch()).backward()
    trainable = dict(module.named_parameters())
    assert trainable and any(name.startswith("log_maps") for name in trainable) == linear
    dead = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("linear", [False, True], ids=["perm", "linear"])
def test_training_lowers_the_midpoint_loss_and_keeps_b_exact(pair, linear):
    model_a, model_b, spec, (weights_a, weights_b), loss = pair
    start = get_method("weight_matching").fit(FitInputs(spec, weights_a, weights_b))
    module = LearnedAlignment(spec, weights_a, weights_b, start, loss, linear_attention=linear, lambdas=(0.5, 0.5))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        module(token_batch()).backward()
        optimizer.step()
    learned = module.alignments()
    before, after = midpoint_loss(pair, start), midpoint_loss(pair, learned)
    # measured 0.381 -> 0.370 (permutations) and -> 0.339 (with maps) at the seeds here; half of that is required
    assert after < before - (0.02 if linear else 0.005), (before, after)
    assert isinstance(learned["attn.0"], HeadLinear if linear else Permutation)
    aligned = BertForMaskedLM(tiny_config()).eval()
    load_state_dict_tied(aligned, apply_alignments(model_b.state_dict(), spec, learned))
    batch = {k: v for k, v in token_batch(3).items() if k != "labels"}
    with torch.no_grad():
        assert (aligned(**batch).logits - model_b(**batch).logits).abs().max().item() <= 1e-4  # float32 models


def test_a_permutation_start_becomes_head_pairing_and_permutation_matrices(pair):
    model_a, _, spec, _, _ = pair
    group = spec.groups["attn.1"]
    perm = random_permutations(spec, torch.Generator().manual_seed(4), ("attn",))["attn.1"]
    start = starting_head_linear(Permutation(perm), group)
    state = {k: v.double() for k, v in model_a.state_dict().items()}
    as_permutation = apply_alignments(state, spec, permutations({"attn.1": perm}))
    as_maps = apply_alignments(state, spec, {"attn.1": start})
    assert all(torch.equal(as_maps[name], as_permutation[name]) for name in state)


def test_a_start_with_linear_maps_needs_attn_linear(pair):
    _, _, spec, (weights_a, weights_b), loss = pair
    group = spec.groups["attn.0"]
    eye = torch.eye(group.head_dim, dtype=torch.float64).repeat(group.num_heads, 1, 1)
    start = {"attn.0": HeadLinear(torch.arange(group.size), {"qk": 2 * eye})}
    with pytest.raises(ConfigError, match="group 'attn.0' is a head_linear.*learn it with attn=linear"):
        LearnedAlignment(spec, weights_a, weights_b, start, loss)
    LearnedAlignment(spec, weights_a, weights_b, start, loss, linear_attention=True)  # kept as its start

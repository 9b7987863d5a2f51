"""ZipIt!'s two-headed model: a trunk's stream fed to every model's own tail, and the mixture of their predictions."""

from __future__ import annotations

import pytest
import torch
from conftest import family_tasks, tiny_batch, tiny_model
from torch.func import functional_call

from lightning_merge.merge.alignment import Zip, apply_alignments
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.two_headed import mixture_logits, two_headed_outputs
from lightning_merge.modules.merge import TASKS

CASES = [(family, task) for family, task in family_tasks() if task in TASKS]


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


def labelled(batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    if task == "sequence_classification":
        return dict(batch, labels=torch.tensor([0, 2, 1]))
    return dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))


def in_trunk(name: str, spec, split: int) -> bool:
    """Whether a parameter is the trunk's: an embedding's or a layer's before ``split`` (tied decoders are not)."""
    family = spec.family
    modules = [spec.base_prefix + m for m in (*family.embeddings, family.embeddings_norm) if m]
    modules += [spec.layer_module(i) for i in range(split)]
    return any(name.startswith(module + ".") for module in modules)


@pytest.mark.parametrize("split", [0, 1])
@pytest.mark.parametrize(("family", "task"), CASES)
def test_a_tail_reads_the_trunks_stream_in_its_own_basis(family, task, split) -> None:
    torch.manual_seed(0)
    model_a = tiny_model(family, task).double().eval()
    model_b = tiny_model(family, task).double().eval()
    spec = spec_for_model(model_a)
    objective = TASKS[task].objective_class(model_a)
    batch = labelled(tiny_batch(family), task)
    # the trunk: B with its stream permuted (the same function), read back through the permutation's inverse
    size = spec.groups["res"].size
    swap = torch.eye(size, dtype=torch.float64)[torch.randperm(size, generator=torch.Generator().manual_seed(1))]
    permuted_b = apply_alignments(model_b.state_dict(), spec, {"res": Zip(swap, swap.T)})
    trunk = {name: permuted_b[name] for name in params_of(model_b)}
    a, b = params_of(model_a), params_of(model_b)
    # what it must equal: one model with B's embeddings and first layers and A's own later layers and heads
    hybrid = {name: b[name] if in_trunk(name, spec, split) else value for name, value in a.items()}
    expected = functional_call(objective, {f"model.{k}": v for k, v in hybrid.items()}, (batch,), tie_weights=False)
    layer = spec.layer_module(split)
    got = two_headed_outputs(objective, layer, trunk, [a], [swap.T], [1.0], batch)
    assert got[1] == expected[1]
    assert (got[0] - expected[0]).abs() <= 1e-10
    own = objective(batch)
    assert (got[0] - own[0]).abs() > 1e-6  # the trunk is not A's: the tail did read it
    # two heads that are the same model mix into that model
    twice = two_headed_outputs(objective, layer, trunk, [a, a], [swap.T, swap.T], [0.3, 0.7], batch)
    assert (twice[0] - expected[0]).abs() <= 1e-10
    if task == "sequence_classification":
        assert torch.allclose(twice[2].softmax(-1), expected[2].softmax(-1), atol=1e-12)


def test_the_mixture_is_the_weighted_mean_of_the_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    mixed = mixture_logits(logits, weights)
    expected = sum(w * x.softmax(-1) for w, x in zip(weights, logits))
    assert torch.allclose(mixed.exp(), expected, atol=1e-14)
    assert torch.allclose(mixed.softmax(-1), expected, atol=1e-14)  # already normalised: logits of the mixture
    regression = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [6.0]])]
    assert torch.equal(mixture_logits(regression, [0.25, 0.75]), torch.tensor([[2.5], [5.0]]))


def test_a_tail_of_weight_zero_does_not_run() -> None:
    torch.manual_seed(0)
    model = tiny_model("bert", "masked_lm").double().eval()
    spec = spec_for_model(model)
    objective = TASKS["masked_lm"].objective_class(model)
    batch = labelled(tiny_batch("bert"), "masked_lm")
    params = params_of(model)
    broken = {name: torch.full_like(value, float("nan")) for name, value in params.items()}
    identity = torch.eye(spec.groups["res"].size, dtype=torch.float64)
    got = two_headed_outputs(objective, spec.layer_module(1), params, [params, broken], [identity, identity],
                             [1.0, 0.0], batch)
    assert (got[0] - objective(batch)[0]).abs() <= 1e-10

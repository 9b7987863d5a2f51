"""Joint alignment of N models: planted copies are all brought back exactly, joint alignments compose around every
cycle while pairwise matching need not, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import apply_alignments, permutations
from lightning_merge.merge.joint import (
    align_to_reference,
    cycle_consistency_error,
    merge_many,
    pairwise_from_joint,
)
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.weight_matching import weight_matching


def random_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = tiny_model("bert", "masked_lm").double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.state_dict()


@pytest.fixture(scope="module")
def spec():
    return spec_for_model(tiny_model("bert", "masked_lm"))


@pytest.mark.parametrize("joint", [merge_many, align_to_reference])
def test_planted_copies_are_all_aligned_back_exactly(spec, joint):
    reference = random_state(0)
    planted = [random_permutations(spec, torch.Generator().manual_seed(seed)) for seed in (1, 2, 3)]
    copies = [apply_alignments(reference, spec, permutations(perms)) for perms in planted]
    found = joint(spec, [reference, *copies])
    assert all(torch.equal(p.perm, torch.arange(p.perm.numel())) for p in found[0].values())
    for copy, alignments in zip(copies, found[1:]):
        back = apply_alignments(copy, spec, alignments)
        assert max((back[n] - reference[n]).abs().max().item() for n in reference) <= 1e-12


def test_joint_alignments_compose_around_every_cycle_and_pairwise_ones_need_not(spec):
    states = [random_state(seed) for seed in (10, 11, 12)]
    pairwise = {(i, j): weight_matching(spec, states[i], states[j]) for i in range(3) for j in range(i + 1, 3)}
    assert cycle_consistency_error(pairwise) > 0.05  # unrelated models: pairwise matches disagree around the cycle
    assert cycle_consistency_error(pairwise_from_joint(merge_many(spec, states))) == 0.0


def test_joint_alignment_needs_two_models_and_cycles_three(spec):
    with pytest.raises(ConfigError, match="at least two models, got 1"):
        merge_many(spec, [random_state(0)])
    with pytest.raises(ConfigError, match="at least three models"):
        cycle_consistency_error(pairwise_from_joint(align_to_reference(spec, [random_state(0), random_state(1)])))

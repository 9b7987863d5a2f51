"""Matching: planted permutations come back; attention variants respect (or ignore) heads as documented."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.errors import DataError
from lightning_merge.merge.matching import (
    ATTENTION_VARIANTS,
    FUNCTION_PRESERVING_ATTENTION,
    match_features,
    match_head_perm,
    match_ignore_heads,
    match_monotonic,
)
from lightning_merge.merge.permute import random_group_permutation
from lightning_merge.merge.spec import PermGroup
from lightning_merge.merge.stats import PairStatistics


def planted_correlation(perm: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Correlation of A's features with B = A's features moved so that B[:, perm[i]] = A[:, i]."""
    generator = torch.Generator().manual_seed(seed)
    x_a = torch.randn(400, perm.numel(), generator=generator, dtype=torch.float64)
    x_b = torch.empty_like(x_a)
    x_b[:, perm] = x_a + 0.3 * torch.randn(x_a.shape, generator=generator, dtype=torch.float64)
    stats = PairStatistics(perm.numel())
    stats.update(x_a, x_b)
    return stats.correlation()


def is_head_aware(perm: torch.Tensor, num_heads: int) -> bool:
    source_heads = perm.reshape(num_heads, -1) // (perm.numel() // num_heads)  # (heads, head_dim)
    return bool((source_heads == source_heads[:, :1]).all())


def test_match_features_recovers_planted_and_orientation():
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    recovered = match_features(planted_correlation(perm))
    assert torch.equal(recovered, perm)
    x_a = torch.randn(5, 10)
    x_b = torch.empty_like(x_a)
    x_b[:, perm] = x_a
    assert torch.equal(x_b[:, recovered], x_a)  # perm[i] = the B feature that goes to position i


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_match_features_overwrite_gives_the_same_assignment(kind):
    generator = torch.Generator().manual_seed(3)
    corr = torch.randn(40, 40, generator=generator, dtype=torch.float64)
    if kind == "ties":
        corr = corr.round()  # many equal entries: both paths must break ties the same way
    original = corr.clone()
    kept = match_features(corr)
    assert torch.equal(corr, original)  # the default leaves the caller's matrix alone
    assert torch.equal(match_features(corr, overwrite=True), kept)
    assert torch.equal(corr, -original)  # overwrite negated it in place instead of copying


@pytest.mark.parametrize("variant", ["head_perm", "ignore_heads"])
def test_attention_variants_recover_head_aware_plant(variant):
    group = PermGroup("attn.0", "attn", 12, num_heads=3)
    perm = random_group_permutation(group, torch.Generator().manual_seed(2))
    recovered = ATTENTION_VARIANTS[variant](planted_correlation(perm), 3)
    assert torch.equal(recovered, perm)


def test_monotonic_keeps_heads_in_place():
    group = PermGroup("attn.0", "attn", 12, num_heads=3)
    perm = random_group_permutation(group, torch.Generator().manual_seed(3))
    recovered = match_monotonic(planted_correlation(perm), 3)
    assert torch.equal(recovered.reshape(3, 4) // 4, torch.arange(3)[:, None].expand(3, 4))


def test_head_perm_stays_head_aware_where_ignore_heads_crosses_heads():
    # A's features 0..3 (head 0) match B's 0, 1 (head 0) and 2, 3 (head 1) best: the free assignment splits them.
    corr = torch.full((8, 8), 0.1, dtype=torch.float64)
    for a, b in enumerate([0, 1, 4, 5, 2, 3, 6, 7]):
        corr[a, b] = 0.9
    free = match_ignore_heads(corr, 2)
    assert not is_head_aware(free, 2)
    aware = match_head_perm(corr, 2)
    assert is_head_aware(aware, 2)
    assert FUNCTION_PRESERVING_ATTENTION == {"head_perm": True, "monotonic": True, "ignore_heads": False}


def test_head_perm_composes_head_and_inner_assignments():
    corr = torch.zeros(4, 4, dtype=torch.float64)  # heads of size 2: A head 0 <-> B head 1, swapped dims
    corr[0, 3] = corr[1, 2] = corr[2, 1] = corr[3, 0] = 1.0
    assert match_head_perm(corr, 2).tolist() == [3, 2, 1, 0]


def test_bad_correlations():
    with pytest.raises(DataError, match="square"):
        match_features(torch.zeros(3, 4))
    with pytest.raises(DataError, match="NaN"):
        match_features(torch.full((3, 3), float("nan")))
    with pytest.raises(DataError, match="into 4 heads"):
        match_head_perm(torch.zeros(6, 6), 4)

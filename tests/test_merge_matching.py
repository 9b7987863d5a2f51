"""Matching: planted permutations come back; attention variants respect (or ignore) heads as documented."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.errors import DataError
from lightning_merge.merge.alignment import moves_heads_whole
from lightning_merge.merge.matching import (
    head_pairing,
    head_procrustes,
    match_features,
    match_head_perm,
    match_ignore_heads,
    match_monotonic,
    orthogonal_procrustes,
    whole_head_permutation,
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


@pytest.mark.parametrize("match", [match_head_perm, match_ignore_heads], ids=["head_perm", "ignore_heads"])
def test_attention_variants_recover_head_aware_plant(match):
    group = PermGroup("attn.0", "attn", 12, num_heads=3)
    perm = random_group_permutation(group, torch.Generator().manual_seed(2))
    recovered = match(planted_correlation(perm), 3)
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
    assert not moves_heads_whole(free, 2)
    aware = match_head_perm(corr, 2)
    assert moves_heads_whole(aware, 2)


def test_head_perm_composes_head_and_inner_assignments():
    corr = torch.zeros(4, 4, dtype=torch.float64)  # heads of size 2: A head 0 <-> B head 1, swapped dims
    corr[0, 3] = corr[1, 2] = corr[2, 1] = corr[3, 0] = 1.0
    assert match_head_perm(corr, 2).tolist() == [3, 2, 1, 0]


def test_orthogonal_procrustes_recovers_a_planted_rotation_in_the_orientation_of_the_cross_moment():
    generator = torch.Generator().manual_seed(4)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64)).Q
    x_b = torch.randn(500, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2.0, 6)
    x_a = x_b @ rotation.T  # x_a = T x_b per token
    cross = x_a.T @ x_b / len(x_a)  # E[x_a x_bᵀ]
    found = orthogonal_procrustes(cross)
    torch.testing.assert_close(found, rotation, rtol=0, atol=1e-10)
    torch.testing.assert_close(found @ found.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_head_procrustes_fits_each_head_of_a_from_its_paired_head_of_b():
    generator = torch.Generator().manual_seed(5)
    heads, dim = 3, 4
    head_of_a = torch.tensor([2, 0, 1])
    rotations = torch.linalg.qr(torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64)).Q
    x_b = torch.randn(800, heads * dim, generator=generator, dtype=torch.float64)
    x_a = torch.cat([x_b[:, head_of_a[h] * dim:(head_of_a[h] + 1) * dim] @ rotations[h].T for h in range(heads)], 1)
    maps = head_procrustes(x_a.T @ x_b / len(x_a), head_of_a, heads)
    torch.testing.assert_close(maps, rotations, rtol=0, atol=1e-10)


def test_head_pairing_and_whole_head_permutation():
    perm = torch.tensor([5, 4, 1, 0, 2, 3])  # 3 heads of 2: A's head 0 takes B's head 2, 1 <- 0, 2 <- 1
    assert head_pairing(perm, 3).tolist() == [2, 0, 1]
    assert whole_head_permutation(torch.tensor([2, 0, 1]), 2).tolist() == [4, 5, 0, 1, 2, 3]


def test_bad_correlations():
    with pytest.raises(DataError, match="square"):
        match_features(torch.zeros(3, 4))
    with pytest.raises(DataError, match="NaN"):
        match_features(torch.full((3, 3), float("nan")))
    with pytest.raises(DataError, match="into 4 heads"):
        match_head_perm(torch.zeros(6, 6), 4)

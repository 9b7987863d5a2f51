"""Permutation helpers: inverting one, and random function-preserving ones for tests and benchmarks.

Orientation (as everywhere): ``perm[i]`` is the index in B's feature order that goes to position ``i``;
`lightning_merge.merge.alignment.apply_alignments` applies them (as `Permutation` alignments) through the spec.
"""

from __future__ import annotations

import torch

from lightning_merge.merge.spec import PermGroup, PermutationSpec


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inv[perm[i]] = i``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def random_group_permutation(group: PermGroup, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random perm of one group; attention groups get a head-aware one (heads moved whole, dims within heads)."""
    if group.kind != "attn":
        return torch.randperm(group.size, generator=generator)
    heads = torch.randperm(group.num_heads, generator=generator)
    within = [torch.randperm(group.head_dim, generator=generator) for _ in range(group.num_heads)]
    # position (h, j) takes B's feature (heads[h], within[h][j]); shape (num_heads, head_dim) then flattened
    return torch.stack([heads[h] * group.head_dim + within[h] for h in range(group.num_heads)]).reshape(-1)


def random_permutations(
    spec: PermutationSpec, generator: torch.Generator | None = None, kinds: tuple[str, ...] = ("ff", "attn", "res")
) -> dict[str, torch.Tensor]:
    """Random function-preserving perms for every group of the given kinds (a test helper)."""
    return {name: random_group_permutation(spec.groups[name], generator) for name in spec.groups_of_kind(kinds)}


def random_orthogonal(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-distributed orthogonal (size, size) float64 matrix (from torch's global RNG without ``generator``)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_orthogonal_fixing_ones(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random (Haar on the complement) orthogonal (size, size) float64 matrix with ``matrix @ 1 = 1``."""
    from lightning_merge.merge.matching import fixing_ones

    return fixing_ones(random_orthogonal(size - 1, generator))

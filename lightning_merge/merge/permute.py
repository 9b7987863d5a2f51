"""Apply permutations to a state dict through a `PermutationSpec` (one generic code path for every group).

Orientation: a permutation of group ``g`` is a LongTensor ``perm`` with ``perm[i]`` = the index in B's feature order
that goes to position ``i``. Every axis the group acts on is gathered with it (``index_select(axis, perm)``), rows and
input columns alike, so the permuted model computes the same function. Matching returns perms in this orientation for
B, so ``apply_permutations(sd_b, spec, perms)`` puts B's features in A's order. If ``sd_b = apply_permutations(sd_a,
spec, planted)``, the perm that re-aligns B with A is ``invert_permutation(planted)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_merge.errors import ConfigError, UnknownNameError
from lightning_merge.merge.spec import PermGroup, PermutationSpec


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Check each perm names a group of ``spec`` and is a permutation of that group's size.

    Raises:
        UnknownNameError: a perm for a group the spec does not have.
        ConfigError: a perm of the wrong size or one that is not a permutation.
    """
    for name, perm in perms.items():
        if name not in spec.groups:
            known = ", ".join(spec.groups)
            raise UnknownNameError(f"no group {name!r} in the {spec.architecture} spec; known: {known}")
        size = spec.groups[name].size
        if perm.shape != (size,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(size)):
            raise ConfigError(f"perm for group {name!r} is not a permutation of {size} features")


def apply_permutations(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every weight permuted along the axes its groups act on.

    Args:
        state_dict: weights of a model the spec describes (tied aliases may be absent).
        spec: the model's `PermutationSpec`.
        perms: group name -> LongTensor perm; groups without a perm stay in place (identity).

    Returns:
        A new dict; unpermuted entries are the input tensors themselves, tied aliases share their source's tensor.
    """
    check_permutations(spec, perms)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in spec.ties and spec.ties[name] in state_dict:
            continue  # filled from its source below, so the tie survives
        out[name] = _permute_tensor(tensor, spec.axes.get(name, ()), perms)
    for alias, source in spec.ties.items():
        if alias in state_dict and source in out:
            out[alias] = out[source]
    return {name: out[name] for name in state_dict}  # keep the input's key order


def _permute_tensor(
    tensor: torch.Tensor, axes: tuple[str | None, ...], perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    for axis, group in enumerate(axes):
        if group is not None and group in perms:
            tensor = torch.index_select(tensor, axis, perms[group].to(tensor.device))
    return tensor


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inv[perm[i]] = i``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def identity_permutations(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """An identity perm for every group of ``spec``."""
    return {name: torch.arange(group.size) for name, group in spec.groups.items()}


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

"""`weight_matching`: data-free weight matching (Ainsworth et al., Git Re-Basin, ICLR 2023, §3.2) over a spec.

Permutations of B are chosen to maximise Σ_w ⟨W_a, π(W_b)⟩ over every weight the spec describes. That is a sum of
bilinear terms in the permutations of different groups, so it is solved by coordinate descent: for one group at a
time, with every other group's alignment held fixed, the objective is linear in that group's permutation and one
assignment solves it exactly; groups are visited in a random order until a whole pass improves nothing.

Attention groups are matched head-aware (`match_head_perm` on the weight similarity), so heads move whole and the
result stays function-preserving; the residual stream is one group like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from lightning_merge.merge.alignment import Alignment, Permutation, transform_tensor
from lightning_merge.merge.matching import match_features, match_head_perm
from lightning_merge.merge.method import WEIGHTS, FitInputs, MergeMethod
from lightning_merge.merge.spec import PermutationSpec

GIT_RE_BASIN = "Ainsworth et al., Git Re-Basin, ICLR 2023, https://arxiv.org/abs/2209.04836"

# A pass counts as progress only when it raises the objective by more than this (relative to its size): without
# it, float ties could make two assignments alternate forever.
RELATIVE_PROGRESS = 1e-12


def weight_matching(
    spec: PermutationSpec,
    weights_a: Mapping[str, torch.Tensor],
    weights_b: Mapping[str, torch.Tensor],
    groups: Iterable[str] | None = None,
    init: Mapping[str, Alignment] | None = None,
    fixed: Mapping[str, Alignment] | None = None,
    max_passes: int = 100,
    generator: torch.Generator | None = None,
) -> dict[str, Permutation]:
    """Permutations of B's ``groups`` that maximise the summed inner product of A's and aligned B's weights.

    Args:
        spec: the models' spec.
        weights_a: A's weights (or any target in A's basis, e.g. a straight-through estimate); tied aliases ignored.
        weights_b: B's weights, in B's own basis.
        groups: the groups to permute (default every group of the spec).
        init: starting alignments of those groups (default identity): each pass only improves on them.
        fixed: alignments of other groups, applied to B but never changed (e.g. per-head linear maps).
        max_passes: stop after this many passes over the groups even if the last one still improved.
        generator: random source of the visiting order.

    Returns:
        group name -> `Permutation`, for every group in ``groups``.
    """
    weights_a, weights_b = spec.split(weights_a), spec.split(weights_b)  # fused projections in parts
    names = list(spec.groups if groups is None else groups)
    current: dict[str, Alignment] = {**(fixed or {}), **_starting_perms(spec, names, init)}
    used = {weight for name in names for weight, _ in spec.group_axes[name] if weight in weights_a}
    a64, b64 = ({w: _float64(weights[w]) for w in used} for weights in (weights_a, weights_b))  # once per weight
    terms = {name: _terms(spec, name, a64, b64) for name in names}
    for _ in range(max_passes):
        order = torch.randperm(len(names), generator=generator).tolist()
        improved = [_improve_group(spec, names[i], terms[names[i]], current) for i in order]
        if not any(improved):
            break
    return {name: current[name] for name in names}


def _starting_perms(spec: PermutationSpec, names: list[str], init: Mapping[str, Alignment] | None) -> dict:
    given = init or {}
    return {name: Permutation(given[name].perm if name in given else torch.arange(spec.groups[name].size))
            for name in names}


def _terms(
    spec: PermutationSpec, group: str, weights_a: Mapping[str, torch.Tensor], weights_b: Mapping[str, torch.Tensor]
) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(weight, axis, A's weight, B's weight) for every axis ``group`` acts on; tied aliases count once."""
    return [
        (weight, index, weights_a[weight], weights_b[weight])
        for weight, index in spec.group_axes[group]
        if weight not in spec.ties and weight in weights_a
    ]


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 view of a weight on its own device (no copy if it is one): a GPU forms the similarities, scipy
    solves the assignments on the CPU."""
    return tensor.detach().to(torch.float64)


def _improve_group(spec: PermutationSpec, group: str, terms: list, current: dict[str, Alignment]) -> bool:
    """Re-solve one group with the others fixed; True if the objective rose."""
    similarity = _similarity(spec, group, terms, current)  # (d_a, d_b) float64
    old = current[group].perm
    old_score = similarity[torch.arange(len(old)), old].sum().item()
    spec_group = spec.groups[group]
    if spec_group.kind == "attn":
        new = match_head_perm(similarity, spec_group.num_heads)
    else:
        new = match_features(similarity)
    new_score = similarity[torch.arange(len(new)), new].sum().item()
    if new_score > old_score + RELATIVE_PROGRESS * max(abs(old_score), 1.0):
        current[group] = Permutation(new)
        return True
    return False


def _similarity(spec: PermutationSpec, group: str, terms: list, current: Mapping[str, Alignment]) -> torch.Tensor:
    """Σ over the group's axes of A's slices against B's slices (B aligned on every other axis): (d_a, d_b)."""
    size = spec.groups[group].size
    total = None
    for weight, index, tensor_a, tensor_b in terms:
        aligned_b = transform_tensor(tensor_b, spec.axes[weight], current, skip=group)
        rows_a = tensor_a.movedim(index, 0).reshape(size, -1)
        rows_b = aligned_b.movedim(index, 0).reshape(size, -1)
        total = rows_a @ rows_b.T if total is None else total.addmm_(rows_a, rows_b.T)
    return total.cpu()


class WeightMatching(MergeMethod):
    """Git Re-Basin's data-free weight matching over every group of the spec (residual stream included)."""

    reference = GIT_RE_BASIN
    summary = "data-free: maximise Σ⟨W_a, π(W_b)⟩ by coordinate descent over the groups"
    needs = frozenset({WEIGHTS})
    function_preserving = True

    @dataclass(frozen=True)
    class Options:
        max_passes: int = 100
        seed: int = 0

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        weights_a, weights_b = inputs.weights
        generator = torch.Generator().manual_seed(self.options.seed)
        return dict(weight_matching(inputs.spec, weights_a, weights_b, max_passes=self.options.max_passes,
                                    generator=generator))

"""Joint alignment of N ≥ 2 models (plain PyTorch): every model's permutations into one basis, model 0's.

- `align_to_reference`: each model matched to the reference alone (Git Re-Basin's weight matching, pair by pair).
- `merge_many`: Git Re-Basin's MergeMany (Ainsworth et al. 2023, Alg. 3): each model in turn is matched to the mean
  of all the others as currently aligned, until a whole round changes no permutation; the common basis is then
  expressed as model 0's.
- `cycle_consistency_error`: how far pairwise alignments are from composing (P_ik = P_jk ∘ P_ij); alignments that all
  go through one basis, as the two above return, compose exactly.

Orientation as everywhere (`lightning_merge.merge.alignment`): a permutation ``perm`` of model i's group maps its
features into model 0's basis, ``perm[k]`` being model i's feature that goes to position k; model 0's own
alignments are identities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Permutation, apply_alignments
from lightning_merge.merge.permute import invert_permutation
from lightning_merge.merge.spec import PermutationSpec
from lightning_merge.merge.weight_matching import weight_matching

StateDict = Mapping[str, torch.Tensor]
Alignments = dict[str, Permutation]


def align_to_reference(
    spec: PermutationSpec, weights: Sequence[StateDict], max_passes: int = 100, seed: int = 0
) -> list[Alignments]:
    """Each model's permutations into model 0's basis, each fitted against model 0 alone."""
    _check_count(weights)
    generator = torch.Generator().manual_seed(seed)
    others = [weight_matching(spec, weights[0], w, max_passes=max_passes, generator=generator) for w in weights[1:]]
    return [_identity(spec), *others]


def merge_many(
    spec: PermutationSpec, weights: Sequence[StateDict], max_rounds: int = 50, max_passes: int = 100, seed: int = 0
) -> list[Alignments]:
    """Git Re-Basin's MergeMany: every model matched in turn to the mean of the others, until nothing changes.

    Returns:
        Per model, group -> `Permutation` into model 0's basis (identities for model 0).
    """
    _check_count(weights)
    generator = torch.Generator().manual_seed(seed)
    current = [_identity(spec) for _ in weights]
    aligned = [dict(w) for w in weights]
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(len(weights), generator=generator).tolist():
            target = _mean([aligned[j] for j in range(len(weights)) if j != i])
            found = weight_matching(spec, target, weights[i], init=current[i], max_passes=max_passes,
                                    generator=generator)
            changed |= any(not torch.equal(found[g].perm, current[i][g].perm) for g in found)
            current[i] = found
            aligned[i] = apply_alignments(weights[i], spec, found)
        if not changed:
            break
    return [_into_first_basis(alignments, current[0]) for alignments in current]


def cycle_consistency_error(pairwise: Mapping[tuple[int, int], Alignments]) -> float:
    """The share of features, over every triple i < j < k and group, where P_ik differs from P_jk ∘ P_ij.

    Args:
        pairwise: (i, j) -> group -> permutation of model j's features into model i's basis, for every i < j.
    """
    models = sorted({m for pair in pairwise for m in pair})
    wrong = total = 0
    for i in models:
        for j in (m for m in models if m > i):
            for k in (m for m in models if m > j):
                for group, direct in pairwise[(i, k)].items():
                    # k -> j -> i: position p of i's basis takes j's feature P_ij[p], which takes k's P_jk[P_ij[p]]
                    composed = pairwise[(j, k)][group].perm[pairwise[(i, j)][group].perm]
                    wrong += int((composed != direct.perm).sum())
                    total += direct.perm.numel()
    if total == 0:
        raise ConfigError("cycle consistency needs alignments of at least three models")
    return wrong / total


def pairwise_from_joint(joint: Sequence[Alignments]) -> dict[tuple[int, int], Alignments]:
    """The pairwise alignments (j into i's basis, i < j) that joint alignments into one basis imply."""
    out = {}
    for i, into_i in enumerate(joint):
        for j in range(i + 1, len(joint)):
            out[(i, j)] = {g: Permutation(joint[j][g].perm[invert_permutation(into_i[g].perm)]) for g in into_i}
    return out


def _into_first_basis(alignments: Alignments, first: Alignments) -> Alignments:
    # into the common basis by ``alignments``, then out of it into model 0's by the inverse of model 0's own
    return {g: Permutation(p.perm[invert_permutation(first[g].perm)]) for g, p in alignments.items()}


def _identity(spec: PermutationSpec) -> Alignments:
    return {name: Permutation(torch.arange(group.size)) for name, group in spec.groups.items()}


def _mean(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    return {name: sum(s[name].double() for s in states) / len(states)
            for name, tensor in states[0].items() if torch.is_floating_point(tensor)}


def _check_count(weights: Sequence[StateDict]) -> None:
    if len(weights) < 2:
        raise ConfigError(f"joint alignment needs at least two models, got {len(weights)}")

"""Joint alignment of N ≥ 2 models (plain PyTorch): every model's permutations into one basis, model 0's.

- `align_to_reference`: each model matched to the reference alone (Git Re-Basin's weight matching, pair by pair).
- `merge_many`: Git Re-Basin's MergeMany (Ainsworth et al. 2023, Alg. 3): each model in turn is matched to the mean
  of all the others as currently aligned, until a whole round changes no permutation; the common basis is then
  expressed as model 0's.
- `to_reference_by_activations`, `merge_many_by_activations` and `cycle_consistent_by_activations` (C2M3's
  synchronised Frank-Wolfe matching on activation correlations): the same for one group, from the pairwise moments
  of N models' features gathered in one statistics pass (`lightning_merge.merge.stats.JointStatistics`).
- `cycle_consistency_error`: how far pairwise alignments are from composing (P_ik = P_jk ∘ P_ij); alignments that all
  go through one basis, as the two above return, compose exactly.

Orientation as everywhere (`lightning_merge.merge.alignment`): a permutation ``perm`` of model i's group maps its
features into model 0's basis, ``perm[k]`` being model i's feature that goes to position k; model 0's own
alignments are identities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Permutation, apply_alignments
from lightning_merge.merge.permute import invert_permutation
from lightning_merge.merge.spec import PermutationSpec
from lightning_merge.merge.stats import inverse_live_std, normalise_covariance
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
            out[(i, j)] = {g: Permutation(_rebased(joint[j][g].perm, into_i[g].perm)) for g in into_i}
    return out


def _rebased(perm: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A permutation into a common basis re-expressed into the basis of the model ``base`` maps there: into the
    common basis by ``perm``, then out of it by the inverse of ``base``."""
    return perm[invert_permutation(base)]


def _into_first_basis(alignments: Alignments, first: Alignments) -> Alignments:
    return {g: Permutation(_rebased(p.perm, first[g].perm)) for g, p in alignments.items()}


def _identity(spec: PermutationSpec) -> Alignments:
    return {name: Permutation(torch.arange(group.size)) for name, group in spec.groups.items()}


def _mean(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    return {name: sum(s[name].double() for s in states) / len(states)
            for name, tensor in states[0].items() if torch.is_floating_point(tensor)}


def _check_count(weights: Sequence[StateDict]) -> None:
    if len(weights) < 2:
        raise ConfigError(f"joint alignment needs at least two models, got {len(weights)}")


# Activation-based joint alignment of one group. ``moments[(i, j)]`` (i < j) are the group's point-averaged moments of
# model i against model j, as `MergeStatistics.moments` gives them: (covariance, var_i, var_j, mean square i, mean
# square j). A matcher turns a score (rows: positions of the target basis, columns: one model's features) into the
# permutation maximising the summed score, within the group's structure (e.g. whole heads for attention).
Moments = Mapping[tuple[int, int], tuple[torch.Tensor, ...]]
Matcher = Callable[[torch.Tensor], torch.Tensor]


def correlations(moments: Moments) -> dict[tuple[int, int], torch.Tensor]:
    """Pearson correlation of every pair (rows: model i's features), dead features 0; the moments are kept."""
    return {pair: normalise_covariance(covariance.clone(), *rest) for pair, (covariance, *rest) in moments.items()}


def to_reference_by_activations(moments: Moments, num_models: int, matcher: Matcher) -> list[torch.Tensor]:
    """Each model's permutation into model 0's basis, matched to model 0 alone (identity for model 0)."""
    return _to_reference(correlations(moments), num_models, matcher)


def _to_reference(
    corr: Mapping[tuple[int, int], torch.Tensor], num_models: int, matcher: Matcher
) -> list[torch.Tensor]:
    return [torch.arange(corr[(0, 1)].shape[0]), *(matcher(corr[(0, j)]) for j in range(1, num_models))]


def merge_many_by_activations(
    moments: Moments, num_models: int, matcher: Matcher, max_rounds: int = 50, seed: int = 0
) -> list[torch.Tensor]:
    """MergeMany with activations: each model in turn matched to the mean of the others' aligned features.

    The correlation of model i's features with the mean of the others' permuted features comes from the pairwise
    moments re-indexed by the current permutations (the sums of permuted features are the permuted sums), so no
    second statistics pass is needed. Starts from `to_reference_by_activations`; stops when a whole round changes no
    permutation. Returns the permutations into model 0's basis.
    """
    perms = to_reference_by_activations(moments, num_models, matcher)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(num_models, generator=generator).tolist():
            found = matcher(_correlation_with_mean_of_others(moments, num_models, perms, i))
            changed |= not torch.equal(found, perms[i])
            perms[i] = found
        if not changed:
            break
    return _into_first(perms)


def cycle_consistent_by_activations(
    moments: Moments, num_models: int, matcher: Matcher, max_iterations: int = 100, tolerance: float = 1e-6
) -> list[torch.Tensor]:
    """C2M3's synchronised matching (Crisostomi et al. 2024) with activation correlations in place of weights.

    Every model i gets a map P_i into a shared universe; pair (i, j) is aligned by P_iᵀ P_j, so all pairwise
    alignments compose (cycle-consistent). Frank-Wolfe maximises Σ_{i<j} tr(P_i C_ij P_jᵀ) over the convex hull of
    the group's permutations (C_ij: correlation of model i's features with model j's): the linear step is the
    group's matcher on each gradient, the step size the exact maximiser of the quadratic along the step; it starts
    from `to_reference_by_activations` and stops when the Frank-Wolfe gap falls below ``tolerance`` (relative) or
    no step improves. Each P_i is then projected onto its nearest permutation. Returns the permutations into model
    0's basis.
    """
    corr = correlations(moments)
    maps = [_one_hot(perm) for perm in _to_reference(corr, num_models, matcher)]
    for _ in range(max_iterations):
        gradients = [sum(maps[j] @ _rows_of(corr, j, i) for j in range(num_models) if j != i)
                     for i in range(num_models)]
        steps = [_one_hot(matcher(gradient)) - current for gradient, current in zip(gradients, maps)]
        gap = sum(float((g * d).sum()) for g, d in zip(gradients, steps))
        if gap <= tolerance * max(1.0, abs(_synchronised_objective(corr, maps))):
            break
        curvature = _synchronised_objective(corr, steps)
        size = min(1.0, gap / (-2 * curvature)) if curvature < 0 else (1.0 if gap + curvature > 0 else 0.0)
        if size <= 0:
            break
        maps = [current + size * step for current, step in zip(maps, steps)]
    return _into_first([matcher(current) for current in maps])


def _synchronised_objective(corr: Mapping[tuple[int, int], torch.Tensor], maps: Sequence[torch.Tensor]) -> float:
    """Σ_{i<j} tr(P_i C_ij P_jᵀ)."""
    return sum(float(((maps[i] @ c) * maps[j]).sum()) for (i, j), c in corr.items())


def _rows_of(corr: Mapping[tuple[int, int], torch.Tensor], j: int, i: int) -> torch.Tensor:
    """C_ji: correlation with model j's features as rows and model i's as columns."""
    return corr[(j, i)] if j < i else corr[(i, j)].T


def _covariance_rows_of(moments: Moments, j: int, i: int) -> torch.Tensor:
    return moments[(j, i)][0] if j < i else moments[(i, j)][0].T


def _variance_of(moments: Moments, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean square) of model k's features."""
    for (i, j), (_, var_i, var_j, meansq_i, meansq_j) in moments.items():
        if k in (i, j):
            return (var_i, meansq_i) if k == i else (var_j, meansq_j)
    raise ConfigError(f"no moments of model {k}")


def _correlation_with_mean_of_others(
    moments: Moments, num_models: int, perms: Sequence[torch.Tensor], i: int
) -> torch.Tensor:
    """corr(mean over j ≠ i of x_j[perm_j[k]], x_i[f]) for every position k and feature f of model i."""
    others = [j for j in range(num_models) if j != i]
    cross = sum(_covariance_rows_of(moments, j, i)[perms[j]] for j in others)
    own = sum(_variance_of(moments, j)[0][perms[j]] for j in others)  # the j = k terms of the mean's variance
    variance = own + sum(_covariance_rows_of(moments, j, k)[perms[j], perms[k]]
                         for j in others for k in others if j != k)
    inverse_mean = torch.where(variance > 1e-12 * own, variance.clamp_min(1e-300).rsqrt(), 0.0)
    inverse_i = inverse_live_std(*_variance_of(moments, i))
    return (cross * inverse_mean[:, None] * inverse_i[None, :]).nan_to_num_(0.0)


def _one_hot(perm: torch.Tensor) -> torch.Tensor:
    """The permutation matrix P with P[k, perm[k]] = 1 (position k of the target takes feature perm[k])."""
    matrix = torch.zeros(perm.numel(), perm.numel(), dtype=torch.float64)
    matrix[torch.arange(perm.numel()), perm] = 1.0
    return matrix


def _into_first(perms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Permutations into a common basis, re-expressed into model 0's (model 0's own becomes the identity)."""
    return [_rebased(perm, perms[0]) for perm in perms]

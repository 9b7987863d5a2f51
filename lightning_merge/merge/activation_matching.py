"""The paper's activation matching (Verma & Elbayad 2024), composed per group kind: ``ff+attn[head_perm]+res``.

Each (group kind, variant) is a `GroupAligner` that turns the statistics of one group into its alignment:
Hungarian matching of correlations for permutations, and ``attn[linear]`` — Head-Perm's head pairing followed by
per-head orthogonal Procrustes maps of the query/key and value/output subspaces (exact for B, beyond permutations).
Methods sharing a (group, variant) solve it once (`FitInputs.shared`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Alignment, HeadLinear, Orthogonal, Permutation
from lightning_merge.merge.matching import (
    RESIDUAL_POINTS,
    head_pairing,
    head_procrustes,
    match_features,
    match_head_perm,
    match_ignore_heads,
    match_monotonic,
    procrustes_fixing_ones,
    whole_head_permutation,
)
from lightning_merge.merge.method import STATISTICS, FitInputs, MergeMethod
from lightning_merge.merge.spec import GROUP_KINDS, PermGroup, PermutationSpec
from lightning_merge.merge.stats import MergeStatistics

PAPER = (
    "Verma & Elbayad, Merging Text Transformer Models from Different Initializations, https://arxiv.org/abs/2403.00986"
)
PROCRUSTES = (
    "Schönemann, A generalized solution of the orthogonal Procrustes problem, Psychometrika 1966 (per-head maps after "
    "the paper's head pairing; cf. Theus et al., Generalized Linear Mode Connectivity for Transformers, "
    "https://arxiv.org/abs/2506.22712)"
)

ORTHOGONAL_RESIDUAL = (
    "Theus et al., Generalized Linear Mode Connectivity for Transformers, https://arxiv.org/abs/2506.22712 "
    "(orthogonal residual maps of pre-LN models); the map fixing the all-ones direction and the folding of LayerNorm "
    "gains are ours, so B's function is kept exactly"
)


@dataclass(frozen=True)
class GroupAligner:
    """How one (group kind, variant) turns statistics into an alignment of one group."""

    fit: Callable[[MergeStatistics, PermGroup], Alignment]
    features: Callable[[PermGroup], list[str]]
    function_preserving: bool
    summary: str
    reference: str = PAPER
    check_spec: Callable[[PermutationSpec], None] = lambda spec: None  # noqa: E731 - raises if it cannot align spec
    learnable: bool = True  # whether `learned` can start from its alignment (permutations and per-head maps)
    permutation: bool = True  # whether its alignment is a permutation


def _own_features(group: PermGroup) -> list[str]:
    return [group.name]


def _attention_features(group: PermGroup) -> list[str]:
    return [group.name, f"{group.name}/query", f"{group.name}/key", f"{group.name}/value"]


def _fit_ff(statistics: MergeStatistics, group: PermGroup) -> Alignment:
    return Permutation(match_features(statistics.correlation(group.name), overwrite=True))


def _attention_aligner(match: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable:
    def fit(statistics: MergeStatistics, group: PermGroup) -> Alignment:
        return Permutation(match(statistics.correlation(group.name), group.num_heads))

    return fit


def _fit_attention_linear(statistics: MergeStatistics, group: PermGroup) -> Alignment:
    """Heads paired as Head-Perm pairs them, then per head an orthogonal Procrustes map of the query and key
    cross moments together (one map keeps QKᵀ) and one of the value cross moment (its inverse goes to the output)."""
    head_of_a = head_pairing(match_head_perm(statistics.correlation(group.name), group.num_heads), group.num_heads)
    query_key = statistics.cross_moment(f"{group.name}/query") + statistics.cross_moment(f"{group.name}/key")
    value = statistics.cross_moment(f"{group.name}/value")
    maps = {"qk": head_procrustes(query_key, head_of_a, group.num_heads),
            "vo": head_procrustes(value, head_of_a, group.num_heads)}
    return HeadLinear(whole_head_permutation(head_of_a, group.head_dim), maps)


def _check_orthogonal_residual(spec: PermutationSpec) -> None:
    refusal = spec.family.orthogonal_residual_refusal() if spec.family else "the models' family is unknown"
    if refusal:
        raise ConfigError(f"res[orthogonal] cannot keep model B's function: {refusal}")


def _fit_residual_orthogonal(statistics: MergeStatistics, group: PermGroup) -> Alignment:
    """One orthogonal map of the stream fixing the all-ones direction: Procrustes on the cross-covariances of every
    residual point, each scaled to unit total variance so that no layer's stream dominates by its norm alone."""
    _check_orthogonal_residual(statistics.spec)
    cross = 0
    for point in statistics.group_points(group.name):
        covariance, var_a, var_b, _, _ = point.moments()
        cross = cross + covariance / (var_a.sum() * var_b.sum()).sqrt().clamp(min=1e-30)
    return Orthogonal(procrustes_fixing_ones(cross))


def _fit_residual_folded_identity(statistics: MergeStatistics, group: PermGroup) -> Alignment:
    """No map of the stream, but the folded endpoints of `res[orthogonal]`: the baseline it is measured against."""
    _check_orthogonal_residual(statistics.spec)
    return Orthogonal(torch.eye(group.size, dtype=torch.float64))


def _residual_aligner(points: slice) -> Callable:
    def fit(statistics: MergeStatistics, group: PermGroup) -> Alignment:
        return Permutation(match_features(statistics.correlation(group.name, points), overwrite=True))

    return fit


# kind -> variant -> aligner; the first variant of a kind is its default ("" for a kind without variants)
GROUP_ALIGNERS: dict[str, dict[str, GroupAligner]] = {
    "ff": {"": GroupAligner(_fit_ff, _own_features, True, "Hungarian on the FF correlation per layer")},
    "attn": {
        "head_perm": GroupAligner(_attention_aligner(match_head_perm), _own_features, True,
                                  "pair heads, then dims within heads (the paper's Head-Perm)"),
        "monotonic": GroupAligner(_attention_aligner(match_monotonic), _own_features, True,
                                  "head j with head j, dims within heads"),
        "ignore_heads": GroupAligner(_attention_aligner(match_ignore_heads), _own_features, False,
                                     "one d x d assignment; moves features across heads"),
        "linear": GroupAligner(_fit_attention_linear, _attention_features, True,
                               "Head-Perm pairing, then per-head orthogonal maps of the q/k and v/o subspaces",
                               PROCRUSTES, permutation=False),
    },
    "res": {
        variant: GroupAligner(_residual_aligner(points), _own_features, True,
                              f"one permutation of the stream from the {variant} residual point(s)")
        for variant, points in RESIDUAL_POINTS.items()
    } | {
        "orthogonal": GroupAligner(_fit_residual_orthogonal, _own_features, True,
                                   "one orthogonal map of the stream fixing the all-ones direction (Procrustes on "
                                   "every residual point); pre-LN models, LayerNorm gains folded into their readers",
                                   ORTHOGONAL_RESIDUAL, _check_orthogonal_residual, learnable=False, permutation=False),
        "fold": GroupAligner(_fit_residual_folded_identity, lambda group: [], True,
                             "LayerNorm gains folded into their readers, the stream left as it is: res[orthogonal]'s "
                             "baseline (vanilla on the folded parametrisation)", ORTHOGONAL_RESIDUAL,
                             _check_orthogonal_residual, learnable=False, permutation=False),
    },
}


# Variants a kind cannot take, and why (what a user asking for them is told).
UNSUPPORTED_VARIANTS: dict[str, dict[str, str]] = {
    "ff": {"linear": "the GELU between a feed-forward layer's rows and columns commutes only with permutations, "
                     "so a linear map would change model B's function"},
    "res": {"linear": "a LayerNorm's elementwise gain commutes only with permutations, and its centring and scaling "
                      "only with orthogonal maps that fix the all-ones direction, so a general linear map would "
                      "change model B's function"},
}


class ActivationMatching(MergeMethod):
    """The paper's activation matching, one variant per group kind (``ff+attn[head_perm]+res[all]``).

    Args:
        name: the name it was requested by.
        variants: group kind -> variant (a key of `GROUP_ALIGNERS`); kinds absent are left alone.
    """

    summary = "correlation of activations, Hungarian matching per group"
    needs = frozenset({STATISTICS})

    def __init__(self, name: str, variants: Mapping[str, str]) -> None:
        super().__init__(name)
        self.variants = {kind: variants[kind] for kind in GROUP_KINDS if kind in variants}

    @property
    def reference(self) -> str:
        return "; ".join(dict.fromkeys([PAPER, *(self._aligner(kind).reference for kind in self.variants)]))

    @property
    def function_preserving(self) -> bool:
        return all(self._aligner(kind).function_preserving for kind in self.variants)

    @property
    def learnable_start(self) -> bool:
        return all(self._aligner(kind).learnable for kind in self.variants)

    @property
    def permutations_only(self) -> bool:
        return all(self._aligner(kind).permutation for kind in self.variants)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.variants)

    @property
    def canonical_name(self) -> str:
        """The name in full group syntax."""
        return "+".join(f"{kind}[{variant}]" if variant else kind for kind, variant in self.variants.items())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "options": {"groups": self.canonical_name}}

    def _aligner(self, kind: str) -> GroupAligner:
        return GROUP_ALIGNERS[kind][self.variants[kind]]

    def group_names(self, spec: PermutationSpec) -> list[str]:
        """The spec groups it aligns."""
        return spec.groups_of_kind(self.variants)

    def check_spec(self, spec: PermutationSpec) -> None:
        for kind in self.variants:
            self._aligner(kind).check_spec(spec)

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        features = [f for name in self.group_names(spec) for f in self._aligner(spec.groups[name].kind).features(
            spec.groups[name])]
        return list(dict.fromkeys(features))

    def fit(self, inputs: FitInputs, groups: Iterable[str] | None = None) -> dict[str, Alignment]:
        """Alignments of every group it aligns (or of ``groups``, a subset of them).

        Raises:
            ArchitectureMismatch: the statistics were collected for a different spec.
            ConfigError: the statistics lack a feature set it needs, or ``groups`` names one it does not align.
        """
        names = self.group_names(inputs.spec)
        if groups is not None:
            outside = [name for name in groups if name not in names]
            if outside:
                raise ConfigError(f"method {self.name!r} does not align group {outside[0]!r}")
            names = list(groups)
        statistics = inputs.statistics
        statistics.check_spec(inputs.spec, [f for name in names for f in self._features(inputs.spec, name)])
        futures = {name: self._submit(inputs, statistics, inputs.spec.groups[name]) for name in names}
        return {name: future.result() for name, future in futures.items()}

    def _features(self, spec: PermutationSpec, name: str) -> list[str]:
        return self._aligner(spec.groups[name].kind).features(spec.groups[name])

    def _submit(self, inputs: FitInputs, statistics: MergeStatistics, group: PermGroup) -> Future:
        aligner = self._aligner(group.kind)
        return inputs.shared((group.name, self.variants[group.kind]), lambda: aligner.fit(statistics, group))


class FullPermutation(ActivationMatching):
    """``permute``: the paper's full method, the same as ``ff+attn[head_perm]+res[all]``."""

    summary = "the paper's full method: ff+attn[head_perm]+res[all]"

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, {kind: next(iter(GROUP_ALIGNERS[kind])) for kind in GROUP_KINDS})

"""Joint methods: N ≥ 2 models aligned at once into model 0's basis (registered like every method).

- ``to_reference[method=...]``: every model aligned to model 0 by any pairwise method (default the paper's
  ``ff+attn+res``).
- ``merge_many[groups=...,by=activations|weights]``: Git Re-Basin's MergeMany — each model in turn aligned to the
  mean of the others, until no permutation changes (by activation correlations from the one statistics pass, or by
  weight matching).
- ``cycle_consistent[groups=...]``: C2M3's synchronised Frank-Wolfe matching through a shared universe, on activation
  correlations; every pairwise alignment it implies composes with the others.

A `JointMethod` fits `fit_joint` on a `JointInputs`; in a pair merge (N = 2) it is an ordinary method whose
alignment of B is its model 1's.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Alignment, Permutation
from lightning_merge.merge.joint import (
    Matcher,
    cycle_consistent_by_activations,
    merge_many,
    merge_many_by_activations,
)
from lightning_merge.merge.matching import (
    RESIDUAL_POINTS,
    match_features,
    match_head_perm,
    match_ignore_heads,
    match_monotonic,
)
from lightning_merge.merge.method import LOSS, STATISTICS, WEIGHTS, FitInputs, MergeMethod
from lightning_merge.merge.spec import PermGroup, PermutationSpec
from lightning_merge.merge.stats import JointStatistics

MERGE_MANY = "Ainsworth et al., Git Re-Basin (MergeMany, Alg. 3), https://arxiv.org/abs/2209.04836"
C2M3 = (
    "Crisostomi et al., C2M3: Cycle-Consistent Multi-Model Merging, NeurIPS 2024, https://arxiv.org/abs/2405.17897 "
    "(its synchronised Frank-Wolfe matching, here on activation correlations instead of weights)"
)
TO_REFERENCE = "every model aligned to one reference (model 0) by a pairwise method"


class JointInputs:
    """What a joint method may read about N models: each pair's `FitInputs` (statistics and weights of models i
    and j, i < j), and views across all of them. Pairs are made on first use and share their fitted work, so a
    pairwise method fitted on pair (0, j) inside ``to_reference`` and by itself is fitted once.

    Args:
        spec: the models' spec.
        num_models: N.
        make_pair: (i, j) -> the `FitInputs` of model i (as A) and model j (as B).
    """

    def __init__(self, spec: PermutationSpec, num_models: int, make_pair: Callable[[int, int], FitInputs]) -> None:
        if num_models < 2:
            raise ConfigError(f"a joint alignment needs at least two models, got {num_models}")
        self.spec = spec
        self.num_models = num_models
        self._make_pair = make_pair
        self._pairs: dict[tuple[int, int], FitInputs] = {}
        self._needs: frozenset[str] | None = None  # None: everything given

    @classmethod
    def of_pair(cls, inputs: FitInputs) -> JointInputs:
        """The two models of a pair merge (A = model 0, B = model 1)."""
        joint = cls(inputs.spec, 2, lambda i, j: inputs)
        joint._pairs[(0, 1)] = inputs
        return joint

    def view(self, needs: frozenset[str]) -> JointInputs:
        """The same pairs, each showing only ``needs``."""
        view = JointInputs(self.spec, self.num_models, self._make_pair)
        view._pairs, view._needs = self._pairs, frozenset(needs)  # the same dict: pairs made later are shared too
        return view

    def pair(self, i: int, j: int) -> FitInputs:
        """Models i (A) and j (B), i < j."""
        if not 0 <= i < j < self.num_models:
            raise ConfigError(f"no pair ({i}, {j}) of {self.num_models} models; pairs are i < j")
        if (i, j) not in self._pairs:
            self._pairs[(i, j)] = self._make_pair(i, j)
        pair = self._pairs[(i, j)]
        return pair if self._needs is None else pair.view(self._needs)

    @property
    def statistics(self) -> JointStatistics:
        pairs = {(i, j): self.pair(i, j).statistics for i in range(self.num_models) for j in range(i + 1,
                                                                                                   self.num_models)}
        return JointStatistics.from_pairs(pairs, self.num_models)

    @property
    def weights(self) -> list[dict[str, torch.Tensor]]:
        """Every model's weights, model 0 first."""
        return [self.pair(0, 1).weights[0], *(self.pair(0, j).weights[1] for j in range(1, self.num_models))]

    def close(self) -> None:
        for pair in self._pairs.values():
            pair.close()
        self._pairs.clear()


class JointMethod(MergeMethod):
    """A method that aligns N ≥ 2 models at once, every model into model 0's basis."""

    # whether model 0 is transformed too (ZipIt!): a pair merge then evaluates both models' alignments
    moves_reference: ClassVar[bool] = False

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        return self.fit_joint(JointInputs.of_pair(inputs))[1]

    @abstractmethod
    def fit_joint(self, inputs: JointInputs) -> list[dict[str, Alignment]]:
        """Per model (model 0 first, its own alignments empty or identities), group -> alignment into model 0's
        basis."""


class ToReference(JointMethod):
    """Every model aligned to model 0 by a pairwise method (``to_reference[method=ff+attn[linear]+res]``)."""

    reference = TO_REFERENCE
    summary = "each model aligned to model 0 by a pairwise method"

    @dataclass(frozen=True)
    class Options:
        method: str = "ff+attn+res"

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        from lightning_merge.merge.methods import get_method  # the registry imports this module

        self.pairwise = get_method(self.options.method)
        if isinstance(self.pairwise, JointMethod) or LOSS in self.pairwise.needs or self.pairwise.changes_path:
            raise ConfigError(f"method {name!r}: method={self.options.method!r} must be a pairwise alignment that "
                              "needs no training loss and keeps the straight path, e.g. ff+attn+res or weight_matching")

    @property
    def needs(self) -> frozenset[str]:
        return self.pairwise.needs

    @property
    def function_preserving(self) -> bool:
        return self.pairwise.function_preserving

    @property
    def learnable_start(self) -> bool:
        return self.pairwise.learnable_start

    @property
    def permutations_only(self) -> bool:
        return self.pairwise.permutations_only

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return self.pairwise.statistics_features(spec)

    def check_spec(self, spec: PermutationSpec) -> None:
        self.pairwise.check_spec(spec)

    def fit_joint(self, inputs: JointInputs) -> list[dict[str, Alignment]]:
        return [{}, *(inputs.pair(0, j).alignments_of(self.pairwise) for j in range(1, inputs.num_models))]


@dataclass(frozen=True)
class JointMatcher:
    """How a joint method matches one (group kind, variant): the feature points it reads and its assignment."""

    points: slice | None
    matcher: Callable[[PermGroup], Matcher]


def _plain(group: PermGroup) -> Matcher:
    return match_features


def _by_heads(match: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[PermGroup], Matcher]:
    return lambda group: partial(match, num_heads=group.num_heads)


# The permutation variants of `lightning_merge.merge.activation_matching.GROUP_ALIGNERS`: joint matching maximises
# summed correlations over permutations of each group's structure.
JOINT_MATCHERS: dict[str, dict[str, JointMatcher]] = {
    "ff": {"": JointMatcher(None, _plain)},
    "attn": {"head_perm": JointMatcher(None, _by_heads(match_head_perm)),
             "monotonic": JointMatcher(None, _by_heads(match_monotonic)),
             "ignore_heads": JointMatcher(None, _by_heads(match_ignore_heads))},
    "res": {variant: JointMatcher(points, _plain) for variant, points in RESIDUAL_POINTS.items()},
}


class _ActivationJointMethod(JointMethod):
    """A joint method over the permutation groups named by its ``groups`` option (activation-matching syntax)."""

    COUNT_OPTION: str  # the option bounding its iterations, at least 1

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        from lightning_merge.merge.methods import get_method

        groups = get_method(self.options.groups)
        self.variants: dict[str, str] = getattr(groups, "variants", None) or {}
        if not self.variants:
            raise ConfigError(f"method {name!r}: groups={self.options.groups!r} must name group kinds, e.g. "
                              "ff+attn+res")
        for kind, variant in self.variants.items():
            if variant not in JOINT_MATCHERS[kind]:
                raise ConfigError(f"method {name!r}: {kind}[{variant}] is not a permutation, which joint matching "
                                  f"needs; use to_reference[method=...] for it")
        count = getattr(self.options, self.COUNT_OPTION)
        if count < 1:
            raise ConfigError(f"method {name!r}: {self.COUNT_OPTION}={count} must be at least 1")

    @property
    def function_preserving(self) -> bool:
        return self.variants.get("attn") != "ignore_heads"

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return spec.groups_of_kind(self.variants) if STATISTICS in self.needs else []

    def _fit_groups(
        self, inputs: JointInputs, solve: Callable[[Any, int, Matcher], list[torch.Tensor]]
    ) -> list[dict[str, Alignment]]:
        statistics = inputs.statistics
        out: list[dict[str, Alignment]] = [{} for _ in range(inputs.num_models)]
        for name in inputs.spec.groups_of_kind(self.variants):
            group = inputs.spec.groups[name]
            how = JOINT_MATCHERS[group.kind][self.variants[group.kind]]
            moments = {pair: stats.moments(name, how.points) for pair, stats in statistics.pairs.items()}
            perms = solve(moments, inputs.num_models, how.matcher(group))
            for alignments, perm in zip(out, perms):
                alignments[name] = Permutation(perm)
        return out


class MergeMany(_ActivationJointMethod):
    """Git Re-Basin's MergeMany: each model in turn aligned to the mean of the others until nothing changes."""

    reference = MERGE_MANY
    summary = "each model in turn aligned to the mean of the others, until no permutation changes"

    @dataclass(frozen=True)
    class Options:
        groups: str = "ff+attn+res"
        by: str = "activations"  # or "weights": weight matching to the mean of the others' weights, every group
        max_rounds: int = 50
        seed: int = 0

    BY = ("activations", "weights")
    COUNT_OPTION = "max_rounds"

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        if self.options.by not in self.BY:
            raise ConfigError(f"method {name!r}: by={self.options.by!r}; choose one of {', '.join(self.BY)}")
        if self.options.by == "weights" and self.options.groups != self.Options.groups:
            raise ConfigError(f"method {name!r}: by=weights aligns every group (weights couple them); drop groups=")

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({STATISTICS if self.options.by == "activations" else WEIGHTS})

    def fit_joint(self, inputs: JointInputs) -> list[dict[str, Alignment]]:
        opts = self.options
        if opts.by == "weights":
            return merge_many(inputs.spec, inputs.weights, max_rounds=opts.max_rounds, seed=opts.seed)
        return self._fit_groups(inputs, partial(merge_many_by_activations, max_rounds=opts.max_rounds, seed=opts.seed))


class CycleConsistent(_ActivationJointMethod):
    """C2M3: every model mapped into one universe by Frank-Wolfe on the pairwise activation correlations."""

    reference = C2M3
    summary = "maps into one universe by Frank-Wolfe on all pairwise correlations (cycle-consistent)"
    needs = frozenset({STATISTICS})

    @dataclass(frozen=True)
    class Options:
        groups: str = "ff+attn+res"
        max_iterations: int = 100

    COUNT_OPTION = "max_iterations"

    def fit_joint(self, inputs: JointInputs) -> list[dict[str, Alignment]]:
        return self._fit_groups(inputs, partial(cycle_consistent_by_activations,
                                                max_iterations=self.options.max_iterations))


def fit_joint(method: MergeMethod, inputs: JointInputs) -> list[dict[str, Alignment]]:
    """Every model's alignment into model 0's basis: a joint method's own, or a pairwise method's to model 0."""
    if isinstance(method, JointMethod):
        return method.fit_joint(inputs.view(method.needs))
    return [{}, *(inputs.pair(0, j).alignments_of(method) for j in range(1, inputs.num_models))]


def fit_pairwise(method: MergeMethod, inputs: JointInputs) -> dict[tuple[int, int], dict[str, Alignment]]:
    """A pairwise method fitted on every pair: (i, j) -> alignment of model j into model i's basis."""
    n = inputs.num_models
    return {(i, j): inputs.pair(i, j).alignments_of(method) for i in range(n) for j in range(i + 1, n)}


def permutations_only(alignments: Sequence[Mapping[str, Alignment]]) -> bool:
    """Whether every alignment is a permutation (what cycle consistency is defined for)."""
    return all(isinstance(a, Permutation) for groups in alignments for a in groups.values())


def with_identities(spec: PermutationSpec, alignments: Sequence[Mapping[str, Alignment]]) -> list[dict[str, Alignment]]:
    """The alignments with an identity permutation for every group each leaves alone."""
    return [{name: groups.get(name, Permutation(torch.arange(group.size))) for name, group in spec.groups.items()}
            for groups in alignments]

"""Merge methods by name: a registry of named methods plus a small grammar for permutation variants.

Names (`get_method`):

- ``vanilla``: no alignment, plain interpolation of θ_A and θ_B.
- ``permute``: the paper's full method, the same as ``ff+attn[head_perm]+res[all]``.
- Group syntax, parts joined by ``+`` in any order, each at most once::

      ff                                       feed-forward groups, one assignment per layer
      attn[head_perm | monotonic | ignore_heads]  attention groups (default head_perm)
      res[all | first | last]                  the residual stream (default all)

  e.g. ``ff``, ``ff+attn``, ``ff+attn[monotonic]``, ``res[last]``, ``ff+attn+res``.

Each method knows the spec groups it needs statistics for (`MergeMethod.group_names`) and turns statistics into
perms (`MergeMethod.fit`); the matcher of each group kind is looked up in `GROUP_MATCHERS`, never chosen by ``if``.
`fit_methods` fits several methods at once: each distinct (group, variant) assignment is solved once, and
independent ones run in parallel threads (scipy's ``linear_sum_assignment`` and torch's kernels release the GIL).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lightning_merge.errors import ConfigError, UnknownNameError
from lightning_merge.merge.matching import (
    ATTENTION_VARIANTS,
    FUNCTION_PRESERVING_ATTENTION,
    RESIDUAL_POINTS,
    match_features,
)
from lightning_merge.merge.spec import GROUP_KINDS, PermGroup, PermutationSpec
from lightning_merge.merge.stats import MergeStatistics

PAPER = (
    "Verma & Elbayad, Merging Text Transformer Models from Different Initializations, https://arxiv.org/abs/2403.00986"
)
VANILLA = "Frankle et al., Linear Mode Connectivity and the Lottery Ticket Hypothesis, https://arxiv.org/abs/1912.05671"

# Variants per group kind; the first is the default. ``ff`` takes none.
GROUP_VARIANTS: dict[str, tuple[str, ...]] = {
    "ff": (),
    "attn": tuple(ATTENTION_VARIANTS),
    "res": tuple(RESIDUAL_POINTS),
}
_PART = re.compile(r"^(?P<kind>\w+)(?:\[(?P<variant>\w+)\])?$")


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: which groups it permutes and how, and the paper it implements.

    Attributes:
        name: the registry name it was requested by.
        reference: the paper/URL it implements.
        groups: group kinds it permutes (``ff``, ``attn``, ``res``); empty for no alignment.
        attention: attention variant, a key of `ATTENTION_VARIANTS`.
        residual: residual variant, a key of `RESIDUAL_POINTS`.
    """

    name: str
    reference: str
    groups: tuple[str, ...] = ()
    attention: str = "head_perm"
    residual: str = "all"

    @property
    def function_preserving(self) -> bool:
        """Whether applying its perms leaves B's function unchanged (False only for ``attn[ignore_heads]``)."""
        return "attn" not in self.groups or FUNCTION_PRESERVING_ATTENTION[self.attention]

    @property
    def canonical_name(self) -> str:
        """The name in full group syntax (``vanilla`` when nothing is permuted)."""
        kinds = [kind for kind in GROUP_KINDS if kind in self.groups]
        return "+".join(f"{kind}[{self.variant(kind)}]" if self.variant(kind) else kind for kind in kinds) or "vanilla"

    def group_names(self, spec: PermutationSpec) -> list[str]:
        """The spec groups this method needs statistics for and returns perms of."""
        return spec.groups_of_kind(self.groups)

    def fit(
        self, statistics: MergeStatistics, spec: PermutationSpec, groups: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Perms of B for every group this method permutes (identity elsewhere, i.e. absent).

        Args:
            statistics: statistics of both models, collected for ``spec``.
            spec: the models' spec.
            groups: fit only these of the method's groups (default all of them).

        Raises:
            ArchitectureMismatch: the statistics were collected for a different spec.
            ConfigError: the statistics lack a group this method needs, or ``groups`` names one it does not permute.
        """
        names = self.group_names(spec)
        if groups is not None:
            outside = [name for name in groups if name not in names]
            if outside:
                raise ConfigError(f"method {self.name!r} does not permute group {outside[0]!r}")
            names = list(groups)
        return _fit_groups({self.name: (self, names)}, statistics, spec, MATCHING_WORKERS)[self.name]

    def variant(self, kind: str) -> str:
        """The variant this method uses for groups of ``kind`` ('' for kinds without variants)."""
        return {"ff": "", "attn": self.attention, "res": self.residual}[kind]


# Threads that solve independent assignments at once. Each holds a float64 d x d correlation (72 MiB for BERT-base's
# FF), so a few threads, not one per core.
MATCHING_WORKERS = min(4, os.cpu_count() or 1)


def fit_methods(
    methods: Mapping[str, MergeMethod],
    statistics: MergeStatistics,
    spec: PermutationSpec,
    workers: int = MATCHING_WORKERS,
) -> dict[str, dict[str, torch.Tensor]]:
    """Perms of every method (name -> group -> perm), as each method's `MergeMethod.fit` would give.

    Methods share work: ``ff`` and ``ff+attn+res`` solve the same feed-forward assignments, so each distinct
    (group, variant) is solved once, and the independent assignments run on ``workers`` threads.
    """
    return _fit_groups({name: (m, m.group_names(spec)) for name, m in methods.items()}, statistics, spec, workers)


def _fit_groups(
    requests: Mapping[str, tuple[MergeMethod, list[str]]],
    statistics: MergeStatistics,
    spec: PermutationSpec,
    workers: int,
) -> dict[str, dict[str, torch.Tensor]]:
    jobs: dict[tuple[str, str], tuple[MergeMethod, PermGroup]] = {}
    for method, names in requests.values():
        statistics.check_spec(spec, names)
        for name in names:
            group = spec.groups[name]
            jobs.setdefault((name, method.variant(group.kind)), (method, group))
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        futures = {key: pool.submit(GROUP_MATCHERS[g.kind], m, statistics, g) for key, (m, g) in jobs.items()}
        solved = {key: future.result() for key, future in futures.items()}
    # a copy per method: shared tensors would alias across methods (and safetensors refuses to save aliases)
    return {
        request: {name: solved[(name, method.variant(spec.groups[name].kind))].clone() for name in names}
        for request, (method, names) in requests.items()
    }


def _fit_ff(method: MergeMethod, statistics: MergeStatistics, group: PermGroup) -> torch.Tensor:
    return match_features(statistics.correlation(group.name), overwrite=True)


def _fit_attention(method: MergeMethod, statistics: MergeStatistics, group: PermGroup) -> torch.Tensor:
    return ATTENTION_VARIANTS[method.attention](statistics.correlation(group.name), group.num_heads)


def _fit_residual(method: MergeMethod, statistics: MergeStatistics, group: PermGroup) -> torch.Tensor:
    return match_features(statistics.correlation(group.name, RESIDUAL_POINTS[method.residual]), overwrite=True)


GROUP_MATCHERS: dict[str, Callable[[MergeMethod, MergeStatistics, PermGroup], torch.Tensor]] = {
    "ff": _fit_ff,
    "attn": _fit_attention,
    "res": _fit_residual,
}

METHODS: dict[str, MergeMethod] = {
    "vanilla": MergeMethod("vanilla", VANILLA),
    "permute": MergeMethod("permute", PAPER, ("ff", "attn", "res")),
}


def register_method(method: MergeMethod) -> None:
    """Add a named method to the registry (later methods: ``zip``, ``weight_matching``, ...)."""
    METHODS[method.name] = method


def known_names() -> str:
    """A one-line description of every accepted name, for error messages and ``--help``."""
    parts = [kind + (f"[{'|'.join(v)}]" if v else "") for kind, v in GROUP_VARIANTS.items()]
    return f"{', '.join(METHODS)}; or groups {', '.join(parts)} joined by '+', e.g. ff+attn[monotonic]+res[last]"


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``, or one parsed from the group syntax (see the module docstring).

    Raises:
        UnknownNameError: the name, a group kind or a variant is unknown, or a group is repeated.
    """
    name = name.strip()
    if name in METHODS:
        return METHODS[name]
    kinds: dict[str, str | None] = {}
    for part in name.split("+"):
        kind, variant = _parse_part(part.strip(), name)
        if kind in kinds:
            raise UnknownNameError(f"method {name!r} names group {kind!r} twice; known: {known_names()}")
        kinds[kind] = variant
    return MergeMethod(
        name,
        PAPER,
        tuple(kind for kind in GROUP_KINDS if kind in kinds),
        attention=kinds.get("attn") or GROUP_VARIANTS["attn"][0],
        residual=kinds.get("res") or GROUP_VARIANTS["res"][0],
    )


def _parse_part(part: str, name: str) -> tuple[str, str | None]:
    match = _PART.match(part)
    if not match or match["kind"] not in GROUP_VARIANTS:
        raise UnknownNameError(f"unknown merge method {name!r}; known: {known_names()}")
    kind, variant = match["kind"], match["variant"]
    if variant is not None and variant not in GROUP_VARIANTS[kind]:
        allowed = ", ".join(GROUP_VARIANTS[kind]) or "none"
        raise UnknownNameError(f"unknown variant {variant!r} of group {kind!r} in {name!r}; variants: {allowed}")
    return kind, variant

"""Merge methods: one interface (`MergeMethod`), one registry (`METHODS`), and a small grammar of names.

A method is one class: its registry name, the paper it implements, what it needs — activation statistics, the
models' weights, a loss over training batches (`STATISTICS`, `WEIGHTS`, `LOSS`) — and ``fit``, which turns
exactly those inputs (`FitInputs`) into one `Alignment` per spec group. The framework reads ``needs`` and gives
the method that and nothing else; no code outside this registry branches on a method's name.

Names (`get_method`):

- a registered name, optionally with options: ``vanilla``, ``permute``, ``weight_matching``,
  ``learned[init=permute,steps=1500,attn=linear]`` (``name[key=value,...]``; every option has a default);
- or activation matching composed per group kind, parts joined by ``+`` in any order, each at most once::

      ff                                                  feed-forward groups, one assignment per layer
      attn[head_perm | monotonic | ignore_heads | linear]  attention groups (default head_perm)
      res[all | first | last]                             the residual stream (default all)

  e.g. ``ff``, ``ff+attn[monotonic]``, ``res[last]``, ``ff+attn+res``, ``ff+attn[linear]+res``.

`fit_methods` fits several methods on one `FitInputs`: a (group, variant) assignment that several methods share is
solved once, a method used as another's starting point (``learned[init=...]``) is fitted once, and independent
assignments run on a few threads (scipy's ``linear_sum_assignment`` and torch's kernels release the GIL).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_merge.errors import ConfigError, UnknownNameError
from lightning_merge.merge.alignment import Alignment, HeadLinear, Permutation
from lightning_merge.merge.matching import (
    RESIDUAL_POINTS,
    head_pairing,
    head_procrustes,
    match_features,
    match_head_perm,
    match_ignore_heads,
    match_monotonic,
    whole_head_permutation,
)
from lightning_merge.merge.spec import GROUP_KINDS, PermGroup, PermutationSpec
from lightning_merge.merge.stats import MergeStatistics

PAPER = (
    "Verma & Elbayad, Merging Text Transformer Models from Different Initializations, https://arxiv.org/abs/2403.00986"
)
VANILLA = "Frankle et al., Linear Mode Connectivity and the Lottery Ticket Hypothesis, https://arxiv.org/abs/1912.05671"
GIT_RE_BASIN = "Ainsworth et al., Git Re-Basin, ICLR 2023, https://arxiv.org/abs/2209.04836"
PROCRUSTES = (
    "Schönemann, A generalized solution of the orthogonal Procrustes problem, 1966 (per-head maps after the paper's "
    "head pairing; cf. Theus et al., Generalized Linear Mode Connectivity for Transformers, "
    "https://arxiv.org/abs/2506.22712)"
)
LEARNED = (
    "Ainsworth et al., Git Re-Basin, ICLR 2023 (straight-through estimator), as used by Theus et al., Generalized "
    "Linear Mode Connectivity for Transformers, NeurIPS 2025, https://arxiv.org/abs/2506.22712"
)

STATISTICS, WEIGHTS, LOSS = "statistics", "weights", "loss"

StateDict = Mapping[str, torch.Tensor]
# Threads that solve independent assignments at once. Each holds a float64 d x d correlation (72 MiB for BERT-base's
# FF), so a few threads, not one per core.
MATCHING_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class TrainingLoss:
    """What the framework gives a method that needs a loss over training batches.

    Attributes:
        loss: (parameters of model A's structure, batch) -> mean loss of the model with those parameters.
        optimise: runs ``module(batch) -> loss`` over training batches for ``steps`` optimiser steps at learning
            rate ``lr``, updating the module's parameters (with the framework's progress bar and logger).
    """

    loss: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], torch.Tensor]
    optimise: Callable[[nn.Module, int, float], None]


class FitInputs:
    """Everything a method may need, of which it is given only what it declared (`MergeMethod.needs`).

    Args:
        spec: the models' spec.
        weights_a: A's weights (state dict), given to methods that need ``WEIGHTS``.
        weights_b: B's weights.
        statistics: activation statistics, for methods that need ``STATISTICS``.
        training: the loss and optimiser, for methods that need ``LOSS``.
        workers: threads for independent assignments.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        weights_a: StateDict | None = None,
        weights_b: StateDict | None = None,
        statistics: MergeStatistics | None = None,
        training: TrainingLoss | None = None,
        workers: int = MATCHING_WORKERS,
    ) -> None:
        self.spec = spec
        self._given = {WEIGHTS: (weights_a, weights_b), STATISTICS: statistics, LOSS: training}
        self._pool = ThreadPoolExecutor(max(1, workers))
        self._lock = threading.Lock()
        self._shared: dict[Any, Future] = {}

    def close(self) -> None:
        """Stop the worker threads and drop every input and shared result (the statistics are large)."""
        self._pool.shutdown()
        self._given = {need: None for need in self._given}
        self._shared.clear()

    def _require(self, need: str) -> Any:
        value = self._given[need]
        if value is None or value == (None, None):
            raise ConfigError(f"this fit was given no {need}; a method that reads them must declare {need!r} in needs")
        return value

    @property
    def statistics(self) -> MergeStatistics:
        return self._require(STATISTICS)

    @property
    def weights(self) -> tuple[StateDict, StateDict]:
        """(A's weights, B's weights)."""
        return self._require(WEIGHTS)

    @property
    def training(self) -> TrainingLoss:
        return self._require(LOSS)

    def shared(self, key: Any, compute: Callable[[], Any]) -> Future:
        """A future of ``compute()``, computed once per ``key`` on the worker threads (work methods share)."""
        with self._lock:
            if key not in self._shared:
                self._shared[key] = self._pool.submit(compute)
            return self._shared[key]

    def alignments_of(self, method: MergeMethod) -> dict[str, Alignment]:
        """``method.fit(self)``, fitted once per method name however many methods start from it."""
        key = ("method", method.name)
        with self._lock:
            cached = self._shared.get(key)
        if cached is None:  # fitted on this thread: a method's fit may itself wait on the worker threads
            cached = Future()
            cached.set_result(method.fit(self))
            with self._lock:
                self._shared.setdefault(key, cached)
        return cached.result()


class MergeMethod(ABC):
    """A merge method: what it needs, and how it fits one alignment per spec group from that.

    Subclasses set ``reference`` (the paper it implements) and ``summary``, and may declare ``Options`` (a
    dataclass whose fields are the ``name[key=value]`` options, each with a default).
    """

    reference: ClassVar[str]
    summary: ClassVar[str]

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, name: str, options: Any = None) -> None:
        self.name = name
        self.options = options if options is not None else self.Options()

    @property
    @abstractmethod
    def needs(self) -> frozenset[str]:
        """Which of `STATISTICS`, `WEIGHTS`, `LOSS` its ``fit`` reads."""

    @property
    @abstractmethod
    def function_preserving(self) -> bool:
        """Whether its alignments leave model B's function unchanged (tests check it against the alignments)."""

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        """The feature sets (names in ``spec.points``) whose statistics ``fit`` reads; empty without `STATISTICS`."""
        return []

    @abstractmethod
    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        """One alignment of B per group it aligns (groups it leaves alone are absent)."""

    def describe(self) -> dict[str, Any]:
        """What the outputs record about it: reference, needs, whether it preserves B, its options."""
        return {"reference": self.reference, "needs": sorted(self.needs),
                "function_preserving": self.function_preserving, "options": dataclasses.asdict(self.options)}


class Vanilla(MergeMethod):
    """No alignment: θ(λ) interpolates A and B as they are."""

    reference = VANILLA
    summary = "plain averaging, no alignment"
    needs = frozenset()
    function_preserving = True

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        return {}


# --- activation matching, composed per group kind ----------------------------------------------------------------


@dataclass(frozen=True)
class GroupAligner:
    """How one (group kind, variant) turns statistics into an alignment of one group."""

    fit: Callable[[MergeStatistics, PermGroup], Alignment]
    features: Callable[[PermGroup], list[str]]
    function_preserving: bool
    summary: str


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
                               "Head-Perm pairing, then per-head orthogonal maps of the q/k and v/o subspaces"),
    },
    "res": {
        variant: GroupAligner(_residual_aligner(points), _own_features, True,
                              f"one permutation of the stream from the {variant} residual point(s)")
        for variant, points in RESIDUAL_POINTS.items()
    },
}


class ActivationMatching(MergeMethod):
    """The paper's activation matching, one variant per group kind (``ff+attn[head_perm]+res[all]``).

    Args:
        name: the name it was requested by.
        variants: group kind -> variant (a key of `GROUP_ALIGNERS`); kinds absent are left alone.
    """

    reference = PAPER
    summary = "correlation of activations, Hungarian matching per group"
    needs = frozenset({STATISTICS})

    def __init__(self, name: str, variants: Mapping[str, str]) -> None:
        super().__init__(name)
        self.variants = {kind: variants[kind] for kind in GROUP_KINDS if kind in variants}

    @property
    def function_preserving(self) -> bool:
        return all(self._aligner(kind).function_preserving for kind in self.variants)

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


# --- weight matching and learned alignments ----------------------------------------------------------------------


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
        from lightning_merge.merge.weight_matching import weight_matching

        weights_a, weights_b = inputs.weights
        generator = torch.Generator().manual_seed(self.options.seed)
        return dict(weight_matching(inputs.spec, weights_a, weights_b, max_passes=self.options.max_passes,
                                    generator=generator))


class Learned(MergeMethod):
    """B's permutations (and, with ``attn=linear``, per-head linear maps) learned against the loss of the
    interpolated model, by Git Re-Basin's straight-through estimator, starting from another method's alignment."""

    reference = LEARNED
    summary = "straight-through permutations (+ per-head linear maps) trained on the interpolated model's loss"

    @dataclass(frozen=True)
    class Options:
        init: str = "weight_matching"  # the method whose alignment it starts from
        steps: int = 1000
        lr: float = 3e-3
        attn: str = "perm"  # "perm": heads permuted; "linear": per-head invertible maps learned too
        lambda_min: float = 0.4  # λ of each step ~ U(lambda_min, lambda_max)
        lambda_max: float = 0.6
        seed: int = 0

    ATTENTION_MODES = ("perm", "linear")

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        opts = self.options
        if opts.steps < 1:
            raise ConfigError(f"method {name!r}: steps={opts.steps} must be at least 1, e.g. learned[steps=1000]")
        if opts.lr <= 0:
            raise ConfigError(f"method {name!r}: lr={opts.lr} must be positive, e.g. learned[lr=0.003]")
        if opts.attn not in self.ATTENTION_MODES:
            raise ConfigError(f"method {name!r}: attn={opts.attn!r}; choose one of {', '.join(self.ATTENTION_MODES)}")
        if not 0 <= opts.lambda_min <= opts.lambda_max <= 1:
            raise ConfigError(f"method {name!r}: need 0 <= lambda_min <= lambda_max <= 1")
        self.init = get_method(opts.init)
        if isinstance(self.init, Learned) or not self.init.function_preserving:
            raise ConfigError(f"method {name!r}: init={opts.init!r} must be a function-preserving, non-learned method")

    @property
    def needs(self) -> frozenset[str]:
        return self.init.needs | {WEIGHTS, LOSS}

    @property
    def function_preserving(self) -> bool:
        return True

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return self.init.statistics_features(spec)

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        from lightning_merge.merge.learned import LearnedAlignment

        opts = self.options
        weights_a, weights_b = inputs.weights
        training = inputs.training
        module = LearnedAlignment(
            inputs.spec, weights_a, weights_b, inputs.alignments_of(self.init), training.loss,
            linear_attention=opts.attn == "linear", lambdas=(opts.lambda_min, opts.lambda_max), seed=opts.seed,
        )
        training.optimise(module, opts.steps, opts.lr)
        return module.alignments()


# --- the registry and the grammar --------------------------------------------------------------------------------

METHODS: dict[str, type[MergeMethod]] = {
    "vanilla": Vanilla,
    "permute": FullPermutation,
    "weight_matching": WeightMatching,
    "learned": Learned,
}

_CALL = re.compile(r"^(?P<head>\w+)(?:\[(?P<args>.*)\])?$", re.S)


def known_names() -> str:
    """A one-line description of every accepted name, for error messages and ``--help``."""
    kinds = [kind + (f"[{'|'.join(v)}]" if any(v) else "") for kind, v in GROUP_ALIGNERS.items()]
    return f"{', '.join(METHODS)}; or groups {', '.join(kinds)} joined by '+', e.g. ff+attn[monotonic]+res[last]"


def get_method(name: str) -> MergeMethod:
    """The method ``name`` asks for: a registered name with options, or the group syntax (see the module doc).

    Raises:
        UnknownNameError: the name, a group kind, a variant or an option is unknown, or a group is repeated.
        ConfigError: an option's value is invalid.
    """
    name = name.strip()
    parts = _split_top_level(name, "+")
    call = _CALL.match(parts[0].strip()) if len(parts) == 1 else None
    if call and call["head"] in METHODS:
        method_class = METHODS[call["head"]]
        return method_class(name, _parse_options(method_class, call["args"], name))
    variants: dict[str, str] = {}
    for part in parts:
        kind, variant = _parse_part(part.strip(), name)
        if kind in variants:
            raise UnknownNameError(f"method {name!r} names group {kind!r} twice; known: {known_names()}")
        variants[kind] = variant
    return ActivationMatching(name, variants)


def _parse_part(part: str, name: str) -> tuple[str, str]:
    match = _CALL.match(part)
    if not match or match["head"] not in GROUP_ALIGNERS:
        raise UnknownNameError(f"unknown merge method {name!r}; known: {known_names()}")
    kind, variant = match["head"], match["args"]
    variants = GROUP_ALIGNERS[kind]
    if variant is None:
        return kind, next(iter(variants))
    if variant not in variants or not variant:
        allowed = ", ".join(v for v in variants if v) or "none"
        raise UnknownNameError(f"unknown variant {variant!r} of group {kind!r} in {name!r}; variants: {allowed}")
    return kind, variant


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets (``learned[init=ff+attn]`` is one part)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _parse_options(method_class: type[MergeMethod], args: str | None, name: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(method_class.Options)}
    values: dict[str, Any] = {}
    for item in _split_top_level(args, ",") if args and args.strip() else []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            known = ", ".join(fields) or "none"
            raise UnknownNameError(f"method {name!r}: unknown option {item.strip()!r}; options: {known}")
        values[key] = _convert(text.strip(), typing.get_type_hints(method_class.Options)[key], name, key)
    return method_class.Options(**values)


def _convert(text: str, kind: type, name: str, key: str) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        return kind(text)
    except ValueError as err:
        raise ConfigError(f"method {name!r}: option {key}={text!r} is not a valid {kind.__name__}") from err


def fit_methods(
    methods: Mapping[str, MergeMethod], inputs: FitInputs, timings: dict[str, float] | None = None
) -> dict[str, dict[str, Alignment]]:
    """Alignments of every method (name -> group -> alignment), sharing work between them (module doc).

    ``timings``, if given, receives each method's fit time in seconds (shared work counts for the first method).
    """
    out = {}
    for name, method in methods.items():
        start = time.perf_counter()
        out[name] = inputs.alignments_of(method)
        if timings is not None:
            timings[name] = time.perf_counter() - start
    return out

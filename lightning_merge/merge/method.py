"""The merge-method interface: what a method declares it needs, and the inputs the framework gives it.

A method is one class (a `MergeMethod` subclass) in its own module, plus one entry in the registry
(`lightning_merge.merge.methods.METHODS`). It declares what ``fit`` reads — activation statistics, the models'
weights, a loss over training batches, feature moments of a model it builds (`STATISTICS`, `WEIGHTS`, `LOSS`,
`ACTIVATIONS`) — and the framework builds a `FitInputs`
holding exactly that: reading anything undeclared fails, so a declaration cannot silently fall out of date.
``fit`` returns one `Alignment` per spec group it aligns; a method that also changes the path between the aligned
endpoints (REPAIR, RegMean) returns it from ``fit_path`` (`lightning_merge.merge.paths`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Alignment
from lightning_merge.merge.paths import InterpolationPath
from lightning_merge.merge.spec import PermutationSpec
from lightning_merge.merge.stats import MergeStatistics

VANILLA = "Frankle et al., Linear Mode Connectivity and the Lottery Ticket Hypothesis, https://arxiv.org/abs/1912.05671"

STATISTICS, WEIGHTS, LOSS, ACTIVATIONS = "statistics", "weights", "loss", "activations"

StateDict = Mapping[str, torch.Tensor]
# Threads that solve independent assignments at once. Each holds a float64 d x d correlation (72 MiB for BERT-base's
# FF), so a few threads, not one per core.
MATCHING_WORKERS = min(4, os.cpu_count() or 1)


# (parameters by name, feature sets, number of batches) -> feature set -> (mean, variance) of each feature, in the
# order the forward pass reaches the sets
ActivationMoments = Callable[[Mapping[str, torch.Tensor], list[str], int], dict[str, tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class TrainingLoss:
    """What the framework gives a method that needs a loss over training batches.

    Attributes:
        loss: (parameters of model A's structure, batch) -> mean loss of the model with those parameters.
        optimise: runs ``module(batch) -> loss`` over training batches for ``steps`` optimiser steps at learning
            rate ``lr``, updating the module's parameters (with the framework's progress bar and logger, which logs
            under the method's ``name``).
    """

    loss: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], torch.Tensor]
    optimise: Callable[[nn.Module, int, float, str], None]


class FitInputs:
    """Everything a method may need, of which each method is shown only what it declared (`MergeMethod.needs`).

    The framework builds one with every input the requested methods need; `alignments_of` fits a method on a view
    that holds only that method's declared inputs (reading another is a `ConfigError`), while all views share the
    worker threads and the results of work several methods have in common.

    Args:
        spec: the models' spec.
        weights_a: A's weights (state dict), given to methods that need ``WEIGHTS``.
        weights_b: B's weights.
        statistics: activation statistics, for methods that need ``STATISTICS``.
        training: the loss and optimiser, for methods that need ``LOSS``.
        activations: (parameters of model A's structure, feature sets, batch count) -> feature set -> (mean,
            variance) per feature over that many of the statistics batches, for methods that need ``ACTIVATIONS``.
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
        activations: ActivationMoments | None = None,
    ) -> None:
        self.spec = spec
        weights = (weights_a, weights_b) if weights_a is not None and weights_b is not None else None
        self._given: dict[str, Any] = {WEIGHTS: weights, STATISTICS: statistics, LOSS: training,
                                       ACTIVATIONS: activations}
        self._visible = frozenset(self._given)
        self._pool = ThreadPoolExecutor(max(1, workers))
        self._lock = threading.Lock()
        self._shared: dict[Any, Future] = {}

    def view(self, needs: frozenset[str]) -> FitInputs:
        """The same inputs and shared work, showing only ``needs``."""
        restricted = copy.copy(self)
        restricted._visible = frozenset(needs)
        return restricted

    def close(self) -> None:
        """Stop the worker threads and drop every input and shared result (the statistics are large)."""
        self._pool.shutdown()
        self._given.update({need: None for need in self._given})
        self._shared.clear()

    def _require(self, need: str) -> Any:
        if need not in self._visible:
            raise ConfigError(f"a method read {need} without declaring {need!r} in its needs")
        if self._given[need] is None:
            raise ConfigError(f"this fit was given no {need}; a method that reads them must declare {need!r} in needs")
        return self._given[need]

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

    @property
    def activations(self) -> ActivationMoments:
        return self._require(ACTIVATIONS)

    def shared(self, key: Any, compute: Callable[[], Any]) -> Future:
        """A future of ``compute()``, computed once per ``key`` on the worker threads (work methods share)."""
        with self._lock:
            if key not in self._shared:
                self._shared[key] = self._pool.submit(compute)
            return self._shared[key]

    def alignments_of(self, method: MergeMethod) -> dict[str, Alignment]:
        """``method.fit`` on a view of its declared inputs, fitted once per method name however many methods start
        from it. It runs on the calling thread: a method's fit may itself wait on the worker threads."""
        key = ("method", method.name)
        with self._lock:
            pending = self._shared.get(key)
            owner = pending is None
            if owner:
                pending = self._shared[key] = Future()
        if owner:
            try:
                pending.set_result(method.fit(self.view(method.needs)))
            except BaseException as err:
                pending.set_exception(err)
        return pending.result()


class MergeMethod(ABC):
    """A merge method: what it needs, and how it fits one alignment per spec group from that.

    Subclasses set ``reference`` (the paper it implements) and ``summary``, and may declare ``Options`` (a
    dataclass whose fields are the ``name[key=value]`` options, each with a default).
    """

    reference: ClassVar[str]
    summary: ClassVar[str]
    changes_path: ClassVar[bool] = False  # whether `fit_path` returns a path other than the straight line

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, name: str, options: Any = None) -> None:
        self.name = name
        self.options = options if options is not None else self.Options()

    @property
    @abstractmethod
    def needs(self) -> frozenset[str]:
        """Which of `STATISTICS`, `WEIGHTS`, `LOSS`, `ACTIVATIONS` its ``fit`` (and ``fit_path``) reads."""

    @property
    @abstractmethod
    def function_preserving(self) -> bool:
        """Whether its alignments leave model B's function unchanged (tests check it against the alignments)."""

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        """The feature sets (names in ``spec.points``) whose statistics ``fit`` reads; empty without `STATISTICS`."""
        return []

    @property
    def learnable_start(self) -> bool:
        """Whether a learned method can start from its alignments (permutations, per-head maps)."""
        return True

    @property
    def permutations_only(self) -> bool:
        """Whether every alignment it fits is a permutation (a path that reads B's features one by one needs it)."""
        return True

    def own_features(self, spec: PermutationSpec) -> list[str]:
        """Feature sets (names in ``spec.points``) of which it reads each model's own statistics
        (`MergeStatistics.own_moments`: Gram matrices); empty without `STATISTICS`."""
        return []

    def fit_path(self, inputs: FitInputs, alignments: Mapping[str, Alignment]) -> InterpolationPath | None:
        """The path between A and B's aligned model it evaluates (None: the straight line), given its alignments."""
        return None

    def split_layer(self, spec: PermutationSpec) -> int | None:
        """The first layer each model runs on its own, if its merged model is a shared trunk with every model's
        own tail (`lightning_merge.merge.two_headed`: ZipIt!'s partial zip); None: one merged model."""
        return None

    def check_spec(self, spec: PermutationSpec) -> None:
        """Raise `ConfigError` if the method cannot align models of ``spec`` (checked before any compute)."""

    @abstractmethod
    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        """One alignment of B per group it aligns (groups it leaves alone are absent)."""

    def describe(self) -> dict[str, Any]:
        """What the outputs record about it: reference, needs, whether it preserves B, its options."""
        return {"summary": self.summary, "reference": self.reference, "needs": sorted(self.needs),
                "function_preserving": self.function_preserving, "options": dataclasses.asdict(self.options)}


class Vanilla(MergeMethod):
    """No alignment: θ(λ) interpolates A and B as they are."""

    reference = VANILLA
    summary = "plain averaging, no alignment"
    needs = frozenset()
    function_preserving = True

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        return {}

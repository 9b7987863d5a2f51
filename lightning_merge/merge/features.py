"""Record the features a spec matches on, with forward hooks on the spec's feature points (plain PyTorch).

Usage::

    with FeatureRecorder(model, spec) as recorder:
        model(**batch)
        features = recorder.pop(batch["attention_mask"])   # {group: {point key: (N, d)}}

Features are kept only for non-padding tokens (and, if a special-tokens mask is given, non-special tokens), so the
statistics are over real tokens as in the paper.

For the statistics pass, `StatisticsRecorder` hooks N models (`PairStatisticsRecorder` two) and adds each feature
point to every pair's sums as soon as the pair's second model produces it, so at most N − 1 models' features of one
batch are held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from lightning_merge.errors import ArchitectureMismatch, DataError
from lightning_merge.merge.families import model_inputs
from lightning_merge.merge.spec import FeaturePoint, PermutationSpec
from lightning_merge.merge.stats import STATISTICS_DTYPE, JointStatistics, MergeStatistics

Features = dict[str, dict[str, torch.Tensor]]


class FeatureRecorder:
    """Forward hooks on the feature points of ``spec``'s groups; `pop` returns the last forward's token features.

    Args:
        model: the model the spec was built for (module names relative to it).
        spec: its `PermutationSpec`.
        groups: group names to record (default: all groups of the spec).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: PermutationSpec,
        groups: Iterable[str] | None = None,
        on_capture: Callable[[str, torch.Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.groups = list(spec.groups if groups is None else groups)
        self.on_capture = on_capture  # (point key, (B, T, d) activation); None: keep it for `pop`
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureRecorder:
        self.register()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def points(self) -> list[FeaturePoint]:
        """The distinct feature points of the recorded groups."""
        unique: dict[str, FeaturePoint] = {}
        for group in self.groups:
            for point in self.spec.points[group]:
                unique.setdefault(point.key, point)
        return list(unique.values())

    def register(self) -> None:
        """Register one forward hook per feature point (idempotent)."""
        if self._handles:
            return
        for point in self.points():
            module = self._module(point.module)
            self._handles.append(module.register_forward_hook(self._hook(point)))

    def remove(self) -> None:
        """Remove the hooks and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as err:
            spec = self.spec.architecture
            raise ArchitectureMismatch(f"model has no module {name} needed by the {spec} spec") from err

    def _hook(self, point: FeaturePoint):
        def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            value = point.select(inputs[0] if point.source == "input" else output).detach()
            if self.on_capture is not None:
                self.on_capture(point.key, value)
            else:
                self._captured[point.key] = value

        return hook

    def pop(self, attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None = None) -> Features:
        """Token features of the last forward pass, padding (and special tokens, if masked) removed.

        Args:
            attention_mask: (B, T), 1 for real tokens.
            special_tokens_mask: (B, T), 1 for tokens to leave out (e.g. [CLS]/[SEP]); optional.

        Returns:
            group name -> point key -> (N, d) features, N = kept tokens. Clears the captured activations.
        """
        keep = _drop_mask(token_mask(attention_mask, special_tokens_mask))
        missing = [p.key for p in self.points() if p.key not in self._captured]
        if missing:
            raise RuntimeError(f"no activation recorded at {missing[0]}; run a forward pass inside the recorder")
        tokens = {key: kept_tokens(value, keep) for key, value in self._captured.items()}
        self._captured.clear()
        return {group: {p.key: tokens[p.key] for p in self.spec.points[group]} for group in self.groups}


def token_mask(attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: real tokens, minus the special ones when ``special_tokens_mask`` is given."""
    keep = attention_mask.bool()
    return keep & ~special_tokens_mask.bool() if special_tokens_mask is not None else keep


def kept_tokens(value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (N, d) rows of the kept tokens (``keep`` None: all of them, as a view, not a copy). A (B, d)
    value is one token per sequence already (a pooler's input: the first token's features), taken whole."""
    if keep is None:
        return value.reshape(-1, value.shape[-1])
    if value.ndim == 2:
        if value.shape[0] != keep.shape[0]:
            raise DataError(f"features of shape {tuple(value.shape)} are neither per token nor per sequence of a "
                            f"batch of {keep.shape[0]}")
        return value
    return value[keep.to(value.device)]


def _drop_mask(keep: torch.Tensor) -> torch.Tensor | None:
    """``keep``, or None when it keeps every token (one host sync per batch, not one per feature point)."""
    return None if keep.all() else keep


class StatisticsRecorder:
    """Hooks on N ≥ 2 models that add every feature point of a batch to `JointStatistics` as the models produce it.

    Holding every model's activations at every point until the batch ends would cost N models' features; here model
    i's features of a point wait only until the last model reaches the same point, and each pair's sums are updated
    as soon as its second model produces the point. Each feature module must run once per forward (true of every
    supported family). Run the models in order on each batch, between `begin_batch` and `end_batch`::

        with StatisticsRecorder(models, statistics) as recorder:
            for batch in batches:
                recorder.begin_batch(batch["attention_mask"])
                for model in models:
                    model(**batch)
                recorder.end_batch()
    """

    def __init__(self, models: Sequence[torch.nn.Module], statistics: JointStatistics) -> None:
        if len(models) != statistics.num_models:
            raise ValueError(f"{len(models)} models for statistics of {statistics.num_models}")
        self.statistics = statistics
        self._models = tuple(models)
        self._recorders: tuple[FeatureRecorder, ...] = ()  # made by `register`, dropped by `remove`
        self._keys = set(statistics.point_keys)
        self._own_keys = [set(own.points) for own in statistics.own]
        self._keep: torch.Tensor | None = None
        self._in_batch = False
        self._waiting: dict[str, dict[int, torch.Tensor]] = {}
        self._done: set[str] = set()

    def __enter__(self) -> StatisticsRecorder:
        self.register()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def register(self) -> None:
        if not self._recorders:
            spec = self.statistics.spec
            own = [group for statistics in self.statistics.own for group in statistics.groups]
            groups = list(dict.fromkeys([*self.statistics.groups, *own]))
            self._recorders = tuple(FeatureRecorder(model, spec, groups, on_capture=self._capture(k))
                                    for k, model in enumerate(self._models))
        try:
            for recorder in self._recorders:
                recorder.register()
        except BaseException:
            self.remove()  # a failure on a later model would leave the earlier ones' hooks
            raise

    def remove(self) -> None:
        for recorder in self._recorders:
            recorder.remove()
        # they hold closures over this recorder: kept, that cycle would keep the statistics alive until Python's
        # cyclic collector happens to run
        self._recorders = ()
        self._waiting.clear()

    def begin_batch(self, attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None = None) -> None:
        """The tokens of the next batch to count (see `FeatureRecorder.pop`)."""
        self._keep = _drop_mask(token_mask(attention_mask, special_tokens_mask))
        self._in_batch = True
        self._waiting.clear()
        self._done.clear()

    def end_batch(self) -> None:
        """Check that every model's forward pass reached every feature point of the batch."""
        missing = sorted(self._keys - self._done)
        self._keep, self._in_batch = None, False
        if missing:
            last = self._name(len(self._models) - 1)
            raise RuntimeError(f"no activation of {last} recorded at {missing[0]}; run every model on every batch, "
                               "in order")

    def _name(self, k: int) -> str:
        return f"model {'AB'[k]}" if len(self._models) == 2 else f"model {k}"

    def _capture(self, k: int) -> Callable[[str, torch.Tensor], None]:
        def capture(key: str, value: torch.Tensor) -> None:
            keep = self._current_keep()
            if self._own_keys and key in self._own_keys[k]:
                own = kept_tokens(value, keep)
                self.statistics.own[k].points[key].update(own, own)
            if key not in self._keys:
                return
            waiting = self._waiting.setdefault(key, {})
            if len(waiting) != k:
                raise RuntimeError(f"{self._name(k)} reached {key} before {self._name(len(waiting))} did on this "
                                   "batch; run the models in order")
            features = kept_tokens(value, keep)
            for i, earlier in waiting.items():
                self.statistics.pair(i, k).points[key].update(earlier, features)
            if k < len(self._models) - 1:
                waiting[k] = features
            else:
                del self._waiting[key]
                self._done.add(key)

        return capture

    def _current_keep(self) -> torch.Tensor | None:
        if not self._in_batch:
            raise RuntimeError("a forward pass ran outside begin_batch/end_batch of the statistics recorder")
        return self._keep


class PairStatisticsRecorder(StatisticsRecorder):
    """`StatisticsRecorder` of two models into one `MergeStatistics` (A = ``model_a``): the pair merge's pass."""

    def __init__(self, model_a: torch.nn.Module, model_b: torch.nn.Module, statistics: MergeStatistics) -> None:
        super().__init__((model_a, model_b), JointStatistics.from_pairs({(0, 1): statistics}, 2))


@torch.no_grad()
def collect_statistics(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    groups: Iterable[str] | None = None,
    device: torch.device | str | None = None,
    exclude_special_tokens: bool = False,
    products: str = STATISTICS_DTYPE,
    own_groups: Iterable[str] = (),
) -> MergeStatistics:
    """Run both models over ``batches`` and accumulate `MergeStatistics` (the plain-PyTorch statistics pass).

    Args:
        model_a: model A (eval mode is the caller's choice; dropout would add noise to the features).
        model_b: model B, same spec.
        batches: dicts of model inputs with an ``attention_mask`` (``special_tokens_mask`` and ``labels`` are not
            passed on, nor token types to a family without them). Only the base model runs when every feature
            point lies in it (the heads make no features).
        spec: the models' spec.
        groups: groups to collect (default all).
        device: where the float64 sums live (default: model A's device).
        exclude_special_tokens: leave out tokens marked in the batch's ``special_tokens_mask`` (the paper keeps
            them, so the default is False).
        products: dtype of each block's feature products (``float32``, the default, or ``float64``; see
            `PairStatistics`).
        own_groups: feature sets of which each model's own statistics are kept too (`MergeStatistics.own`).

    Returns:
        The accumulated statistics.
    """
    pair = (model_a, model_b)
    return collect_joint_statistics(pair, batches, spec, groups, device, exclude_special_tokens, products,
                                    own_groups).pair(0, 1)


@torch.no_grad()
def collect_joint_statistics(
    models: Sequence[torch.nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    groups: Iterable[str] | None = None,
    device: torch.device | str | None = None,
    exclude_special_tokens: bool = False,
    products: str = STATISTICS_DTYPE,
    own_groups: Iterable[str] = (),
) -> JointStatistics:
    """`collect_statistics` for N ≥ 2 models: every pair's statistics from one pass over ``batches`` (and each
    model's own statistics of ``own_groups``, see `JointStatistics`)."""
    statistics = JointStatistics(spec, len(models), groups, device or next(models[0].parameters()).device, products,
                                 own_groups)
    runners = [feature_runner(model, spec, [*statistics.groups, *own_groups])[0] for model in models]
    with StatisticsRecorder(models, statistics) as recorder:
        for batch in batches:
            recorder.begin_batch(*_token_masks(batch, exclude_special_tokens))
            inputs = _model_inputs(batch, spec)
            for k, (model, run) in enumerate(zip(models, runners)):
                if all(model is not earlier for earlier in models[:k]):  # one model twice: its hooks all fire at once
                    run(**_to(inputs, model))
            recorder.end_batch()
    return statistics


_NOT_MODEL_INPUTS = ("special_tokens_mask", "labels")


def _token_masks(batch: Mapping[str, torch.Tensor], exclude_special: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "attention_mask" not in batch:
        raise DataError(f"a statistics batch needs an attention_mask; it has {', '.join(batch)}")
    if exclude_special and "special_tokens_mask" not in batch:
        raise DataError("exclude_special_tokens needs a special_tokens_mask in every batch")
    return batch["attention_mask"], batch["special_tokens_mask"] if exclude_special else None


def needs_heads(spec: PermutationSpec, groups: Iterable[str]) -> bool:
    """Whether a feature point of ``groups`` lies outside the base model: otherwise a statistics pass runs only the
    base model and skips the heads (e.g. a 30k-vocab decoder)."""
    prefix = spec.base_prefix
    return any(not point.module.startswith(prefix) for group in groups for point in spec.points[group])


def feature_runner(model: torch.nn.Module, spec: PermutationSpec, groups: Iterable[str]) -> tuple[torch.nn.Module, str]:
    """The module a pass that records ``groups`` runs — the base model unless a point lies in a head — and the
    prefix its parameter names lack."""
    if spec.base_prefix and not needs_heads(spec, groups):
        return model.get_submodule(spec.base_prefix.rstrip(".")), spec.base_prefix
    return model, ""


def _model_inputs(batch: Mapping[str, torch.Tensor], spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """What the models take of a batch: the family's inputs, or everything but masks and labels."""
    if spec.family:
        return model_inputs(batch, spec.family)
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def _to(inputs: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {name: value.to(device) for name, value in inputs.items()}


@torch.no_grad()
def feature_moments(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    features: Sequence[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    special_token_ids: Sequence[int] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance of every feature of one-point feature sets over the real tokens of ``batches``, with
    ``model`` run on ``params`` (by parameter name, tied aliases included) instead of its own weights: only its
    base model when every point lies in it. ``special_token_ids``: tokens left out, as the statistics pass leaves
    them out with ``exclude_special_tokens``.

    Returns:
        feature set -> ((d,) mean, (d,) variance) in float64, in the order the forward pass reaches the sets (what a
        layer-by-layer correction such as REPAIR's follows).
    """
    by_key = {spec.points[name][0].key: name for name in features}
    sums: dict[str, list] = {}
    keep: list[torch.Tensor | None] = [None]

    def capture(key: str, value: torch.Tensor) -> None:
        if key in by_key:
            tokens = kept_tokens(value, keep[0]).double()
            total = sums.setdefault(by_key[key], [0, 0.0, 0.0])
            total[0] += tokens.shape[0]
            total[1] = total[1] + tokens.sum(0)
            total[2] = total[2] + tokens.square().sum(0)

    device = next(iter(params.values())).device
    runner, prefix = feature_runner(model, spec, features)
    weights = {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}
    special = torch.tensor(list(special_token_ids), device=device) if special_token_ids else None
    with FeatureRecorder(model, spec, list(features), on_capture=capture):
        for batch in batches:
            inputs = {name: value.to(device) for name, value in _model_inputs(batch, spec).items()}
            leave_out = torch.isin(inputs["input_ids"], special) if special is not None else None
            keep[0] = _drop_mask(token_mask(inputs["attention_mask"], leave_out))
            torch.func.functional_call(runner, weights, args=(), kwargs=inputs, tie_weights=False)
    if not sums:
        raise DataError("measuring the merged model's features saw no batches; give the statistics data some text")
    out = {}
    for name, (count, total, squares) in sums.items():
        mean = total / max(count, 1)
        out[name] = (mean, (squares / max(count, 1) - mean.square()).clamp(min=0))
    return out

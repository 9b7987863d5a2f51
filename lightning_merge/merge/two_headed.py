"""ZipIt!'s partial zip as a model: a shared trunk and every model's own tail, their predictions mixed.

The trunk is the merged model's first k layers (and embeddings); the stream it leaves at layer k is unmerged into
each model's basis, and each model runs its own layers k.. and heads on it. The two-headed (N-headed) model predicts
the mixture Σ_i w_i p_i of the tails' predicted distributions (a weighted mean for a one-output regression), the
weights being the interpolation's: (1−λ, λ) along a pair's path, 1/N for the N-way merge.

Every forward goes through one model's module tree with other parameters (``torch.func.functional_call``): the
trunk stops at layer k, and each tail's layer k reads the unmerged stream in place of what that model computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_merge.merge.interpolate import in_math_dtype, math_dtype

Params = Mapping[str, Tensor]


class _StreamReached(Exception):
    """Raised by the trunk's hook at the split layer: the trunk's work is done."""

    def __init__(self, stream: Tensor) -> None:
        super().__init__()
        self.stream = stream


class _Predictor(nn.Module):
    """An objective's ``predictions`` as a forward, for ``functional_call``."""

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.objective.predictions(batch)


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_first_input(args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@contextmanager
def _hooked(layer: nn.Module, hook: Any) -> Iterator[None]:
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def trunk_stream(objective: nn.Module, layer: nn.Module, params: Params, batch: dict[str, Tensor]) -> Tensor:
    """The stream (B, T, d) that the objective's model with ``params`` feeds ``layer`` (its later layers not run)."""

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _StreamReached(_first_input(args, kwargs))

    predictor = _Predictor(objective)
    with _hooked(layer, stop):
        try:
            functional_call(predictor, _prefixed(params), (batch,), tie_weights=False)
        except _StreamReached as reached:
            return reached.stream
    raise RuntimeError(f"the model never ran its layer {type(layer).__name__} on the batch")


def tail_predictions(
    objective: nn.Module, layer: nn.Module, params: Params, stream: Tensor, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """(logits, targets) of the objective's model with ``params`` when ``layer`` reads ``stream`` instead of what
    the model's earlier layers computed."""

    def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _with_first_input(args, kwargs, stream.to(_first_input(args, kwargs).dtype))

    with _hooked(layer, feed):
        return functional_call(_Predictor(objective), _prefixed(params), (batch,), tie_weights=False)


def mixture_logits(logits: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Logits of the mixture Σ_i w_i softmax(logits_i) (its log-probabilities); one-output regressions: the weighted
    mean. Weights must be positive and sum to one."""
    logits = [in_math_dtype(x) for x in logits]
    if logits[0].shape[-1] == 1:
        return sum(w * x for w, x in zip(weights, logits))
    stacked = torch.stack([F.log_softmax(x, dim=-1) + math.log(w) for w, x in zip(weights, logits)])
    return torch.logsumexp(stacked, dim=0)


def two_headed_outputs(
    objective: nn.Module,
    layer_module: str,
    trunk: Params,
    tails: Sequence[Params],
    unmerges: Sequence[Tensor],
    weights: Sequence[float],
    batch: dict[str, Tensor],
) -> tuple[Tensor, ...]:
    """The objective's outputs (summed loss, count[, logits]) of the model whose trunk holds ``trunk`` up to
    ``layer_module`` and whose heads are the models of ``tails``, mixed with ``weights`` (tails of weight 0 do not
    run).

    Args:
        objective: an objective (`lightning_merge.objectives`) around a model of the merged models' structure.
        layer_module: the name, in the objective's model, of the first layer the tails run on their own.
        trunk: the merged parameters (every parameter name of the model; those past the split are not read).
        tails: each model's own parameters.
        unmerges: per tail, (d, d): the trunk's stream feature j read as Σ_i unmerge[j, i] of the merged ones.
        weights: per tail, its share of the mixture.
    """
    layer = objective.model.get_submodule(layer_module)
    stream = trunk_stream(objective, layer, trunk, batch)
    logits, kept, targets = [], [], None
    for params, unmerge, weight in zip(tails, unmerges, weights):
        if weight == 0:
            continue
        tail_logits, targets = tail_predictions(objective, layer, params, _unmerged(stream, unmerge), batch)
        logits.append(tail_logits)
        kept.append(weight)
    return objective.outputs(mixture_logits(logits, kept), targets)


def _unmerged(stream: Tensor, unmerge: Tensor) -> Tensor:
    """The stream in a tail's basis, at least in float32: under bf16 autocast the product would round the stream,
    which the models' own residual additions keep in float32."""
    dtype = math_dtype(stream.dtype)
    with torch.autocast(stream.device.type, enabled=False):
        return stream.to(dtype) @ unmerge.T.to(device=stream.device, dtype=dtype)


def _prefixed(params: Params) -> dict[str, Tensor]:
    return {f"objective.model.{name}": value for name, value in params.items()}

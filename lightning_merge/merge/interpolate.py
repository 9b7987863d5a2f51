"""Linear interpolation θ(λ) = (1−λ)·θ_A + λ·π(θ_B) between two state dicts, loss barriers and midpoint figures
(pure functions).

Floating tensors are interpolated in at least float32 and cast back to their dtype; non-floating buffers
(``position_ids``) are taken from A; tied weights (two names, one storage, e.g. the MLM decoder and the word
embeddings) stay one tensor in the result, and `load_state_dict_tied` checks the tie survives loading.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from lightning_merge.errors import ArchitectureMismatch, ConfigError

StateDict = Mapping[str, torch.Tensor]
_ENDPOINT_TOLERANCE = 1e-9


def find_ties(state_dict: StateDict) -> dict[str, str]:
    """Alias name -> source name for entries that share storage with an earlier entry (same view of it)."""
    seen: dict[tuple, str] = {}
    ties: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue
        view = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if view in seen:
            ties[name] = seen[view]
        else:
            seen[view] = name
    return ties


def _check_same_keys(sd_a: StateDict, sd_b: StateDict) -> None:
    for name in list(sd_a) + list(sd_b):
        if name not in sd_a or name not in sd_b:
            side = "B" if name in sd_a else "A"
            raise ArchitectureMismatch(f"state dicts differ: {name} is missing from {side}")
        if sd_a[name].shape != sd_b[name].shape:
            raise ArchitectureMismatch(
                f"state dicts differ in {name}: shape {tuple(sd_a[name].shape)} vs {tuple(sd_b[name].shape)}"
            )


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: half precision (autocast's bf16 too) in float32, float32 and float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


def in_math_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its `math_dtype` (itself when it is one already)."""
    return tensor.to(math_dtype(tensor.dtype))


def _lerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """(1−λ)·a + λ·b; the endpoints are the tensors themselves (lerp would spread a non-finite b to λ = 0)."""
    if lam == 0:
        return a
    if lam == 1:
        return b.to(a.dtype)
    dtype = math_dtype(a.dtype)
    return torch.lerp(a.to(dtype), b.to(dtype), lam).to(a.dtype)


def combine_state_dicts(states: Sequence[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k θ_k for weights summing to 1 (states already in one basis): a model itself where one weight is 1,
    `interpolate_state_dicts` for two, A's tied entries sharing one tensor."""
    chosen = [(state, weight) for state, weight in zip(states, weights) if weight != 0]
    if len(chosen) == 1:
        return dict(chosen[0][0])
    if len(chosen) == 2:
        (first, w_first), (second, w_second) = chosen
        return interpolate_state_dicts(first, second, w_second / (w_first + w_second))
    first = chosen[0][0]
    for state, _ in chosen[1:]:
        _check_same_keys(first, state)
    return _map_floats(first, lambda name, value: sum(w * state[name].to(value.device) for state, w in chosen))


def _map_floats(reference: StateDict, combine: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``combine(name, tensor)`` for every floating entry of ``reference`` in its key order; its other entries as
    they are, and its tied entries sharing one tensor."""
    ties = find_ties(reference)
    out: dict[str, torch.Tensor] = {}
    for name, value in reference.items():
        if name in ties:
            out[name] = out[ties[name]]
        elif torch.is_floating_point(value):
            out[name] = combine(name, value)
        else:
            out[name] = value
    return out


def interpolate_state_dicts(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """θ(λ) = (1−λ)·θ_A + λ·θ_B, exact at λ = 0 and 1.

    Args:
        sd_a: state dict of model A.
        sd_b: state dict of model B, already permuted into A's basis.
        lam: interpolation weight of B.

    Returns:
        A new state dict in A's key order; non-floating entries come from A, A's tied entries share one tensor.

    Raises:
        ArchitectureMismatch: the key sets or shapes differ.
    """
    _check_same_keys(sd_a, sd_b)
    return _map_floats(sd_a, lambda name, a: _lerp(a, sd_b[name].to(a.device), lam))


def load_state_dict_tied(model: torch.nn.Module, state_dict: StateDict) -> None:
    """Load ``state_dict`` into ``model`` and check that the model's tied weights are still tied.

    Tied aliases may be absent from ``state_dict``; if present they must equal their source.

    Raises:
        ArchitectureMismatch: keys are missing/unexpected, tied entries disagree, or loading broke a tie.
    """
    ties = find_ties(model.state_dict())
    for alias, source in ties.items():
        if alias in state_dict and source in state_dict and not torch.equal(state_dict[alias], state_dict[source]):
            raise ArchitectureMismatch(f"tied weights {alias} and {source} differ in the state dict")
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    missing = [name for name in missing if name not in ties]
    if missing or unexpected:
        problem = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
        raise ArchitectureMismatch(f"state dict {problem} for {type(model).__name__}")
    broken = [alias for alias, source in ties.items() if alias not in find_ties(model.state_dict())]
    if broken:
        raise ArchitectureMismatch(f"loading untied {broken[0]} from {ties[broken[0]]}")


def lambda_grid(step: float = 0.05) -> list[float]:
    """λ from 0 to 1 in ``step`` increments, endpoints exact (the paper uses 0.05)."""
    if not 0 < step <= 1:
        raise ConfigError(f"lambda step must be in (0, 1], got {step}")
    count = round(1 / step)
    return [i / count for i in range(count + 1)]


def _check_lambdas(lambdas: Sequence[float], losses: Sequence[float]) -> np.ndarray:
    grid = np.asarray(lambdas, dtype=np.float64)
    if grid.ndim != 1 or len(grid) != len(losses) or len(grid) < 2:
        raise ConfigError(f"need one loss per lambda and at least two lambdas, got {len(grid)} and {len(losses)}")
    if not np.isfinite(grid).all():
        raise ConfigError(f"lambdas must be finite numbers in [0, 1], got {grid[~np.isfinite(grid)][0]}")
    if (grid < -_ENDPOINT_TOLERANCE).any() or (grid > 1 + _ENDPOINT_TOLERANCE).any():
        raise ConfigError(f"lambdas must lie within [0, 1], got {grid.min()}..{grid.max()}")
    for endpoint in (0.0, 1.0):
        if not (np.abs(grid - endpoint) <= _ENDPOINT_TOLERANCE).any():
            raise ConfigError(f"the lambda grid must contain {endpoint:g} (the endpoints define the barrier)")
    if len(np.unique(grid)) != len(grid):
        raise ConfigError("the lambda grid has duplicate values")
    return grid


def check_lambdas(lambdas: Sequence[float]) -> list[float]:
    """Validate a λ grid (within [0, 1], containing 0 and 1, no duplicates) before any curve is computed."""
    return _check_lambdas(lambdas, list(lambdas)).tolist()


def loss_barrier(lambdas: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Loss barrier of an interpolation curve, in both published forms.

    Args:
        lambdas: the λ grid; must lie in [0, 1] and contain 0 and 1.
        losses: L(θ(λ)) for each λ.

    Returns:
        ``barrier``: max over λ of L(λ) − ((1−λ)L(0) + λL(1)), with ``barrier_lambda`` its argmax;
        ``barrier_midpoint``: max over λ of L(λ) − ½(L(0) + L(1)), with ``barrier_midpoint_lambda``;
        ``loss_a`` = L(0), ``loss_b`` = L(1).

    Raises:
        ConfigError: the grid is not a valid λ grid or does not match the losses.
    """
    grid = _check_lambdas(lambdas, losses)
    values = np.asarray(losses, dtype=np.float64)
    loss_a = float(values[np.argmin(np.abs(grid))])
    loss_b = float(values[np.argmin(np.abs(grid - 1))])
    linear = values - ((1 - grid) * loss_a + grid * loss_b)
    midpoint = values - 0.5 * (loss_a + loss_b)
    return {
        "barrier": float(linear.max()),
        "barrier_lambda": float(grid[int(np.argmax(linear))]),
        "barrier_midpoint": float(midpoint.max()),
        "barrier_midpoint_lambda": float(grid[int(np.argmax(midpoint))]),
        "loss_a": loss_a,
        "loss_b": loss_b,
    }


def midpoint_figures(lambdas: Sequence[float], curve: Mapping[str, Sequence[float]],
                     endpoints: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The merged model at the λ nearest ½ against models A and B as they are: ``midpoint_loss`` and
    ``midpoint_excess`` (its loss minus the endpoints' mean), and per task metric ``midpoint_<metric>`` and
    ``midpoint_<metric>_drop`` (the endpoints' mean minus it)."""
    index = min(range(len(lambdas)), key=lambda i: abs(lambdas[i] - 0.5))
    figures = {"midpoint_lambda": float(lambdas[index])}
    for name, values in curve.items():
        mean = sum(endpoints[name]) / len(endpoints[name])
        figures[f"midpoint_{name}"] = float(values[index])
        key, sign = ("midpoint_excess", 1) if name == "loss" else (f"midpoint_{name}_drop", -1)
        figures[key] = sign * (float(values[index]) - mean)
    return figures

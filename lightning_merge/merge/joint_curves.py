"""What an N-model merge evaluates and how its numbers are summarised (plain Python; the test loop runs the points).

Every method gets, on the same evaluation data:

- the line between every pair of models (i, j): a pairwise method's own fit of j into i's basis, a joint method's
  two models both in model 0's basis — so the barrier of each pair is measured after the method's alignment;
- each model alone and the uniform N-way average in the method's common basis (a pairwise method's common basis is
  its alignment of every model to model 0): the "merged model" and the mean endpoint loss it is compared with;
- for N = 3, a barycentric grid over the triangle of the three models (``simplex_steps`` divisions per edge).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_merge.errors import ConfigError
from lightning_merge.merge.interpolate import loss_barrier

Pair = tuple[int, int]


@dataclass(frozen=True)
class CurvePoint:
    """One evaluated model: ``weights`` over the states of ``basis`` (None: every model in the method's common basis;
    (i, j): models i and j as the method aligned that pair alone)."""

    method: str
    basis: Pair | None
    weights: tuple[float, ...]


def pair_key(pair: Pair) -> str:
    return f"{pair[0]}-{pair[1]}"


class JointPlan:
    """The points an N-model merge evaluates per method, and the summary of their losses and metrics.

    Args:
        methods: the method names, in order.
        num_models: N ≥ 2.
        lambdas: the λ grid of every pair's line (contains 0 and 1).
        pairwise: the methods fitted pair by pair (their pair lines use their own pairwise fits).
        simplex_steps: divisions per edge of the N = 3 triangle grid (0: none).
    """

    def __init__(
        self, methods: Sequence[str], num_models: int, lambdas: Sequence[float], pairwise: Iterable[str],
        simplex_steps: int = 0,
    ) -> None:
        check_simplex_steps(simplex_steps)
        self.methods, self.num_models, self.lambdas = list(methods), num_models, list(lambdas)
        self.pairwise, self.simplex_steps = set(pairwise), simplex_steps if num_models == 3 else 0
        self.pairs: list[Pair] = list(itertools.combinations(range(num_models), 2))
        self.points: list[CurvePoint] = []
        self._index: dict[tuple[str, str, Any], int] = {}
        for method in self.methods:
            self._add_method(method)

    def _add(self, method: str, role: str, key: Any, basis: Pair | None, weights: Sequence[float]) -> None:
        self._index[(method, role, key)] = len(self.points)
        self.points.append(CurvePoint(method, basis, tuple(float(w) for w in weights)))

    def _add_method(self, method: str) -> None:
        n = self.num_models
        for pair in self.pairs:
            for lam in self.lambdas:
                if method in self.pairwise:
                    self._add(method, "pair", (pair, lam), pair, (1 - lam, lam))
                else:
                    self._add(method, "pair", (pair, lam), None, _on_edge(n, pair, lam))
        for k in range(n):
            self._add(method, "vertex", k, None, [float(i == k) for i in range(n)])
        self._add(method, "average", None, None, [1 / n] * n)
        for counts in self.simplex_counts():
            self._add(method, "simplex", counts, None, [c / self.simplex_steps for c in counts])

    def simplex_counts(self) -> list[tuple[int, ...]]:
        """The triangle grid's points as counts per model (summing to ``simplex_steps``), vertices excluded."""
        steps = self.simplex_steps
        if not steps:
            return []
        grid = [(a, b, steps - a - b) for a in range(steps + 1) for b in range(steps + 1 - a)]
        return [counts for counts in grid if max(counts) < steps]

    def points_of(self, method: str) -> list[tuple[int, CurvePoint]]:
        return [(i, point) for i, point in enumerate(self.points) if point.method == method]

    def results(self, losses: Sequence[float], metrics: Sequence[Mapping[str, float]] | None = None) -> dict:
        """Curves, barriers per pair, the N-way average against the mean endpoint, and the simplex grid."""
        values = [{"loss": float(loss), **(metrics[i] if metrics else {})} for i, loss in enumerate(losses)]
        out: dict[str, Any] = {"lambdas": self.lambdas, "num_models": self.num_models, "curves": {}, "barriers": {},
                               "average": {}, "simplex": {}}
        for method in self.methods:
            out["curves"][method], out["barriers"][method] = self._pair_curves(method, values)
            out["average"][method] = self._average(method, values)
            if self.simplex_steps:
                out["simplex"][method] = self._simplex(method, values)
        return out

    def _value(self, values: list[dict], method: str, role: str, key: Any) -> dict[str, float]:
        return values[self._index[(method, role, key)]]

    def _pair_curves(self, method: str, values: list[dict]) -> tuple[dict, dict]:
        curves, barriers = {}, {}
        for pair in self.pairs:
            points = [self._value(values, method, "pair", (pair, lam)) for lam in self.lambdas]
            curve = {name: [point[name] for point in points] for name in points[0]}
            figures = dict(loss_barrier(self.lambdas, curve["loss"]))
            for name, series in curve.items():
                if name != "loss":  # a metric should be high: its barrier is the largest drop below the line
                    drop = loss_barrier(self.lambdas, [-v for v in series])
                    figures.update({f"{name}_barrier": drop["barrier"], f"{name}_a": series[0],
                                    f"{name}_b": series[-1]})
            curves[pair_key(pair)], barriers[pair_key(pair)] = curve, figures
        return curves, barriers

    def _average(self, method: str, values: list[dict]) -> dict[str, float]:
        average = self._value(values, method, "average", None)
        vertices = [self._value(values, method, "vertex", k) for k in range(self.num_models)]
        out = {}
        for name, value in average.items():
            endpoint = sum(vertex[name] for vertex in vertices) / len(vertices)
            out.update({name: value, f"mean_endpoint_{name}": endpoint, f"{name}_increase": value - endpoint})
        return out

    def _simplex(self, method: str, values: list[dict]) -> dict[str, list]:
        steps, n = self.simplex_steps, self.num_models
        counts = [tuple(steps * (i == k) for i in range(n)) for k in range(n)] + self.simplex_counts()
        losses = [self._value(values, method, "vertex", k)["loss"] for k in range(n)]
        losses += [self._value(values, method, "simplex", c)["loss"] for c in self.simplex_counts()]
        return {"weights": [[c / steps for c in point] for point in counts], "loss": losses}


def check_simplex_steps(steps: int) -> None:
    if steps < 0:
        raise ConfigError(f"simplex_steps={steps} must be 0 (no grid) or more")


def _on_edge(num_models: int, pair: Pair, lam: float) -> list[float]:
    return [(1 - lam) if k == pair[0] else lam if k == pair[1] else 0.0 for k in range(num_models)]

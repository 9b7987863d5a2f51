"""What a merge run leaves behind: curves.csv, barriers.json, barrier.png, a markdown table, and its marker."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_merge.io import atomic_file, atomic_write_text

MERGE_COMPLETE = ".merge_complete.json"  # written last: a run dir without it holds no complete merge

# curves: method -> metric name -> values along the λ grid, e.g. {"vanilla": {"loss": [...], "accuracy": [...]}}
Curves = Mapping[str, Mapping[str, Sequence[float]]]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def curves_csv(lambdas: Sequence[float], curves: Curves) -> str:
    """One row per (method, λ) with one column per metric."""
    metrics = sorted({name for per_method in curves.values() for name in per_method})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "lambda", *metrics])
    for method, per_method in curves.items():
        for i, lam in enumerate(lambdas):
            row = [f"{per_method[m][i]:.8g}" if m in per_method else "" for m in metrics]
            writer.writerow([method, f"{lam:.6g}", *row])
    return out.getvalue()


def barrier_table(barriers: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per method, one column per barrier/endpoint figure."""
    columns = list(columns or next(iter(barriers.values()), {}).keys())
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for method, figures in barriers.items():
        cells = [_cell(figures[c]) if c in figures else "" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | bool) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else f"{value:.4f}"


def plot_curves(path: Path, lambdas: Sequence[float], curves: Curves, metric: str = "loss") -> Path:
    """Every method's curve of ``metric`` along λ on one plot, written atomically as PNG."""
    figure, axis = new_plot()
    for method, per_method in curves.items():
        if metric in per_method:
            axis.plot(lambdas, per_method[metric], marker="o", markersize=3, label=method)
    axis.set(xlabel="λ  (0 = model A, 1 = permuted model B)", ylabel=metric)
    return save_plot(figure, axis, path)


def new_plot() -> tuple[Any, Any]:
    """A figure and axes on the non-interactive backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save_plot(figure: Any, axis: Any, path: Path) -> Path:
    """Grid, legend and layout, then write the PNG atomically and free the figure."""
    import matplotlib.pyplot as plt

    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    return path


def compare_midpoints(barriers: Mapping[str, dict[str, Any]], alignments: Sequence[str]) -> str | None:
    """Add to every method's figures its merged model's loss against vanilla's (``midpoint_loss_vs_vanilla``) and
    against the best of ``alignments`` (function-preserving alignments on the straight line:
    ``midpoint_loss_vs_best_alignment``), where those were evaluated; return that best alignment's name."""
    def loss(method: str) -> float:
        return barriers[method]["midpoint_loss"]

    straight = [method for method in alignments if method in barriers]
    best = min(straight, key=loss) if straight else None
    for figures in barriers.values():
        if "vanilla" in barriers:
            figures["midpoint_loss_vs_vanilla"] = figures["midpoint_loss"] - loss("vanilla")
        if best is not None:
            figures["midpoint_loss_vs_best_alignment"] = figures["midpoint_loss"] - loss(best)
    return best


def plot_merged(path: Path, barriers: Mapping[str, Mapping[str, Any]], endpoints: Mapping[str, Sequence[float]],
                metric: str = "loss") -> Path:
    """Each method's merged model (λ = ½) as a bar of ``metric``, with models A and B and their mean as lines."""
    figure, axis = new_plot()
    methods = [m for m in barriers if f"midpoint_{metric}" in barriers[m]]
    axis.barh(methods, [barriers[m][f"midpoint_{metric}"] for m in methods], color="tab:blue", alpha=0.7)
    for value, label, style in ((endpoints[metric][0], "model A", ":"), (endpoints[metric][1], "model B", "--"),
                                (sum(endpoints[metric]) / 2, "mean of A and B", "-")):
        axis.axvline(value, color="black", linestyle=style, label=label)
    low = min([*endpoints[metric], *(barriers[m][f"midpoint_{metric}"] for m in methods)])
    axis.set_xlim(left=low - 0.05 * abs(low))
    axis.set(xlabel=f"{metric} of the merged model (λ = ½)")
    axis.invert_yaxis()
    return save_plot(figure, axis, path)


def write_report(
    run_dir: Path,
    lambdas: Sequence[float],
    curves: Curves,
    barriers: Mapping[str, Mapping],
    columns: Sequence[str] | None = None,
    endpoints: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """Write curves.csv, barriers.json and barrier.png (and with ``endpoints``, models A's and B's own figures,
    merged.png: every method's merged model against them) into ``run_dir``; return the markdown table of
    ``columns``."""
    atomic_write_text(run_dir / "curves.csv", curves_csv(lambdas, curves))
    atomic_write_text(run_dir / "barriers.json", json.dumps(barriers, indent=2, sort_keys=False) + "\n")
    plot_curves(run_dir / "barrier.png", lambdas, curves)
    if endpoints is not None:
        plot_merged(run_dir / "merged.png", barriers, endpoints)
    if columns is not None:
        present = {key for figures in barriers.values() for key in figures}
        columns = [c for c in columns if c in present]
    return barrier_table(barriers, columns)


def write_joint_report(run_dir: Path, results: Mapping[str, Any]) -> str:
    """An N-model merge's outputs: curves.csv (one row per method, pair and λ), barriers.json (per pair, the N-way
    average against the mean endpoint, cycle-consistency errors), barrier.png (each method's curve averaged over
    pairs), simplex.png for N = 3; returns the markdown summary table."""
    lambdas, curves = results["lambdas"], results["curves"]
    flat = {f"{method} {pair}": curve for method, per_pair in curves.items() for pair, curve in per_pair.items()}
    atomic_write_text(run_dir / "curves.csv", curves_csv(lambdas, flat).replace("method,", "method pair,", 1))
    summary = joint_summary(results)
    figures = {"summary": summary, "barriers": results["barriers"], "average": results["average"],
               "cycle_consistency_error": results.get("cycle_consistency_error", {})}
    atomic_write_text(run_dir / "barriers.json", json.dumps(figures, indent=2) + "\n")
    mean_curves = {method: {"loss": [sum(c["loss"][i] for c in per_pair.values()) / len(per_pair)
                                     for i in range(len(lambdas))]} for method, per_pair in curves.items()}
    plot_curves(run_dir / "barrier.png", lambdas, mean_curves)
    if results.get("simplex"):
        plot_simplex(run_dir / "simplex.png", results["simplex"])
    return barrier_table(summary)


def joint_summary(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: barrier mean ± s.e. over pairs, each pair's barrier, the N-way average's loss against the mean
    endpoint loss, the cycle-consistency error of its pairwise alignments, and whether it keeps every model."""
    out = {}
    for method, per_pair in results["barriers"].items():
        mean, error = mean_se([figures["barrier"] for figures in per_pair.values()])
        average = results["average"][method]
        row: dict[str, Any] = {"barrier_mean": mean, "barrier_se": error}
        row.update({f"barrier_{pair}": figures["barrier"] for pair, figures in per_pair.items()})
        row.update({"average_loss": average["loss"], "mean_endpoint_loss": average["mean_endpoint_loss"],
                    "average_loss_increase": average["loss_increase"]})
        cycle = results.get("cycle_consistency_error", {}).get(method)
        if cycle is not None:
            row["cycle_consistency_error"] = cycle
        if "function_preserving" in average:
            row["function_preserving"] = average["function_preserving"]
        out[method] = row
    return out


def plot_simplex(path: Path, simplex: Mapping[str, Mapping[str, Sequence]]) -> Path:
    """One barycentric heatmap of the loss per method over the triangle of three models, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri

    methods = list(simplex)
    columns = min(3, len(methods))
    rows = -(-len(methods) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.3 * rows), squeeze=False)
    low = min(min(grid["loss"]) for grid in simplex.values())
    high = max(max(grid["loss"]) for grid in simplex.values())
    corners = [(0.0, 0.0), (1.0, 0.0), (0.5, 3**0.5 / 2)]
    image = None
    for axis, method in zip(axes.flat, methods):
        weights, losses = simplex[method]["weights"], simplex[method]["loss"]
        xs = [sum(w * c[0] for w, c in zip(point, corners)) for point in weights]
        ys = [sum(w * c[1] for w, c in zip(point, corners)) for point in weights]
        image = axis.tripcolor(mtri.Triangulation(xs, ys), losses, shading="gouraud", vmin=low, vmax=high)
        for k, (x, y) in enumerate(corners):
            axis.annotate(f"model {k}", (x, y), ha="center", va="top" if y == 0 else "bottom", fontsize=8)
        axis.set_title(method, fontsize=9)
        axis.set_aspect("equal")
        axis.axis("off")
    for axis in list(axes.flat)[len(methods):]:
        axis.axis("off")
    figure.colorbar(image, ax=axes.ravel().tolist(), label="loss", shrink=0.8)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    return path

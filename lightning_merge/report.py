"""What a merge run leaves behind: curves.csv, barriers.json, barrier.png, a markdown table, and its marker."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_merge.io import atomic_file, atomic_write_text

MERGE_COMPLETE = ".merge_complete.json"  # written last: a run dir without it holds no complete merge

# curves: method -> metric name -> values along the λ grid, e.g. {"vanilla": {"loss": [...], "accuracy": [...]}}
Curves = Mapping[str, Mapping[str, Sequence[float]]]


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


def write_report(
    run_dir: Path,
    lambdas: Sequence[float],
    curves: Curves,
    barriers: Mapping[str, Mapping],
    columns: Sequence[str] | None = None,
) -> str:
    """Write curves.csv, barriers.json and barrier.png into ``run_dir``; return the markdown table of ``columns``."""
    atomic_write_text(run_dir / "curves.csv", curves_csv(lambdas, curves))
    atomic_write_text(run_dir / "barriers.json", json.dumps(barriers, indent=2, sort_keys=False) + "\n")
    plot_curves(run_dir / "barrier.png", lambdas, curves)
    if columns is not None:
        present = {key for figures in barriers.values() for key in figures}
        columns = [c for c in columns if c in present]
    return barrier_table(barriers, columns)

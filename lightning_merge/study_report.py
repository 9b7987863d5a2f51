"""The study's report: the paper's tables as mean ± standard error over seed pairs, every method the merges ran
(beyond the paper's), and curve plots."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from lightning_merge.errors import DataError
from lightning_merge.io import atomic_file, atomic_write_text
from lightning_merge.report import mean_se, new_plot, save_plot

# Table 1: attention variants (with FF), Table 2: residual variants; rows are (label, method name).
ATTENTION_ROWS = (
    ("vanilla", "vanilla"),
    ("FF only", "ff"),
    ("FF + attn, Monotonic", "ff+attn[monotonic]"),
    ("FF + attn, Ignore-Heads", "ff+attn[ignore_heads]"),
    ("FF + attn, Head-Perm", "ff+attn[head_perm]"),
)
RESIDUAL_ROWS = (
    ("identity (vanilla)", "vanilla"),
    ("residual, first", "res[first]"),
    ("residual, last", "res[last]"),
    ("residual, all", "res[all]"),
    ("full: FF + attn + residual", "ff+attn+res"),
)
# Table 3 (pre-LN models only): the residual stream by one orthogonal map, folded LayerNorms (docs/methods.md)
ORTHOGONAL_ROWS = (
    ("identity (vanilla)", "vanilla"),
    ("folded LayerNorms, identity", "res[fold]"),
    ("residual permutation, all", "res[all]"),
    ("residual orthogonal (folded)", "res[orthogonal]"),
    ("full: FF + attn + residual permutation", "ff+attn+res"),
    ("FF + attn + residual orthogonal", "ff+attn+res[orthogonal]"),
    ("FF + attn linear + residual orthogonal", "ff+attn[linear]+res[orthogonal]"),
)
TASK_METHODS = ("vanilla", "ff+attn+res")
# what the pretrained models' loss is, by the label a study gives them
LOSS_DESCRIPTIONS = {
    "MLM": "masked-token cross-entropy on fixed validation masks",
    "CLM": "next-token cross-entropy on every validation token after a block's first",
}


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean, se = mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def load_pair_results(merge_dir: Path, seeds: Sequence[int]) -> dict[str, dict]:
    """pair name -> results.json of that pair's merge run."""
    results = {}
    for a, b in itertools.combinations(seeds, 2):
        path = merge_dir / f"seed{a}-seed{b}" / "results.json"
        if not path.is_file():
            raise DataError(f"merge results {path} are missing; rerun the study to complete that stage")
        results[f"seed{a}-seed{b}"] = json.loads(path.read_text())
    return results


def _column(pairs: dict[str, dict], method: str, key: str) -> list[float]:
    figures = (r["barriers"].get(method, {}) for r in pairs.values())
    return [f[key] for f in figures if key in f]


def method_table(pairs: dict[str, dict], rows: Sequence[tuple[str, str]], title: str) -> str:
    lines = [f"### {title}", "", "| method | loss barrier | midpoint barrier |", "|---|---:|---:|"]
    for label, method in rows:
        lines.append(f"| {label} (`{method}`) | {_fmt(_column(pairs, method, 'barrier'))} | "
                     f"{_fmt(_column(pairs, method, 'barrier_midpoint'))} |")
    return "\n".join(lines)


def primary_metric(pairs: dict[str, dict]) -> str:
    """The first task metric recorded along the curves (``accuracy`` for most tasks)."""
    curves = next(iter(next(iter(pairs.values()))["curves"].values()))
    return next((name for name in curves if name != "loss"), "loss")


def task_table(task_pairs: dict[str, dict[str, dict]]) -> str:
    head = "| task | " + " | ".join(f"{m} loss barrier | {m} metric drop" for m in TASK_METHODS) + " |"
    lines = ["### Table 3: fine-tuned classifiers, vanilla vs full method", "", head,
             "|---|" + "---:|" * (2 * len(TASK_METHODS))]
    for task, pairs in task_pairs.items():
        metric = primary_metric(pairs)
        cells = [f"{_fmt(_column(pairs, m, 'barrier'))} | {_fmt(_column(pairs, m, f'{metric}_barrier'))}"
                 for m in TASK_METHODS]
        lines.append(f"| {task} ({metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _methods(pairs: dict[str, dict]) -> list[str]:
    """Every method the pairs' merges ran, in the order of the first pair's results."""
    return list(next(iter(pairs.values()))["barriers"])


def _removed(pairs: dict[str, dict], method: str) -> list[float]:
    """Per pair, the share of vanilla's loss barrier that ``method`` removes (in %)."""
    shares = []
    for result in pairs.values():
        vanilla, figures = result["barriers"].get("vanilla"), result["barriers"].get(method)
        if vanilla and figures and vanilla["barrier"] > 0:
            shares.append(100 * (1 - figures["barrier"] / vanilla["barrier"]))
    return shares


def _preserves(pairs: dict[str, dict], method: str) -> str:
    info = next(iter(pairs.values())).get("methods", {}).get(method, {})
    return {True: "yes", False: "no"}.get(info.get("function_preserving"), "–")


def all_methods_table(pairs: dict[str, dict], title: str, metric: str | None = None) -> str:
    """Every method the merges ran: loss barrier, % of vanilla's removed, metric drop, whether it preserves B."""
    metric_head = f" {metric} drop |" if metric else ""
    lines = [f"### {title}", "", f"| method | loss barrier | midpoint barrier | % of vanilla removed |{metric_head} "
             "preserves B |", "|---|---:|---:|---:|" + ("---:|" if metric else "") + "---|"]
    for method in _methods(pairs):
        metric_cell = f" {_fmt(_column(pairs, method, f'{metric}_barrier'))} |" if metric else ""
        removed = _fmt(_removed(pairs, method), digits=1)
        lines.append(f"| `{method}` | {_fmt(_column(pairs, method, 'barrier'))} | "
                     f"{_fmt(_column(pairs, method, 'barrier_midpoint'))} | {removed} |{metric_cell} "
                     f"{_preserves(pairs, method)} |")
    return "\n".join(lines)


def plot_mean_curves(path: Path, pairs: dict[str, dict], methods: Sequence[str], title: str) -> None:
    """Mean loss curve per method over pairs, with a ±1 standard-error band."""
    figure, axis = new_plot()
    for method in methods:
        curves = [r["curves"][method]["loss"] for r in pairs.values() if method in r["curves"]]
        if not curves:
            continue
        lambdas = next(iter(pairs.values()))["lambdas"]
        stats = [mean_se(column) for column in zip(*curves)]
        means = [m for m, _ in stats]
        axis.plot(lambdas, means, label=method)
        axis.fill_between(lambdas, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    axis.set(xlabel="λ", ylabel="loss", title=title)
    save_plot(figure, axis, path)


def merged_table(mlm: dict[str, dict], task_pairs: dict[str, dict[str, dict]], label: str) -> str:
    """The merged model (λ = ½) of every method against its endpoints: the language model's loss and its excess
    over the endpoints' mean, and each task's metrics (mean ± s.e. over pairs); first row the endpoints' mean."""
    tasks = {task: _task_metric_names(pairs) for task, pairs in task_pairs.items()}
    header = [f"{label} loss", "excess over endpoints"] + [f"{task} {m}" for task, names in tasks.items()
                                                            for m in names]
    lines = [f"### The merged model (λ = ½) of every method ({label} and fine-tuned pairs)", "",
             "| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    sources = {label: mlm, **task_pairs}
    endpoint_cells = [_fmt(_endpoint_means(mlm, "loss")), "0"] + [
        _fmt(_endpoint_means(task_pairs[task], m)) for task, names in tasks.items() for m in names]
    lines.append("| endpoints (mean of A and B) | " + " | ".join(endpoint_cells) + " |")
    methods = list(dict.fromkeys(m for pairs in sources.values() for m in _methods(pairs)))
    for method in methods:
        cells = [_fmt(_column(mlm, method, "midpoint_loss")), _fmt(_column(mlm, method, "midpoint_excess"))] + [
            _fmt(_column(task_pairs[task], method, f"midpoint_{m}")) for task, names in tasks.items() for m in names]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _task_metric_names(pairs: dict[str, dict]) -> list[str]:
    names = [name for r in pairs.values() for name in r.get("endpoints", {}) if name != "loss"]
    return list(dict.fromkeys(names))


def _endpoint_means(pairs: dict[str, dict], metric: str) -> list[float]:
    return [sum(r["endpoints"][metric]) / 2 for r in pairs.values() if metric in r.get("endpoints", {})]


def joint_table(results: dict, pairs: dict[str, dict], label: str) -> str:
    """The N-model merge: per method, its barrier over every pair after the joint alignment (beside the same pairs'
    barrier when the pair is fitted alone, from the pairwise merges), the N-way average's loss over the mean
    endpoint loss, and the cycle-consistency error of its pairwise alignments."""
    n = results["num_models"]
    lines = [f"### {n} models merged at once ({label})", "",
             f"| method | pair barrier (joint alignment) | pair barrier (fitted per pair) | {n}-way average loss | "
             "mean endpoint loss | increase | cycle-consistency error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, per_pair in results["barriers"].items():
        mean, se = mean_se([figures["barrier"] for figures in per_pair.values()])
        alone = _column(pairs, method, "barrier")
        average = results["average"][method]
        cycle = results.get("cycle_consistency_error", {}).get(method)
        lines.append(f"| `{method}` | {mean:.3f} ± {se:.3f} | {_fmt(alone)} | {average['loss']:.3f} | "
                     f"{average['mean_endpoint_loss']:.3f} | {average['loss_increase']:.3f} | "
                     f"{'–' if cycle is None else f'{cycle:.3f}'} |")
    return "\n".join(lines)


def write_study_report(
    root: Path, seeds: Sequence[int], tasks: Sequence[str], language_model: str = "MLM", joint: bool = False
) -> Path:
    """Write ``report/report.md``, the curve PNGs and ``report/pairs.json`` (raw per-pair results).

    ``language_model`` (``MLM`` or ``CLM``) names the pretrained models and their loss in the report; ``joint``
    adds the table of the merge of all seeds at once (``merge/mlm_joint``)."""
    report_dir = root / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    mlm = load_pair_results(root / "merge" / "mlm", seeds)
    task_pairs = {task: load_pair_results(root / "merge" / task, seeds) for task in tasks}
    label = language_model
    sections = [
        f"# Merging study: seeds {', '.join(map(str, seeds))} ({len(mlm)} pairs)",
        f"Barriers are mean ± standard error over seed pairs; loss in nats ({label}: {LOSS_DESCRIPTIONS[label]}). "
        "Metric drop: largest fall of the task metric below the line between the endpoints.",
        method_table(mlm, ATTENTION_ROWS, f"Table 1: attention variants ({label})"),
        method_table(mlm, RESIDUAL_ROWS, f"Table 2: residual variants ({label})"),
    ]
    orthogonal = any("res[orthogonal]" in r["barriers"] for r in mlm.values())
    if orthogonal:
        sections.append(method_table(mlm, ORTHOGONAL_ROWS, f"Table 3: orthogonal residual map, pre-LN ({label})"))
    if task_pairs:
        sections.append(task_table(task_pairs))
    sections.append(all_methods_table(mlm, f"Every method ({label}), beyond the paper's"))
    for task, pairs in task_pairs.items():
        sections.append(all_methods_table(pairs, f"Every method ({task})", primary_metric(pairs)))
    sections.append(merged_table(mlm, task_pairs, label))
    if joint:
        path = root / "merge" / "mlm_joint" / "results.json"
        if not path.is_file():
            raise DataError(f"joint merge results {path} are missing; rerun the study to complete that stage")
        joint_results = json.loads(path.read_text())
        sections.append(joint_table(joint_results, mlm, label))
        if (path.parent / "simplex.png").is_file():
            with atomic_file(report_dir / "mlm_joint_simplex.png") as tmp:
                shutil.copyfile(path.parent / "simplex.png", tmp)
            sections.append("![loss over the triangle of three models](mlm_joint_simplex.png)")
    plot_mean_curves(report_dir / "mlm_attention.png", mlm, [m for _, m in ATTENTION_ROWS],
                     f"{label}: attention variants")
    plot_mean_curves(report_dir / "mlm_residual.png", mlm, [m for _, m in RESIDUAL_ROWS], f"{label}: residual variants")
    sections.append("![attention variants](mlm_attention.png)\n\n![residual variants](mlm_residual.png)")
    if orthogonal:
        plot_mean_curves(report_dir / "mlm_orthogonal.png", mlm, [m for _, m in ORTHOGONAL_ROWS],
                         f"{label}: orthogonal residual map")
        sections.append("![orthogonal residual map](mlm_orthogonal.png)")
    for task, pairs in task_pairs.items():
        plot_mean_curves(report_dir / f"{task}.png", pairs, TASK_METHODS, f"{task}: loss along λ")
        sections.append(f"![{task}]({task}.png)")
    atomic_write_text(report_dir / "pairs.json", json.dumps({"mlm": mlm, **task_pairs}, indent=2) + "\n")
    text = "\n\n".join(sections) + "\n"
    atomic_write_text(report_dir / "report.md", text)
    print(text, flush=True)
    return report_dir

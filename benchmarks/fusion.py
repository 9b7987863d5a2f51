"""Benchmark of the fusion methods' costs: what RegMean's Gram matrices add to the statistics pass, each method's fit,
and the price of one merged model on a path (RegMean's solve, REPAIR's measurement) beside the straight line.

Two random-init models of one preset (the quickstart's shape by default) and random token blocks. Rows:
- the statistics pass of the paper's method alone, and with each model's own Gram matrices at every linear layer's
  input (what ``+regmean`` adds): seconds, the sums' bytes;
- per method: its fit (alignments and path) in seconds; for a path method, the first θ(½) (solve or measurement,
  then kept) and a later one, against the line's; one batch's loss at the merged model, and for a two-headed
  method (``zip[layers=k]``) at its two-headed model (the trunk and both tails: the price of each of its curve
  points against one forward).

Usage::

    python benchmarks/fusion.py                                  # the tiny preset, 16k statistics tokens
    python benchmarks/fusion.py --tokens 2048 --output /tmp/fusion.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import torch
from torch.func import functional_call

from lightning_merge.io import atomic_write_text
from lightning_merge.merge.alignment import apply_alignments
from lightning_merge.merge.features import collect_statistics, feature_moments
from lightning_merge.merge.interpolate import interpolate_state_dicts
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import fit_methods, get_method
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.two_headed import two_headed_outputs
from lightning_merge.objectives import MaskedLMObjective

sys.path.insert(0, str(Path(__file__).parent))
from joint_statistics import random_models, token_batches  # noqa: E402 - sibling scripts, not a package
from merge_core import timed  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "fusion.json"
METHODS = ("ff+attn+res", "ff+attn+res+repair", "ff+attn+res+repair[exact=true,batches=2]", "ff+attn+res+regmean",
           "ot", "zip", "zip[layers=1]")


def bench_statistics(models: list, spec, batches: list, methods: dict) -> tuple[dict, object]:
    features = list(dict.fromkeys(f for m in methods.values() for f in m.statistics_features(spec)))
    own = list(dict.fromkeys(f for m in methods.values() for f in m.own_features(spec)))
    device = torch.device("cpu")
    row = {}
    with torch.no_grad():
        row["statistics_s"], plain = timed(lambda: collect_statistics(*models, batches, spec, features), device)
        row["statistics_own_s"], statistics = timed(
            lambda: collect_statistics(*models, batches, spec, features, own_groups=own), device)
    row["statistics_bytes"] = plain.nbytes()
    row["own_bytes"] = sum(stats.nbytes() for stats in statistics.own)
    return row, statistics


def bench_method(name: str, models: list, spec, statistics, batches: list) -> dict:
    method = get_method(name)
    params = [{n: p.detach() for n, p in m.named_parameters(remove_duplicate=False)} for m in models]

    def activations(weights, features, count):
        return feature_moments(models[0], weights, spec, features, itertools.islice(batches, count))

    inputs = FitInputs(spec, params[0], params[1], statistics, activations=activations)
    paths, references = {}, {}
    device = torch.device("cpu")
    row = {"method": name}
    row["fit_s"], alignments = timed(lambda: fit_methods({name: method}, inputs, paths=paths,
                                                         references=references)[name], device)
    state = apply_alignments(models[1].state_dict(), spec, alignments)
    aligned = {n: state[n] for n in params[1]}
    row["line_s"], _ = timed(lambda: interpolate_state_dicts(params[0], aligned, 0.5), device)
    if name in paths:
        row["path_first_s"], _ = timed(lambda: paths[name].at(params[0], aligned, 0.5), device)
        row["path_again_s"], _ = timed(lambda: paths[name].at(params[0], aligned, 0.5), device)
    row.update(bench_point(models, spec, method.split_layer(spec), params, aligned, references.get(name), alignments,
                           masked(batches[0])))
    inputs.close()
    return row


def masked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with MLM labels at every seventh position (the loss's positions; inputs left unmasked)."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, ::7] = batch["input_ids"][:, ::7]
    return dict(batch, labels=labels)


def bench_point(models: list, spec, split: int | None, params: list, aligned: dict, reference: dict | None,
                alignments: dict, batch: dict) -> dict:
    """Seconds of one batch's loss at the line's θ(½) and, for a two-headed method, at its two-headed model."""
    objective, device = MaskedLMObjective(models[0]), torch.device("cpu")
    line = interpolate_state_dicts(params[0], aligned, 0.5)
    state = {f"model.{k}": v for k, v in line.items()}
    with torch.no_grad():
        row = {"point_s": timed(lambda: functional_call(objective, state, (batch,), tie_weights=False), device, 3)[0]}
        if split is not None:
            zipped_a = apply_alignments(models[0].state_dict(), spec, reference)
            trunk = interpolate_state_dicts({n: zipped_a[n] for n in params[0]}, aligned, 0.5)
            unmerges = [reference["res"].unmerge, alignments["res"].unmerge]
            row["two_headed_point_s"], _ = timed(lambda: two_headed_outputs(
                objective, spec.layer_module(split), trunk, params, unmerges, [0.5, 0.5], batch), device, 3)
    return row


def table(statistics_row: dict, rows: list[dict]) -> str:
    lines = [f"statistics pass: {statistics_row['statistics_s']:.2f} s, with own Grams "
             f"{statistics_row['statistics_own_s']:.2f} s; sums {statistics_row['statistics_bytes'] / 2**20:.1f} MiB "
             f"+ own {statistics_row['own_bytes'] / 2**20:.1f} MiB", "",
             "| method | fit s | line θ(½) s | path θ(½) first s | path θ(½) again s | point s | two-headed point s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        first, again, two = (f"{row[key]:.3f}" if key in row else "–"
                             for key in ("path_first_s", "path_again_s", "two_headed_point_s"))
        lines.append(f"| `{row['method']}` | {row['fit_s']:.2f} | {row['line_s']:.3f} | {first} | {again} | "
                     f"{row['point_s']:.3f} | {two} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384, help="statistics tokens")
    parser.add_argument("--batch-size", type=int, default=128, help="blocks of 32 tokens per batch")
    parser.add_argument("--methods", default=";".join(METHODS), help="method names separated by ;")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    models = random_models(args.preset, 2, args.vocab, args.heads)
    spec = spec_for_model(models[0])
    batches = token_batches(args.tokens, args.vocab, args.batch_size)
    names = args.methods.split(";")
    statistics_row, statistics = bench_statistics(models, spec, batches, {n: get_method(n) for n in names})
    rows = [bench_method(name, models, spec, statistics, batches) for name in names]
    print(table(statistics_row, rows))
    meta = {"preset": args.preset, "tokens": args.tokens, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine()}
    result = {"meta": meta, "statistics": statistics_row, "rows": rows}
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()

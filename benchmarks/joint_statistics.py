"""Benchmark of merging N models: the one statistics pass over N models, and the joint methods' fit times.

Random-init models of one preset (the quickstart's shape by default: `tiny` with 8 heads and a 4096-token vocab) and
random token blocks. Per N it measures the statistics pass over ``tokens`` and over 4x ``tokens`` (seconds, and the
bytes the float64 sums hold: equal for both token counts, and N(N−1)/2 times one pair's: memory O(N² d²) per point,
independent of the tokens), the peak memory the pass adds, and the fit time of the joint methods on those statistics.

Usage::

    python benchmarks/joint_statistics.py                       # N = 2, 3, 4, 5 at 16k and 64k tokens
    python benchmarks/joint_statistics.py --models 2,3 --tokens 2048 --output /tmp/joint.json
    python benchmarks/joint_statistics.py --methods merge_many 'cycle_consistent[max_iterations=20]'
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BertForMaskedLM

from lightning_merge.io import atomic_write_text
from lightning_merge.merge.features import collect_joint_statistics
from lightning_merge.merge.joint_methods import JointInputs, fit_joint
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.models import build_config

sys.path.insert(0, str(Path(__file__).parent))
from merge_core import PeakMemory, timed  # noqa: E402 - a sibling script, not a package

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "joint_statistics.json"
METHODS = ("to_reference", "merge_many", "cycle_consistent", "merge_many[by=weights]")
BLOCK = 32


def random_models(preset: str, count: int, vocab: int, heads: int) -> list[torch.nn.Module]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        config = build_config(preset, vocab, num_attention_heads=heads)
        models.append(BertForMaskedLM(config).eval())
    return models


def token_batches(tokens: int, vocab: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    blocks = max(1, tokens // BLOCK)
    ids = torch.randint(5, vocab, (blocks, BLOCK), generator=generator)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size])}
            for i in range(0, blocks, batch_size)]


def bench_count(models: list[torch.nn.Module], args: argparse.Namespace) -> dict:
    spec = spec_for_model(models[0])
    device = torch.device("cpu")
    row: dict = {"models": len(models), "tokens": args.tokens}
    for label, tokens in (("", args.tokens), ("_4x", 4 * args.tokens)):
        batches = token_batches(tokens, args.vocab, args.batch_size)
        peak = PeakMemory(device)
        with torch.no_grad(), peak.measure():
            seconds, statistics = timed(lambda: collect_joint_statistics(models, batches, spec), device)
        row.update({f"statistics{label}_s": seconds, f"statistics{label}_bytes": statistics.nbytes(),
                    f"statistics{label}_peak_mib": peak.peak_bytes / 2**20})
    row["pair_bytes"] = statistics.pairs[(0, 1)].nbytes()
    weights = [dict(m.named_parameters()) for m in models]
    inputs = JointInputs(spec, len(models), lambda i, j: FitInputs(spec, weights[i], weights[j],
                                                                   statistics=statistics.pair(i, j)))
    for name in args.methods:
        row[f"fit_{name}_s"], _ = timed(lambda: fit_joint(get_method(name), inputs), device)
    inputs.close()
    return row


def table(rows: list[dict], methods: Sequence[str] = METHODS) -> str:
    columns = ["N", "stats s", "stats 4x s", "sums MiB", "sums 4x MiB", "pairs", "peak MiB",
               *(f"fit {name} s" for name in methods)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for row in rows:
        cells = [str(row["models"]), f"{row['statistics_s']:.2f}", f"{row['statistics_4x_s']:.2f}",
                 f"{row['statistics_bytes'] / 2**20:.1f}", f"{row['statistics_4x_bytes'] / 2**20:.1f}",
                 f"{row['statistics_bytes'] / row['pair_bytes']:.0f}", f"{row['statistics_peak_mib']:.0f}",
                 *(f"{row[f'fit_{name}_s']:.2f}" for name in methods)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2,3,4,5", help="comma-separated model counts N")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384, help="statistics tokens (and 4x that)")
    parser.add_argument("--batch-size", type=int, default=128, help="blocks of 32 tokens per batch")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="the joint methods whose fits are timed")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    for name in args.methods:
        get_method(name)  # a mistyped name fails here, not after the statistics passes
    counts = [int(n) for n in args.models.split(",")]
    every = random_models(args.preset, max(counts), args.vocab, args.heads)
    rows = [bench_count(every[:n], args) for n in counts]
    print(table(rows, args.methods))
    meta = {"preset": args.preset, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}
    atomic_write_text(args.output, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()

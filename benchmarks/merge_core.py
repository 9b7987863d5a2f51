"""Benchmark of the merge core: statistics updates, matching per group type, applying permutations.

Random weights (HF init) and random correlated features (B = A's features permuted plus noise), for the model-size
presets of `lightning_merge.models`. Per preset it measures:

- statistics: seconds per million tokens for each group kind (ff / attn / res) and in total, the bytes the float64
  sums hold after ``tokens`` and after 4x ``tokens`` (equal: memory does not grow with tokens), and the peak memory
  the updates add on top of the sums (float64 copies of one chunk of features);
- matching: seconds per group for ff, attn (head_perm, monotonic, ignore_heads) and res (all), and per model;
- applying: seconds for ``apply_alignments`` (random permutations) on the full state dict, and for one interpolation.

Usage::

    python benchmarks/merge_core.py --quick                # all presets, few tokens, one group per kind matched
    python benchmarks/merge_core.py --presets tiny,mini --tokens 65536 --output /tmp/merge_core.json
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from transformers import BertForMaskedLM

from lightning_merge.io import atomic_write_text
from lightning_merge.merge.alignment import apply_alignments, permutations
from lightning_merge.merge.interpolate import interpolate_state_dicts
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import PermutationSpec, spec_for_model
from lightning_merge.merge.stats import MergeStatistics
from lightning_merge.models import PRESETS, build_config

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "merge_core.json"
REPEAT = 3  # matching and applying are timed best-of-3: on a shared machine single timings are noisy
MATCHERS = ("ff", "attn[head_perm]", "attn[monotonic]", "attn[ignore_heads]", "res[all]")


class PeakMemory:
    """Peak memory added while the block runs: CUDA allocator stats, or RSS sampled from /proc on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - base
            return
        base, peak, done = self._rss(), [0], threading.Event()

        def sample() -> None:  # the RSS high-water mark cannot be reset, so sample it while the block runs
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                done.wait(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            done.set()
            sampler.join()
            self.peak_bytes = max(peak[0], self._rss()) - base


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> tuple[float, object]:
    """Seconds a call of ``fn`` takes, best of ``repeat`` (synchronised on CUDA), and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def correlated_features(spec: PermutationSpec, tokens: int, device: torch.device) -> tuple[dict, dict]:
    """One batch of features for every group and point: B = A permuted, times 0.8, plus noise. (tokens, d) each."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    by_size: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in spec.groups.values():
        if group.size not in by_size:  # points of the same width share one tensor: values don't change the cost
            x_a = torch.randn(tokens, group.size, generator=generator)
            noise = torch.randn(tokens, group.size, generator=generator)
            x_b = 0.8 * x_a[:, torch.randperm(group.size, generator=generator)] + 0.6 * noise
            by_size[group.size] = (x_a.to(device), x_b.to(device))
    feats_a = {g: {p.key: by_size[spec.groups[g].size][0] for p in spec.points[g]} for g in spec.groups}
    feats_b = {g: {p.key: by_size[spec.groups[g].size][1] for p in spec.points[g]} for g in spec.groups}
    return feats_a, feats_b


def bench_statistics(spec: PermutationSpec, tokens: int, batch_tokens: int, device: torch.device) -> dict:
    """Update time per kind (per million tokens), sums' bytes after 1x and 4x tokens, peak extra memory.

    Each kind's pass over ``tokens`` is timed best-of-`REPEAT` (the statistics keep accumulating meanwhile).
    """
    feats_a, feats_b = correlated_features(spec, batch_tokens, device)
    batches = max(1, tokens // batch_tokens)
    result: dict = {"tokens": batches * batch_tokens}
    statistics = {}
    for kind in ("ff", "attn", "res"):
        stats = MergeStatistics(spec, spec.groups_of_kind([kind]), device=device)
        memory = PeakMemory(device)
        with memory.measure():
            seconds, _ = timed(lambda: _passes(stats, feats_a, feats_b, batches), device, REPEAT)
        result[f"stats_{kind}_s_per_Mtok"] = seconds / result["tokens"] * 1e6
        result[f"stats_{kind}_bytes"] = stats.nbytes()
        result[f"stats_{kind}_peak_extra_bytes"] = memory.peak_bytes
        statistics[kind] = stats
    result["stats_total_s_per_Mtok"] = sum(result[f"stats_{k}_s_per_Mtok"] for k in ("ff", "attn", "res"))
    result["stats_bytes"] = sum(s.nbytes() for s in statistics.values())
    seen = statistics["res"].token_count
    _passes(statistics["res"], feats_a, feats_b, 3 * REPEAT * batches)  # 4x the tokens in all: sums must not grow
    assert statistics["res"].token_count == 4 * seen
    result["stats_res_bytes_after_4x_tokens"] = statistics["res"].nbytes()
    result["stats_memory_constant"] = result["stats_res_bytes_after_4x_tokens"] == result["stats_res_bytes"]
    return result | {"_statistics": statistics}


def _passes(stats: MergeStatistics, feats_a: dict, feats_b: dict, batches: int) -> None:
    for _ in range(batches):
        stats.update_from_features(feats_a, feats_b)


def bench_matching(spec: PermutationSpec, statistics: dict, all_groups: bool, device: torch.device) -> dict:
    """Seconds per group for each matcher (first group of its kind, or the mean over all groups)."""
    result = {}
    for name in MATCHERS:
        method = get_method(name)
        names = method.group_names(spec) if all_groups else method.group_names(spec)[:1]
        inputs = lambda: FitInputs(spec, statistics=statistics[method.kinds[0]])  # noqa: E731 - fresh: no shared results
        seconds, _ = timed(lambda: method.fit(inputs(), groups=names), device, REPEAT)
        result[f"match_{name}_s_per_group"] = seconds / len(names)
        result[f"match_{name}_s_per_model"] = seconds / len(names) * len(method.group_names(spec))
    return result


def bench_apply(model: torch.nn.Module, spec: PermutationSpec, device: torch.device) -> dict:
    state = {name: tensor.to(device) for name, tensor in model.state_dict().items()}
    perms = permutations({name: p.to(device) for name, p in random_permutations(spec, torch.Generator()).items()})
    apply_seconds, permuted = timed(lambda: apply_alignments(state, spec, perms), device, REPEAT)
    interpolate_seconds, _ = timed(lambda: interpolate_state_dicts(state, permuted, 0.5), device, REPEAT)
    parameters = sum(t.numel() for n, t in state.items() if n not in spec.ties)
    return {"parameters": parameters, "apply_s": apply_seconds, "interpolate_s": interpolate_seconds}


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    config = build_config(preset, vocab_size=30522)
    model = BertForMaskedLM(config)
    spec = spec_for_model(model)
    stats = bench_statistics(spec, args.tokens, args.batch_tokens, device)
    statistics = stats.pop("_statistics")
    matching = bench_matching(spec, statistics, all_groups=not args.quick, device=device)
    row = {"preset": preset, **{k: getattr(config, k) for k in PRESETS[preset]}}
    return row | stats | matching | bench_apply(model, spec, device)


COLUMNS = [
    ("preset", "preset", "{}"),
    ("parameters", "params (M)", "{:.1f}", 1e-6),
    ("tokens", "tokens", "{}"),
    ("stats_ff_s_per_Mtok", "stats ff s/Mtok", "{:.1f}"),
    ("stats_attn_s_per_Mtok", "attn s/Mtok", "{:.1f}"),
    ("stats_res_s_per_Mtok", "res s/Mtok", "{:.1f}"),
    ("stats_total_s_per_Mtok", "total s/Mtok", "{:.1f}"),
    ("stats_bytes", "sums MiB", "{:.1f}", 2**-20),
    ("stats_res_bytes", "res MiB @1x tok", "{:.2f}", 2**-20),
    ("stats_res_bytes_after_4x_tokens", "res MiB @4x tok", "{:.2f}", 2**-20),
    ("stats_ff_peak_extra_bytes", "ff peak extra MiB", "{:.1f}", 2**-20),
    ("match_ff_s_per_group", "match ff s/grp", "{:.3f}"),
    ("match_attn[head_perm]_s_per_group", "head_perm s/grp", "{:.3f}"),
    ("match_attn[monotonic]_s_per_group", "monotonic s/grp", "{:.3f}"),
    ("match_attn[ignore_heads]_s_per_group", "ignore_heads s/grp", "{:.3f}"),
    ("match_res[all]_s_per_group", "match res s", "{:.3f}"),
    ("apply_s", "apply s", "{:.3f}"),
    ("interpolate_s", "interp s", "{:.3f}"),
]


def table(rows: list[dict]) -> str:
    """A markdown table of the main columns."""
    header = "| " + " | ".join(title for _, title, *_ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key] * (scale[0] if scale else 1)) for key, _, fmt, *scale in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, from {', '.join(PRESETS)}")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per statistics measurement")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per update call")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; statistics live there in float64")
    parser.add_argument("--quick", action="store_true", help="2048 tokens, one group per kind matched")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = args.batch_tokens = 2048
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    get_method("ff")  # warm-up: scipy and torch first-call overheads stay out of the first preset's timings
    linear_sum_assignment(torch.rand(8, 8).numpy(), maximize=True)
    rows = []
    for preset in args.presets.split(","):
        rows.append(bench_preset(preset.strip(), args, device))
        print(f"done {preset}: {json.dumps({k: v for k, v in rows[-1].items() if k.startswith('stats_total')})}")
    print(table(rows))
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    meta |= {"machine": platform.machine(), "quick": args.quick}
    atomic_write_text(args.output, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()

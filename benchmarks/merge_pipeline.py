"""End-to-end benchmark of `lm-merge merge`: statistics, matching, applying, curve evaluation, per preset.

For each preset (random-init models, or two given HF checkpoints) one fresh subprocess runs the real merge pipeline
(`MergeTrainer.merge` on an `InterpolationModule`) over synthetic token blocks, so peak memory is that preset's alone.
Reported per preset: seconds per phase, the statistics pass against plain forwards of both models over the same
batches (with their heads, and the encoders alone, which is what the pass runs), each method's fit time (next to the
statistics pass it may share), feature tokens/s (both models), the cost of one (method, λ) curve point
against one plain forward pass over the same evaluation data, and peak memory (RSS over the process's before the
models load, sampled every 5 ms on CPU; max allocated on GPU) overall and per phase (statistics, matching, curves),
against the two models' parameter memory and the float64 statistics' bytes. The random-init checkpoints are written
by the parent process, so building them is not in the measured process's memory. The measured process inherits
``GLIBC_TUNABLES`` (recorded in each row), which decides how much freed memory glibc keeps resident (README).

Usage::

    python benchmarks/merge_pipeline.py                         # tiny, mini, small on this machine's device
    python benchmarks/merge_pipeline.py --model-a runs/study/quickstart/pretrain/seed0/hf \\
        --model-b runs/study/quickstart/pretrain/seed1/hf --block-size 32 --batch-size 128 --eval-tokens 32768 \\
        --methods vanilla ff+attn+res 'ff+attn[linear]+res' weight_matching learned   # the quickstart pair
    python benchmarks/merge_pipeline.py --presets base --vocab 30522 --feature-tokens 1048576 --eval-tokens 1048576 \\
        --precision bf16-mixed --batch-size 256 --statistics-batch-size 64   # the GPU target (BERT-base, 1 M + 1 M)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from transformers import BertForMaskedLM

from lightning_merge.data.tensors import TensorDictDataset
from lightning_merge.io import atomic_write_text
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.stats import STATISTICS_DTYPE
from lightning_merge.models import build_config
from lightning_merge.modules.merge import InterpolationModule
from lightning_merge.trainer import MergeTrainer

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "merge_pipeline.json"


class SyntheticBlocks(pl.LightningDataModule):
    """Random token blocks: unmasked for statistics, with fixed 15% masks for the curves."""

    def __init__(self, vocab: int, feature_tokens: int, eval_tokens: int, batch_size: int, block: int = 128) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.batch_size = batch_size
        self.block = block
        self.features = self._blocks(vocab, feature_tokens, generator)
        self.evaluation = self._blocks(vocab, eval_tokens, generator)
        masked = torch.rand(self.evaluation["input_ids"].shape, generator=generator) < 0.15
        self.evaluation["labels"] = torch.where(masked, self.evaluation["input_ids"], -100)
        self.tokenizer = None

    def _blocks(self, vocab: int, tokens: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(5, vocab, (max(1, tokens // self.block), self.block), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    def features_dataloader(self, split: str = "train", max_blocks: int | None = None) -> DataLoader:
        return DataLoader(TensorDictDataset(self.features), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """The curve data: blocks with fixed masks (what `MergeTrainer.merge` evaluates along λ)."""
        return DataLoader(TensorDictDataset(self.evaluation), batch_size=self.batch_size)

    test_dataloader = val_dataloader
    train_dataloader = val_dataloader  # what learned methods train on


STATM = Path("/proc/self/statm")


def _resident_bytes() -> int:
    """The process's resident memory now (Linux); elsewhere its peak so far."""
    if STATM.exists():
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS: rough


class PhaseMemory(pl.Callback):
    """Peak memory of each phase of the merge: RSS sampled every few ms on CPU, max allocated on a GPU.

    The phases follow the merge's loops: models and data loading, the statistics pass (validation), matching (at
    validation end; Lightning calls this callback's hook before the MergeCallback's), the curves (test), and the
    benchmark's own forward pass after the merge. The process's overall peak says how much memory a merge needs;
    the phase that sets it says where to look.
    """

    def __init__(self, device: torch.device, sample: bool = True) -> None:
        self.device = device
        self.phase = "loading"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._measure = None  # off Linux a CPU run has no current RSS to sample: no phase peaks
        if device.type == "cuda":
            self._measure = lambda: torch.cuda.max_memory_allocated(device)
        elif STATM.exists():
            self._measure = _resident_bytes
            if sample:  # otherwise RSS is read only where a phase ends: its peak may be missed
                threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._record()

    def _record(self) -> None:
        if self._measure is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self._measure())

    def mark(self, phase: str) -> None:
        """End the current phase (its peak so far is kept) and start ``phase``."""
        self._record()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.phase = phase

    def stop(self) -> dict[str, int]:
        self.mark("stopped")
        self._stop.set()
        return {phase: peak for phase, peak in self.peaks.items() if phase != "stopped"}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("statistics")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("matching")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("curves")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("after_merge")


# Plain forwards are timed this many times and averaged: one pass of a tiny model varies by a third between runs,
# while a curve's time is already an average over its points.
FORWARD_REPEATS = 3


def _mean_seconds(run: Any, device: torch.device) -> float:
    total = 0.0
    for _ in range(FORWARD_REPEATS):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += time.perf_counter() - start
    return total / FORWARD_REPEATS


def _plain_forwards_seconds(
    forwards: list[Callable[[dict[str, torch.Tensor]], Any]], loader: DataLoader, device: torch.device, precision: str
) -> float:
    """Mean seconds of running each of ``forwards`` on every batch: inference mode and the trainer's autocast, as its
    loops run them, and no hooks."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))

    def run() -> None:
        with torch.inference_mode(), autocast:
            for batch in loader:
                inputs = {k: v.to(device) for k, v in batch.items()}
                for forward in forwards:
                    forward(inputs)

    return _mean_seconds(run, device)


def _forward_seconds(module: InterpolationModule, loader: DataLoader, precision: str) -> float:
    """One plain forward pass of the objective over the evaluation data: the floor of one curve point."""
    return _plain_forwards_seconds([module.objective], loader, module.device, precision)


def _pair_forwards_seconds(
    module: InterpolationModule, loader: DataLoader, encoder_only: bool, precision: str
) -> float:
    """Plain forwards of models A and B over the statistics batches: the floor of the statistics pass, which adds
    the feature products to them. ``encoder_only``: the base models, as the pass runs them (the heads make no
    features); otherwise the models' own forward, heads included."""
    models = [m.base_model if encoder_only else m for m in (module.model_a, module.model_b)]
    forwards = [lambda inputs, model=model: model(**inputs) for model in models]
    return _plain_forwards_seconds(forwards, loader, module.device, precision)


def _statistics_bytes(module: InterpolationModule, methods: list[str]) -> int:
    """Bytes of the float64 sums the methods need (`MergeStatistics.nbytes`, without allocating them)."""
    features = {f for name in methods for f in get_method(name).statistics_features(module.spec)}
    widths = {point.key: module.spec.feature_size(f) for f in features for point in module.spec.points[f]}
    return sum(8 * (d * d + 4 * d + 1) for d in widths.values())


def _random_models(preset: str, vocab: int, root: Path) -> tuple[str, str]:
    """Two random-init checkpoints of ``preset`` (seeds 0 and 1), written by the parent process so that building
    them is not part of the measured process's memory."""
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        BertForMaskedLM(build_config(preset, vocab_size=vocab)).save_pretrained(root / name)
    return str(root / "a"), str(root / "b")


MERGE_PHASES = ("loading", "statistics", "matching", "curves")


def run_one(args: argparse.Namespace) -> dict:
    """Benchmark one pair of checkpoints in this process; returns its row."""
    resident_before = _resident_bytes()  # interpreter and libraries, before the trainer and the models
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MergeTrainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                               default_root_dir=tmp)
        device = trainer.strategy.root_device
        memory = PhaseMemory(device, sample=not args.no_memory_sampling)
        trainer.callbacks.append(memory)  # before the MergeCallback, which `merge` appends
        vocab = BertForMaskedLM.config_class.from_pretrained(args.model_a).vocab_size
        data = SyntheticBlocks(vocab, args.feature_tokens, args.eval_tokens, args.batch_size, args.block_size)
        lambdas = [i / (args.lambdas - 1) for i in range(args.lambdas)]
        start = time.perf_counter()
        module = InterpolationModule(args.model_a, args.model_b, lambdas=lambdas)
        results = trainer.merge(
            module, data, methods=args.methods, export_method=None, statistics_dtype=args.statistics_dtype,
            statistics_batch_size=args.statistics_batch_size,
        )
        total = time.perf_counter() - start
    module.to(device)
    apply_start = time.perf_counter()
    module.endpoints(args.methods[-1])
    apply_s = time.perf_counter() - apply_start
    forward_s = _forward_seconds(module, data.test_dataloader(), args.precision)
    statistics_loader = DataLoader(TensorDictDataset(data.features),
                                   batch_size=args.statistics_batch_size or args.batch_size)
    pair_forwards_s = _pair_forwards_seconds(module, statistics_loader, False, args.precision)
    encoder_forwards_s = _pair_forwards_seconds(module, statistics_loader, True, args.precision)
    baseline = 0 if device.type == "cuda" else resident_before
    peaks = {phase: peak for phase, peak in memory.stop().items() if phase in MERGE_PHASES}
    peak = max(peaks.values(), default=float("nan"))
    params = sum(p.numel() * p.element_size() for p in module.model_a.parameters())
    statistics_bytes = _statistics_bytes(module, args.methods)
    t = results["timings"]
    return {
        "preset": args.preset,
        "device": str(device),
        "precision": args.precision,
        "statistics_dtype": args.statistics_dtype,
        "statistics_batch_size": args.statistics_batch_size or args.batch_size,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # the C allocator's settings (see the README)
        "memory_sampled": not args.no_memory_sampling,
        "feature_tokens": t.get("statistics_tokens", 0),
        "eval_tokens": data.evaluation["input_ids"].numel(),
        "statistics_s": t.get("statistics_s", 0.0),
        "feature_tokens_per_s": 2 * t.get("statistics_tokens", 0) / max(t.get("statistics_s", 0.0), 1e-9),
        # the statistics pass against plain forwards of both models over the same batches (issue 21's 1.3x target)
        "pair_forwards_s": pair_forwards_s,
        "statistics_over_forwards": t.get("statistics_s", 0.0) / pair_forwards_s,
        "encoder_forwards_s": encoder_forwards_s,
        "statistics_over_encoder_forwards": t.get("statistics_s", 0.0) / encoder_forwards_s,
        "matching_s": t.get("matching_s", 0.0),
        "apply_s": apply_s,
        "curves_s": t["curves_s"],
        "curve_points": t["curve_points"],
        "per_point_s": t["curves_s"] / t["curve_points"],
        "forward_s": forward_s,
        "per_point_over_forward": t["curves_s"] / t["curve_points"] / forward_s,
        "total_s": total,
        "two_models_param_mib": 2 * params / 2**20,
        "statistics_mib": statistics_bytes / 2**20,
        # the issue's target: about 3x the two models' parameters plus the statistics
        "memory_target_mib": (3 * 2 * params + statistics_bytes) / 2**20,
        **{f"{phase}_peak_mib": (peaks.get(phase, float("nan")) - baseline) / 2**20 for phase in MERGE_PHASES},
        # the merge's peak: RSS, and RSS over the process's before loading the models (CPU); max allocated (GPU)
        "peak_mib": peak / 2**20,
        "peak_over_baseline_mib": (peak - baseline) / 2**20,
        "fit_s": t.get("fit_s", {}),  # per method; work shared between methods counts for the first that needs it
    }


COLUMNS = (
    ("preset", "{}"), ("device", "{}"), ("feature_tokens", "{}"), ("statistics_batch_size", "{}"),
    ("statistics_s", "{:.2f}"), ("pair_forwards_s", "{:.2f}"), ("statistics_over_forwards", "{:.2f}"),
    ("encoder_forwards_s", "{:.2f}"), ("statistics_over_encoder_forwards", "{:.2f}"),
    ("feature_tokens_per_s", "{:.0f}"), ("matching_s", "{:.2f}"), ("apply_s", "{:.3f}"), ("curves_s", "{:.2f}"),
    ("per_point_s", "{:.3f}"), ("forward_s", "{:.3f}"), ("per_point_over_forward", "{:.2f}"), ("total_s", "{:.1f}"),
    ("two_models_param_mib", "{:.0f}"), ("statistics_mib", "{:.0f}"), ("memory_target_mib", "{:.0f}"),
    *((f"{phase}_peak_mib", "{:.0f}") for phase in ("statistics", "matching", "curves")),
    ("peak_mib", "{:.0f}"), ("peak_over_baseline_mib", "{:.0f}"),
)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[name]) for name, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def fit_table(rows: list[dict]) -> str:
    """Each method's fit seconds per preset, beside the statistics pass (shared by the methods that read it)."""
    methods = list(dict.fromkeys(m for row in rows for m in row["fit_s"]))
    lines = ["| preset | statistics_s | " + " | ".join(f"fit `{m}` s" for m in methods) + " |",
             "|" + "---|" * (len(methods) + 2)]
    for row in rows:
        cells = [f"{row['fit_s'][m]:.2f}" if m in row["fit_s"] else "" for m in methods]
        lines.append(f"| {row['preset']} | {row['statistics_s']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "mini", "small"])
    parser.add_argument("--preset", help=argparse.SUPPRESS)  # one preset, in the subprocess
    parser.add_argument("--model-a", help="HF dir of model A (instead of random-init presets)")
    parser.add_argument("--model-b", help="HF dir of model B")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--feature-tokens", type=int, default=65536)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (the quickstart study: 32)")
    parser.add_argument("--statistics-batch-size", type=int, help="statistics pass batch (default: --batch-size)")
    parser.add_argument("--lambdas", type=int, default=11)
    parser.add_argument("--methods", nargs="+", default=["vanilla", "ff+attn+res"])
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    parser.add_argument("--statistics-dtype", default=STATISTICS_DTYPE, help="dtype of the statistics' products")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-memory-sampling", action="store_true",
                        help="time without the thread that samples RSS every 5 ms (it shares the CPU with the timed "
                             "work); CPU peaks are then read only at phase ends")
    return parser.parse_args(argv)


def _run_subprocess(argv: list[str] | None, preset: str, model_a: str, model_b: str) -> dict:
    """One preset in a fresh process, so that its peak memory is its own."""
    argv_one = list(argv if argv is not None else sys.argv[1:])
    command = [sys.executable, __file__, *argv_one, "--preset", preset, "--model-a", model_a, "--model-b", model_b]
    result = subprocess.run(command, capture_output=True, text=True)
    row_lines = [line for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if result.returncode != 0 or not row_lines:
        sys.exit(f"benchmark of {preset} failed:\n{result.stderr[-3000:]}")
    return json.loads(row_lines[-1][4:])


def _checkpoint_name(path: str) -> str:
    """``runs/.../seed0/hf`` -> ``seed0``: an HF export's folder is named after what it holds, not the run."""
    folder = Path(path)
    return folder.parent.name if folder.name == "hf" else folder.name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.preset:
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    presets = [_checkpoint_name(args.model_a)] if args.model_a else args.presets
    for preset in presets:
        with tempfile.TemporaryDirectory() as tmp:
            models = (args.model_a, args.model_b) if args.model_a else _random_models(preset, args.vocab, Path(tmp))
            rows.append(_run_subprocess(argv, preset, *models))
        print(table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else table(rows), flush=True)
    info = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    atomic_write_text(args.output, json.dumps({"info": info, "args": vars(args) | {"output": str(args.output)},
                                               "rows": rows}, indent=2) + "\n")
    print(f"\n{table(rows)}\n\n{fit_table(rows)}\n\nwritten to {args.output}")


if __name__ == "__main__":
    main()

"""Benchmark of one training step under each precision and attention kernel: which settings train fastest here.

A pretraining step of ``MLMModule`` — the masked-LM objective's forward, backward and an AdamW step — on random
token blocks, for every (attention kernel, precision) pair: HF's ``sdpa`` (the default) and ``eager`` attention,
float32 and bfloat16 autocast (what ``trainer.precision: bf16-mixed`` runs). bfloat16 is fast only on hardware with
bf16 matrix units (AMX on recent Xeons, tensor cores on GPUs); elsewhere it is slower than float32, so measure
before choosing. bf16 changes the rounding of every step, so the models differ from float32 runs: the quickstart
study trains in float32.

Usage::

    python benchmarks/training_step.py                                  # the quickstart's shape (tiny, 128 x 32)
    python benchmarks/training_step.py --preset small --block 128 --batch-size 32
    python benchmarks/training_step.py --device cuda --preset base --vocab 30522 --block 128 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

from lightning_merge.io import atomic_write_text
from lightning_merge.models import attention_kwargs, build_config
from lightning_merge.objectives import MaskedLMObjective

sys.path.insert(0, str(Path(__file__).parent))
from merge_core import timed  # noqa: E402 - a sibling script, not a package

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "training_step.json"
ATTENTION = ("sdpa", "eager")
PRECISIONS = {"float32": None, "bf16-mixed": torch.bfloat16}
MASKED_FRACTION = 0.15  # of the tokens, as MLM pretraining masks them


def random_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.batch_size, args.block), generator=generator)
    labels = torch.where(torch.rand(ids.shape, generator=generator) < MASKED_FRACTION, ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def step_seconds(attention: str, dtype: torch.dtype | None, args: argparse.Namespace, device: torch.device) -> float:
    """Best of ``args.repeat`` timings of ``args.steps`` steps, after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    config = build_config(args.preset, args.vocab, num_attention_heads=args.heads, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    model = AutoModelForMaskedLM.from_config(config, **attention_kwargs(attention)).to(device).train()
    objective = MaskedLMObjective(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = random_batch(args, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss_sum, count = objective(batch)
        (loss_sum / count.clamp(min=1)).backward()  # as MLMModule takes the mean
        optimizer.step()
        optimizer.zero_grad()

    def steps() -> None:
        for _ in range(args.steps):
            step()

    for _ in range(args.warmup):
        step()
    seconds, _ = timed(steps, device, repeat=args.repeat)
    return seconds / args.steps


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = [{"attention": attention, "precision": precision,
             "step_ms": 1000 * step_seconds(attention, dtype, args, device)}
            for attention in ATTENTION for precision, dtype in PRECISIONS.items()]
    baseline = rows[0]["step_ms"]  # the default: sdpa in float32
    for row in rows:
        row["speedup"] = baseline / row["step_ms"]
    return rows


def _has_amx() -> bool | None:
    """Whether the CPU has AMX's bf16 matrix units (Linux's CPU flags; None where they cannot be read)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None


def table(rows: list[dict]) -> str:
    lines = ["| attention | precision | ms / step | speed-up vs sdpa float32 |", "|---|---|---:|---:|"]
    lines += [f"| {r['attention']} | {r['precision']} | {r['step_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (the quickstart's tiny model has 8)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block", type=int, default=32, help="tokens per block")
    parser.add_argument("--batch-size", type=int, default=128, help="blocks per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeat", type=int, default=2, help="timings per setting; the best is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = measure(args, device)
    print(table(rows))
    meta = {"preset": args.preset, "heads": args.heads, "vocab": args.vocab, "block": args.block,
            "batch_size": args.batch_size, "device": args.device, "torch": torch.__version__,
            "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": _has_amx()}
    atomic_write_text(args.output, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()

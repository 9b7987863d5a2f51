"""float32 vs float64 feature products in the merge statistics: speed, correlation error, and what matching makes of it.

Both models run once over real text (the offline MLM corpus, the models' own tokenizer); the same token features feed
`MergeStatistics` with float64 products and with float32 products (the sums are float64 in both). Per group kind
it reports the largest absolute correlation difference, the share of each permutation that float32 matching gives
identically, and the total matched correlation of either permutation under the float64 correlations (a different
but equally good assignment among near-ties is harmless). The seconds are the update time only, not the forwards.

Usage::

    python benchmarks/statistics_precision.py                      # the quickstart study's seeds 0 and 1
    python benchmarks/statistics_precision.py --model-a A/hf --model-b B/hf --blocks 8192 --device cuda
    python benchmarks/statistics_precision.py --device cuda --matmul-precision high   # float32 products in TF32

``--save-blocks F`` also writes the corpus blocks it used (safetensors); ``--blocks-file F`` reads them back instead
of the corpus, so the comparison runs where neither the corpus nor ``datasets`` is (``benchmarks/gpu.sh``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import BertForMaskedLM

from lightning_merge.data.tensors import TensorDictDataset
from lightning_merge.io import atomic_write_text
from lightning_merge.merge.features import FeatureRecorder
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.spec import spec_for_pair
from lightning_merge.merge.stats import PRODUCT_DTYPES, MergeStatistics

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "statistics_precision.json"
UPDATE_REPEATS = 3
QUICKSTART = Path("runs/study/quickstart/pretrain")
METHOD = "ff+attn+res"


@torch.no_grad()
def features(model_a: torch.nn.Module, model_b: torch.nn.Module, loader, device: torch.device) -> list[dict]:
    """Every batch's point key -> (A's, B's) token features, kept on ``device``, so both dtypes see the same ones."""
    spec = spec_for_pair(model_a, model_b)
    recorded = []
    with FeatureRecorder(model_a, spec) as recorder_a, FeatureRecorder(model_b, spec) as recorder_b:
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items()}
            model_a.bert(**inputs)
            model_b.bert(**inputs)
            feats_a, feats_b = recorder_a.pop(inputs["attention_mask"]), recorder_b.pop(inputs["attention_mask"])
            recorded.append({key: (feats_a[g][key], feats_b[g][key]) for g in feats_a for key in feats_a[g]})
    return recorded


def accumulate(spec, recorded: list[dict], products: str, device: torch.device) -> tuple[MergeStatistics, float]:
    statistics = MergeStatistics(spec, device=device, products=products)
    start = time.perf_counter()
    for batch in recorded:
        for key, (x_a, x_b) in batch.items():
            statistics.points[key].update(x_a, x_b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics, time.perf_counter() - start


def compare(spec, exact: MergeStatistics, fast: MergeStatistics) -> list[dict]:
    method = get_method(METHOD)
    found_exact, found_fast = (method.fit(FitInputs(spec, statistics=s)) for s in (exact, fast))
    perms_exact = {group: alignment.perm for group, alignment in found_exact.items()}
    perms_fast = {group: alignment.perm for group, alignment in found_fast.items()}
    rows = []
    for kind in ("ff", "attn", "res"):
        groups = spec.groups_of_kind([kind])
        errors, same, score_exact, score_fast = [], [], 0.0, 0.0
        for group in groups:
            corr_exact, corr_fast = exact.correlation(group), fast.correlation(group)
            errors.append(float((corr_exact - corr_fast).abs().max()))
            same.append(float((perms_exact[group] == perms_fast[group]).double().mean()))
            rows_index = torch.arange(corr_exact.shape[0])
            score_exact += float(corr_exact[rows_index, perms_exact[group]].sum())
            score_fast += float(corr_exact[rows_index, perms_fast[group]].sum())
        rows.append({
            "kind": kind,
            "groups": len(groups),
            "max_abs_correlation_error": max(errors),
            "perm_entries_identical": sum(same) / len(same),
            "matched_correlation_float64_perm": score_exact,
            "matched_correlation_float32_perm": score_fast,
        })
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-a", default=str(QUICKSTART / "seed0" / "hf"))
    parser.add_argument("--model-b", default=str(QUICKSTART / "seed1" / "hf"))
    parser.add_argument("--blocks", type=int, default=1024, help="unmasked training blocks of the offline corpus")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                        help="torch's float32 matmul precision; high: TF32 on GPUs that have it")
    parser.add_argument("--blocks-file", type=Path, help="token blocks saved by --save-blocks, instead of the corpus")
    parser.add_argument("--save-blocks", type=Path, help="write the corpus blocks used here (safetensors)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.blocks_file is not None and args.save_blocks is not None:
        parser.error("--save-blocks writes the corpus blocks; with --blocks-file there are none to write")
    return args


def token_blocks(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The unmasked blocks to run: ``--blocks-file``, or ``--blocks`` blocks of the offline corpus, evenly spread."""
    if args.blocks_file is not None:
        blocks = load_file(args.blocks_file)
        args.blocks, args.block_size = blocks["input_ids"].shape  # what ran, in the results' args
        return blocks
    from lightning_merge.data.mlm import MLMDataModule  # needs `datasets` and the corpus; a blocks file needs neither

    data = MLMDataModule(tokenizer=args.model_a, block_size=args.block_size, batch_size=args.batch_size)
    data.setup("validate")
    batches = list(data.features_dataloader("train", args.blocks))
    blocks = {key: torch.cat([batch[key] for batch in batches]).contiguous() for key in batches[0]}
    if args.save_blocks is not None:
        args.save_blocks.parent.mkdir(parents=True, exist_ok=True)
        save_file(blocks, str(args.save_blocks))
    return blocks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    model_a, model_b = (BertForMaskedLM.from_pretrained(p).to(device).eval() for p in (args.model_a, args.model_b))
    spec = spec_for_pair(model_a, model_b)
    blocks = token_blocks(args)
    recorded = features(model_a, model_b, DataLoader(TensorDictDataset(blocks), batch_size=args.batch_size), device)
    tokens = sum(next(iter(batch.values()))[0].shape[0] for batch in recorded)
    timings, statistics = {}, {}
    for _ in range(UPDATE_REPEATS):  # alternating, the fastest of each: one pass varies by half between runs
        for name in PRODUCT_DTYPES:
            statistics[name], seconds = accumulate(spec, recorded, name, device)
            timings[name] = min(seconds, timings.get(name, seconds))
    rows = compare(spec, statistics["float64"], statistics["float32"])
    result = {
        "info": {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "args": {name: str(v) if isinstance(v, Path) else v for name, v in vars(args).items()},
        "tokens": tokens,
        "update_seconds": timings,
        "rows": rows,
    }
    speedup = timings["float64"] / timings["float32"]
    print(f"{tokens} tokens; update seconds float64 {timings['float64']:.2f}, float32 {timings['float32']:.2f} "
          f"({speedup:.2f}x)\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return result


if __name__ == "__main__":
    main()

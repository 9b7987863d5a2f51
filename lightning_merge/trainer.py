"""`MergeTrainer`: a Lightning Trainer with a ``merge`` entry point (statistics pass, matching, barrier curves)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.utilities import rank_zero_only
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from lightning_merge.callbacks import MergeCallback
from lightning_merge.errors import ConfigError, OutputExistsError
from lightning_merge.io import atomic_dir, atomic_file, atomic_write_text
from lightning_merge.memory import release_freed_memory
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.stats import product_dtype
from lightning_merge.modules.merge import InterpolationModule
from lightning_merge.report import write_report

# The paper's comparisons: FF alone, FF+attention per attention variant, residual per variant, the full method.
DEFAULT_METHODS: tuple[str, ...] = (
    "vanilla",
    "ff",
    "ff+attn[head_perm]",
    "ff+attn[monotonic]",
    "ff+attn[ignore_heads]",
    "res[first]",
    "res[last]",
    "res[all]",
    "ff+attn+res",
)


class MergeTrainer(pl.Trainer):
    """A Trainer that can also ``merge`` two models: see `MergeTrainer.merge`."""

    def merge(
        self,
        model: InterpolationModule,
        datamodule: pl.LightningDataModule | None = None,
        methods: list[str] | None = None,
        export_method: str | None = "ff+attn+res",
        export_lambda: float = 0.5,
        exclude_special_tokens: bool = False,
        statistics_split: str = "train",
        statistics_max_blocks: int | None = 512,
        statistics_dtype: str = "float64",
        statistics_data: pl.LightningDataModule | None = None,
        statistics_batch_size: int | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Align model B to model A with every method and measure the loss barrier of each.

        One statistics pass (validation loop over the datamodule's feature batches) serves every method; the
        barrier curves come from one test loop over the (first) validation loader, whose masks are fixed. Outputs
        go to ``trainer.default_root_dir``.

        Args:
            model: the `InterpolationModule` holding models A and B.
            datamodule: gives ``features_dataloader(split, max_blocks)`` (unmasked text; else its validation
                inputs) for statistics and ``val_dataloader()`` for the curves.
            methods: merge method names (default: the paper's comparisons, `DEFAULT_METHODS`).
            export_method: method whose λ = ``export_lambda`` model is saved to ``merged/`` (None: none).
            export_lambda: λ of the exported merged model.
            exclude_special_tokens: leave special tokens out of the statistics.
            statistics_split: split whose text feeds the statistics (with ``features_dataloader``).
            statistics_max_blocks: at most this many blocks of it (evenly spread; None: all).
            statistics_dtype: ``float64`` (default) or ``float32``: the dtype each block's feature products are
                formed in; the sums are float64 either way. float32 is faster (on GPUs by far) and its correlation
                error is negligible for matching (benchmarks/statistics_precision.py measures it).
            statistics_data: a separate datamodule for the statistics (e.g. a BookCorpus sample, as in the
                paper); default: ``datamodule``.
            statistics_batch_size: sequences per batch of the statistics pass (default: the datamodule's). The
                pass holds model A's features at every feature point for one batch while B runs, so a smaller batch
                lowers its peak memory in proportion; the sums do not change.
            overwrite: replace the outputs of an earlier run in the same directory.
        """
        methods = list(methods or DEFAULT_METHODS)
        run_dir = Path(self.default_root_dir)
        self._check_request(run_dir, methods, export_method, overwrite)
        product_dtype(statistics_dtype)  # an unknown name fails before any work
        if statistics_batch_size is not None and statistics_batch_size < 1:
            raise ConfigError(f"statistics_batch_size={statistics_batch_size} must be at least 1, or null")
        datamodule.setup("test")
        model.check_tokenizer(getattr(datamodule, "tokenizer", None))
        timings: dict[str, float] = {}
        if statistics_data is not None:
            statistics_data.setup("validate")
            model.check_tokenizer(getattr(statistics_data, "tokenizer", None))
        statistics = _statistics_loader(
            statistics_data or datamodule, statistics_split, statistics_max_blocks, statistics_batch_size
        )
        permutations = self._fit_permutations(
            model, datamodule, statistics, methods, exclude_special_tokens, statistics_dtype, timings
        )
        model.set_methods(permutations, _task_metrics(datamodule))
        release_freed_memory()  # the statistics and correlations, before the curves' parameters and activations
        start = time.perf_counter()
        self.test(model, dataloaders=_first(datamodule.val_dataloader()), verbose=False)
        timings["curves_s"] = time.perf_counter() - start
        release_freed_memory()  # the curves' activations, before the export builds the merged model
        timings["curve_points"] = len(model.methods) * len(model.lambdas)
        results = {**model.results, "timings": timings}
        self._write_outputs(run_dir, model, permutations, results, export_method, export_lambda, datamodule)
        return results

    def _check_request(self, run_dir: Path, methods: list[str], export_method: str | None, overwrite: bool) -> None:
        for name in methods:
            get_method(name)  # unknown names fail here, before any work
        if export_method is not None and export_method not in methods:
            raise ConfigError(f"export_method {export_method!r} is not among the methods: {', '.join(methods)}")
        if (run_dir / "barriers.json").exists() and not overwrite:
            raise OutputExistsError(
                f"{run_dir} holds an earlier merge; pass --overwrite true or another --trainer.default_root_dir"
            )

    def _fit_permutations(
        self, model: InterpolationModule, datamodule: Any, loader: Any, methods: Sequence[str], exclude_special: bool,
        statistics_dtype: str, timings: dict,
    ) -> dict[str, dict[str, torch.Tensor]]:
        if not any(get_method(name).groups for name in methods):
            return {name: {} for name in methods}  # nothing to align: no statistics pass needed
        tokenizer = getattr(datamodule, "tokenizer", None)
        special_ids = tokenizer.all_special_ids if exclude_special and tokenizer is not None else None
        callback = MergeCallback(methods, special_token_ids=special_ids, statistics_dtype=statistics_dtype)
        self.callbacks.append(callback)
        try:
            self.validate(model, dataloaders=loader, verbose=False)
        finally:
            self.callbacks.remove(callback)
        timings.update(callback.timings, statistics_tokens=callback.statistics.token_count)
        return callback.permutations

    @rank_zero_only
    def _write_outputs(
        self, run_dir: Path, model: InterpolationModule, permutations: dict, results: dict, export_method: str | None,
        export_lambda: float, datamodule: Any,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        flat = {f"{method}/{group}": perm.cpu().contiguous() for method, perms in permutations.items()
                for group, perm in perms.items()}
        with atomic_file(run_dir / "permutations.safetensors") as tmp:
            save_file(flat, str(tmp), metadata={"methods": json.dumps(list(permutations))})
        metric_columns = [k for k in next(iter(results["barriers"].values())) if k.endswith(("_barrier", "_a", "_b"))
                          and k not in BARRIER_COLUMNS]
        table = write_report(run_dir, results["lambdas"], results["curves"], results["barriers"],
                             [*BARRIER_COLUMNS, *metric_columns])
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        if export_method is not None:
            self._export_merged(run_dir / "merged", model, export_method, export_lambda, datamodule)
        print(f"\nBarriers along the interpolation path ({run_dir}):\n{table}\n", flush=True)

    @staticmethod
    def _export_merged(path: Path, model: InterpolationModule, method: str, lam: float, datamodule: Any) -> None:
        merged = copy.deepcopy(model.model_a)  # keeps buffers and the decoder/embedding tie
        with torch.no_grad():
            for name, value in model.interpolated(method, lam).items():
                merged.get_parameter(name).copy_(value)
        tokenizer = getattr(datamodule, "tokenizer", None)
        with atomic_dir(path, overwrite=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)


BARRIER_COLUMNS = ("barrier", "barrier_midpoint", "loss_a", "loss_b")


class RankStridedSampler(DistributedSampler):
    """Every rank takes every world_size-th item, none repeated, so sums over ranks equal one process's sums.

    Lightning's own DistributedSampler pads ranks to equal length by repeating items, which would count them twice
    in the statistics and curves. The world is read when iterating, after the strategy has set up the processes;
    being a DistributedSampler, Lightning leaves it in place. Evaluation only: ranks may run one batch apart.
    """

    def __init__(self, dataset: Any) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)

    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, len(self.dataset), world))

    def __len__(self) -> int:
        rank, world = self._world()
        return len(range(rank, len(self.dataset), world))


def _unrepeated(loader: DataLoader, batch_size: int | None = None) -> DataLoader:
    """The same loader (or with another batch size), split across ranks without repeats (`RankStridedSampler`)."""
    return DataLoader(loader.dataset, batch_size=batch_size or loader.batch_size,
                      sampler=RankStridedSampler(loader.dataset), collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


def _first(loaders: Any, batch_size: int | None = None) -> Any:
    return _unrepeated(loaders[0] if isinstance(loaders, (list, tuple)) else loaders, batch_size)


def _statistics_loader(datamodule: Any, split: str, max_blocks: int | None, batch_size: int | None) -> Any:
    """Unmasked text of ``split`` when the datamodule offers it (MLM), else its (first) validation inputs; in batches
    of ``batch_size`` (None: the datamodule's)."""
    features = getattr(datamodule, "features_dataloader", None)
    if callable(features):
        return _unrepeated(features(split=split, max_blocks=max_blocks), batch_size)
    return _first(datamodule.val_dataloader(), batch_size)


def _task_metrics(datamodule: Any) -> torchmetrics.MetricCollection | None:
    """The task metrics of a classification datamodule (a GLUE task), evaluated along λ beside the loss."""
    task = getattr(datamodule, "task", None)
    if task is None or not hasattr(task, "metrics"):
        return None
    from lightning_merge.modules.glue import task_metrics

    return task_metrics(task)

"""Lightning callbacks: HF export of trained models (and, for merging, the MergeCallback)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from lightning_merge.errors import DataError
from lightning_merge.io import atomic_dir
from lightning_merge.merge.features import StatisticsRecorder, needs_heads
from lightning_merge.merge.stats import STATISTICS_DTYPE, JointStatistics, MergeStatistics, product_dtype


class HFExport(pl.Callback):
    """At the end of training, write the wrapped HF model (safetensors) and its tokenizer to ``<root>/<dirname>``.

    The directory loads with ``AutoModelFor*.from_pretrained``; it is written under a temp name and renamed, so an
    interrupted export never leaves a half-written model where a finished one was.
    """

    def __init__(self, dirname: str = "hf") -> None:
        self.dirname = dirname

    def export_dir(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        with atomic_dir(self.export_dir(trainer), overwrite=True) as tmp:
            pl_module.model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)


class MergeCallback(pl.Callback):
    """Gather the activation statistics a merge's methods need during a `PairModule`'s validation pass.

    At validation start it hooks the feature points of every model; during each batch's forward passes it adds
    every point's token features to every pair's float64 sums (`StatisticsRecorder`): ``statistics`` is then the
    `MergeStatistics` of A and B, or with N > 2 models the `JointStatistics` of every pair; at validation end it
    removes the hooks and all-reduces the sums across ranks, so every rank holds the statistics of all tokens.
    Fitting the methods' alignments from them is the trainer's next step.

    Args:
        features: the feature sets to record (names in the spec's ``points``: what the methods declare they read).
        special_token_ids: token ids to leave out of the statistics (the paper keeps special tokens: None).
        statistics_dtype: ``float32`` (default) or ``float64``: the dtype of the per-block products (sums stay float64).
        own_features: feature sets of which each model's statistics against itself are kept too (Gram matrices).
    """

    def __init__(
        self,
        features: Sequence[str],
        special_token_ids: Sequence[int] | None = None,
        statistics_dtype: str = STATISTICS_DTYPE,
        own_features: Sequence[str] = (),
    ) -> None:
        self.features = list(features)
        self.own_features = list(own_features)
        self.statistics_dtype = statistics_dtype
        product_dtype(statistics_dtype)  # an unknown name fails here, before the pass
        self.special_token_ids = list(special_token_ids) if special_token_ids else None
        self.statistics: MergeStatistics | JointStatistics | None = None
        self._recorder: StatisticsRecorder | None = None
        self._joint: JointStatistics | None = None
        self._special_ids: Tensor | None = None
        self.timings: dict[str, float] = {}
        self._start = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        models = pl_module.all_models
        self._joint = JointStatistics(pl_module.spec, len(models), self.features, pl_module.device,
                                      self.statistics_dtype, self.own_features)
        pl_module.statistics_run_heads = needs_heads(pl_module.spec, [*self.features, *self.own_features])
        # a pair merge's methods read one pair's statistics; a merge of N > 2 models reads every pair's
        self.statistics = self._joint.pair(0, 1) if len(models) == 2 else self._joint
        self._recorder = StatisticsRecorder(models, self._joint)
        self._recorder.register()
        if self.special_token_ids:
            self._special_ids = torch.tensor(self.special_token_ids, device=pl_module.device)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        special = torch.isin(batch["input_ids"], self._special_ids) if self._special_ids is not None else None
        self._recorder.begin_batch(batch["attention_mask"], special)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._recorder.end_batch()  # every point's sums were updated during the forward passes

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()  # left in place, they would break every later forward of the models

    def _remove_hooks(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        _sum_across_ranks(trainer.strategy, self._joint.state_tensors().values())
        if self._joint.point_keys and self._joint.token_count == 0:
            raise DataError("the statistics pass saw no tokens; give the datamodule some validation text")
        self.timings = {"statistics_s": time.perf_counter() - self._start}


def _sum_across_ranks(strategy: pl.strategies.Strategy, tensors: Iterable[Tensor]) -> None:
    """All-reduce every tensor in place, one at a time: reduced copies of all the sums, kept until loaded, would
    hold the statistics twice while the permutations are fitted."""
    for total in tensors:
        reduced = strategy.reduce(total, reduce_op="sum")
        if reduced is not total:  # DDP reduces in place and a single device returns the input; anything else: copy
            total.copy_(reduced)

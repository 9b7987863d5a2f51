"""Lightning callbacks: HF export of trained models (and, for merging, the MergeCallback)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from lightning_merge.io import atomic_dir


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

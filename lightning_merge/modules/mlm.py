"""MLMModule: pretrain a BERT masked language model from a size preset (or continue from a checkpoint)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from transformers import BertForMaskedLM

from lightning_merge.errors import ConfigError
from lightning_merge.models import HF_CONFIG_KEY, build_config, load_pretrained
from lightning_merge.modules.optim import adamw_linear_schedule
from lightning_merge.objectives import MaskedLMObjective


class MLMModule(pl.LightningModule):
    """HF ``BertForMaskedLM`` trained with AdamW, linear warmup and decay; loss only at masked positions.

    Args:
        preset: model size (``tiny``, ``mini``, ``small``, ``base``), used unless ``init_from`` is given.
        init_from: HF directory, our ``.ckpt`` or hub id to start from instead of a random init.
        max_position_embeddings: longest sequence the model can read.
        config_overrides: extra ``BertConfig`` fields (dropout, layer count, ...), winning over the preset.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay (not applied to biases and LayerNorms).
        warmup_ratio: fraction of the training steps spent warming up linearly.
        betas: AdamW betas.
    """

    def __init__(
        self,
        preset: str = "mini",
        init_from: str | None = None,
        max_position_embeddings: int = 512,
        config_overrides: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        betas: tuple[float, float] = (0.9, 0.98),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: BertForMaskedLM | None = None
        self.objective: MaskedLMObjective | None = None
        if init_from is not None:
            self.build(None)

    def build(self, vocab_size: int | None) -> None:
        """Create the HF model: from ``init_from`` or, with ``vocab_size`` tokens, from the preset.

        Lightning calls this through `configure_model` with the datamodule tokenizer's size.
        """
        hp = self.hparams
        if hp.init_from is not None:
            model = load_pretrained(hp.init_from, BertForMaskedLM).train()  # from_pretrained returns eval mode
        else:
            if vocab_size is None:
                raise ConfigError("MLMModule needs a datamodule with a tokenizer (or model.init_from) for its vocab")
            overrides = dict(hp.config_overrides or {})
            config = build_config(hp.preset, vocab_size, hp.max_position_embeddings, **overrides)
            model = BertForMaskedLM(config)
        self.model = model
        self.objective = MaskedLMObjective(model)

    def configure_model(self) -> None:
        if self.model is None:
            tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
            self.build(len(tokenizer) if tokenizer is not None else None)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, count = self.objective(batch)
        return loss_sum / count.clamp(min=1), count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, count = self.model_step(batch)
        # weight batches by masked-token count so val/loss is the mean over all masked tokens
        self.log("val/loss", loss, batch_size=int(count), sync_dist=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is None:
            return
        self.log("val/ppl", torch.exp(loss.detach().float().clamp(max=50)), sync_dist=True)
        baseline = self._unigram_baseline()
        if baseline is not None:
            self.log("val/unigram_loss", baseline)
            self.log("val/unigram_gap", baseline - loss.detach().float(), prog_bar=True)

    def _unigram_baseline(self) -> float | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        baseline = getattr(datamodule, "unigram_baseline", None)
        return float(baseline()) if callable(baseline) else None

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_linear_schedule(self, hp.lr, hp.weight_decay, hp.warmup_ratio, hp.betas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HF_CONFIG_KEY] = self.model.config.to_dict()

"""MLMModule: pretrain a masked language model of any family with an MLM class (BERT, RoBERTa, DistilBERT,
RoBERTa-PreLayerNorm) from a size preset, or continue from a checkpoint."""

from __future__ import annotations

from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel

from lightning_merge.errors import ConfigError
from lightning_merge.merge.families import CAUSAL_LM, MASKED_LM, get_family
from lightning_merge.models import (
    HF_CONFIG_KEY,
    attention_kwargs,
    build_config,
    load_pretrained,
    sinusoidal_positions,
)
from lightning_merge.modules.optim import adamw_linear_schedule
from lightning_merge.objectives import CausalLMObjective, MaskedLMObjective


class MLMModule(pl.LightningModule):
    """An HF masked LM (``BertForMaskedLM`` by default) trained with AdamW, linear warmup and decay; loss only at
    masked positions.

    Args:
        preset: model size (``tiny``, ``mini``, ``small``, ``base``), used unless ``init_from`` is given.
        family: model family of a new model (``bert``, ``roberta``, ``distilbert``, ``roberta-prelayernorm``;
            ``gpt2`` for `CLMModule`'s causal LM); default ``bert`` here, ``gpt2`` in `CLMModule`. A model
            loaded from ``init_from`` keeps its own.
        init_from: HF directory, our ``.ckpt`` or hub id to start from instead of a random init.
        max_position_embeddings: longest sequence the model can read.
        config_overrides: extra HF config fields (dropout, layer count, ...), winning over the preset.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay (not applied to biases and LayerNorms).
        warmup_ratio: fraction of the training steps spent warming up linearly.
        betas: AdamW betas.
        sinusoidal_positions: If set, initialise the (still learned) position embeddings as sinusoids of this
            amplitude in a random, seed-dependent basis instead of BERT's N(0, 0.02). Small models trained for
            minutes then learn to use context; with the default init they stay at unigram + copy-the-input level.
        attn_implementation: HF's attention kernel, ``sdpa`` (the default) or ``eager``. With
            ``trainer.precision: bf16-mixed`` on a CPU with AMX, ``eager`` trained 1.4-2x faster than float32,
            while SDPA's bfloat16 backward is slow there at the quickstart's shape (docs/performance.md,
            benchmarks/training_step.py).
    """

    task: ClassVar[str] = MASKED_LM
    default_family: ClassVar[str] = "bert"
    auto_class: ClassVar[type] = AutoModelForMaskedLM
    objective_class: ClassVar[type] = MaskedLMObjective

    def __init__(
        self,
        preset: str = "mini",
        family: str | None = None,
        init_from: str | None = None,
        max_position_embeddings: int = 512,
        config_overrides: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        betas: tuple[float, float] = (0.9, 0.98),
        sinusoidal_positions: float | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        attention_kwargs(attn_implementation)  # an unknown name fails before any data is read
        family = family or self.default_family
        self.save_hyperparameters()
        self.hparams.family = family
        if self.task not in get_family(family).classes:
            raise ConfigError(f"family {family!r} has no {self.task} class; MLMModule pretrains masked LMs and "
                              "CLMModule causal LMs")
        self.model: PreTrainedModel | None = None
        self.objective: MaskedLMObjective | CausalLMObjective | None = None
        self.val_context_loss = MeanMetric()  # loss where the input is [MASK]: context is the only evidence there
        if init_from is not None:
            self.build(None)

    def build(self, vocab_size: int | None, pad_token_id: int | None = None) -> None:
        """Create the HF model: from ``init_from`` or, with ``vocab_size`` tokens, from the preset.

        Lightning calls this through `configure_model` with the datamodule tokenizer's size and padding id (which
        RoBERTa's position ids count from).
        """
        hp = self.hparams
        attention = attention_kwargs(hp.attn_implementation)
        if hp.init_from is not None:
            model = load_pretrained(hp.init_from, self.auto_class, **attention).train()  # from_pretrained: eval mode
        else:
            if vocab_size is None:
                raise ConfigError("MLMModule needs a datamodule with a tokenizer (or model.init_from) for its vocab")
            overrides = dict(hp.config_overrides or {})
            if pad_token_id is not None:
                overrides.setdefault("pad_token_id", pad_token_id)
            config = build_config(hp.preset, vocab_size, hp.max_position_embeddings, hp.family, **overrides)
            model = self.auto_class.from_config(config, **attention)
            if hp.sinusoidal_positions is not None:
                positions = get_family(hp.family).embeddings[1]
                table = model.base_model.get_submodule(positions).weight
                with torch.no_grad():
                    table.copy_(sinusoidal_positions(*table.shape, amplitude=hp.sinusoidal_positions))
        self.model = model
        self.objective = self.objective_class(model)

    def configure_model(self) -> None:
        if self.model is None:
            tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
            if tokenizer is None:
                self.build(None)
            else:
                self.build(len(tokenizer), tokenizer.pad_token_id)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, count = self.objective(batch)
        return loss_sum / count.clamp(min=1), count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses, masked = self.objective.token_losses(batch)
        # weight batches by masked-token count so val/loss is the mean over all masked tokens
        self.log("val/loss", losses.mean(), batch_size=losses.numel(), sync_dist=True, prog_bar=True)
        tokenizer = self._datamodule_attr("tokenizer")
        if tokenizer is not None:
            at_mask_inputs = batch["input_ids"][masked] == tokenizer.mask_token_id
            self.val_context_loss.update(losses[at_mask_inputs], weight=1.0)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is None:
            return
        self.log("val/ppl", torch.exp(loss.detach().float().clamp(max=50)), sync_dist=True)
        context_loss = self.val_context_loss.compute() if self.val_context_loss.update_count else None
        self.val_context_loss.reset()
        unigram_baseline = self._datamodule_attr("unigram_baseline")
        if unigram_baseline is None:
            return
        self.log("val/unigram_loss", unigram_baseline())
        self.log("val/unigram_gap", unigram_baseline() - loss.detach().float(), prog_bar=True)
        if context_loss is not None:
            # the gap at [MASK] inputs only: copying the visible input token cannot help there
            self.log("val/context_gap", unigram_baseline(mask_inputs_only=True) - context_loss, prog_bar=True)

    def _datamodule_attr(self, name: str) -> Any:
        return getattr(getattr(self.trainer, "datamodule", None), name, None)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_linear_schedule(self, hp.lr, hp.weight_decay, hp.warmup_ratio, hp.betas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HF_CONFIG_KEY] = self.model.config.to_dict()


class CLMModule(MLMModule):
    """An HF causal LM (``GPT2LMHeadModel``) trained like `MLMModule`, on next-token loss at every real position.

    Takes `MLMModule`'s arguments (``family`` defaults to ``gpt2`` here); logs ``val/loss``, ``val/ppl`` and, with a
    `lightning_merge.data.clm.CLMDataModule`, ``val/unigram_gap`` (the same measure as the MLM's, on next tokens).
    """

    task: ClassVar[str] = CAUSAL_LM
    default_family: ClassVar[str] = "gpt2"
    auto_class: ClassVar[type] = AutoModelForCausalLM
    objective_class: ClassVar[type] = CausalLMObjective

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses, _ = self.objective.token_losses(batch)
        self.log("val/loss", losses.mean(), batch_size=losses.numel(), sync_dist=True, prog_bar=True)

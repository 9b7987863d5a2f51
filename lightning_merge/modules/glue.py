"""GLUEModule: fine-tune a pretrained BERT as a sequence classifier (or regressor) on one task of the task table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from transformers import (
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_merge.data.glue import GlueTask, get_task
from lightning_merge.errors import CheckpointError, ConfigError
from lightning_merge.models import HF_CONFIG_KEY, attention_kwargs, load_pretrained
from lightning_merge.modules.optim import adamw_linear_schedule
from lightning_merge.objectives import SequenceClassificationObjective

# metric name (as in the task table) -> factory(num_labels). Classification metrics take predicted label ids.
METRICS: dict[str, Callable[[int], Metric]] = {
    "accuracy": lambda n: Accuracy(task="multiclass", num_classes=n, average="micro"),
    "f1": lambda n: F1Score(task="binary"),  # of the positive class (label 1), as GLUE reports for MRPC and QQP
    "matthews": lambda n: MatthewsCorrCoef(task="multiclass", num_classes=n),
    "pearson": lambda n: PearsonCorrCoef(),
    "spearman": lambda n: SpearmanCorrCoef(),
}


def task_metrics(task: GlueTask) -> MetricCollection:
    """The task's metrics (``accuracy``, ``f1``, ...), to be updated with ``predictions(logits, task)`` and labels."""
    return MetricCollection({name: METRICS[name](task.num_labels) for name in task.metrics})


def predictions(logits: Tensor, task: GlueTask) -> Tensor:
    """Predicted label ids (B,) from logits (B, num_labels), or the regression output (B,) for one-label tasks."""
    return logits.squeeze(-1) if task.is_regression else logits.argmax(dim=-1)


def build_classifier(
    init_from: str | Path, task: GlueTask, head_seed: int | None = 0, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A sequence classifier of ``init_from``'s family (``BertForSequenceClassification``, ...) for ``task``, its
    encoder loaded from ``init_from``.

    Weights the source lacks (the classifier, and the pooler when the source is an MLM model without one) are drawn
    from a generator seeded with ``head_seed``, so models fine-tuned from different pretraining seeds start with
    identical heads, as in the paper. ``head_seed=None`` draws them from the global RNG (``seed_everything``).
    """
    labels = {"id2label": dict(enumerate(task.label_names))} if task.label_names else {}
    kwargs = {"num_labels": task.num_labels, **labels, **attention_kwargs(attn_implementation)}
    if head_seed is None:
        return load_pretrained(init_from, AutoModelForSequenceClassification, **kwargs)
    with torch.random.fork_rng(devices=[]):  # the global RNG (dropout, shuffling) is left as it was
        torch.manual_seed(head_seed)
        return load_pretrained(init_from, AutoModelForSequenceClassification, **kwargs)


def check_vocab(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Raise ``CheckpointError`` unless the model's vocabulary and the tokenizer have the same size."""
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(
            f"model {source} has a vocabulary of {config.vocab_size} tokens but tokenizer "
            f"{tokenizer.name_or_path or '(unnamed)'} has {len(tokenizer)}; fine-tune with the tokenizer the model "
            "was pretrained with (data.tokenizer, or leave it unset to use the one beside init_from)"
        )


def validation_prefixes(task: GlueTask) -> list[str]:
    """Log prefixes of the validation splits: ``val`` for the first, ``val_<suffix>`` for the others (MNLI-mm)."""
    return ["val"] + [f"val_{split.removeprefix('validation_')}" for split in task.validation_splits[1:]]


class GLUEModule(pl.LightningModule):
    """An HF sequence classifier (of ``init_from``'s family) fine-tuned with AdamW, linear warmup and decay; task
    metrics.

    Logs ``train/loss``, ``val/loss`` and ``val/<metric>`` (``val_mismatched/...`` for MNLI's second validation
    split), ``val/majority_accuracy`` as a baseline, and ``test/...`` for tasks with a labelled test split. Loss is
    cross-entropy, MSE for STS-B (``SequenceClassificationObjective``, shared with merging).

    Args:
        init_from: The pretrained encoder: our HF dir (``checkpoints/mlm/seed0/hf``), our ``.ckpt``, or a hub id.
        task: Task name; by default the datamodule's.
        head_seed: Seed of the newly initialised weights (classifier, and pooler if the source has none). The
            default 0 gives every pretraining seed the same head (the paper's setting); ``None`` follows the global
            seed, so heads differ across seeds.
        lr: Peak learning rate (2e-5 in the paper).
        weight_decay: AdamW decoupled weight decay (not on biases and LayerNorms).
        warmup_ratio: Fraction of the training steps spent warming up linearly.
        betas: AdamW betas.
        attn_implementation: HF's attention kernel, ``sdpa`` (the default) or ``eager``; with
            ``trainer.precision: bf16-mixed`` on a CPU with AMX, ``eager`` (docs/performance.md).
    """

    def __init__(
        self,
        init_from: str,
        task: str | None = None,
        head_seed: int | None = 0,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        attention_kwargs(attn_implementation)  # an unknown name fails before any data is read
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.objective: SequenceClassificationObjective | None = None
        self.val_metrics: nn.ModuleList | None = None  # one MetricCollection per validation split
        self.test_metrics: MetricCollection | None = None
        self.task: GlueTask | None = None
        if task is not None:
            self._build(get_task(task))

    def _build(self, task: GlueTask) -> None:
        self.task = task
        # record the resolved task (also in hparams_initial, which loggers merge with the datamodule's `task`), so
        # a checkpoint rebuilds without a datamodule
        self.save_hyperparameters({**self.hparams, "task": task.name})
        self.model = build_classifier(self.hparams.init_from, task, self.hparams.head_seed,
                                      self.hparams.attn_implementation)
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodules' modes (no dropout)
        self.objective = SequenceClassificationObjective(self.model)
        self.val_metrics = nn.ModuleList(task_metrics(task) for _ in task.validation_splits)
        self.test_metrics = task_metrics(task)

    def configure_model(self) -> None:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        data_task = getattr(datamodule, "task", None)
        if self.model is None:
            if data_task is None:
                raise ConfigError("GLUEModule needs model.task or a GLUEDataModule to take the task from")
            self._build(data_task)
        elif data_task is not None and data_task.name != self.task.name:
            raise ConfigError(f"model.task={self.task.name} but data.task={data_task.name}; set them equal")
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            check_vocab(self.model.config, tokenizer, str(self.hparams.init_from))

    def model_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        loss_sum, count, logits = self.objective(batch)
        return loss_sum / count.clamp(min=1), count, logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, count, _ = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(count))
        return loss

    def _eval_step(self, batch: dict[str, Tensor], prefix: str, metrics: MetricCollection) -> None:
        loss, count, logits = self.model_step(batch)
        metrics.update(predictions(logits, self.task), batch["labels"])
        # weighted by batch size, so the epoch value is the mean over examples, however the data is batched
        self.log(f"{prefix}/loss", loss, batch_size=int(count), sync_dist=True, add_dataloader_idx=False)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, validation_prefixes(self.task)[dataloader_idx], self.val_metrics[dataloader_idx])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def _log_metrics(self, prefix: str, metrics: MetricCollection) -> None:
        if any(metric.update_called for metric in metrics.values()):
            values = metrics.compute()  # torchmetrics syncs its states across ranks here
            self.log_dict({f"{prefix}/{name}": value for name, value in values.items()}, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        for prefix, metrics in zip(validation_prefixes(self.task), self.val_metrics):
            self._log_metrics(prefix, metrics)
        majority = getattr(self._trainer.datamodule, "majority_accuracy", None) if self._trainer else None
        baseline = majority() if callable(majority) else None
        if baseline is not None:
            self.log("val/majority_accuracy", baseline)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_linear_schedule(self, hp.lr, hp.weight_decay, hp.warmup_ratio, hp.betas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HF_CONFIG_KEY] = self.model.config.to_dict()

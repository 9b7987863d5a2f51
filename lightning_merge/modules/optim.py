"""The optimizer both trainable modules use: AdamW with linear warmup and decay, no decay on biases/LayerNorms."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from transformers import get_linear_schedule_with_warmup


def adamw_linear_schedule(
    module: pl.LightningModule, lr: float, weight_decay: float, warmup_ratio: float, betas: tuple[float, float]
) -> dict[str, Any]:
    """``configure_optimizers`` output for ``module``, stepping the schedule every optimizer step."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""`AlignmentLearningModule`: Lightning's training loop around a method's trainable alignment (plain ``nn.Module``).

A method that needs a loss over training batches (``learned``) builds an ``nn.Module`` whose ``forward(batch)``
returns the loss of one step; the merge fits it with this module, so the loop, progress bar, logging and devices
are Lightning's.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


class AlignmentLearningModule(pl.LightningModule):
    """Adam on ``alignment``'s parameters, minimising ``alignment(batch)``; logs ``learn/<name>/loss``.

    Args:
        alignment: the trainable alignment (its ``forward(batch)`` is the loss).
        lr: Adam's learning rate.
        name: the method's name, for the logged metric.
    """

    def __init__(self, alignment: nn.Module, lr: float, name: str = "learned") -> None:
        super().__init__()
        self.alignment = alignment
        self.lr = lr
        self.metric_name = f"learn/{name}/loss"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.alignment(batch)
        self.log(self.metric_name, loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.alignment.parameters(), lr=self.lr)

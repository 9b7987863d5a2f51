"""Training/evaluation objectives as plain modules, so ``torch.func.functional_call`` can evaluate them at any θ.

Each objective returns summed loss and the number of items it summed over; means are taken after summing across
batches and ranks, so an evaluation is exact however the data is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertForMaskedLM, BertForSequenceClassification

IGNORE_INDEX = -100


def _encoder_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


class MaskedLMObjective(nn.Module):
    """Cross-entropy at masked positions only: the decoder runs on ~15% of tokens, not all of them."""

    def __init__(self, model: BertForMaskedLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses, _ = self.token_losses(batch)
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token losses at the masked positions, and the ``(B, T)`` boolean mask of those positions."""
        hidden = self.model.bert(**_encoder_inputs(batch)).last_hidden_state  # (B, T, d)
        labels = batch["labels"]
        masked = labels != IGNORE_INDEX
        logits = self.model.cls(hidden[masked])  # (n_masked, vocab)
        return F.cross_entropy(logits.float(), labels[masked], reduction="none"), masked


class SequenceClassificationObjective(nn.Module):
    """Cross-entropy (MSE for one-label regression) per example; also returns logits for task metrics."""

    def __init__(self, model: BertForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.model(**_encoder_inputs(batch)).logits.float()  # (B, num_labels)
        labels = batch["labels"]
        if self.model.config.num_labels == 1:
            loss_sum = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        else:
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        return loss_sum, torch.tensor(labels.shape[0], device=labels.device), logits

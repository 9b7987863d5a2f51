"""Training/evaluation objectives as plain modules, so ``torch.func.functional_call`` can evaluate them at any θ.

Each objective returns summed loss and the number of items it summed over; means are taken after summing across
batches and ranks, so an evaluation is exact however the data is split. They work for every registered family: the
family's record says which inputs the model takes and which modules make LM logits from the hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_merge.merge.families import Family, family_of_class, model_inputs

IGNORE_INDEX = -100


def family_of(model: nn.Module) -> Family:
    """The family record of an HF model instance (`UnsupportedModel` lists the supported classes)."""
    return family_of_class(type(model).__name__)


class _LanguageModelObjective(nn.Module):
    """Cross-entropy of LM logits at the positions a subclass picks: the decoder runs there only."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.family = family_of(model)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses, _ = self.token_losses(batch)
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM logits of (N, d) hidden states through the family's head modules."""
        for name in self.family.lm_head:
            hidden = self.model.get_submodule(name)(hidden)
        return hidden

    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.base_model(**model_inputs(batch, self.family)).last_hidden_state  # (B, T, d)

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MaskedLMObjective(_LanguageModelObjective):
    """Cross-entropy at masked positions only: the decoder runs on ~15% of tokens, not all of them."""

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token losses at the masked positions, and the ``(B, T)`` boolean mask of those positions."""
        hidden = self.hidden_states(batch)
        labels = batch["labels"]
        masked = labels != IGNORE_INDEX
        logits = self.logits(hidden[masked])  # (n_masked, vocab)
        return F.cross_entropy(logits.float(), labels[masked], reduction="none"), masked


class CausalLMObjective(_LanguageModelObjective):
    """Next-token cross-entropy: position t predicts ``labels[t + 1]`` (HF's convention: labels are the inputs,
    ``-100`` where no loss is taken, e.g. padding)."""

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token losses, and the ``(B, T)`` mask of the positions whose next token is predicted."""
        hidden = self.hidden_states(batch)
        targets = batch["labels"][:, 1:]
        predicting = torch.zeros_like(batch["labels"], dtype=torch.bool)
        predicting[:, :-1] = targets != IGNORE_INDEX
        logits = self.logits(hidden[predicting])  # (n_predicted, vocab)
        return F.cross_entropy(logits.float(), targets[predicting[:, :-1]], reduction="none"), predicting


class SequenceClassificationObjective(nn.Module):
    """Cross-entropy (MSE for one-label regression) per example; also returns logits for task metrics."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.family = family_of(model)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.model(**model_inputs(batch, self.family)).logits.float()  # (B, num_labels)
        labels = batch["labels"]
        if self.model.config.num_labels == 1:
            loss_sum = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        else:
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        return loss_sum, torch.tensor(labels.shape[0], device=labels.device), logits

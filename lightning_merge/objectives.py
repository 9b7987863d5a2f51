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
from lightning_merge.merge.interpolate import in_math_dtype

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
        return self.outputs(*self.predictions(batch))

    def predictions(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(logits (n, vocab), targets (n,)) at the positions the loss is taken."""
        logits, targets, _ = self._predicted(batch)
        return logits, targets

    def outputs(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(summed loss, item count) of ``logits`` against ``targets`` (e.g. of a mixture of models' logits)."""
        loss_sum = F.cross_entropy(in_math_dtype(logits), targets, reduction="sum")
        return loss_sum, torch.tensor(targets.numel(), device=targets.device)

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token losses at the predicted positions, and the ``(B, T)`` boolean mask of those positions."""
        logits, targets, positions = self._predicted(batch)
        return F.cross_entropy(in_math_dtype(logits), targets, reduction="none"), positions

    def logits(self, hidden: Tensor) -> Tensor:
        """LM logits of (N, d) hidden states through the family's head modules."""
        for name in self.family.lm_head:
            hidden = self.model.get_submodule(name)(hidden)
        return hidden

    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.base_model(**model_inputs(batch, self.family)).last_hidden_state  # (B, T, d)

    def _predicted(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, targets, (B, T) mask of the positions they are taken at)."""
        raise NotImplementedError


class MaskedLMObjective(_LanguageModelObjective):
    """Cross-entropy at masked positions only: the decoder runs on ~15% of tokens, not all of them."""

    def _predicted(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.hidden_states(batch)
        labels = batch["labels"]
        masked = labels != IGNORE_INDEX
        return self.logits(hidden[masked]), labels[masked], masked  # logits (n_masked, vocab)


class CausalLMObjective(_LanguageModelObjective):
    """Next-token cross-entropy: position t predicts ``labels[t + 1]`` (HF's convention: labels are the inputs,
    ``-100`` where no loss is taken, e.g. padding)."""

    def _predicted(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.hidden_states(batch)
        targets = batch["labels"][:, 1:]
        predicting = torch.zeros_like(batch["labels"], dtype=torch.bool)
        predicting[:, :-1] = targets != IGNORE_INDEX
        return self.logits(hidden[predicting]), targets[predicting[:, :-1]], predicting


class SequenceClassificationObjective(nn.Module):
    """Cross-entropy (MSE for one-label regression) per example; also returns logits for task metrics."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.family = family_of(model)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.outputs(*self.predictions(batch))

    def predictions(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(logits (B, num_labels), labels (B,))."""
        return self.model(**model_inputs(batch, self.family)).logits, batch["labels"]

    def outputs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(summed loss, example count, logits) of ``logits`` against ``labels``."""
        logits = in_math_dtype(logits)  # autocast's half precision in float32
        if self.model.config.num_labels == 1:
            loss_sum = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        else:
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        return loss_sum, torch.tensor(labels.shape[0], device=labels.device), logits

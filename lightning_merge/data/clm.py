"""``CLMDataModule``: the MLM data's blocks for causal (next-token) language modelling.

The blocks, tokenizer, caches and limits are `lightning_merge.data.mlm.MLMDataModule`'s; nothing is masked. Every
batch carries ``labels`` = ``input_ids`` (Hugging Face's convention: the objective shifts them, so position t is scored
on token t + 1), built by ``DataCollatorForLanguageModeling(mlm=False)`` for training and once for validation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling

from lightning_merge.data.mlm import MLMDataModule, _spread
from lightning_merge.data.sources import TextSource
from lightning_merge.data.tensors import ResumableLoader, TensorDictDataset


class CLMDataModule(MLMDataModule):
    """Causal-language-modelling data: blocks of a text source with next-token labels.

    Args:
        source: Where the text comes from; ``None`` = the offline Wikipedia dump.
        tokenizer: Directory or hub id of an existing tokenizer; ``None`` = train a WordPiece tokenizer (cached).
        vocab_size: Vocabulary size of the trained tokenizer (ignored when ``tokenizer`` is given).
        block_size: Tokens per block, ``[CLS]`` (the first token, never scored) and ``[SEP]`` included.
        batch_size: Blocks per batch.
        num_workers: DataLoader worker processes.
        max_train_blocks: Use at most this many training blocks, evenly spread over the split.
        max_val_blocks: Use at most this many validation blocks, evenly spread over the split.
        cache_dir: Cache root for tokenizers and blocks.
    """

    def __init__(
        self,
        source: TextSource | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            source, tokenizer, vocab_size, block_size, batch_size, num_workers=num_workers,
            max_train_blocks=max_train_blocks, max_val_blocks=max_val_blocks, cache_dir=cache_dir,
        )  # fmt: skip

    def _collator(self) -> DataCollatorForLanguageModeling:
        return DataCollatorForLanguageModeling(self.tokenizer, mlm=False)

    def validation_tensors(self) -> dict[str, torch.Tensor]:
        """The validation blocks with their labels, computed once."""
        if self._val_tensors is None:
            features = self._features(_spread(self.blocks("validation"), self.max_val_blocks))
            features.pop("special_tokens_mask")
            rows = TensorDictDataset(features)
            self._val_tensors = dict(self._collator()([rows[i] for i in range(len(rows))]))
        return self._val_tensors

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled by the run's seed; the position is checkpointed, so a resumed run continues."""
        features = self._features(_spread(self.blocks("train"), self.max_train_blocks))
        features.pop("special_tokens_mask")
        return ResumableLoader(TensorDictDataset(features), self.batch_size, torch.initial_seed(), self._collator(),
                               self.num_workers)

    def unigram_baseline(self, mask_inputs_only: bool = False) -> float:
        """Next-token loss (nats per scored token) of predicting every token by its training-set frequency.

        Counted over every training token after the first of its block (the tokens a causal LM is scored on;
        add-one smoothing over the whole vocabulary) and scored on the validation labels: a model below this number
        uses context. ``mask_inputs_only`` has no meaning without masks and is refused.
        """
        if mask_inputs_only:
            raise ValueError("a causal LM has no masked inputs")
        if self._unigram is None:
            vocab = len(self.tokenizer)
            counts = np.bincount(self.blocks("train")[:, 1:].ravel(), minlength=vocab).astype(np.float64)[:vocab]
            log_probs = np.log(counts + 1.0) - math.log(counts.sum() + vocab)
            targets = self.validation_tensors()["labels"][:, 1:].numpy()
            self._unigram = {False: float(-log_probs[targets[targets != -100]].mean())}
        return self._unigram[False]

"""``MLMDataModule``: text source -> WordPiece tokenizer -> fixed-length blocks -> masked-LM batches.

Blocks. Each split is tokenized with ``datasets.map`` (batched, no special tokens), every document is followed by
``[SEP]``, the token stream is cut into pieces of ``block_size - 2`` and each piece is wrapped as
``[CLS] piece [SEP]``. Blocks may therefore span document boundaries (marked by the inner ``[SEP]``); there is no
padding, so ``attention_mask`` is all ones and ``token_type_ids`` all zeros. The tail of each ``datasets.map`` batch
(1000 texts) that does not fill a block is dropped. Blocks are cached as ``.npz`` under
``<cache>/mlm/``, keyed by the split's text hash, the tokenizer and ``block_size``.

Masks. Training batches are masked on the fly by Hugging Face's ``DataCollatorForLanguageModeling`` (15 %, 80/10/10),
drawing from torch's global RNG (so ``seed_everything`` makes runs repeatable). Validation and test batches carry
**fixed** masks: the same collator, seeded with ``mask_seed``, is run once over the validation blocks and the result is
stored, so every epoch, every model and every interpolation of a merge is scored on the very same positions.

Batches are dicts of ``(batch, block_size)`` int64 tensors: ``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels`` (``-100`` except at masked positions).
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from lightning_merge.data.offline import cache_dir as default_cache_dir
from lightning_merge.data.sources import TEXT, TextSource, WikipediaSource
from lightning_merge.data.tensors import ResumableLoader, TensorDictDataset, spread_indices
from lightning_merge.data.tokenizer import cached_wordpiece, corpus_hash, load_tokenizer, tokenizer_fingerprint
from lightning_merge.errors import ConfigError, DataError
from lightning_merge.io import cached_arrays

# Bump when the packing changes, so cached blocks are rebuilt.
BLOCKS_VERSION = 1
# Fixed masks are drawn over chunks of this many blocks: a constant, so masks never depend on batch_size.
_MASK_CHUNK = 1024
_MAP_BATCH = 1000


def _texts(dataset: datasets.Dataset):
    return (text for batch in dataset.iter(batch_size=_MAP_BATCH) for text in batch[TEXT])


class SeededMasking:
    """MLM masking whose random draws are seeded by the run's seed and the batch's own tokens: the same batch is
    masked the same way whenever it is drawn, so a resumed run needs no global random state restored.

    Args:
        tokenizer: the tokenizer (its mask token and vocabulary).
        probability: share of tokens masked (80 % [MASK], 10 % random, 10 % unchanged).
        seed: the run's seed.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, probability: float, seed: int) -> None:
        self.tokenizer, self.probability, self.seed = tokenizer, probability, seed

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        tokens = torch.stack([row["input_ids"] for row in rows]).numpy().tobytes()
        key = (self.seed % 2**64).to_bytes(8, "little")
        batch_seed = int.from_bytes(hashlib.blake2b(tokens, digest_size=8, key=key).digest(), "little") % 2**63
        collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.probability, seed=batch_seed)
        return collator(rows)


def pack_blocks(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> np.ndarray:
    """Tokenize ``dataset['text']`` with ``datasets.map`` and pack it into ``[CLS] ... [SEP]`` blocks.

    Returns:
        An ``(n_blocks, block_size)`` int32 array (``n_blocks`` may be 0).
    """
    backend, cls_id, sep_id, body = (
        tokenizer.backend_tokenizer,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        block_size - 2,
    )

    def pack(batch: dict) -> dict:
        # The backend tokenizer, not __call__: documents are longer than model_max_length on purpose.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips offsets (tokenizers>=0.21)
        encodings = encode(batch[TEXT], add_special_tokens=False)
        stream = list(chain.from_iterable(encoding.ids + [sep_id] for encoding in encodings))
        starts = range(0, len(stream) - body + 1, body)
        return {"input_ids": [[cls_id, *stream[start : start + body], sep_id] for start in starts]}

    packed = dataset.map(
        pack, batched=True, batch_size=_MAP_BATCH, remove_columns=dataset.column_names, keep_in_memory=True,
        load_from_cache_file=False, desc=f"Packing {block_size}-token blocks",
    )  # fmt: skip
    if len(packed) == 0:
        return np.zeros((0, block_size), dtype=np.int32)
    column = packed.with_format("arrow")["input_ids"].combine_chunks()  # arrow -> numpy in one copy, not per row
    return column.flatten().to_numpy().astype(np.int32).reshape(-1, block_size)


def _spread(blocks: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` blocks, evenly spread over the split (so a small slice still covers every document)."""
    if limit is None or limit >= len(blocks):
        return blocks
    return blocks[spread_indices(len(blocks), limit)]


class MLMDataModule(pl.LightningDataModule):
    """Masked-language-modelling data: blocks of a text source, dynamic training masks, fixed validation masks.

    Args:
        source: Where the text comes from (``WikipediaSource``, ``HubSource``, ``LocalFilesSource``);
            ``None`` = the offline Wikipedia dump.
        tokenizer: Directory or hub id of an existing tokenizer (e.g. MultiBERTs'); ``None`` = train a WordPiece
            tokenizer on the source's training split (cached: every seed shares it).
        vocab_size: Vocabulary size of the trained tokenizer (ignored when ``tokenizer`` is given).
        block_size: Tokens per block, ``[CLS]`` and ``[SEP]`` included.
        batch_size: Blocks per batch (training, validation and test).
        mlm_probability: Share of tokens masked (80 % ``[MASK]``, 10 % random token, 10 % unchanged).
        num_workers: DataLoader worker processes.
        max_train_blocks: Use at most this many training blocks, evenly spread over the split.
        max_val_blocks: Use at most this many validation blocks, evenly spread over the split.
        mask_seed: Seed of the fixed validation/test masks.
        cache_dir: Cache root for tokenizers and blocks; default ``$LIGHTNING_MERGE_CACHE`` or
            ``~/.cache/lightning_merge``.
    """

    def __init__(
        self,
        source: TextSource | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        block_size: int = 128,
        batch_size: int = 32,
        mlm_probability: float = 0.15,
        num_workers: int = 0,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        mask_seed: int = 1234,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_settings(block_size, batch_size, mlm_probability, max_train_blocks, max_val_blocks)
        self.save_hyperparameters(ignore=["source"])
        self.source = source if source is not None else WikipediaSource()
        self.tokenizer_name = tokenizer
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.mlm_probability = mlm_probability
        self.num_workers = num_workers
        self.max_train_blocks = max_train_blocks
        self.max_val_blocks = max_val_blocks
        self.mask_seed = mask_seed
        self.cache_root = Path(cache_dir) if cache_dir else None
        self._splits: datasets.DatasetDict | None = None
        self._digests: dict[str, str] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._blocks: dict[str, np.ndarray] = {}
        self._val_tensors: dict[str, torch.Tensor] | None = None
        self._unigram: dict[bool, float] | None = None

    # ----------------------------------------------------------------- building blocks (cached)
    @property
    def _cache(self) -> Path:
        return self.cache_root or default_cache_dir()

    def _load_splits(self) -> datasets.DatasetDict:
        if self._splits is None:
            self._splits = self.source.load_splits()
            self._digests = {name: corpus_hash(_texts(split)) for name, split in self._splits.items()}
        return self._splits

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: loaded from ``tokenizer``, or trained (and cached) on the training split on first use."""
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def _make_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer_name is not None:
            tokenizer = load_tokenizer(self.tokenizer_name)
            if not tokenizer.is_fast:
                raise ConfigError(
                    f"tokenizer {self.tokenizer_name!r} is not a fast tokenizer; pass one with a tokenizer.json"
                )
        else:
            train = self._load_splits()["train"]
            tokenizer = cached_wordpiece(
                _texts(train), self.vocab_size, self.cache_root, corpus_digest=self._digests["train"],
                model_max_length=max(512, self.block_size),
            )  # fmt: skip
        if self.block_size > tokenizer.model_max_length:
            raise ConfigError(
                f"block_size={self.block_size} exceeds the tokenizer's limit {tokenizer.model_max_length}"
            )
        return tokenizer

    def _blocks_path(self, split: str) -> Path:
        key = [self._digests[split], tokenizer_fingerprint(self.tokenizer), self.block_size, BLOCKS_VERSION]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        return self._cache / "mlm" / f"blocks-{split}-{self.block_size}-{digest}.npz"

    def blocks(self, split: str) -> np.ndarray:
        """All ``(n, block_size)`` blocks of ``split`` (``train``/``validation``), before any ``max_*`` limit."""
        if split not in self._blocks:
            dataset = self._load_splits()[split]
            blocks = cached_arrays(  # a damaged copy is rebuilt
                self._blocks_path(split), lambda: {"blocks": pack_blocks(dataset, self.tokenizer, self.block_size)}
            )["blocks"]
            if len(blocks) == 0:
                raise DataError(
                    f"the {split} split of {self.source.describe()} does not fill one block of {self.block_size} "
                    "tokens; add text to it or lower block_size"
                )
            self._blocks[split] = blocks
        return self._blocks[split]

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Build the caches (tokenizer, blocks) once per node; ``setup`` then only reads them."""
        self.blocks("train")
        self.blocks("validation")

    def setup(self, stage: str | None = None) -> None:
        self.blocks("train")
        self.validation_tensors()

    def _features(self, blocks: np.ndarray) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(blocks.astype(np.int64))
        special = torch.from_numpy(np.isin(blocks, self.tokenizer.all_special_ids)).long()
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids),
            "special_tokens_mask": special,
        }

    def validation_tensors(self) -> dict[str, torch.Tensor]:
        """The validation blocks with their fixed masks: ``input_ids`` (masked), ``attention_mask``,
        ``token_type_ids``, ``labels`` — computed once, identical for every call and every instance."""
        if self._val_tensors is None:
            features = self._features(_spread(self.blocks("validation"), self.max_val_blocks))
            collator = DataCollatorForLanguageModeling(
                self.tokenizer, mlm_probability=self.mlm_probability, seed=self.mask_seed
            )
            rows = TensorDictDataset(features)
            chunks = [
                collator([rows[i] for i in range(start, min(start + _MASK_CHUNK, len(rows)))])
                for start in range(0, len(rows), _MASK_CHUNK)
            ]
            self._val_tensors = {key: torch.cat([c[key] for c in chunks]) for key in ("input_ids", "labels")}
            self._val_tensors.update(
                attention_mask=features["attention_mask"], token_type_ids=features["token_type_ids"]
            )
        return self._val_tensors

    def _loader(self, dataset: Dataset, shuffle: bool, collate_fn=None, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle, collate_fn=collate_fn,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled, masked anew each batch by ``DataCollatorForLanguageModeling``.

        Order and masks follow the run's seed (``torch.initial_seed()``, which ``seed_everything`` sets) and not the
        global random state, and the loader's position is checkpointed: a run resumed with ``--ckpt_path last``
        trains on the same batches, masked the same way, as the run that was interrupted would have."""
        features = self._features(_spread(self.blocks("train"), self.max_train_blocks))
        seed = torch.initial_seed()
        masking = SeededMasking(self.tokenizer, self.mlm_probability, seed)
        return ResumableLoader(TensorDictDataset(features), self.batch_size, seed, masking, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks with fixed masks, in a fixed order."""
        return self._loader(TensorDictDataset(self.validation_tensors()), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The validation blocks with the same fixed masks (the offline corpus is too small for a third split)."""
        return self.val_dataloader()

    def features_dataloader(
        self, split: str = "validation", max_blocks: int | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """Unmasked blocks (no ``labels``) in a fixed order, e.g. for the activation statistics of a merge.

        Args:
            split: ``train`` or ``validation``.
            max_blocks: At most this many blocks, evenly spread (default: the ``max_*_blocks`` of the split).
            batch_size: Default ``batch_size``.
        """
        limit = max_blocks or (self.max_train_blocks if split == "train" else self.max_val_blocks)
        features = self._features(_spread(self.blocks(split), limit))
        features.pop("special_tokens_mask")
        return self._loader(TensorDictDataset(features), shuffle=False, batch_size=batch_size)

    # ----------------------------------------------------------------- reference numbers
    def unigram_baseline(self, mask_inputs_only: bool = False) -> float:
        """MLM loss (nats per masked token) of predicting every masked token by its training-set frequency.

        Frequencies are counted over all training blocks (special tokens excluded, add-one smoothing over the whole
        vocabulary) and scored on the fixed validation masks: a model below this number uses context.

        Args:
            mask_inputs_only: Score only the masked positions whose input is ``[MASK]`` (80% of them). On the other
                20% the input token is the answer half the time, so a model that copies its input beats the
                baseline there (by ~0.5 nats overall) without using any context.
        """
        if self._unigram is None:
            vocab = len(self.tokenizer)
            counts = np.bincount(self.blocks("train").ravel(), minlength=vocab).astype(np.float64)[:vocab]
            counts[self.tokenizer.all_special_ids] = 0.0
            log_probs = np.log(counts + 1.0) - math.log(counts.sum() + vocab)
            tensors = self.validation_tensors()
            labels, inputs = tensors["labels"].numpy(), tensors["input_ids"].numpy()
            masked = labels != -100
            self._unigram = {
                False: float(-log_probs[labels[masked]].mean()),
                True: float(-log_probs[labels[masked & (inputs == self.tokenizer.mask_token_id)]].mean()),
            }
        return self._unigram[mask_inputs_only]


def _check_settings(
    block_size: int, batch_size: int, mlm_probability: float, max_train: int | None, max_val: int | None
) -> None:
    if block_size < 8:
        raise ConfigError(f"block_size={block_size} is too small; use at least 8 (128 is the default)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if not 0.0 < mlm_probability < 1.0:
        raise ConfigError(f"mlm_probability={mlm_probability} must be in (0, 1); BERT uses 0.15")
    for name, value in (("max_train_blocks", max_train), ("max_val_blocks", max_val)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be at least 1, or null for all blocks")

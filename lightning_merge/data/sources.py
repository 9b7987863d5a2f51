"""Text sources behind one interface: each yields a ``train`` and a ``validation`` ``datasets.Dataset`` of ``text``.

A source is a plain class with a typed ``__init__``, so it can be chosen from a config or the command line by
class path (jsonargparse / LightningCLI)::

    data:
      source:
        class_path: lightning_merge.data.sources.HubSource
        init_args: {path: wikitext, name: wikitext-103-raw-v1}

Every source drops empty texts. When a source has no validation split of its own, it is split off the training
texts deterministically by text hash (:func:`lightning_merge.data.wiki.is_validation`): the same rows land in
validation on every machine and every run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import datasets
import datasets.exceptions
from datasets.exceptions import DatasetGenerationError

from lightning_merge.data import wiki
from lightning_merge.data.offline import cache_dir
from lightning_merge.errors import DataError

TEXT = "text"
SPLITS = ("train", "validation")
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class TextSource(ABC):
    """Where training text comes from. Subclasses implement :meth:`load_splits`."""

    @abstractmethod
    def load_splits(self) -> datasets.DatasetDict:
        """Return a ``DatasetDict`` with ``train`` and ``validation`` splits, each with one ``text`` column."""

    def describe(self) -> str:
        """A short human-readable name, for logs and error messages."""
        return type(self).__name__


def _datasets_cache() -> str:
    return str(cache_dir() / "hf_datasets")


def _text_only(dataset: datasets.Dataset, column: str, where: str) -> datasets.Dataset:
    """Keep ``column`` renamed to ``text``, without empty rows; a missing column is a ``DataError`` naming the fix."""
    if column not in dataset.column_names:
        raise DataError(
            f"{where} has no column {column!r} (columns: {', '.join(dataset.column_names)}); pass column=<one of them>"
        )
    dataset = dataset.select_columns([column])
    if column != TEXT:
        dataset = dataset.rename_column(column, TEXT)
    return dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch[TEXT]], batched=True)


def split_off_validation(
    train: datasets.Dataset, validation_fraction: float
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a text dataset into (train, validation) by text hash: order-independent and deterministic."""
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction} must be in (0, 1) to split off a validation set")

    def in_validation(batch: dict) -> dict:
        return {"_val": [wiki.is_validation(text, validation_fraction) for text in batch[TEXT]]}

    flagged = train.map(in_validation, batched=True)
    pick = flagged.filter(lambda batch: batch["_val"], batched=True).remove_columns("_val")
    rest = flagged.filter(lambda batch: [not v for v in batch["_val"]], batched=True).remove_columns("_val")
    return rest, pick


def _checked(splits: datasets.DatasetDict, source: TextSource) -> datasets.DatasetDict:
    for split in SPLITS:
        if len(splits[split]) == 0:
            raise DataError(
                f"the {split} split of {source.describe()} has no non-empty text; point the source at data with text"
            )
    return splits


class WikipediaSource(TextSource):
    """Cleaned articles of a MediaWiki XML dump, split into train/validation by title hash.

    Args:
        dump: Path of a MediaWiki XML dump (``.xml`` or ``.xml.bz2``); ``None`` = the pinned offline English
            Wikipedia sample (README.md, "Data": 98 articles, ~2.8 M characters after cleaning).
        validation_fraction: Share of articles held out for validation. The default 0.1 holds out 8 articles of
            the offline dump; 0.05 would leave only 2, too few for a stable validation loss.
        min_chars: Articles shorter than this after cleaning are dropped.
    """

    def __init__(self, dump: str | None = None, validation_fraction: float = 0.1, min_chars: int = 200) -> None:
        self.dump = dump
        self.validation_fraction = validation_fraction
        self.min_chars = min_chars

    def describe(self) -> str:
        return f"WikipediaSource({self.dump or 'offline dump'})"

    def load_splits(self) -> datasets.DatasetDict:
        articles = wiki.load_articles(self.dump, self.min_chars)
        train, validation = wiki.split_articles(articles, self.validation_fraction)
        splits = {name: [a.text for a in part] for name, part in zip(SPLITS, (train, validation))}
        dataset = datasets.DatasetDict({k: datasets.Dataset.from_dict({TEXT: v}) for k, v in splits.items()})
        return _checked(dataset, self)


class HubSource(TextSource):
    """A dataset loaded with ``datasets.load_dataset`` (a hub id, a builder such as ``json``, or a local dataset dir).

    Args:
        path: Hub id (``wikitext``, ``bookcorpus``), builder name (``text``/``json``/``csv`` with ``data_files``) or
            local dataset directory.
        name: Dataset configuration (``wikitext-103-raw-v1``).
        train_split: Split used for training.
        validation_split: Split used for validation; ``None`` = split it off the training split.
        column: Column that holds the text.
        validation_fraction: Share of training rows held out when ``validation_split`` is ``None``.
        data_files: Passed to ``load_dataset`` (for builders such as ``json``).
        revision: Dataset revision (git tag/commit) on the hub, for reproducibility.
        max_train_rows: Keep only the first rows of the training split (to bound very large corpora).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        train_split: str = "train",
        validation_split: str | None = "validation",
        column: str = TEXT,
        validation_fraction: float = 0.05,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        max_train_rows: int | None = None,
    ) -> None:
        self.path = path
        self.name = name
        self.train_split = train_split
        self.validation_split = validation_split
        self.column = column
        self.validation_fraction = validation_fraction
        self.data_files = data_files
        self.revision = revision
        self.max_train_rows = max_train_rows

    def describe(self) -> str:
        return f"HubSource({self.path}{'/' + self.name if self.name else ''})"

    def _load(self, split: str) -> datasets.Dataset:
        try:
            dataset = datasets.load_dataset(
                self.path,
                self.name,
                split=split,
                data_files=self.data_files,
                revision=self.revision,
                cache_dir=_datasets_cache(),
            )
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
            raise DataError(
                f"cannot load split {split!r} of dataset {self.path!r} ({type(err).__name__}: {err}); "
                "check the id/config/split names, or that the hub is reachable (set HF_DATASETS_OFFLINE=0)"
            ) from err
        return _text_only(dataset, self.column, f"{self.describe()} split {split!r}")

    def load_splits(self) -> datasets.DatasetDict:
        train = self._load(self.train_split)
        if self.max_train_rows is not None:
            train = train.select(range(min(self.max_train_rows, len(train))))
        if self.validation_split is None:
            train, validation = split_off_validation(train, self.validation_fraction)
        else:
            validation = self._load(self.validation_split)
        return _checked(datasets.DatasetDict(train=train, validation=validation), self)


def _as_list(files: str | list[str] | None) -> list[str]:
    return [] if files is None else [files] if isinstance(files, str) else list(files)


def _builder_for(files: list[str]) -> str:
    """The ``datasets`` builder for a list of files, from their extension (``.gz``/``.bz2`` etc. looked through)."""
    kinds = set()
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"local data file {file} does not exist; fix the path or create the file")
        if Path(file).stat().st_size == 0:
            raise DataError(f"local data file {file} is empty; give it text or leave it out")
        suffixes = [s for s in Path(file).suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
        suffix = suffixes[-1].lower() if suffixes else ""
        if suffix not in _BUILDERS:
            raise DataError(f"local data file {file} has an unsupported extension; use .txt, .jsonl, .json or .csv")
        kinds.add(_BUILDERS[suffix])
    if len(kinds) > 1:
        raise DataError(f"local data files mix formats ({', '.join(sorted(kinds))}); use one format per source")
    return kinds.pop()


class LocalFilesSource(TextSource):
    """Local ``.txt`` / ``.jsonl`` / ``.csv`` files (optionally compressed).

    Args:
        train_files: File or files for training.
        validation_files: File or files for validation; ``None`` = split off the training files by text hash.
        column: Column holding the text in ``.jsonl``/``.csv`` files (``.txt`` files always give ``text``).
        validation_fraction: Share of training rows held out when ``validation_files`` is ``None``.
        sample_by: For ``.txt``: one row per ``line``, ``paragraph`` (blank-line separated) or ``document`` (file).
    """

    def __init__(
        self,
        train_files: str | list[str],
        validation_files: str | list[str] | None = None,
        column: str = TEXT,
        validation_fraction: float = 0.05,
        sample_by: Literal["line", "paragraph", "document"] = "line",
    ) -> None:
        self.train_files = _as_list(train_files)
        self.validation_files = _as_list(validation_files)
        self.column = column
        self.validation_fraction = validation_fraction
        self.sample_by = sample_by

    def describe(self) -> str:
        return f"LocalFilesSource({', '.join(self.train_files)})"

    def _load(self, files: list[str]) -> datasets.Dataset:
        builder = _builder_for(files)
        options = {"sample_by": self.sample_by} if builder == "text" else {}
        try:
            dataset = datasets.load_dataset(
                builder,
                data_files=[str(Path(f).resolve()) for f in files],
                split="train",
                cache_dir=_datasets_cache(),
                **options,
            )
        except DatasetGenerationError as err:  # e.g. a file of blank lines or of unreadable JSON
            cause = err.__cause__ or err
            raise DataError(f"could not read local files {', '.join(files)}: {str(cause).splitlines()[0]}") from err
        column = TEXT if builder == "text" else self.column
        return _text_only(dataset, column, f"local files {', '.join(files)}")

    def load_splits(self) -> datasets.DatasetDict:
        if not self.train_files:
            raise DataError("LocalFilesSource needs at least one file in train_files")
        train = self._load(self.train_files)
        if self.validation_files:
            validation = self._load(self.validation_files)
        else:
            train, validation = split_off_validation(train, self.validation_fraction)
        return _checked(datasets.DatasetDict(train=train, validation=validation), self)

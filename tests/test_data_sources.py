"""Text sources: local txt/jsonl/csv files, hub-shaped datasets loaded from local files, the Wikipedia dump."""

from __future__ import annotations

import bz2
import csv
import json

import pytest

from lightning_merge.data import sources
from lightning_merge.data.sources import HubSource, LocalFilesSource, TextSource, WikipediaSource
from lightning_merge.errors import DataError

LINES = [f"sentence number {i} about foxes and rivers" for i in range(200)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MERGE_CACHE", str(tmp_path / "cache"))


def _write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _texts(splits) -> tuple[list[str], list[str]]:
    return list(splits["train"]["text"]), list(splits["validation"]["text"])


def test_txt_split_off_deterministic(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES[:100] + ["", "   "] + LINES[100:]) + "\n")
    train, validation = _texts(LocalFilesSource(str(path), validation_fraction=0.1).load_splits())
    assert sorted(train + validation) == sorted(LINES)  # blank lines dropped, nothing lost
    assert 5 < len(validation) < 40
    again = LocalFilesSource([str(path)], validation_fraction=0.1).load_splits()
    assert _texts(again) == (train, validation)


def test_jsonl_with_validation_files_and_column(tmp_path):
    train_file = _write_jsonl(tmp_path / "train.jsonl", LINES[:150], column="body")
    val_file = _write_jsonl(tmp_path / "val.jsonl", LINES[150:], column="body")
    splits = LocalFilesSource(str(train_file), str(val_file), column="body").load_splits()
    assert _texts(splits) == (LINES[:150], LINES[150:])
    assert splits["train"].column_names == ["text"]


def test_csv_and_compressed(tmp_path):
    path = tmp_path / "reviews.csv.bz2"
    rows = [{"review": t, "label": i % 2} for i, t in enumerate(LINES)]
    with bz2.open(path, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "label"])
        writer.writeheader()
        writer.writerows(rows)
    train, validation = _texts(LocalFilesSource(str(path), column="review").load_splits())
    assert sorted(train + validation) == sorted(LINES)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"{missing} does not exist; fix the path"):
        LocalFilesSource(str(missing)).load_splits()


def test_wrong_column_and_extension(tmp_path):
    with pytest.raises(DataError, match="no column 'body'.*pass column="):
        LocalFilesSource(str(_write_jsonl(tmp_path / "a.jsonl", LINES)), column="body").load_splits()
    (tmp_path / "a.parquet").write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        LocalFilesSource(str(tmp_path / "a.parquet")).load_splits()


def test_empty_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "ok.txt").write_text("\n".join(LINES))
    with pytest.raises(DataError, match="train split .* has no non-empty text"):
        LocalFilesSource(str(tmp_path / "empty.txt"), str(tmp_path / "ok.txt")).load_splits()


def test_hub_source_through_local_dataset_dir(tmp_path):
    # Same shape as wikitext on the hub: a dataset repo with train/validation files and a `text` column.
    repo = tmp_path / "wikitext-like"
    repo.mkdir()
    _write_jsonl(repo / "train.jsonl", LINES[:150] + [""])
    _write_jsonl(repo / "validation.jsonl", LINES[150:])
    splits = HubSource(str(repo)).load_splits()
    assert _texts(splits) == (LINES[:150], LINES[150:])


def test_hub_source_builder_without_validation_split(tmp_path):
    # bookcorpus has only `train`: validation is split off deterministically.
    path = tmp_path / "books.txt"
    path.write_text("\n".join(LINES))
    source = HubSource("text", data_files={"train": str(path)}, validation_split=None, max_train_rows=120)
    train, validation = _texts(source.load_splits())
    assert sorted(train + validation) == sorted(LINES[:120]) and validation


def test_hub_source_bad_split_is_data_error(tmp_path):
    path = tmp_path / "books.txt"
    path.write_text("\n".join(LINES))
    with pytest.raises(DataError, match="cannot load split 'validation'"):
        HubSource("text", data_files={"train": str(path)}).load_splits()


def test_wikipedia_source_on_small_dump(tmp_path):
    from tests.test_data_wiki import PROSE, _dump, _page

    dump = _dump(tmp_path / "d.xml.bz2", [_page(f"Article {i}", f"Article {i}. " + PROSE) for i in range(40)])
    train, validation = _texts(WikipediaSource(str(dump), validation_fraction=0.2).load_splits())
    assert len(train) + len(validation) == 40 and validation
    assert _texts(WikipediaSource(str(dump), validation_fraction=0.2).load_splits()) == (train, validation)


def test_sources_are_class_path_arguments(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--source", type=TextSource)
    args = parser.parse_args(
        ["--source.class_path", "lightning_merge.data.sources.LocalFilesSource", "--source.init_args.train_files", "a"]
    )
    source = parser.instantiate_classes(args).source
    assert isinstance(source, sources.LocalFilesSource) and source.train_files == ["a"]

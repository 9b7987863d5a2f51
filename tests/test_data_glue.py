"""GLUE task table, local files of the GLUE schema, bad inputs, and the offline tasks (rt_polarity, wiki pairs)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_merge.data.glue import (
    TASKS,
    GLUEDataModule,
    balanced_split,
    build_rt_polarity,
    encode,
    get_task,
    load_splits,
    tokenizer_source,
)
from lightning_merge.data.glue import _paraphrase_pairs as paraphrase_pairs
from lightning_merge.data.tokenizer import load_tokenizer, train_wordpiece
from lightning_merge.errors import ConfigError, DataError, UnknownNameError

GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
WORDS = "the a film movie was is great dull fun boring plot actor it not very good bad and story sentence follows"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [" ".join(WORDS.split()[i:] + WORDS.split()[:i]) for i in range(20)]
    path = tmp_path_factory.mktemp("tok")
    train_wordpiece(texts, vocab_size=150, min_frequency=1).save_pretrained(path)
    return str(path)


def _write(path, rows: list[dict]) -> str:
    """Write rows as csv, tsv or jsonl, by the file's extension."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        keys = list(rows[0])
        path.write_text("\n".join([sep.join(keys)] + [sep.join(str(r[k]) for k in keys) for r in rows]) + "\n")
    return str(path)


def _pairs(n: int) -> list[dict]:
    return [{"sentence1": f"the film {i}", "sentence2": "it was great fun", "label": i % 2} for i in range(n)]


def test_task_table_covers_glue_and_offline_tasks():
    assert set(GLUE) | {"rt_polarity", "wiki_next_sentence"} <= set(TASKS)
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("mrpc").metrics == ("accuracy", "f1") and "matthews" in get_task("cola").metrics
    assert len(get_task("qqp").text_keys) == 2 and len(get_task("sst2").text_keys) == 1
    assert get_task("rt_polarity").splits == ("train", "validation", "test")


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownNameError, match="unknown task 'sst3'; known tasks: cola, sst2"):
        GLUEDataModule(task="sst3")


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
def test_local_files_of_the_glue_schema(tmp_path, tokenizer_dir, ext):
    files = {
        "train": _write(tmp_path / f"train{ext}", _pairs(6)),
        "validation": _write(tmp_path / f"dev{ext}", _pairs(4)),
    }
    data = GLUEDataModule(task="mrpc", tokenizer=tokenizer_dir, data_files=files, batch_size=4)
    data.setup("fit")
    assert len(data.datasets["train"]) == 6 and len(data.datasets["validation"]) == 4
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["input_ids"].shape[0] == 4
    assert (batch["token_type_ids"] == 1).any()  # pair encoding: sentence2 is segment 1


def test_evaluation_splits_come_longest_first_and_training_keeps_its_order(tmp_path, tokenizer_dir):
    words = WORDS.split()
    rows = [{"sentence": " ".join(words[: 1 + (7 * i) % 13]), "label": i % 2} for i in range(16)]
    files = {"train": _write(tmp_path / "t.jsonl", rows), "validation": _write(tmp_path / "v.jsonl", rows)}
    data = GLUEDataModule(task="sst2", tokenizer=tokenizer_dir, data_files=files, batch_size=4)
    data.setup("fit")
    in_file_order = encode(load_splits(get_task("sst2"), files)["validation"], get_task("sst2"),
                           load_tokenizer(tokenizer_dir))
    lengths = [len(ids) for ids in data.datasets["validation"]["input_ids"]]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 4
    as_rows = sorted(map(tuple, data.datasets["validation"]["input_ids"]))
    assert as_rows == sorted(map(tuple, in_file_order["input_ids"]))  # the same examples
    assert data.datasets["train"]["input_ids"] == in_file_order["input_ids"]  # shuffled by its loader, not here
    collate = data.val_dataloader().collate_fn
    slots = [sum(b["input_ids"].numel() for b in DataLoader(d, batch_size=4, collate_fn=collate))
             for d in (data.datasets["validation"], in_file_order)]
    assert sum(lengths) <= slots[0] < slots[1]


def test_grouped_training_batches_pad_less_and_still_see_every_example_once(tmp_path, tokenizer_dir):
    words = WORDS.split()
    rows = [{"sentence": " ".join(words[: 1 + (7 * i) % 13]), "label": i % 2} for i in range(64)]
    files = {"train": _write(tmp_path / "t.jsonl", rows), "validation": _write(tmp_path / "v.jsonl", rows[:8])}
    slots, seen = {}, {}
    for grouped in (False, True):
        data = GLUEDataModule(task="sst2", tokenizer=tokenizer_dir, data_files=files, batch_size=4,
                              group_by_length=grouped)
        data.setup("fit")
        batches = list(data.train_dataloader())
        slots[grouped] = sum(b["input_ids"].numel() for b in batches)
        seen[grouped] = sorted(tuple(ids[mask.bool()].tolist()) for b in batches
                               for ids, mask in zip(b["input_ids"], b["attention_mask"]))
    tokens = sum(len(ids) for ids in data.datasets["train"]["input_ids"])
    assert seen[True] == seen[False]  # the same examples, each once
    assert tokens <= slots[True] < slots[False] and slots[True] - tokens < (slots[False] - tokens) / 2


def test_encodings_are_cached_by_texts_tokenizer_and_length(tmp_path, tokenizer_dir, monkeypatch):
    import lightning_merge.data.glue as glue

    rows = [{"sentence1": f"the film {i} was", "sentence2": "great fun " * (i % 4), "label": i % 2} for i in range(9)]
    split = load_splits(get_task("mrpc"), {"train": _write(tmp_path / "t.jsonl", rows),
                                           "validation": _write(tmp_path / "v.jsonl", rows)})["train"]
    task, tokenizer, cache = get_task("mrpc"), load_tokenizer(tokenizer_dir), tmp_path / "cache"
    fresh = encode(split, task, tokenizer, max_length=8)
    first = glue.cached_encode(split, task, tokenizer, max_length=8, cache=cache)
    monkeypatch.setattr(glue, "encode", lambda *args: pytest.fail("tokenized again"))
    again = glue.cached_encode(split, task, load_tokenizer(tokenizer_dir), max_length=8, cache=cache)
    assert first.features == again.features == fresh.features
    assert first.to_dict() == again.to_dict() == fresh.to_dict()
    with pytest.raises(pytest.fail.Exception, match="tokenized again"):  # another length, other labels: new keys
        glue.cached_encode(split, task, tokenizer, max_length=16, cache=cache)
    with pytest.raises(pytest.fail.Exception, match="tokenized again"):
        glue.cached_encode(split.map(lambda r: {"label": 1 - r["label"]}), task, tokenizer, max_length=8, cache=cache)
    (stored,) = (cache / "glue").glob("*.npz")
    stored.write_bytes(stored.read_bytes()[:100])  # cut: rebuilt, not trusted
    monkeypatch.setattr(glue, "encode", encode)
    assert glue.cached_encode(split, task, tokenizer, max_length=8, cache=cache).to_dict() == fresh.to_dict()


def test_cached_encodings_keep_float_labels_and_empty_splits(tmp_path, tokenizer_dir):
    import lightning_merge.data.glue as glue

    rows = [{"sentence1": "a film", "sentence2": "a movie", "label": 3.8},
            {"sentence1": "a", "sentence2": "b", "label": 0}]
    files = {"train": _write(tmp_path / "t.jsonl", rows), "validation": _write(tmp_path / "v.jsonl", rows)}
    task, tokenizer = get_task("stsb"), load_tokenizer(tokenizer_dir)
    split = load_splits(task, files)["train"]
    glue.cached_encode(split, task, tokenizer, cache=tmp_path / "cache")
    again = glue.cached_encode(split, task, tokenizer, cache=tmp_path / "cache")
    assert again.features == encode(split, task, tokenizer).features and again["labels"] == pytest.approx([3.8, 0.0])
    empty = glue.cached_encode(split.select([]), task, tokenizer, cache=tmp_path / "cache")
    assert len(empty) == 0 and len(glue.longest_first(empty)) == 0


def test_tsv_reads_quotes_literally_and_label_names_map(tmp_path):
    rows = [{"sentence": 'he said "great', "label": "positive"}, {"sentence": "NA", "label": "negative"}]
    files = {"train": _write(tmp_path / "t.tsv", rows), "validation": _write(tmp_path / "v.jsonl", rows)}
    splits = load_splits(get_task("sst2"), files)
    assert splits["train"]["sentence"] == ['he said "great', "NA"]
    assert [get_task("sst2").label_id(v) for v in splits["validation"]["label"]] == [1, 0]


def test_regression_labels_are_floats(tmp_path, tokenizer_dir):
    rows = [
        {"sentence1": "a film", "sentence2": "a movie", "label": 3.8},
        {"sentence1": "a", "sentence2": "b", "label": 0},
    ]
    files = {"train": _write(tmp_path / "t.jsonl", rows), "validation": _write(tmp_path / "v.jsonl", rows)}
    encoded = encode(load_splits(get_task("stsb"), files)["train"], get_task("stsb"), load_tokenizer(tokenizer_dir))
    assert encoded["labels"] == pytest.approx([3.8, 0.0])


def test_missing_column_names_the_column_and_file(tmp_path):
    rows = [{"sentence1": "a", "label": 0}]
    files = {"train": _write(tmp_path / "train.csv", rows), "validation": _write(tmp_path / "dev.csv", rows)}
    with pytest.raises(DataError, match=r"train\.csv has no column 'sentence2'.*needs sentence1, sentence2, label"):
        load_splits(get_task("rte"), files)


@pytest.mark.parametrize(
    "task, label, shown",
    [
        ("sst2", 2, r"\[2\]"),
        ("mnli", -1, r"\[-1\]"),
        ("sst2", "great", r"\['great'\]"),
        ("stsb", "high", r"\['high'\]"),
    ],
)
def test_labels_outside_the_task_set(tmp_path, task, label, shown):
    keys = get_task(task).text_keys
    rows = [{**{k: "a film" for k in keys}, "label": label}]
    splits = ("train", *get_task(task).validation_splits)
    files = {s: _write(tmp_path / f"{s}.jsonl", rows) for s in splits}
    with pytest.raises(DataError, match=f"label values {shown}.* outside task {task}'s labels"):
        load_splits(get_task(task), files)


def test_missing_split_file_and_format_are_one_line_errors(tmp_path):
    ok = _write(tmp_path / "ok.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
    with pytest.raises(DataError, match="no 'validation_matched' entry; task mnli needs train, validation_matched"):
        load_splits(get_task("mnli"), {"train": ok, "validation": ok})
    with pytest.raises(DataError, match="nope.csv .* does not exist"):
        load_splits(get_task("mnli"), {"train": ok, "validation_matched": ok, "validation_mismatched": "nope.csv"})
    with pytest.raises(DataError, match="unsupported extension"):
        load_splits(get_task("sst2"), {"train": ok, "validation": str(tmp_path / "x.parquet")})


def test_tokenizer_is_found_beside_the_model(tmp_path, tokenizer_dir):
    run = tmp_path / "mlm" / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "hf").mkdir()
    (run / "hf" / "tokenizer.json").write_text("{}")
    assert tokenizer_source(str(run / "hf")) == str(run / "hf")
    assert tokenizer_source(str(run / "checkpoints" / "last.ckpt")) == str(run / "hf")
    assert tokenizer_source("google/multiberts-seed_0") == "google/multiberts-seed_0"
    with pytest.raises(ConfigError, match="no tokenizer found for .*pass data.tokenizer"):
        tokenizer_source(str(run / "checkpoints"))


def test_datamodule_without_tokenizer_or_model_says_what_to_pass():
    with pytest.raises(ConfigError, match="needs data.tokenizer"):
        GLUEDataModule(task="sst2").setup("fit")


def test_balanced_split_is_deterministic_and_balanced():
    rows = [(f"text {i}", int(i % 3 == 0)) for i in range(300)]  # 100 positives, 200 negatives
    first, again = balanced_split(rows), balanced_split(list(rows))
    assert first == again
    assert {name: len(part) for name, part in first.items()} == {"train": 160, "validation": 20, "test": 20}
    for part in first.values():
        assert sum(label for _, label in part) * 2 == len(part)
    texts = [{t for t, _ in part} for part in first.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_rt_polarity_is_deterministic_balanced_and_disjoint():
    splits, again = build_rt_polarity(), build_rt_polarity()
    for name, part in splits.items():
        labels = part["label"]
        assert 2 * sum(labels) == len(labels), name
        assert part["sentence"] == again[name]["sentence"]
    assert len(splits["train"]) > 8000 and len(splits["validation"]) > 1000
    train = set(splits["train"]["sentence"])
    assert not train & set(splits["validation"]["sentence"]) and not train & set(splits["test"]["sentence"])


def test_wiki_next_sentence_is_a_balanced_pair_task(tokenizer_dir):
    data = GLUEDataModule(task="wiki_next_sentence", tokenizer=tokenizer_dir, max_eval_samples=64, max_train_samples=64)
    data.setup("fit")
    labels = torch.tensor(data.datasets["validation"]["labels"])
    assert 0.3 < labels.float().mean() < 0.7  # a 64-row sample of an exactly balanced split
    raw = load_splits(get_task("wiki_next_sentence"))
    assert 2 * sum(raw["train"]["label"]) == len(raw["train"])
    labels_of = {}
    for first, label in zip(raw["train"]["sentence1"], raw["train"]["label"]):
        labels_of.setdefault(first, []).append(label)
    assert all(2 * sum(labels) == len(labels) for labels in labels_of.values())  # sentence A alone tells nothing
    assert not set(raw["train"]["sentence1"]) & set(raw["validation"]["sentence1"])  # split by article
    batch = next(iter(data.train_dataloader()))
    assert (batch["token_type_ids"] == 1).any() and (batch["token_type_ids"] == 0).any()
    assert data.majority_accuracy() == pytest.approx(max(labels.float().mean(), 1 - labels.float().mean()).item())


def _words(sentence: str) -> set[str]:
    return set(sentence.split())


def test_paraphrase_pairs_ask_to_compare_both_sentences() -> None:
    articles = [
        [[f"article {a} sentence {i} says {' '.join(f'w{a}{i}{k}' for k in range(8))}" for i in range(p, p + 3)]
         for p in (0, 3)]
        for a in range(4)
    ]
    pairs = paraphrase_pairs(articles, random.Random(0))
    assert pairs == paraphrase_pairs(articles, random.Random(0))  # a fixed split for every training seed
    first, second, labels = pairs["sentence1"], pairs["sentence2"], pairs["label"]
    assert len(labels) == 2 * 4 * 6 and 2 * sum(labels) == len(labels)
    assert first[0::2] == first[1::2] and labels[0::2] == [1] * 24 and labels[1::2] == [0] * 24  # A alone: no cue
    vocabulary = {w for article in articles for paragraph in article for s in paragraph for w in s.split()}
    shared = {0: [], 1: []}
    for a, b, label in zip(first, second, labels):
        assert _words(b) <= vocabulary and b != a  # rewritten, from words of the corpus
        own = {w for w in _words(a) if w.startswith("w")}  # the words only this sentence has
        shared[label].append(len(own & _words(b)) / len(own))
    assert min(shared[1]) > 0 and sum(shared[1]) / 24 > 0.6  # each word kept with probability 0.7
    assert sum(shared[0]) / 24 < 0.1  # a negative shares A's words only where a rewrite drew one from A's article


def test_paraphrase_pairs_refuse_a_corpus_with_nothing_to_pair() -> None:
    with pytest.raises(DataError, match="no sentence other than 'one repeated sentence'"):
        paraphrase_pairs([[["one repeated sentence"]], [["one repeated sentence"]]], random.Random(0))


def test_wiki_paraphrase_is_a_balanced_pair_task(tokenizer_dir):
    data = GLUEDataModule(task="wiki_paraphrase", tokenizer=tokenizer_dir, max_eval_samples=64, max_train_samples=64)
    data.setup("fit")
    raw = load_splits(get_task("wiki_paraphrase"))
    for part in raw.values():
        assert 2 * sum(part["label"]) == len(part)
        ratio = {label: [] for label in (0, 1)}
        for a, b, label in zip(part["sentence1"], part["sentence2"], part["label"]):
            ratio[label].append(len(b.split()) / len(a.split()))
        mean = {label: sum(r) / len(r) for label, r in ratio.items()}
        assert abs(mean[1] - mean[0]) < 0.05, mean  # B's length relative to A's gives the label away no more
    assert not set(raw["train"]["sentence1"]) & set(raw["validation"]["sentence1"])  # split by article
    batch = next(iter(data.train_dataloader()))
    assert (batch["token_type_ids"] == 1).any() and (batch["token_type_ids"] == 0).any()
    assert get_task("wiki_paraphrase").metrics == ("accuracy", "f1")

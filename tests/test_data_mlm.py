"""MLMDataModule on tiny local files: batch format, fixed validation masks, caches, unigram baseline, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_merge.data import mlm, offline
from lightning_merge.data import tokenizer as tokenizer_module
from lightning_merge.data.mlm import MLMDataModule
from lightning_merge.data.sources import LocalFilesSource
from lightning_merge.errors import ConfigError, DataError

USER_CACHE = offline.cache_dir()  # read before the fixture below points the cache at a temp dir
WORDS = "the a fox dog river bank runs jumps over under quick lazy brown green small large near far".split()


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(offline.CACHE_ENV, str(tmp_path_factory.mktemp("default-cache")))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small text files (train ~12k words, validation ~2k) of pseudo-sentences."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, lines in (("train.txt", 600), ("val.txt", 100)):
        sentences = [" ".join(rng.choice(WORDS, size=20)) + "." for _ in range(lines)]
        (root / name).write_text("\n".join(sentences) + "\n")
    return root


def _dm(corpus, cache, **kwargs) -> MLMDataModule:
    source = LocalFilesSource(str(corpus / "train.txt"), str(corpus / "val.txt"))
    settings = dict(vocab_size=100, block_size=32, batch_size=8, cache_dir=str(cache))
    return MLMDataModule(source, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def datamodule(corpus, cache):
    dm = _dm(corpus, cache)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batch_format(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(t.shape == (8, 32) and t.dtype == torch.int64 for t in batch.values())
    tok = datamodule.tokenizer
    masked = batch["labels"] != -100
    assert masked.any() and (batch["labels"][masked] >= len(tok.all_special_ids)).all()  # never a special token
    assert (batch["labels"][:, 0] == -100).all()  # [CLS] is never masked
    assert (batch["attention_mask"] == 1).all() and (batch["token_type_ids"] == 0).all()


def test_blocks_are_cls_body_sep(datamodule):
    blocks = datamodule.blocks("train")
    tok = datamodule.tokenizer
    assert blocks.shape[1] == 32 and len(blocks) > 100
    assert (blocks[:, 0] == tok.cls_token_id).all() and (blocks[:, -1] == tok.sep_token_id).all()
    assert tok.decode(blocks[0, 1:6].tolist()).split()[0] in WORDS


def test_validation_masks_fixed(datamodule, corpus, cache):
    def all_batches(dm, batch_size=None):
        if batch_size:
            dm.batch_size = batch_size
        return {k: torch.cat([b[k] for b in dm.val_dataloader()]) for k in ("input_ids", "labels")}

    first = all_batches(datamodule)
    assert torch.equal(first["labels"], all_batches(datamodule)["labels"])  # every epoch
    other = _dm(corpus, cache, batch_size=5)  # a separate instance, another batch size: same masks
    other.setup("validate")
    again = all_batches(other)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    rate = (first["labels"] != -100).float().mean().item()
    assert 0.08 < rate < 0.2
    test = torch.cat([b["labels"] for b in datamodule.test_dataloader()])
    assert torch.equal(test, first["labels"])
    reseeded = _dm(corpus, cache, mask_seed=7)
    assert not torch.equal(reseeded.validation_tensors()["labels"], first["labels"])


def test_training_order_and_masks_follow_the_run_seed_not_the_global_state(datamodule):
    torch.manual_seed(3)
    loader = datamodule.train_dataloader()
    torch.rand(100)  # draws from the global state in between change nothing
    first = next(iter(loader))
    torch.manual_seed(3)
    second = next(iter(datamodule.train_dataloader()))
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])
    torch.manual_seed(4)
    other = next(iter(datamodule.train_dataloader()))
    assert not torch.equal(first["input_ids"], other["input_ids"])
    assert (first["labels"] != -100).any()  # masked at all


def test_unigram_baseline(datamodule):
    baseline = datamodule.unigram_baseline()
    assert math.isfinite(baseline) and 0.0 < baseline < math.log(len(datamodule.tokenizer))
    # ~20 roughly equiprobable words plus '.', so the frequency model is close to log(number of words).
    assert abs(baseline - math.log(len(WORDS))) < 0.5


def test_features_dataloader_is_unmasked(datamodule):
    batches = list(datamodule.features_dataloader("validation", max_blocks=10, batch_size=4))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2] and "labels" not in batches[0]
    ids = torch.cat([b["input_ids"] for b in batches])
    assert not (ids == datamodule.tokenizer.mask_token_id).any()
    assert set(ids.flatten().tolist()) <= set(np.unique(datamodule.blocks("validation")).tolist())


def test_max_blocks_spread_and_caches(corpus, cache, monkeypatch):
    monkeypatch.setattr(mlm, "pack_blocks", lambda *a, **k: pytest.fail("blocks cache not used"))
    monkeypatch.setattr(tokenizer_module, "train_wordpiece", lambda *a, **k: pytest.fail("tokenizer cache not used"))
    dm = _dm(corpus, cache, max_train_blocks=10, max_val_blocks=6)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 10 and len(dm.validation_tensors()["labels"]) == 6
    assert len(list((cache / "tokenizers").iterdir())) == 1


def test_a_truncated_blocks_cache_is_rebuilt_with_one_line(corpus, tmp_path, capsys):
    first = _dm(corpus, tmp_path / "cache").blocks("train")
    (cached,) = (tmp_path / "cache" / "mlm").glob("blocks-train-*.npz")
    cached.write_bytes(cached.read_bytes()[:-100])  # a copy cut short by a kill or a full disk
    capsys.readouterr()
    again = _dm(corpus, tmp_path / "cache").blocks("train")
    assert np.array_equal(again, first)
    out = capsys.readouterr().out
    assert f"cache file {cached} does not match its recorded digest" in out and "rebuilding it" in out


def test_existing_tokenizer_dir(datamodule, corpus, cache, tmp_path):
    datamodule.tokenizer.save_pretrained(tmp_path / "tok")
    dm = _dm(corpus, cache, tokenizer=str(tmp_path / "tok"), vocab_size=5000)  # vocab_size is ignored
    dm.setup("fit")
    assert np.array_equal(dm.blocks("train"), datamodule.blocks("train"))
    # A merge run loads the tokenizer from a model's export dir: it must score the very same masked positions.
    assert torch.equal(dm.validation_tensors()["labels"], datamodule.validation_tensors()["labels"])
    with pytest.raises(ConfigError, match="block_size=1024 exceeds the tokenizer's limit 512"):
        _dm(corpus, cache, tokenizer=str(tmp_path / "tok"), block_size=1024).tokenizer


def test_empty_validation_is_data_error(corpus, tmp_path):
    (tmp_path / "tiny.txt").write_text("the fox.\n")
    source = LocalFilesSource(str(corpus / "train.txt"), str(tmp_path / "tiny.txt"))
    dm = MLMDataModule(source, vocab_size=100, block_size=32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="validation split .* does not fill one block of 32 tokens; add text"):
        dm.prepare_data()


def test_missing_local_file_is_data_error(tmp_path):
    dm = MLMDataModule(LocalFilesSource(str(tmp_path / "missing.txt")), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="missing.txt does not exist"):
        dm.prepare_data()


def test_small_vocab_is_config_error(corpus, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=50 is too small"):
        _dm(corpus, tmp_path, vocab_size=50).prepare_data()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 4}, "block_size=4 is too small"),
        ({"mlm_probability": 0.0}, "mlm_probability=0.0 must be in"),
        ({"max_val_blocks": 0}, "max_val_blocks=0 must be at least 1"),
    ],
)
def test_bad_settings(corpus, cache, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _dm(corpus, cache, **kwargs).tokenizer


def test_datamodule_arguments_parse_with_class_path_source():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MLMDataModule, "data")
    args = parser.parse_args(
        [
            "--data.source.class_path=lightning_merge.data.sources.HubSource",
            "--data.source.init_args.path=wikitext",
            "--data.source.init_args.name=wikitext-103-raw-v1",
            "--data.block_size=64",
        ]
    )
    dm = parser.instantiate_classes(args).data
    assert dm.source.name == "wikitext-103-raw-v1" and dm.block_size == 64


def test_wikipedia_default_source(monkeypatch):
    """The offline corpus end to end, small: real dump, small vocabulary, a slice of blocks.

    Runs against the user cache (content-addressed, so sharing it is safe): warm, this takes well under a second.
    """
    monkeypatch.setenv(offline.CACHE_ENV, str(USER_CACHE))
    dm = MLMDataModule(vocab_size=1000, block_size=64, max_train_blocks=64, max_val_blocks=32)
    dm.setup("fit")
    assert len(dm.blocks("train")) > 5000 and len(dm.validation_tensors()["labels"]) == 32
    assert 4.0 < dm.unigram_baseline() < math.log(1000)


def test_unigram_baseline_at_mask_inputs_scores_only_those_positions(datamodule):
    tensors = datamodule.validation_tensors()
    at_mask = (tensors["labels"] != -100) & (tensors["input_ids"] == datamodule.tokenizer.mask_token_id)
    kept_or_random = (tensors["labels"] != -100) & ~at_mask
    assert at_mask.sum() > 3 * kept_or_random.sum() > 0  # BERT's 80/10/10
    context_only = datamodule.unigram_baseline(mask_inputs_only=True)
    assert math.isfinite(context_only) and context_only != datamodule.unigram_baseline()
    assert abs(context_only - datamodule.unigram_baseline()) < 0.2

"""WordPiece training: determinism, BERT conventions, save/load round trip, the shared cache, bad vocab sizes."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lightning_merge.data import tokenizer as tok_mod
from lightning_merge.data.tokenizer import cached_wordpiece, corpus_hash, load_tokenizer, train_wordpiece
from lightning_merge.errors import ConfigError, DataError

TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Foxes and dogs are animals; the quick ones run, the lazy ones sleep.",
    "Anarchism is a political philosophy. Albedo is the reflectivity of a surface!",
    "Über naïve café résumé, a lower-cased and accent-stripped vocabulary.",
] * 10


def test_bert_conventions_and_determinism():
    tokenizer = train_wordpiece(TEXTS, 200)
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 4)
    encoded = tokenizer("The quick fox.", "Lazy dogs!")
    assert encoded["input_ids"][0] == tokenizer.cls_token_id and encoded["input_ids"][-1] == tokenizer.sep_token_id
    assert set(encoded["token_type_ids"]) == {0, 1}
    assert tokenizer.tokenize("ÜBER Café") == tokenizer.tokenize("uber cafe")  # uncased, accents stripped
    # The tokenizers trainer alone numbers '##x' pieces in hash order (tokenizers#1794); ours must not.
    again = train_wordpiece(list(reversed(TEXTS)), 200)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_round_trip(tmp_path):
    tokenizer = train_wordpiece(TEXTS, 200, model_max_length=128)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    pair = ("Foxes jump over dogs, naïvely.", "The lazy surface!")
    assert loaded(*pair) == tokenizer(*pair)
    assert loaded.model_max_length == 128 and loaded.mask_token == "[MASK]" and len(loaded) == len(tokenizer)
    assert load_tokenizer(str(tmp_path))(*pair) == tokenizer(*pair)


def test_cache_shared_across_calls(tmp_path, monkeypatch):
    first = cached_wordpiece(TEXTS, 200, tmp_path)
    monkeypatch.setattr(tok_mod, "train_wordpiece", lambda *a, **k: pytest.fail("cache not used"))
    second = cached_wordpiece(TEXTS, 200, tmp_path, corpus_digest=corpus_hash(TEXTS))
    assert second.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1  # one directory for every seed/run
    assert not any(p.name.startswith(".") for p in (tmp_path / "tokenizers").iterdir())  # no temp leftovers


def test_a_damaged_cached_tokenizer_is_trained_again(tmp_path, capsys):
    first = cached_wordpiece(TEXTS, 200, tmp_path)
    (target,) = (tmp_path / "tokenizers").iterdir()
    data = (target / "tokenizer.json").read_bytes()
    (target / "tokenizer.json").write_bytes(data[: len(data) // 2])
    again = cached_wordpiece(TEXTS, 200, tmp_path)
    assert again.get_vocab() == first.get_vocab()
    assert f"cached tokenizer {target} is unreadable" in capsys.readouterr().out


def test_corpus_hash_is_length_prefixed():
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])


@pytest.mark.parametrize("vocab_size", [10, 99])
def test_vocab_size_below_minimum(vocab_size, tmp_path):
    with pytest.raises(ConfigError, match=f"vocab_size={vocab_size} is too small.*use vocab_size >= 100"):
        cached_wordpiece(TEXTS, vocab_size, tmp_path)
    assert not (tmp_path / "tokenizers").exists()


def test_vocab_size_below_alphabet():
    many_chars = TEXTS + ["".join(chr(0x4E00 + i) for i in range(120))]  # 120 CJK characters
    with pytest.raises(ConfigError, match="vocab_size=150 is too small for this corpus.*use vocab_size >= 1"):
        train_wordpiece(many_chars, 150)


def test_empty_texts():
    with pytest.raises(DataError, match="training texts are empty"):
        train_wordpiece(["", "   "], 200)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer .*save_pretrained or a hub id"):
        load_tokenizer(str(tmp_path / "no-such-dir"))

"""WordPiece tokenizers: trained on a corpus with the ``tokenizers`` library and cached, or loaded from a dir/hub id.

A trained tokenizer is a BERT tokenizer in all but name: BERT normalizer (lower case, accents stripped) and
pre-tokenizer, ``##`` continuation pieces, ``[CLS] A [SEP] B [SEP]`` post-processing with token types, and the five
BERT special tokens at ids 0-4. It is returned as ``transformers.PreTrainedTokenizerFast`` (``tokenizer.json`` is the
whole definition), so ``save_pretrained`` + ``AutoTokenizer.from_pretrained`` round-trips it exactly.

The cache key is the sha256 of the training texts plus the vocabulary size and options: every seed of a study, and
every later run, gets the very same tokenizer directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_merge.data.offline import cache_dir
from lightning_merge.errors import ConfigError, DataError, OutputExistsError
from lightning_merge.io import atomic_dir

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
MIN_VOCAB_SIZE = 100


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 over the texts, each length-prefixed (so ``["ab", "c"]`` and ``["a", "bc"]`` differ)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the full tokenizer definition (``tokenizer.json``), without the truncation and padding settings
    that calling the tokenizer leaves on it: they are not the tokenizer, and would change the key of a cache."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode("utf-8")).hexdigest()


def _bert_pipeline(lowercase: bool, vocab: dict[str, int] | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _word_counts(texts: Iterable[str], tokenizer: Tokenizer) -> Counter[str]:
    """Words as the trainer sees them (normalized, pre-tokenized), counted.

    Whitespace-split tokens are counted first (C speed) and only the distinct ones are pre-tokenized, since the BERT
    pre-tokenizer splits on whitespace, then on punctuation.
    """
    chunks: Counter[str] = Counter()
    for text in texts:
        chunks.update(tokenizer.normalizer.normalize_str(text).split())
    words: Counter[str] = Counter()
    for chunk, count in chunks.items():
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(chunk):
            words[word] += count
    return words


def _alphabet(words: Counter[str], limit: int) -> tuple[list[str], list[str]]:
    """The ``limit`` most frequent characters, and those of them that occur inside words (they get ``##`` forms).

    Ties are broken by the character itself: the trainer breaks them by hash-map order, which changes per process.
    """
    chars: Counter[str] = Counter()
    inner: set[str] = set()
    for word, count in words.items():
        for char in word:
            chars[char] += count
        inner.update(word[1:])
    alphabet = sorted(chars, key=lambda c: (-chars[c], c))[:limit]
    return alphabet, [c for c in alphabet if c in inner]


def _repeat_words(words: Counter[str], chunk: int = 4096) -> Iterator[str]:
    """Each word ``count`` times, space-joined in chunks (so the trainer's own counting reproduces ``words``)."""
    for word, count in sorted(words.items()):
        for start in range(0, count, chunk):
            yield " ".join([word] * min(chunk, count - start))


def _add_post_processor(tokenizer: Tokenizer) -> None:
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: the 5 special tokens and the characters of the corpus need "
            f"more; use vocab_size >= {MIN_VOCAB_SIZE} (8192 is a good default for a small corpus)"
        )


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
    limit_alphabet: int = 500,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts``: the same texts and settings give the same vocabulary.

    The ``tokenizers`` trainer alone is not deterministic (huggingface/tokenizers#1794): it numbers the ``##``
    pieces of single characters in hash-map order, and those ids break ties between equally frequent merges. So the
    alphabet and the ``##`` pieces are computed here and handed to the trainer in a fixed order (as initial alphabet
    and leading special tokens); the trainer then only learns the merges.

    Args:
        texts: Training texts (iterated once).
        vocab_size: Size of the vocabulary, special tokens included.
        lowercase: Lower-case and strip accents (BERT "uncased").
        min_frequency: Minimum count of a merged piece.
        limit_alphabet: At most this many distinct characters are kept; words with rarer ones become ``[UNK]``.
        model_max_length: Longest sequence the tokenizer will produce (the model's position embeddings).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4.

    Raises:
        ConfigError: ``vocab_size`` cannot hold the special tokens and the alphabet of the corpus.
        DataError: ``texts`` is empty.
    """
    _check_vocab_size(vocab_size)
    tokenizer = _bert_pipeline(lowercase)
    words = _word_counts(texts, tokenizer)
    if not words:
        raise DataError("the tokenizer's training texts are empty; check the source's train split")
    alphabet, inner = _alphabet(words, limit_alphabet)
    needed = len(SPECIAL_TOKENS) + len(alphabet) + len(inner)
    if vocab_size < needed:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for this corpus: its special tokens and {len(alphabet)} "
            f"characters (with their ## forms) alone need {needed}; use vocab_size >= {needed} "
            "(several thousand to learn useful word pieces), or lower limit_alphabet"
        )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        special_tokens=list(SPECIAL_TOKENS.values()) + ["##" + c for c in inner],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    # Counted words stand in for the texts: the trainer re-normalizes them (a no-op) and sums the counts.
    tokenizer.train_from_iterator(_repeat_words(words), trainer)
    # Rebuild from the learned vocabulary so the '##x' helpers are ordinary pieces, not special added tokens.
    final = _bert_pipeline(lowercase, tokenizer.get_vocab(with_added_tokens=False))
    final.add_special_tokens(list(SPECIAL_TOKENS.values()))
    _add_post_processor(final)
    return PreTrainedTokenizerFast(
        tokenizer_object=final,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **SPECIAL_TOKENS,
    )


def cached_wordpiece(
    texts: Iterable[str],
    vocab_size: int,
    cache: Path | None = None,
    *,
    corpus_digest: str | None = None,
    **options,
) -> PreTrainedTokenizerFast:
    """``train_wordpiece`` with a cache: ``<cache>/tokenizers/wordpiece-<vocab>-<hash>/`` (written atomically).

    Args:
        texts: Training texts; must be iterable twice when ``corpus_digest`` is not given (hash, then train).
        vocab_size: Size of the vocabulary.
        cache: Cache root; default ``offline.cache_dir()``.
        corpus_digest: ``corpus_hash(texts)`` if the caller has it already.
        **options: Further ``train_wordpiece`` keyword arguments (part of the cache key).

    Returns:
        The tokenizer, loaded from the cache directory (the same object every seed and every run gets).
    """
    _check_vocab_size(vocab_size)
    digest = corpus_digest or corpus_hash(texts)
    key = hashlib.sha256(json.dumps([digest, vocab_size, sorted(options.items())]).encode()).hexdigest()[:16]
    target = (cache or cache_dir()) / "tokenizers" / f"wordpiece-{vocab_size}-{key}"
    if (target / "tokenizer.json").is_file():
        try:
            return load_tokenizer(str(target))
        except DataError as err:  # a cached file damaged after it was written: train it again
            print(f"cached tokenizer {target} is unreadable ({err.__cause__ or err}); rebuilding it", flush=True)
            shutil.rmtree(target, ignore_errors=True)
    if not (target / "tokenizer.json").is_file():
        tokenizer = train_wordpiece(texts, vocab_size, **options)
        try:
            with atomic_dir(target) as tmp:
                tokenizer.save_pretrained(tmp)
        except OutputExistsError:
            pass  # another process (a DDP rank) finished the same tokenizer first: use theirs
    return load_tokenizer(str(target))


def load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (``save_pretrained`` output) or a hub id (``google/multiberts-seed_0``).

    Raises:
        DataError: Neither a local directory nor a loadable hub id.
        ConfigError: The tokenizer has no mask token, so it cannot be used for masked language modelling.
    """
    local = Path(path_or_id).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else path_or_id)
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot load tokenizer {path_or_id!r} ({err.__class__.__name__}); pass a directory written by "
            "save_pretrained or a hub id reachable from here"
        ) from err
    if tokenizer.mask_token is None:
        raise ConfigError(f"tokenizer {path_or_id!r} has no mask token; masked language modelling needs one")
    return tokenizer

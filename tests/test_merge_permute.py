"""apply_permutations: random function-preserving perms leave every output unchanged (float64, ≤ 1e-10)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from lightning_merge.errors import ConfigError, UnknownNameError
from lightning_merge.merge.interpolate import load_state_dict_tied
from lightning_merge.merge.permute import (
    apply_permutations,
    check_permutations,
    invert_permutation,
    random_permutations,
)
from lightning_merge.merge.spec import spec_for_model

TOLERANCE = 1e-10
KINDS = [("ff",), ("attn",), ("res",), ("ff", "attn", "res")]


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=24,
        num_labels=3,
    )


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 50, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def permuted_copy(model: torch.nn.Module, perms: dict) -> torch.nn.Module:
    spec = spec_for_model(model)
    copy = type(model)(model.config).double().eval()
    load_state_dict_tied(copy, apply_permutations(model.state_dict(), spec, perms))
    return copy


def random_model(model_class) -> torch.nn.Module:
    model = model_class(tiny_config()).double().eval()
    with torch.no_grad():  # LayerNorm affine defaults are 1/0; randomise so a wrong LayerNorm permutation shows
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("kinds", KINDS, ids="+".join)
@pytest.mark.parametrize("model_class", [BertForMaskedLM, BertForSequenceClassification])
@torch.no_grad()
def test_random_permutation_preserves_logits(model_class, kinds):
    model = random_model(model_class)
    perms = random_permutations(spec_for_model(model), torch.Generator().manual_seed(1), kinds)
    permuted = permuted_copy(model, perms)
    moved = [name for name, value in model.state_dict().items() if not torch.equal(permuted.state_dict()[name], value)]
    assert moved  # the check below is not vacuous
    expected, actual = model(**batch()).logits, permuted(**batch()).logits
    assert (actual - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_untied_mlm_decoder_is_exact():
    model = BertForMaskedLM(BertConfig(**{**tiny_config().to_dict(), "tie_word_embeddings": False})).double().eval()
    perms = random_permutations(spec_for_model(model), torch.Generator().manual_seed(9))
    permuted = permuted_copy(model, perms)
    assert permuted.cls.predictions.decoder.weight is not permuted.bert.embeddings.word_embeddings.weight
    assert (permuted(**batch()).logits - model(**batch()).logits).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_bert_model_hidden_states_come_out_permuted_by_res():
    model = random_model(BertModel)
    perms = random_permutations(spec_for_model(model), torch.Generator().manual_seed(2))
    expected, actual = model(**batch()), permuted_copy(model, perms)(**batch())
    assert (actual.pooler_output - expected.pooler_output).abs().max().item() <= TOLERANCE
    realigned = actual.last_hidden_state[..., invert_permutation(perms["res"])]
    assert (realigned - expected.last_hidden_state).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_mlm_transform_must_move_with_residual():
    """The published code's defect: leave the MLM transform's output unpermuted and the logits change."""
    model = random_model(BertForMaskedLM)
    spec = spec_for_model(model)
    axes = dict(spec.axes)
    axes["cls.predictions.transform.dense.weight"] = (None, "res")
    axes["cls.predictions.transform.dense.bias"] = (None,)
    axes["cls.predictions.transform.LayerNorm.weight"] = (None,)
    axes["cls.predictions.transform.LayerNorm.bias"] = (None,)
    broken = dataclasses.replace(spec, axes=axes)
    perms = random_permutations(spec, torch.Generator().manual_seed(4), ("res",))
    copy = BertForMaskedLM(model.config).double().eval()
    load_state_dict_tied(copy, apply_permutations(model.state_dict(), broken, perms))
    assert (copy(**batch()).logits - model(**batch()).logits).abs().max().item() > 1e-3


def test_tied_decoder_stays_tied():
    model = BertForMaskedLM(tiny_config())
    spec = spec_for_model(model)
    permuted = apply_permutations(model.state_dict(), spec, random_permutations(spec, torch.Generator()))
    assert permuted["cls.predictions.decoder.weight"] is permuted["bert.embeddings.word_embeddings.weight"]
    assert permuted["cls.predictions.decoder.bias"] is permuted["cls.predictions.bias"]
    assert list(permuted) == list(model.state_dict())
    copy = BertForMaskedLM(model.config)
    load_state_dict_tied(copy, permuted)
    assert copy.cls.predictions.decoder.weight is copy.bert.embeddings.word_embeddings.weight


def test_state_dict_without_alias_is_fine():
    model = BertForMaskedLM(tiny_config())
    spec = spec_for_model(model)
    state = {k: v for k, v in model.state_dict().items() if k not in spec.ties}
    permuted = apply_permutations(state, spec, random_permutations(spec, torch.Generator()))
    assert set(permuted) == set(state)


def test_inverse_restores_exactly():
    model = BertForSequenceClassification(tiny_config())
    spec = spec_for_model(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    there = apply_permutations(model.state_dict(), spec, perms)
    back = apply_permutations(there, spec, {name: invert_permutation(p) for name, p in perms.items()})
    assert all(torch.equal(back[name], value) for name, value in model.state_dict().items())


def test_random_attention_perm_is_head_aware():
    spec = spec_for_model(BertModel(tiny_config()))
    group = spec.groups["attn.0"]
    perm = random_permutations(spec, torch.Generator().manual_seed(6), ("attn",))["attn.0"]
    blocks = perm.reshape(group.num_heads, group.head_dim) // group.head_dim  # (heads, head_dim): source head
    assert (blocks == blocks[:, :1]).all()  # each head comes whole from one head of B
    assert sorted(blocks[:, 0].tolist()) == list(range(group.num_heads))


def test_bad_permutations():
    spec = spec_for_model(BertModel(tiny_config()))
    with pytest.raises(UnknownNameError, match="no group 'ff.7'.*known: ff.0"):
        check_permutations(spec, {"ff.7": torch.arange(48)})
    with pytest.raises(ConfigError, match="not a permutation of 48"):
        check_permutations(spec, {"ff.0": torch.arange(47)})
    with pytest.raises(ConfigError, match="not a permutation"):
        check_permutations(spec, {"res": torch.zeros(32, dtype=torch.long)})

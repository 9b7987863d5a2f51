"""Alignments applied through the spec: random function-preserving ones leave every output unchanged (float64,
≤ 1e-10) — permutations of every group, per-head linear maps of attention — and they save and load exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config
from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel

from lightning_merge.errors import CheckpointError, ConfigError, UnknownNameError
from lightning_merge.merge.alignment import (
    HeadLinear,
    Permutation,
    apply_alignments,
    check_alignments,
    load_alignments,
    permutations,
    save_alignments,
)
from lightning_merge.merge.interpolate import load_state_dict_tied
from lightning_merge.merge.permute import invert_permutation, random_permutations
from lightning_merge.merge.spec import Axis, spec_for_model

TOLERANCE = 1e-10
KINDS = [("ff",), ("attn",), ("res",), ("ff", "attn", "res")]


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 40, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def aligned_copy(model: torch.nn.Module, alignments: dict) -> torch.nn.Module:
    spec = spec_for_model(model)
    copy = type(model)(model.config).double().eval()
    load_state_dict_tied(copy, apply_alignments(model.state_dict(), spec, alignments))
    return copy


def permuted_copy(model: torch.nn.Module, perms: dict) -> torch.nn.Module:
    return aligned_copy(model, permutations(perms))


def random_head_linear(spec, generator: torch.Generator, orthogonal: bool = False) -> dict[str, HeadLinear]:
    """Random function-preserving linear alignments of every attention group: shuffled heads, random maps."""
    out = {}
    for name in spec.groups_of_kind(["attn"]):
        group = spec.groups[name]
        heads, dim = group.num_heads, group.head_dim
        perm = (torch.randperm(heads, generator=generator)[:, None] * dim + torch.arange(dim)).reshape(-1)
        maps = {}
        for subspace in group.subspaces:
            raw = torch.randn(heads, dim, dim, generator=generator, dtype=torch.float64)
            maps[subspace] = torch.linalg.qr(raw).Q if orthogonal else raw + 2 * torch.eye(dim, dtype=torch.float64)
        out[name] = HeadLinear(perm, maps)
    return out


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
    model = BertForMaskedLM(tiny_config(tie_word_embeddings=False)).double().eval()
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
    axes["cls.predictions.transform.dense.weight"] = (None, Axis("res", "in"))
    axes["cls.predictions.transform.dense.bias"] = (None,)
    axes["cls.predictions.transform.LayerNorm.weight"] = (None,)
    axes["cls.predictions.transform.LayerNorm.bias"] = (None,)
    broken = dataclasses.replace(spec, axes=axes)
    perms = random_permutations(spec, torch.Generator().manual_seed(4), ("res",))
    copy = BertForMaskedLM(model.config).double().eval()
    load_state_dict_tied(copy, apply_alignments(model.state_dict(), broken, permutations(perms)))
    assert (copy(**batch()).logits - model(**batch()).logits).abs().max().item() > 1e-3


def test_tied_decoder_stays_tied():
    model = BertForMaskedLM(tiny_config())
    spec = spec_for_model(model)
    permuted = apply_alignments(model.state_dict(), spec, permutations(random_permutations(spec, torch.Generator())))
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
    permuted = apply_alignments(state, spec, permutations(random_permutations(spec, torch.Generator())))
    assert set(permuted) == set(state)


def test_inverse_restores_exactly():
    model = BertForSequenceClassification(tiny_config())
    spec = spec_for_model(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    there = apply_alignments(model.state_dict(), spec, permutations(perms))
    back = apply_alignments(there, spec, permutations({name: invert_permutation(p) for name, p in perms.items()}))
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
        check_alignments(spec, {"ff.7": Permutation(torch.arange(24))})
    with pytest.raises(ConfigError, match="not a permutation of 24"):
        check_alignments(spec, {"ff.0": Permutation(torch.arange(23))})
    with pytest.raises(ConfigError, match="not a permutation"):
        check_alignments(spec, {"res": Permutation(torch.zeros(16, dtype=torch.long))})


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "invertible"])
@pytest.mark.parametrize("model_class", [BertForMaskedLM, BertForSequenceClassification, BertModel])
@torch.no_grad()
def test_random_head_linear_maps_preserve_outputs(model_class, orthogonal):
    model = random_model(model_class)
    spec = spec_for_model(model)
    alignments = {**random_head_linear(spec, torch.Generator().manual_seed(3), orthogonal),
                  **permutations(random_permutations(spec, torch.Generator().manual_seed(4), ("ff", "res")))}
    assert all(a.preserves_function(spec.groups[g]) for g, a in alignments.items())
    aligned = aligned_copy(model, alignments)
    query = "encoder.layer.0.attention.self.query.weight"
    prefix = spec.base_prefix
    assert not torch.allclose(aligned.state_dict()[prefix + query], model.state_dict()[prefix + query])
    expected, actual = model(**batch()), aligned(**batch())
    output = "last_hidden_state" if model_class is BertModel else "logits"
    if model_class is BertModel:  # the residual stream comes out permuted
        actual = {output: actual.last_hidden_state[..., invert_permutation(alignments["res"].perm)]}
        expected = {output: expected.last_hidden_state}
    assert (actual[output] - expected[output]).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_a_map_of_one_subspace_alone_is_exact_and_changes_the_weights_it_should():
    model = random_model(BertForMaskedLM)
    spec = spec_for_model(model)
    full = random_head_linear(spec, torch.Generator().manual_seed(5))["attn.1"]
    only_vo = HeadLinear(full.perm, {"vo": full.maps["vo"]})
    aligned = aligned_copy(model, {"attn.1": only_vo})
    layer = "bert.encoder.layer.1.attention."
    before, after = model.state_dict(), aligned.state_dict()
    query = before[layer + "self.query.weight"].index_select(0, full.perm)
    assert torch.equal(after[layer + "self.query.weight"], query)  # qk only permuted
    value = before[layer + "self.value.weight"].index_select(0, full.perm)
    assert not torch.allclose(after[layer + "self.value.weight"], value)  # vo mapped
    assert (aligned(**batch()).logits - model(**batch()).logits).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_a_permutation_across_heads_is_declared_and_found_not_function_preserving():
    model = random_model(BertForMaskedLM)
    with torch.no_grad():  # at init scale attention is nearly uniform, and mixing heads would hardly show
        for projection in ("query", "key"):
            getattr(model.bert.encoder.layer[0].attention.self, projection).weight.mul_(30)
    spec = spec_for_model(model)
    group = spec.groups["attn.0"]
    across = torch.arange(group.size).roll(1)  # every head takes one feature of its neighbour
    assert not Permutation(across).preserves_function(group)
    assert Permutation(torch.arange(group.size)).preserves_function(group)
    changed = permuted_copy(model, {"attn.0": across})
    assert (changed(**batch()).logits - model(**batch()).logits).abs().max().item() > 1e-3


def test_bad_head_linear_alignments():
    spec = spec_for_model(BertModel(tiny_config()))
    group = spec.groups["attn.0"]
    heads, dim = group.num_heads, group.head_dim
    eye = torch.eye(dim, dtype=torch.float64).repeat(heads, 1, 1)
    with pytest.raises(ConfigError, match="moves features across heads"):
        check_alignments(spec, {"attn.0": HeadLinear(torch.arange(group.size).roll(1), {"qk": eye})})
    with pytest.raises(ConfigError, match="not invertible"):
        check_alignments(spec, {"attn.0": HeadLinear(torch.arange(group.size), {"qk": torch.zeros_like(eye)})})
    with pytest.raises(ConfigError, match="have shape"):
        check_alignments(spec, {"attn.0": HeadLinear(torch.arange(group.size), {"vo": eye[:, :-1]})})
    with pytest.raises(ConfigError, match="no subspace 'xy'"):
        check_alignments(spec, {"attn.0": HeadLinear(torch.arange(group.size), {"xy": eye})})
    # no BERT axis of an attention group is elementwise, but a family whose is must not be mapped silently
    with pytest.raises(ConfigError, match="cannot act on the elementwise axis"):
        HeadLinear(torch.arange(group.size), {"qk": eye}).apply(torch.ones(group.size), 0, Axis("attn.0", "norm", "qk"))


def test_alignments_save_and_load_every_kind(tmp_path):
    spec = spec_for_model(BertForMaskedLM(tiny_config()))
    generator = torch.Generator().manual_seed(8)
    saved = {"ff+attn[linear]+res": {**random_head_linear(spec, generator),
                                     **permutations(random_permutations(spec, generator, ("ff", "res")))},
             "vanilla": {}, "ff": permutations(random_permutations(spec, generator, ("ff",)))}
    save_alignments(tmp_path / "alignments.safetensors", saved)
    loaded = load_alignments(tmp_path / "alignments.safetensors")
    assert list(loaded) == list(saved)
    for method, groups in saved.items():
        assert loaded[method].keys() == groups.keys()
        for name, alignment in groups.items():
            again = loaded[method][name]
            assert type(again) is type(alignment)
            assert all(torch.equal(again.tensors()[k], t) for k, t in alignment.tensors().items())


def test_an_earlier_permutations_file_still_loads(tmp_path):
    from safetensors.torch import save_file

    perm = torch.randperm(24)
    save_file({"ff/ff.0": perm, "permute/res": torch.arange(16)}, str(tmp_path / "permutations.safetensors"),
              metadata={"methods": '["vanilla", "ff", "permute"]'})
    loaded = load_alignments(tmp_path / "permutations.safetensors")
    assert list(loaded) == ["vanilla", "ff", "permute"] and loaded["vanilla"] == {}
    assert isinstance(loaded["ff"]["ff.0"], Permutation) and torch.equal(loaded["ff"]["ff.0"].perm, perm)


def test_a_tensor_outside_the_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"ff/ff.0/perm": torch.arange(4), "ff/ff.1/perm": torch.arange(4)}, str(tmp_path / "a.safetensors"),
              metadata={"methods": '["ff"]', "kinds": '{"ff/ff.0": "permutation"}'})
    with pytest.raises(CheckpointError, match="tensor ff/ff.1/perm belongs to no alignment"):
        load_alignments(tmp_path / "a.safetensors")
    save_file({"ff/ff.0/perm": torch.arange(4)}, str(tmp_path / "b.safetensors"),
              metadata={"methods": '["ff"]', "kinds": '{"ff/ff.0": "rotation"}'})
    with pytest.raises(CheckpointError, match="unknown kind 'rotation' of ff/ff.0"):
        load_alignments(tmp_path / "b.safetensors")


def test_missing_or_corrupt_alignments_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_alignments(tmp_path / "nothing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_alignments(tmp_path / "bad.safetensors")

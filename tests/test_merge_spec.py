"""PermutationSpec: built from the config, complete over the state dict, bad input named."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config
from transformers import BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, BertModel

from lightning_merge.errors import ArchitectureMismatch, UnsupportedModel
from lightning_merge.merge.spec import ARCHITECTURES, Axis, spec_for_model, spec_for_pair, spec_from_config

CLASSES = (BertModel, BertForMaskedLM, BertForSequenceClassification)


@pytest.mark.parametrize("model_class", CLASSES)
def test_spec_covers_every_floating_weight(model_class):
    model = model_class(tiny_config())
    spec = spec_for_model(model)
    floating = {name for name, t in model.state_dict().items() if torch.is_floating_point(t)}
    assert floating <= set(spec.axes)
    assert set(spec.groups) == {"ff.0", "ff.1", "attn.0", "attn.1", "res"}
    assert spec.groups["attn.1"].num_heads == 4 and spec.groups["attn.1"].head_dim == 4
    assert spec.groups["ff.1"].size == 24 and spec.groups["res"].size == 16


@pytest.mark.parametrize("model_class", CLASSES)
def test_feature_points_name_real_modules(model_class):
    model = model_class(tiny_config())
    spec = spec_for_model(model)
    assert len(spec.points["res"]) == 2 * 2 + 1
    inputs = {features for _, features in spec.inputs.values()}
    for features, points in spec.points.items():
        for point in points:
            model.get_submodule(point.module)  # raises if the name is wrong
            reads = features in inputs or features in spec.groups and features != "res"
            assert point.source == ("input" if reads else "output")
    projections = {f"attn.{i}/{p}" for i in range(2) for p in ("query", "key", "value")}
    pre_activations = {f"ff.{i}/pre" for i in range(2)}
    assert {f for f in spec.points if "/" in f} - inputs == projections | pre_activations
    prefix = "" if model_class is BertModel else "bert."
    assert spec.points["attn.1/key"][0].module == f"{prefix}encoder.layer.1.attention.self.key"
    assert spec.inputs[f"{prefix}encoder.layer.0.output.dense.weight"] == (
        1, f"ff.0/input:{prefix}encoder.layer.0.output.dense")
    assert spec.points[f"res/input:{prefix}encoder.layer.1.attention.self.query"][0].source == "input"
    assert spec.points["ff.1/pre"][0].module == f"{prefix}encoder.layer.1.intermediate.dense"
    assert spec.points["ff.0"][0].module == f"{prefix}encoder.layer.0.output.dense"
    assert spec.points["attn.1"][0].module == f"{prefix}encoder.layer.1.attention.output.dense"
    assert spec.points["res"][0].module == f"{prefix}embeddings.LayerNorm"


def test_mlm_head_moves_with_residual_and_decoder_is_tied():
    spec = spec_for_model(BertForMaskedLM(tiny_config()))
    assert spec.ties["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    # the tied decoder takes its source's axes: the embedding rows carry the residual features
    assert spec.axes["cls.predictions.decoder.weight"] == (None, Axis("res", "out"))
    assert spec.axes["cls.predictions.transform.dense.weight"] == (Axis("res", "out"), Axis("res", "in"))
    assert spec.axes["cls.predictions.transform.dense.bias"] == (Axis("res", "out"),)
    assert spec.axes["cls.predictions.transform.LayerNorm.weight"] == (Axis("res", "norm"),)
    assert spec.axes["cls.predictions.bias"] == (None,)


def test_attention_axes_say_how_a_linear_map_acts_on_them():
    spec = spec_for_model(BertModel(tiny_config()))
    layer = "encoder.layer.0.attention."
    assert spec.axes[layer + "self.query.weight"] == (Axis("attn.0", "out", "qk"), Axis("res", "in"))
    assert spec.axes[layer + "self.key.weight"][0] == Axis("attn.0", "in", "qk")  # keys meet queries in QKᵀ
    assert spec.axes[layer + "self.key.bias"] == (Axis("attn.0", "in", "qk"),)
    assert spec.axes[layer + "self.value.weight"][0] == Axis("attn.0", "out", "vo")
    assert spec.axes[layer + "output.dense.weight"] == (Axis("res", "out"), Axis("attn.0", "in", "vo"))
    assert spec.axes[layer + "output.LayerNorm.bias"] == (Axis("res", "norm"),)
    assert spec.groups["attn.0"].subspaces == ("qk", "vo") and spec.groups["ff.0"].subspaces == ()


def test_pooler_reads_residual_but_its_output_is_not_permuted():
    spec = spec_for_model(BertForSequenceClassification(tiny_config()))
    assert spec.axes["bert.pooler.dense.weight"] == (None, Axis("res", "in"))
    assert spec.axes["bert.pooler.dense.bias"] == (None,)
    assert spec.axes["classifier.weight"] == (None, None)


def test_inverse_map_is_derived_from_axes():
    spec = spec_for_model(BertForMaskedLM(tiny_config()))
    assert ("bert.encoder.layer.1.intermediate.dense.weight", 0) in spec.group_axes["ff.1"]
    assert ("bert.encoder.layer.1.output.dense.weight", 1) in spec.group_axes["ff.1"]
    assert ("cls.predictions.transform.dense.weight", 0) in spec.group_axes["res"]
    assert len(spec.group_axes["attn.0"]) == 3 * 2 + 1  # q, k, v rows + bias, output columns


def test_bert_model_without_pooler():
    spec = spec_for_model(BertModel(tiny_config(), add_pooling_layer=False))
    assert not any(name.startswith("pooler") for name in spec.axes)
    assert dict(spec.fields)["heads"] == ()


def test_spec_from_class_name_equals_spec_from_model():
    config = tiny_config()
    assert spec_from_config(config, "BertForMaskedLM").axes == spec_for_model(BertForMaskedLM(config)).axes


def test_unsupported_class_names_supported_ones():
    with pytest.raises(UnsupportedModel, match="BertForPreTraining.*supported: BertModel, BertForMaskedLM"):
        spec_for_model(BertForPreTraining(tiny_config()))
    with pytest.raises(UnsupportedModel, match="supported"):
        spec_from_config(tiny_config(), torch.nn.Linear)


def test_unsupported_config():
    with pytest.raises(UnsupportedModel, match="position_embedding_type"):
        spec_from_config(tiny_config(position_embedding_type="relative_key"), "BertModel")
    roberta_like = dataclasses.make_dataclass("Cfg", [("model_type", str)])("roberta")
    with pytest.raises(UnsupportedModel, match="model_type 'roberta'"):
        spec_from_config(roberta_like, "BertModel")


def test_pair_mismatch_names_first_differing_field():
    base = BertForMaskedLM(tiny_config())
    with pytest.raises(ArchitectureMismatch, match="num_hidden_layers: 2 vs 3"):
        spec_for_pair(base, BertForMaskedLM(tiny_config(num_hidden_layers=3, intermediate_size=48)))
    with pytest.raises(ArchitectureMismatch, match="intermediate_size: 24 vs 48"):
        spec_for_pair(base, BertForMaskedLM(tiny_config(intermediate_size=48)))
    with pytest.raises(ArchitectureMismatch, match="architecture: 'BertForMaskedLM' vs 'BertForSequenceClass"):
        spec_for_pair(base, BertForSequenceClassification(tiny_config()))
    assert spec_for_pair(base, BertForMaskedLM(tiny_config())).architecture == "BertForMaskedLM"


def test_state_dict_checks():
    model = BertForMaskedLM(tiny_config())
    spec = spec_for_model(model)
    state = dict(model.state_dict())
    with pytest.raises(UnsupportedModel, match="extra.weight is not described"):
        spec.check_state_dict({**state, "extra.weight": torch.zeros(2)})
    state["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(25, 16)
    with pytest.raises(ArchitectureMismatch, match="intermediate.dense.weight axis 0 has size 25, group ff.0 has 24"):
        spec.check_state_dict(state)
    del state["bert.encoder.layer.0.intermediate.dense.weight"]
    with pytest.raises(ArchitectureMismatch, match="lacks bert.encoder.layer.0.intermediate.dense.weight"):
        spec.check_state_dict(state)


def test_family_tables_are_data():
    assert ARCHITECTURES["BertForMaskedLM"].prefix("BertForMaskedLM") == "bert."
    assert ARCHITECTURES["BertModel"].prefix("BertModel") == ""


def test_merge_package_does_not_import_lightning():
    import ast
    from pathlib import Path

    import lightning_merge.merge

    for path in Path(lightning_merge.merge.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] in {"lightning", "pytorch_lightning"}], path.name


def test_untied_mlm_decoder_is_its_own_weight():
    spec = spec_for_model(BertForMaskedLM(tiny_config(tie_word_embeddings=False)))
    assert not spec.ties
    assert spec.axes["cls.predictions.decoder.weight"] == (None, Axis("res", "in"))
    assert spec.axes["cls.predictions.decoder.bias"] == (None,)
    with pytest.raises(ArchitectureMismatch, match="tie_word_embeddings: True vs False"):
        spec_for_pair(BertForMaskedLM(tiny_config()), BertForMaskedLM(tiny_config(tie_word_embeddings=False)))


@pytest.mark.parametrize(("family", "arch", "expected"), [
    ("bert", "BertForMaskedLM", [1, 3]),  # the embeddings' LayerNorm, then each layer's two outputs
    ("gpt2", "GPT2LMHeadModel", [1, 3]),  # each earlier LayerNorm's input, and the split layer's first
])
def test_the_stream_points_before_a_layer(family, arch, expected):
    spec = spec_from_config(tiny_config(family), arch)
    assert [spec.stream_points_before(k) for k in range(2)] == expected
    assert spec.num_layers == 2 and spec.layer_module(1) == spec.base_prefix + spec.family.layer.format(i=1)

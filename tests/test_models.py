from __future__ import annotations

import pytest
import torch
from transformers import BertForMaskedLM, BertForSequenceClassification

from lightning_merge.errors import CheckpointError, ConfigError, UnknownNameError
from lightning_merge.models import (
    HF_CONFIG_KEY,
    PRESETS,
    attention_kwargs,
    build_config,
    load_pretrained,
    sinusoidal_positions,
)


def tiny_mlm() -> BertForMaskedLM:
    return BertForMaskedLM(build_config("tiny", vocab_size=50, hidden_size=16, intermediate_size=32))


def test_presets_build_configs() -> None:
    for name in PRESETS:
        config = build_config(name, vocab_size=100)
        assert config.hidden_size % config.num_attention_heads == 0


def test_unknown_preset_lists_known() -> None:
    with pytest.raises(UnknownNameError, match="known presets: tiny"):
        build_config("huge", vocab_size=10)


def test_load_hf_dir_and_classifier_from_mlm(tmp_path) -> None:
    model = tiny_mlm()
    model.save_pretrained(tmp_path / "hf")
    again = load_pretrained(tmp_path / "hf", BertForMaskedLM)
    assert torch.equal(again.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    clf = load_pretrained(tmp_path / "hf", BertForSequenceClassification, num_labels=3)
    assert clf.classifier.out_features == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, value) -> None:
    model = tiny_mlm()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[3, 4] = value
    model.save_pretrained(tmp_path / "hf")
    message = "has 1 non-finite value\\(s\\) in bert.encoder.layer.1.output.dense.weight.*pass allow_nonfinite"
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / "hf", BertForMaskedLM)
    loaded = load_pretrained(tmp_path / "hf", BertForMaskedLM, allow_nonfinite=True)
    assert not torch.isfinite(loaded.bert.encoder.layer[1].output.dense.weight).all()


def test_load_our_lightning_checkpoint(tmp_path) -> None:
    model = tiny_mlm()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, HF_CONFIG_KEY: model.config.to_dict()}, tmp_path / "x.ckpt")
    again = load_pretrained(tmp_path / "x.ckpt", BertForMaskedLM)
    assert torch.equal(again.cls.predictions.bias, model.cls.predictions.bias)


@pytest.mark.parametrize("source", ["hf", "x.ckpt"])
def test_the_attention_kernel_reaches_a_loaded_model(tmp_path, source) -> None:
    model = tiny_mlm()
    model.save_pretrained(tmp_path / "hf")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, HF_CONFIG_KEY: model.config.to_dict()}, tmp_path / "x.ckpt")
    assert load_pretrained(tmp_path / source, BertForMaskedLM).config._attn_implementation == "sdpa"
    eager = load_pretrained(tmp_path / source, BertForMaskedLM, **attention_kwargs("eager"))
    assert eager.config._attn_implementation == "eager"


def test_attention_kernels_are_the_two_every_family_has() -> None:
    assert attention_kwargs(None) == {} and attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}
    with pytest.raises(ConfigError, match="unknown attn_implementation 'flash_attention_2'; known: sdpa, eager"):
        attention_kwargs("flash_attention_2")


def test_missing_and_corrupt_checkpoints_name_the_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope.ckpt", BertForMaskedLM)
    corrupt = tmp_path / "bad.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt is corrupt"):
        load_pretrained(corrupt, BertForMaskedLM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty", BertForMaskedLM)


def test_foreign_checkpoint_is_rejected(tmp_path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not written by lightning_merge"):
        load_pretrained(tmp_path / "foreign.ckpt", BertForMaskedLM)


def test_truncated_safetensors_is_a_clear_checkpoint_error(tmp_path) -> None:
    tiny_mlm().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_pretrained(tmp_path / "hf", BertForMaskedLM)


def test_sinusoidal_positions_are_shift_invariant_in_a_seeded_random_basis():
    torch.manual_seed(0)
    table = sinusoidal_positions(64, 16, amplitude=0.1).double()
    gram = table @ table.T
    # inner products depend only on the offset between positions: what makes "attend to my neighbour" easy
    assert torch.allclose(torch.diagonal(gram, 1)[:-1], torch.diagonal(gram, 1)[1:], atol=1e-6)
    assert torch.allclose(torch.diagonal(gram), torch.full((64,), 0.01 * 8, dtype=torch.float64), atol=1e-6)
    torch.manual_seed(0)
    assert torch.equal(sinusoidal_positions(64, 16, amplitude=0.1), table.float())
    torch.manual_seed(1)
    other_seed = sinusoidal_positions(64, 16, amplitude=0.1)
    assert (other_seed - table.float()).abs().max() > 0.05  # another seed, another basis
    with pytest.raises(ConfigError, match="even hidden size"):
        sinusoidal_positions(8, 15, amplitude=0.1)

"""MLMModule: validation metrics, including the context-only gap at [MASK] inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_merge.data.mlm import MLMDataModule
from lightning_merge.data.sources import LocalFilesSource
from lightning_merge.errors import ConfigError
from lightning_merge.modules.mlm import MLMModule

WORDS = "the a fox dog river bank runs jumps over under quick lazy brown green".split()


@pytest.fixture
def datamodule(tmp_path):
    rng = np.random.default_rng(0)
    for name, lines in (("train.txt", 200), ("val.txt", 40)):
        (tmp_path / name).write_text("\n".join(" ".join(rng.choice(WORDS, size=16)) + "." for _ in range(lines)))
    source = LocalFilesSource(str(tmp_path / "train.txt"), str(tmp_path / "val.txt"))
    return MLMDataModule(source, vocab_size=100, block_size=32, batch_size=8, cache_dir=str(tmp_path / "cache"))


def _manual_losses(module: MLMModule, datamodule: MLMDataModule) -> tuple[float, float]:
    module.model.eval()
    all_losses, context_losses = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            losses, masked = module.objective.token_losses(batch)
            all_losses.append(losses)
            context_losses.append(losses[batch["input_ids"][masked] == datamodule.tokenizer.mask_token_id])
    return float(torch.cat(all_losses).mean()), float(torch.cat(context_losses).mean())


def test_validation_logs_loss_unigram_gap_and_context_gap(datamodule, cpu_trainer_kwargs):
    module = MLMModule(preset="tiny", config_overrides=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    trainer = pl.Trainer(**cpu_trainer_kwargs)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    loss, context_loss = _manual_losses(module, datamodule)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert metrics["val/unigram_gap"] == pytest.approx(datamodule.unigram_baseline() - loss, abs=1e-4)
    expected_context_gap = datamodule.unigram_baseline(mask_inputs_only=True) - context_loss
    assert metrics["val/context_gap"] == pytest.approx(expected_context_gap, abs=1e-4)
    # a second validation gives the same numbers: the context metric is reset between epochs
    again = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert again["val/context_gap"] == pytest.approx(metrics["val/context_gap"], abs=1e-6)


def test_sinusoidal_position_init_is_used_and_seeded():
    def positions(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        module = MLMModule(preset="tiny", sinusoidal_positions=0.1, config_overrides=dict(hidden_size=32))
        module.build(vocab_size=100)
        return module.model.bert.embeddings.position_embeddings.weight.detach().double()

    table = positions(0)
    gram = table @ table.T
    assert torch.allclose(torch.diagonal(gram, 3)[:-1], torch.diagonal(gram, 3)[1:], atol=1e-6)
    assert torch.equal(positions(0), table) and not torch.allclose(positions(1), table)


def test_the_attention_kernel_reaches_the_model_and_trains_in_bf16(datamodule, cpu_trainer_kwargs, tmp_path):
    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    default = MLMModule(preset="tiny", config_overrides=small)
    default.build(vocab_size=100)
    assert default.model.config._attn_implementation == "sdpa"
    module = MLMModule(preset="tiny", config_overrides=small, attn_implementation="eager", lr=1e-2, warmup_ratio=0.0)
    trainer = pl.Trainer(max_steps=3, precision="bf16-mixed", num_sanity_val_steps=0, **cpu_trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    assert module.model.config._attn_implementation == "eager"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    module.model.save_pretrained(tmp_path / "hf")  # a model trained with eager attention loads with the default
    continued = MLMModule(init_from=str(tmp_path / "hf"))
    assert continued.model.config._attn_implementation == "sdpa"
    assert MLMModule(init_from=str(tmp_path / "hf"), attn_implementation="eager").model.config._attn_implementation \
        == "eager"


def test_an_unknown_attention_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown attn_implementation 'fast'; known: sdpa, eager"):
        MLMModule(preset="tiny", attn_implementation="fast")

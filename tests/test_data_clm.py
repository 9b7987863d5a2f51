"""CLMDataModule on tiny local files: next-token labels equal to the inputs, a fixed validation set, the unigram
baseline a causal LM is measured against, and a training order that resumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_merge.data.clm import CLMDataModule
from lightning_merge.data.sources import LocalFilesSource

WORDS = "the a fox dog river bank runs jumps over under quick lazy brown green small large near far".split()


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> CLMDataModule:
    root = tmp_path_factory.mktemp("clm")
    rng = np.random.default_rng(0)
    for name, lines in (("train.txt", 400), ("val.txt", 80)):
        (root / name).write_text("\n".join(" ".join(rng.choice(WORDS, size=20)) + "." for _ in range(lines)) + "\n")
    source = LocalFilesSource(str(root / "train.txt"), str(root / "val.txt"))
    dm = CLMDataModule(source, vocab_size=100, block_size=32, batch_size=8, cache_dir=str(root / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_carry_the_inputs_as_labels_and_nothing_is_masked(datamodule) -> None:
    batch = next(iter(datamodule.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert not (batch["input_ids"] == datamodule.tokenizer.mask_token_id).any()
    validation = next(iter(datamodule.val_dataloader()))
    assert torch.equal(validation["labels"], validation["input_ids"])


def test_unigram_baseline_scores_every_next_token_by_training_frequency(datamodule) -> None:
    vocab = len(datamodule.tokenizer)
    counts = np.bincount(datamodule.blocks("train")[:, 1:].ravel(), minlength=vocab)[:vocab] + 1.0
    targets = datamodule.validation_tensors()["labels"][:, 1:].numpy().ravel()
    expected = -np.mean(np.log(counts[targets] / counts.sum()))
    assert math.isclose(datamodule.unigram_baseline(), expected, rel_tol=1e-9)
    with pytest.raises(ValueError, match="no masked inputs"):
        datamodule.unigram_baseline(mask_inputs_only=True)


def test_training_order_follows_the_seed_and_resumes(datamodule) -> None:
    torch.manual_seed(5)
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    expected = next(batches)["input_ids"]
    torch.manual_seed(5)
    resumed = datamodule.train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], expected)

"""The objectives compute the same losses as Hugging Face's heads, only on fewer positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import family_tasks, tiny_batch, tiny_config, tiny_model
from transformers import BertForMaskedLM

from lightning_merge.merge.families import FAMILIES, model_inputs
from lightning_merge.objectives import CausalLMObjective, MaskedLMObjective, SequenceClassificationObjective

MLM_FAMILIES = [name for name, task in family_tasks() if task == "masked_lm"]
CLASSIFIER_FAMILIES = [name for name, task in family_tasks() if task == "sequence_classification"]


@pytest.mark.parametrize("family", MLM_FAMILIES)
def test_masked_lm_loss_equals_hf_loss_over_masked_positions(family) -> None:
    model = tiny_model(family, "masked_lm").eval()
    data = tiny_batch(family)
    generator = torch.Generator().manual_seed(1)
    data["labels"] = torch.where(torch.rand(3, 12, generator=generator) < 0.3, data["input_ids"], -100)
    loss_sum, count = MaskedLMObjective(model)(data)
    assert count == (data["labels"] != -100).sum()
    inputs = model_inputs(data, FAMILIES[family])
    torch.testing.assert_close(loss_sum / count, model(**inputs, labels=data["labels"]).loss, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_equals_hf_loss_over_real_next_tokens() -> None:
    model = tiny_model("gpt2", "causal_lm").eval()
    data = tiny_batch("gpt2")
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    loss_sum, count = CausalLMObjective(model)(data)
    assert count == (data["labels"][:, 1:] != -100).sum() == 11 + 6 + 3
    inputs = model_inputs(data, FAMILIES["gpt2"])
    torch.testing.assert_close(loss_sum / count, model(**inputs, labels=data["labels"]).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", CLASSIFIER_FAMILIES)
def test_classification_and_regression_losses_equal_hf_losses(family) -> None:
    classifier = tiny_model(family, "sequence_classification").eval()
    data = {**tiny_batch(family), "labels": torch.tensor([0, 2, 1])}
    loss_sum, count, logits = SequenceClassificationObjective(classifier)(data)
    assert count == 3 and logits.shape == (3, 3)
    inputs = model_inputs(data, FAMILIES[family])
    torch.testing.assert_close(loss_sum / count, classifier(**inputs, labels=data["labels"]).loss, rtol=1e-5,
                               atol=1e-6)
    regressor = tiny_model(family, "sequence_classification", num_labels=1).eval()
    data = {**tiny_batch(family), "labels": torch.tensor([0.5, 2.0, 4.5])}
    loss_sum, count, _ = SequenceClassificationObjective(regressor)(data)
    torch.testing.assert_close(loss_sum / count, regressor(**inputs, labels=data["labels"]).loss, rtol=1e-5,
                               atol=1e-6)


def test_masked_lm_objective_reads_position_ids():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(num_hidden_layers=1, max_position_embeddings=64)).eval()
    ids = torch.randint(5, 40, (2, 8))
    labels = torch.where(torch.rand(2, 8) < 0.5, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    shifted = {**batch, "position_ids": torch.arange(8).expand(2, 8) + 20}
    objective = MaskedLMObjective(model)
    with torch.no_grad():
        assert not torch.allclose(objective(batch)[0], objective(shifted)[0])
        expected = F.cross_entropy(model(**{k: v for k, v in shifted.items() if k != "labels"}).logits.transpose(1, 2),
                                   labels, reduction="sum")
        assert torch.allclose(objective(shifted)[0], expected, atol=1e-5)

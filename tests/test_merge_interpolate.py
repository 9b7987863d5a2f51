"""Interpolation between state dicts (exact endpoints, ties kept, dtypes kept) and loss barriers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import BertForMaskedLM

from lightning_merge.errors import ArchitectureMismatch, ConfigError
from lightning_merge.merge.interpolate import (
    check_lambdas,
    find_ties,
    interpolate_state_dicts,
    lambda_grid,
    load_state_dict_tied,
    loss_barrier,
)


def tiny_mlm(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config()).eval()


def test_endpoints_exact_and_midpoint_average():
    sd_a, sd_b = tiny_mlm(0).state_dict(), tiny_mlm(1).state_dict()
    for lam, expected in ((0.0, sd_a), (1.0, sd_b)):
        out = interpolate_state_dicts(sd_a, sd_b, lam)
        assert all(torch.equal(out[name], expected[name]) for name in sd_a)
    mid = interpolate_state_dicts(sd_a, sd_b, 0.5)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    torch.testing.assert_close(mid[name], (sd_a[name] + sd_b[name]) / 2)


def test_ties_kept_and_loaded():
    sd_a, sd_b = tiny_mlm(0).state_dict(), tiny_mlm(1).state_dict()
    out = interpolate_state_dicts(sd_a, sd_b, 0.3)
    assert out["cls.predictions.decoder.weight"] is out["bert.embeddings.word_embeddings.weight"]
    assert find_ties(out) == find_ties(sd_a)
    model = tiny_mlm(2)
    load_state_dict_tied(model, out)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, out["cls.predictions.decoder.weight"])


def test_non_float_from_a_and_half_precision_kept():
    sd_a = {"w": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(3)}
    sd_b = {"w": torch.full((3,), 3.0, dtype=torch.bfloat16), "ids": torch.arange(3) + 5}
    out = interpolate_state_dicts(sd_a, sd_b, 0.25)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert out["ids"] is sd_a["ids"]


def test_interpolated_parameters_through_functional_call_equal_a_loaded_model():
    model_a, model_b = tiny_mlm(0), tiny_mlm(1)
    params_a = dict(model_a.named_parameters())  # what the curves pass to functional_call: tied weights once
    direct = interpolate_state_dicts(params_a, {name: model_b.state_dict()[name] for name in params_a}, 0.4)
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        functional = torch.func.functional_call(model_a, direct, (ids,)).logits
        load_state_dict_tied(model_b, interpolate_state_dicts(model_a.state_dict(), model_b.state_dict(), 0.4))
        torch.testing.assert_close(functional, model_b(ids).logits)


def test_mismatched_state_dicts():
    sd_a = tiny_mlm(0).state_dict()
    with pytest.raises(ArchitectureMismatch, match="extra is missing from A"):
        interpolate_state_dicts(sd_a, {**sd_a, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ArchitectureMismatch, match="differ in cls.predictions.bias: shape"):
        interpolate_state_dicts(sd_a, {**sd_a, "cls.predictions.bias": torch.zeros(31)}, 0.5)
    model = tiny_mlm(0)
    bad = dict(sd_a)
    bad["cls.predictions.decoder.weight"] = bad["cls.predictions.decoder.weight"] + 1
    with pytest.raises(ArchitectureMismatch, match="tied weights"):
        load_state_dict_tied(model, bad)


def test_loss_barrier_both_forms():
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 2.0, 3.0, 2.5, 2.0]
    result = loss_barrier(lambdas, losses)
    assert result["barrier"] == pytest.approx(1.5)  # 3.0 - (0.5*1 + 0.5*2)
    assert result["barrier_lambda"] == 0.5
    assert result["barrier_midpoint"] == pytest.approx(1.5)
    assert (result["loss_a"], result["loss_b"]) == (1.0, 2.0)
    flat = loss_barrier(lambdas, [1.0, 1.25, 1.5, 1.75, 2.0])
    assert flat["barrier"] == pytest.approx(0.0)
    assert flat["barrier_midpoint"] == pytest.approx(0.5)  # the midpoint form counts the endpoint gap
    assert loss_barrier([1.0, 0.0, 0.5], [2.0, 1.0, 1.5])["barrier"] == pytest.approx(0.0)  # order free


@pytest.mark.parametrize(
    ("lambdas", "losses", "message"),
    [
        ([0.0, 0.5], [1.0, 1.0], "must contain 1"),
        ([0.5, 1.0], [1.0, 1.0], "must contain 0"),
        ([0.0, 1.0, 1.5], [1.0, 1.0, 1.0], r"within \[0, 1\]"),
        ([0.0, 1.0], [1.0], "one loss per lambda"),
        ([0.0, 1.0, 1.0], [1.0, 1.0, 1.0], "duplicate"),
    ],
)
def test_loss_barrier_validates_grid(lambdas, losses, message):
    with pytest.raises(ConfigError, match=message):
        loss_barrier(lambdas, losses)


def test_lambda_grid():
    grid = lambda_grid(0.05)
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0 and grid[10] == 0.5
    with pytest.raises(ConfigError):
        lambda_grid(0.0)


def test_a_nan_lambda_is_refused():
    with pytest.raises(ConfigError, match="lambdas must be finite numbers in \\[0, 1\\], got nan"):
        check_lambdas([0.0, float("nan"), 1.0])


def test_check_lambdas_before_any_curve():
    from lightning_merge.merge.interpolate import check_lambdas

    assert check_lambdas([0, 0.5, 1]) == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="must contain 1"):
        check_lambdas([0.0, 0.5])


def test_combine_state_dicts_is_exact_at_a_model_a_line_for_two_and_a_weighted_mean():
    from lightning_merge.merge.interpolate import combine_state_dicts

    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 3, generator=generator), "ids": torch.arange(3)} for _ in range(3)]
    for state in states:
        state["tied"] = state["w"]
    assert combine_state_dicts(states, [0, 1, 0])["w"] is states[1]["w"]
    two = combine_state_dicts(states, [0.75, 0, 0.25])
    assert torch.equal(two["w"], interpolate_state_dicts(states[0], states[2], 0.25)["w"])
    three = combine_state_dicts(states, [0.2, 0.3, 0.5])
    expected = 0.2 * states[0]["w"] + 0.3 * states[1]["w"] + 0.5 * states[2]["w"]
    assert torch.allclose(three["w"], expected, atol=1e-6) and three["tied"] is three["w"]
    assert torch.equal(three["ids"], states[0]["ids"])

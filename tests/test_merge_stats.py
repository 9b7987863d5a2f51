"""Streaming statistics: exact sums, Pearson correlation without NaN, memory independent of tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from lightning_merge.errors import ArchitectureMismatch, ConfigError, DataError
from lightning_merge.merge import stats as stats_module
from lightning_merge.merge.spec import spec_from_config
from lightning_merge.merge.stats import MergeStatistics, PairStatistics, correlation_from_moments


def correlated(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_a = torch.randn(n, d, generator=generator) * torch.linspace(0.5, 3, d) + 2.0
    x_b = 0.7 * x_a[:, torch.randperm(d, generator=generator)] + 0.3 * torch.randn(n, d, generator=generator)
    return x_a, x_b


def test_correlation_matches_numpy():
    x_a, x_b = correlated(500, 6)
    stats = PairStatistics(6)
    stats.update(x_a, x_b)
    expected = np.corrcoef(x_a.double().numpy().T, x_b.double().numpy().T)[:6, 6:]
    np.testing.assert_allclose(stats.correlation().numpy(), expected, atol=1e-10)


def test_streaming_and_merge_equal_one_pass():
    x_a, x_b = correlated(300, 5)
    whole, first, second, streamed = (PairStatistics(5) for _ in range(4))
    whole.update(x_a, x_b)
    first.update(x_a[:120], x_b[:120])
    second.update(x_a[120:], x_b[120:])
    for start in range(0, 300, 7):
        streamed.update(x_a[start : start + 7], x_b[start : start + 7])
    first.merge(second)
    for other in (first, streamed):
        for name, value in whole.state_tensors().items():
            torch.testing.assert_close(other.state_tensors()[name], value, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("products", ["float64", "float32"])
def test_one_update_split_into_blocks_gives_the_same_sums(monkeypatch, products):
    x_a, x_b = correlated(300, 5)
    whole = PairStatistics(5, products=products)
    whole.update(x_a, x_b)
    factor = stats_module.FLOAT32_BLOCK_FACTOR if products == "float32" else 1
    monkeypatch.setitem(stats_module.UPDATE_BLOCK_BYTES, "cpu", 8 * 5 * 64 // factor)  # blocks of 64 tokens: 5 of them
    blocked = PairStatistics(5, products=products)
    assert blocked._block_rows() == 64
    blocked.update(x_a, x_b)
    # float32 blocks are shifted by their own means: the same sums up to float32 rounding
    tolerance = dict(rtol=1e-12, atol=1e-9) if products == "float64" else dict(rtol=1e-5, atol=1e-3)
    for name, value in whole.state_tensors().items():
        torch.testing.assert_close(blocked.state_tensors()[name], value, **tolerance)


def test_float32_products_stay_close_to_float64_even_under_autocast():
    x_a, x_b = correlated(3000, 16)  # means of 2: the raw products are larger than the covariances they give
    exact, fast = PairStatistics(16), PairStatistics(16, products="float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the hooks that feed the sums run inside the forward's
        exact.update(x_a, x_b)
        fast.update(x_a, x_b)
    assert all(t.dtype == torch.float64 for t in fast.state_tensors().values())
    torch.testing.assert_close(fast.correlation(), exact.correlation(), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown statistics dtype 'bfloat16'; known: float64, float32"):
        PairStatistics(4, products="bfloat16")


def test_float32_products_survive_a_large_mean_and_constant_features():
    generator = torch.Generator().manual_seed(3)
    x_a = 100.0 + 0.1 * torch.randn(20000, 8, generator=generator)  # a LayerNorm outlier: mean 1000x the spread
    x_b = x_a[:, torch.randperm(8, generator=generator)] + 0.05 * torch.randn(20000, 8, generator=generator)
    x_b[:, 3] = 7.5  # constant: dead in float32 as in float64
    exact, fast = PairStatistics(8), PairStatistics(8, products="float32")
    exact.update(x_a, x_b)
    fast.update(x_a, x_b)
    torch.testing.assert_close(fast.correlation(), exact.correlation(), rtol=0, atol=1e-4)
    assert (fast.correlation()[:, 3] == 0).all()


def test_float32_products_of_tiny_features_do_not_underflow():
    # MiniLM's last LayerNorm leaves features ~1e-32: squared in float32 they underflow, and correlated as unit-variance
    # noise they matched the wrong neurons of a permuted copy
    generator = torch.Generator().manual_seed(4)
    x_a, _ = correlated(4000, 6)
    x_a[:, :2] *= 1e-32
    x_a[:, 2] *= 1e-40  # below float32's normal range: 1/scale would overflow
    perm = torch.randperm(6, generator=generator)
    exact, fast = PairStatistics(6), PairStatistics(6, products="float32")
    exact.update(x_a, x_a[:, perm])
    fast.update(x_a, x_a[:, perm])
    torch.testing.assert_close(fast.correlation(), exact.correlation(), rtol=0, atol=1e-5)
    assert torch.equal(fast.correlation().argmax(1), torch.argsort(perm))


def test_non_finite_features_correlate_zero():
    x_a, x_b = correlated(100, 4)
    x_a[5, 2] = float("inf")
    stats = PairStatistics(4)
    stats.update(x_a, x_b)
    corr = stats.correlation()
    assert (corr[2] == 0).all() and torch.isfinite(corr).all()


def test_dead_and_constant_features_give_zero_not_nan():
    x_a, x_b = correlated(200, 4)
    x_a[:, 1] = 0.0  # dead
    x_b[:, 2] = 3.25  # constant
    stats = PairStatistics(4)
    stats.update(x_a, x_b)
    corr = stats.correlation()
    assert torch.isfinite(corr).all()
    assert (corr[1] == 0).all() and (corr[:, 2] == 0).all()
    assert corr.abs().max() <= 1.0


def test_rectangular_and_bad_shapes():
    stats = PairStatistics(3, 5)
    stats.update(torch.randn(10, 3), torch.randn(10, 5))
    assert stats.correlation().shape == (3, 5)
    with pytest.raises(DataError, match="same N"):
        stats.update(torch.randn(10, 3), torch.randn(9, 5))
    with pytest.raises(DataError, match="width"):
        stats.update(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(DataError, match="no tokens"):
        PairStatistics(3).correlation()


def test_averaged_covariance_over_points():
    x_a, x_b = correlated(400, 4, seed=1)
    y_a, y_b = correlated(400, 4, seed=2)
    p, q = PairStatistics(4), PairStatistics(4)
    p.update(x_a, x_b)
    q.update(y_a, y_b)
    (cov_p, var_ap, var_bp, *_), (cov_q, var_aq, var_bq, *_) = p.moments(), q.moments()
    expected = (cov_p + cov_q) / 2 / torch.outer((var_ap + var_aq) / 2, (var_bp + var_bq) / 2).sqrt()
    torch.testing.assert_close(correlation_from_moments([p.moments(), q.moments()]), expected)
    torch.testing.assert_close(correlation_from_moments([p.moments()]), p.correlation())


def tiny_spec(layers: int = 2):
    return spec_from_config(tiny_config(num_hidden_layers=layers), "BertModel")


def features_for(spec, n: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        group: {p.key: torch.randn(n, spec.groups[group].size, generator=generator) for p in spec.points[group]}
        for group in spec.groups
    }


def test_merge_statistics_memory_is_independent_of_tokens():
    spec = tiny_spec()
    stats = MergeStatistics(spec)
    size = stats.nbytes()
    for seed in range(5):
        stats.update_from_features(features_for(spec, 1000, seed), features_for(spec, 1000, seed + 10))
    assert stats.nbytes() == size
    assert stats.token_count == 5000
    assert stats.correlation("res").shape == (16, 16)
    assert stats.correlation("res", slice(0, 1)).shape == (16, 16)


def test_state_tensors_simulated_all_reduce():
    spec = tiny_spec()
    ranks = [MergeStatistics(spec) for _ in range(2)]
    combined = MergeStatistics(spec)
    for seed, rank in enumerate(ranks):
        feats_a, feats_b = features_for(spec, 50, seed), features_for(spec, 50, seed + 10)
        rank.update_from_features(feats_a, feats_b)
        combined.update_from_features(feats_a, feats_b)
    reduced = {key: sum(rank.state_tensors()[key] for rank in ranks) for key in ranks[0].state_tensors()}
    ranks[0].load_state_tensors(reduced)
    for key, value in combined.state_tensors().items():
        torch.testing.assert_close(ranks[0].state_tensors()[key], value, rtol=1e-12, atol=1e-9)


def test_statistics_from_another_spec_are_refused():
    stats = MergeStatistics(tiny_spec(2))
    with pytest.raises(ArchitectureMismatch, match="statistics and models differ in num_hidden_layers: 2 vs 3"):
        stats.check_spec(tiny_spec(3))
    with pytest.raises(ArchitectureMismatch, match="num_hidden_layers"):
        stats.merge(MergeStatistics(tiny_spec(3)))
    partial = MergeStatistics(tiny_spec(2), groups=["ff.0"])
    with pytest.raises(ConfigError, match="no feature set 'res'"):
        partial.check_spec(tiny_spec(2), ["res"])
    with pytest.raises(ConfigError, match="no feature set 'ff.9'"):
        MergeStatistics(tiny_spec(2), groups=["ff.9"])


def test_state_tensors_are_live_for_in_place_all_reduce():
    spec = tiny_spec()
    rank, other = MergeStatistics(spec), MergeStatistics(spec)
    rank.update_from_features(features_for(spec, 20, 0), features_for(spec, 20, 1))
    other.update_from_features(features_for(spec, 30, 2), features_for(spec, 30, 3))
    for key, tensor in rank.state_tensors().items():
        tensor.add_(other.state_tensors()[key])  # what dist.all_reduce(tensor) does in place
    assert rank.token_count == 50

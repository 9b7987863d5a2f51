"""benchmarks/merge_pipeline.py runs the real merge on random checkpoints and reports every phase (smoke test)."""

from __future__ import annotations

import math

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def merge_pipeline():
    return load_benchmark("merge_pipeline")


def test_one_preset_reports_time_and_memory_of_every_phase(merge_pipeline, tmp_path) -> None:
    model_a, model_b = merge_pipeline._random_models("tiny", 64, tmp_path)
    args = merge_pipeline.parse_args(
        ["--feature-tokens", "512", "--eval-tokens", "256", "--batch-size", "2", "--lambdas", "3",
         "--statistics-batch-size", "1", "--vocab", "64", "--accelerator", "cpu",
         "--preset", "tiny", "--model-a", model_a, "--model-b", model_b,
         "--methods", "vanilla", "ff+attn+res", "weight_matching", "learned[attn=linear,steps=2]"]
    )
    row = merge_pipeline.run_one(args)
    assert row["feature_tokens"] == 512 and row["eval_tokens"] == 256 and row["statistics_batch_size"] == 1
    assert row["curve_points"] == 4 * 3  # four methods, three λ each
    assert set(row["fit_s"]) == {"vanilla", "ff+attn+res", "weight_matching", "learned[attn=linear,steps=2]"}
    assert "| fit `learned[attn=linear,steps=2]` s |" in merge_pipeline.fit_table([row])
    assert all(row[key] > 0 for key in ("statistics_s", "matching_s", "curves_s", "forward_s"))
    phases = [row[f"{phase}_peak_mib"] for phase in ("statistics", "matching", "curves")]
    assert all(not math.isnan(peak) for peak in phases)
    assert row["peak_over_baseline_mib"] == max(row[f"{p}_peak_mib"] for p in merge_pipeline.MERGE_PHASES)
    assert row["memory_target_mib"] == pytest.approx(3 * row["two_models_param_mib"] + row["statistics_mib"])
    assert merge_pipeline.table([row]).count("\n") == 2  # header, rule, one row
    assert row["pair_forwards_s"] > 0 and row["encoder_forwards_s"] > 0 and row["memory_sampled"]
    assert row["statistics_over_forwards"] == pytest.approx(row["statistics_s"] / row["pair_forwards_s"])
    assert row["statistics_over_encoder_forwards"] == pytest.approx(row["statistics_s"] / row["encoder_forwards_s"])


def test_timing_without_memory_sampling_still_reads_each_phase(merge_pipeline, tmp_path) -> None:
    model_a, model_b = merge_pipeline._random_models("tiny", 64, tmp_path)
    args = merge_pipeline.parse_args(
        ["--feature-tokens", "256", "--eval-tokens", "128", "--batch-size", "2", "--lambdas", "2", "--block-size", "32",
         "--vocab", "64", "--accelerator", "cpu", "--preset", "tiny", "--model-a", model_a, "--model-b", model_b,
         "--methods", "vanilla", "ff", "--no-memory-sampling"]
    )
    row = merge_pipeline.run_one(args)
    assert not row["memory_sampled"] and row["eval_tokens"] == 128  # 4 blocks of 32
    assert all(not math.isnan(row[f"{phase}_peak_mib"]) for phase in ("statistics", "curves"))  # read at phase ends

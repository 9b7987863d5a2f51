"""benchmarks/statistics_precision.py on saved token blocks: no corpus and no `datasets` needed (smoke test)."""

from __future__ import annotations

import torch
from conftest import load_benchmark, tiny_config
from safetensors.torch import save_file
from transformers import BertForMaskedLM


def test_saved_blocks_feed_the_comparison_of_float32_with_float64(tmp_path) -> None:
    config = tiny_config()
    for seed in (0, 1):
        torch.manual_seed(seed)
        BertForMaskedLM(config).save_pretrained(tmp_path / f"m{seed}")
    ids = torch.randint(5, 40, (24, 8), generator=torch.Generator().manual_seed(0))
    blocks = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    save_file(blocks, str(tmp_path / "blocks.safetensors"))
    result = load_benchmark("statistics_precision").main([
        "--model-a", str(tmp_path / "m0"), "--model-b", str(tmp_path / "m1"), "--batch-size", "5",
        "--blocks-file", str(tmp_path / "blocks.safetensors"), "--output", str(tmp_path / "out.json"),
    ])
    assert result["tokens"] == 24 * 8
    assert [row["kind"] for row in result["rows"]] == ["ff", "attn", "res"]
    for row in result["rows"]:
        assert row["max_abs_correlation_error"] < 1e-5
        if row["kind"] != "attn":  # one assignment per group: the float64 one is optimal under float64 correlations
            assert row["matched_correlation_float32_perm"] <= row["matched_correlation_float64_perm"] + 1e-9
    assert (result["args"]["blocks"], result["args"]["block_size"]) == (24, 8)  # the file's, not the defaults
    assert (tmp_path / "out.json").exists()

"""benchmarks/joint_statistics.py times the statistics pass over N models and the joint fits (smoke test): the sums
grow with the number of pairs, not with the tokens."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_sums_grow_with_pairs_not_tokens(tmp_path) -> None:
    bench = load_benchmark("joint_statistics")
    output = tmp_path / "joint.json"
    rows = bench.main(["--models", "2,3", "--tokens", "256", "--vocab", "64", "--batch-size", "4",
                       "--output", str(output)])
    two, three = rows
    for row in rows:
        assert row["statistics_bytes"] == row["statistics_4x_bytes"] and row["statistics_s"] > 0
        assert all(row[f"fit_{name}_s"] >= 0 for name in bench.METHODS)
    assert two["statistics_bytes"] == two["pair_bytes"] and three["statistics_bytes"] == 3 * three["pair_bytes"]
    assert json.loads(output.read_text())["rows"][1]["models"] == 3
    assert bench.table(rows).count("\n") == 3  # header, rule, two rows

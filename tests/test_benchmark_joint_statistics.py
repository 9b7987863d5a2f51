"""benchmarks/joint_statistics.py times the statistics pass over N models and the joint fits (smoke test): the sums
grow with the number of pairs, not with the tokens."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_sums_grow_with_pairs_not_tokens(tmp_path) -> None:
    bench = load_benchmark("joint_statistics")
    output = tmp_path / "joint.json"
    # every joint method, each stopped early: iterating to convergence on random models takes ~15 s in all
    methods = ["to_reference", "merge_many[max_rounds=2]", "cycle_consistent[max_iterations=3]",
               "merge_many[by=weights,max_rounds=2]"]
    assert [name.split("[")[0] for name in methods] == [name.split("[")[0] for name in bench.METHODS]
    rows = bench.main(["--models", "2,3", "--tokens", "256", "--vocab", "64", "--batch-size", "4",
                       "--methods", *methods, "--output", str(output)])
    two, three = rows
    for row in rows:
        assert row["statistics_bytes"] == row["statistics_4x_bytes"] and row["statistics_s"] > 0
        assert all(row[f"fit_{name}_s"] >= 0 for name in methods)
    assert two["statistics_bytes"] == two["pair_bytes"] and three["statistics_bytes"] == 3 * three["pair_bytes"]
    assert json.loads(output.read_text())["rows"][1]["models"] == 3
    table = bench.table(rows, methods)
    assert table.count("\n") == 3 and "fit cycle_consistent[max_iterations=3] s" in table  # header, rule, two rows

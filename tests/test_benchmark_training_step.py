"""benchmarks/training_step.py times a training step per attention kernel and precision (smoke test)."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_every_kernel_and_precision_gets_a_row(tmp_path) -> None:
    bench = load_benchmark("training_step")
    output = tmp_path / "step.json"
    rows = bench.main(["--heads", "2", "--vocab", "64", "--block", "8", "--batch-size", "2", "--steps", "1",
                       "--warmup", "1", "--repeat", "1", "--output", str(output)])
    assert [(r["attention"], r["precision"]) for r in rows] == [
        ("sdpa", "float32"), ("sdpa", "bf16-mixed"), ("eager", "float32"), ("eager", "bf16-mixed")]
    assert all(r["step_ms"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    written = json.loads(output.read_text())
    assert written["rows"] == rows and written["meta"]["preset"] == "tiny"
    assert bench.table(rows).count("\n") == 5  # header, rule, four rows

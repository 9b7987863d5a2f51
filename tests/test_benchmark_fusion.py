"""benchmarks/fusion.py times the fusion methods (smoke test): the own Grams add bytes to the statistics, a path's
first merged model is solved or measured and kept, the line has no path, a two-headed point is timed."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_fusion_costs_are_reported(tmp_path) -> None:
    bench = load_benchmark("fusion")
    output = tmp_path / "fusion.json"
    result = bench.main(["--tokens", "256", "--vocab", "64", "--batch-size", "4", "--output", str(output),
                         "--methods", ";".join(["ff+attn+res", "ff+attn+res+regmean",
                                                "ff+attn+res+repair[exact=true,batches=2]", "zip", "zip[layers=1]"])])
    assert result["statistics"]["own_bytes"] > 0 and result["statistics"]["statistics_own_s"] > 0
    rows = {row["method"]: row for row in result["rows"]}
    assert "path_first_s" not in rows["ff+attn+res"] and "path_first_s" not in rows["zip"]
    for name in ("ff+attn+res+regmean", "ff+attn+res+repair[exact=true,batches=2]"):
        assert rows[name]["path_first_s"] > 0 and rows[name]["path_again_s"] > 0
    assert all(row["point_s"] > 0 for row in rows.values())
    assert rows["zip[layers=1]"]["two_headed_point_s"] > 0 and "two_headed_point_s" not in rows["zip"]
    assert json.loads(output.read_text())["rows"][0]["method"] == "ff+attn+res"

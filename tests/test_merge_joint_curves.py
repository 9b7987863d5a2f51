"""The points an N-model merge evaluates and the numbers it reports from their losses."""

from __future__ import annotations

import pytest

from lightning_merge.errors import ConfigError
from lightning_merge.merge.joint_curves import JointPlan
from lightning_merge.report import mean_se


def test_every_method_gets_every_pair_each_model_the_average_and_for_three_a_triangle():
    plan = JointPlan(["vanilla", "ff", "merge_many"], 3, [0.0, 0.5, 1.0], pairwise=["vanilla", "ff"], simplex_steps=3)
    per_method = 3 * 3 + 3 + 1 + 7  # pairs x lambdas, vertices, average, non-vertex grid points of 3 steps
    assert len(plan.points) == 3 * per_method
    ff_lines = {point.basis for _, point in plan.points_of("ff") if point.basis is not None}
    assert ff_lines == {(0, 1), (0, 2), (1, 2)}  # a pairwise method's own fit of each pair
    joint = [point for _, point in plan.points_of("merge_many")]
    assert all(point.basis is None and abs(sum(point.weights) - 1) < 1e-12 for point in joint)
    assert JointPlan(["ff"], 4, [0.0, 1.0], [], simplex_steps=3).simplex_counts() == []  # a triangle is N = 3 only


def test_results_report_barriers_per_pair_and_the_average_against_the_mean_endpoint():
    plan = JointPlan(["m"], 3, [0.0, 0.5, 1.0], pairwise=[], simplex_steps=2)
    vertex_loss = {0: 1.0, 1: 2.0, 2: 3.0}
    losses = []
    for point in plan.points:
        on = [k for k, w in enumerate(point.weights) if w]
        if len(on) == 1:
            losses.append(vertex_loss[on[0]])
        elif len(on) == 2 and point.weights[on[0]] == 0.5:
            losses.append(10.0 if on == [0, 1] else 5.0)  # midpoints of the pairs
        else:
            losses.append(4.0)  # the average and the triangle's interior (none at 2 steps)
    results = plan.results(losses)
    assert results["barriers"]["m"]["0-1"]["barrier"] == pytest.approx(10.0 - 1.5)
    assert results["barriers"]["m"]["1-2"]["barrier"] == pytest.approx(5.0 - 2.5)
    assert results["average"]["m"] == pytest.approx({"loss": 4.0, "mean_endpoint_loss": 2.0, "loss_increase": 2.0})
    assert len(results["simplex"]["m"]["loss"]) == 6 and results["simplex"]["m"]["loss"][:3] == [1.0, 2.0, 3.0]
    mean, error = mean_se([figures["barrier"] for figures in results["barriers"]["m"].values()])
    assert mean == pytest.approx((8.5 + 3.0 + 2.5) / 3) and error > 0


def test_a_negative_grid_is_refused():
    with pytest.raises(ConfigError, match="simplex_steps=-1"):
        JointPlan(["m"], 3, [0.0, 1.0], [], simplex_steps=-1)

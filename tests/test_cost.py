"""The cost accounting of benchmarks/offline_cost.py (compile-only FLOPs, equal-compute
interpolation) on tiny configs: seconds, nothing trained."""

import os
import sys

import pytest
from helpers import ROOT, config

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import offline_cost  # noqa: E402
import xla_cost  # noqa: E402


def _tiny(name, arg, **overrides):
    c = config(name, arg, **{"batch_size": 8, "eval_batch_size": 8, **overrides})
    return c


def test_step_flops_positive_and_no_extra_params():
    cost = xla_cost.step_cost(_tiny("kd_mnist.py", "random,smoke"))
    assert cost["flops"] > 0
    assert cost["extra_params"] == 0 and cost["student_params"] > 0


def test_generator_step_counts_every_student_update():
    one = xla_cost.step_cost(_tiny("dfad_mnist.py", "smoke", **{"generator.s_steps": 1}))
    two = xla_cost.step_cost(_tiny("dfad_mnist.py", "smoke", **{"generator.s_steps": 2}))
    assert two["flops"] > one["flops"] > 0
    # the second student update costs at least a student forward + backward
    assert two["extra_params"] == one["extra_params"] > 0


def test_pool_pass_flops_scale_with_pool_and_not_batch():
    c = _tiny("kd_mnist.py", "random,smoke")
    per8 = xla_cost.teacher_forward_flops(c, batch=8)
    per16 = xla_cost.teacher_forward_flops(c, batch=16)
    assert per8 > 0 and per16 == pytest.approx(per8, rel=0.02)
    small = offline_cost.pool_pass_flops(c, passes=1, images=1000)
    large = offline_cost.pool_pass_flops(c, passes=1, images=2000)
    twice = offline_cost.pool_pass_flops(c, passes=2, images=1000)
    assert large["pool_flops"] == pytest.approx(2 * small["pool_flops"])
    assert twice["pool_flops"] == pytest.approx(2 * small["pool_flops"])
    assert offline_cost.pool_pass_flops(c, passes=0)["pool_flops"] == 0


def test_accuracy_at_equal_compute():
    flops, acc = [10.0, 20.0, 40.0], [0.2, 0.5, 0.7]
    assert offline_cost.accuracy_at(flops, acc, 15.0) == (pytest.approx(0.35), "interpolated")
    assert offline_cost.accuracy_at(flops, acc, 30.0) == (pytest.approx(0.6), "interpolated")
    assert offline_cost.accuracy_at(flops, acc, 20.0) == (pytest.approx(0.5), "interpolated")
    assert offline_cost.accuracy_at(flops, acc, 40.0) == (0.7, "finished")
    assert offline_cost.accuracy_at(flops, acc, 100.0) == (0.7, "finished")
    assert offline_cost.accuracy_at(flops, acc, 5.0) == (None, "before first eval")
    assert offline_cost.accuracy_at([], [], 5.0) == (None, "no eval")
    # the curve a run's eval records give: pool-pass FLOPs + step × step FLOPs
    cost = {"pool_flops": 100.0, "flops": 2.0, "steps": 50}
    assert offline_cost.total_flops(cost) == 200.0
    assert offline_cost.total_flops(cost, 10) == 120.0

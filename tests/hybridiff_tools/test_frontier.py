"""The frontier's speed side: the schedule model on the committed H200 profile, behind one call."""

from pathlib import Path

import pytest

from hybridiff_tools.bench.frontier import batch_linear, predicted_speedups, profile_device
from hybridiff_tools.bench.frontier_cli import parse_lengths

PROFILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "gpu_profile_h200_fp16.json"


def test_no_window_is_predicted_as_cfg_parallel_and_a_window_as_faster():
    device = profile_device(PROFILE, "h200")
    none = predicted_speedups(device, 30, 12, "slope", k=0, window_batch=1)
    assert none["hybrid"] == pytest.approx(none["cfg-parallel"])
    ten = predicted_speedups(device, 30, 12, "slope", k=10, window_batch=1)
    assert ten["hybrid"] > none["hybrid"]


def test_on_a_device_without_batching_gain_the_full_cfg_window_buys_nothing_over_cfg_parallel():
    eager = profile_device(PROFILE, "h200")
    linear = batch_linear(eager, "2x-batch")
    assert linear.compute.forward_b2 == 2 * eager.compute.forward_b1
    assert linear.compute.stages_b2.stage2 == 2 * eager.compute.stages_b1.stage2
    conditional = predicted_speedups(linear, 30, 12, "slope", k=10, window_batch=1)
    full_cfg = predicted_speedups(linear, 30, 12, "slope", k=10, window_batch=2)
    assert full_cfg["hybrid"] <= conditional["cfg-parallel"] < conditional["hybrid"]


def test_window_lengths_parse_with_all_as_every_step():
    assert parse_lengths("4, 2,all", 30) == [2, 4, 30]
    with pytest.raises(ValueError):
        parse_lengths("0,2", 30)

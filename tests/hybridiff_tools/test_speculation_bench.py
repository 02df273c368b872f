"""``hybridiff_tools.bench.speculation``'s pure parts: which steps form the speculative zone, and the summary
of runs side by side (the end-to-end run takes two clusters and minutes: BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from hybridiff.protocol import Phase
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_tools.bench.speculation import summarize, zone


def _stats(phases: list[Phase]) -> pb.GenerateStats:
    return pb.GenerateStats(steps=[pb.StepStat(step=i, phase=p) for i, p in enumerate(phases)])


def test_the_zone_runs_from_after_l_to_the_fill():
    dp, fill, pipe = Phase.DATA_PARALLEL, Phase.PIPELINE_FILL, Phase.PIPELINE
    stats = _stats([dp] * 6 + [fill, pipe, pipe, dp])
    assert [s.step for s in zone(stats, l_slope=3)] == [4, 5, 6]
    # no window (tau1 decided too late): every step after L could have opened it
    assert [s.step for s in zone(_stats([dp] * 6), l_slope=3)] == [4, 5]


def _row(image: bytes, steps: int, control: float) -> dict:
    return {
        "latency_seconds": 1.0,
        "zone_steps": steps,
        "zone_control_seconds": control,
        "zone_worker_waits_seconds": control,
        "zone_compute_seconds": 0.01 * steps,
        "image": image,
    }


def test_the_summary_is_per_zone_step_and_compares_the_images():
    runs = {
        "on": [_row(b"a", 4, 0.004), _row(b"b", 6, 0.006)],
        "off": [_row(b"a", 4, 0.008), _row(b"b", 6, 0.012)],
    }
    result = summarize(runs)
    assert result["on"]["zone_steps"] == 10
    assert result["on"]["zone_control_ms_per_step"] == pytest.approx(1.0)
    assert result["off"]["zone_control_ms_per_step"] == pytest.approx(2.0)
    assert result["identical_images"] is True
    runs["off"][1]["image"] = b"c"
    assert summarize(runs)["identical_images"] is False

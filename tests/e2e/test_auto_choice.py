"""Cost-aware AUTO through a real local cluster: the schedule AUTO chose, from the costs the
workers measured and the model's calibration, and its predicted latency are in the stats."""

from __future__ import annotations

import shutil

import pytest
from cluster_helpers import make_input, send, wait_until

from hybridiff.calibration import Calibration, PolicyCalibration, write_calibration
from hybridiff.client import DiffusionClient
from hybridiff.protocol import Mode, WindowGuidance
from hybridiff_launch.local_cluster import LocalCluster

STEPS = 8
CALIBRATION = Calibration(
    floor_db=45.0,
    num_steps=STEPS,
    guidance_scale=5.0,
    policies={
        WindowGuidance.CONDITIONAL: PolicyCalibration({1: 52.0, 2: 47.0, 3: 44.0}),
        WindowGuidance.FULL_CFG: PolicyCalibration({1: 60.0, 4: 50.0, 5: 46.0}),
    },
)


def test_auto_without_a_calibration_says_so_and_still_predicts(sdxl_cluster, otlp):
    raw = make_input(prompt="a red circle", num_steps=4, seed=3, request_id="auto-choice-1")
    resp = send(DiffusionClient(sdxl_cluster.address), raw, 120)
    choice = resp.stats.auto_choice
    assert resp.stats.HasField("auto_choice") and choice.mode == resp.stats.mode_used == Mode.HYBRID
    assert choice.basis == "no calibration: HYBRID as before"
    assert 0 < choice.predicted_seconds and choice.single_seconds > 0 and choice.cfg_parallel_seconds > 0
    assert any("no calibration" in note for note in resp.stats.notes)

    def auto_span():
        return next(
            (
                s["attributes"]
                for s in otlp.snapshot()
                if s["name"] == "hybridiff.generate"
                and s["attributes"].get("hybridiff.request_id") == "auto-choice-1"
            ),
            None,
        )

    wait_until(lambda: auto_span() is not None, 20, "the request's span")
    span = auto_span()
    assert span["hybridiff.auto.mode"] == "hybrid" and span["hybridiff.auto.window_guidance"] == "conditional"
    assert span["hybridiff.auto.predicted_seconds"] == pytest.approx(choice.predicted_seconds)
    named = send(
        DiffusionClient(sdxl_cluster.address),
        make_input(prompt="a red circle", num_steps=4, seed=3, mode="cfg-parallel"),
        120,
    )
    assert not named.stats.HasField("auto_choice")  # a named mode is not AUTO's


@pytest.mark.slow  # a calibrated cluster of its own (~15 s)
def test_auto_runs_the_schedule_it_chose_within_the_calibration(model_dirs, tmp_path):
    model = shutil.copytree(model_dirs["sdxl"], tmp_path / "calibrated")
    write_calibration(model, CALIBRATION)
    with LocalCluster(model, workers=2, policy="latency", log_dir=tmp_path / "logs") as cluster:
        client = DiffusionClient(cluster.address)
        raw = make_input(prompt="a red circle", num_steps=STEPS, seed=5, tau_cap=2)
        for _ in range(2):  # the second runs on costs refined by the first's steps
            resp = send(client, raw, 300)
            stats, choice = resp.stats, resp.stats.auto_choice
            assert choice.basis == "measured costs and calibration" and choice.predicted_seconds > 0
            assert choice.mode == stats.mode_used
            if choice.window_guidance:
                assert stats.window_guidance == choice.window_guidance
                longest = CALIBRATION.max_window(WindowGuidance(choice.window_guidance), STEPS)
                assert stats.tau2 - stats.tau1 + 1 <= longest
            if choice.mode == Mode.HYBRID:
                assert stats.tau2 <= stats.tau1 + choice.k
            assert not any("AUTO" in note for note in stats.notes)

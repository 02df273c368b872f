"""AUTO in one process (``hybridiff run``): with the model's calibration, the schedule cost-aware
AUTO chose from the split planner's measured costs; without one, HYBRID as before."""

from __future__ import annotations

import pytest
from cluster_helpers import make_input

from hybridiff.calibration import Calibration, PolicyCalibration
from hybridiff.protocol import Mode, WindowGuidance

STEPS = 6
CALIBRATION = Calibration(
    45.0,
    STEPS,
    5.0,
    {
        WindowGuidance.CONDITIONAL: PolicyCalibration({1: 50.0, 2: 46.0, 3: 40.0}),
        WindowGuidance.FULL_CFG: PolicyCalibration({1: 60.0, 3: 47.0}),
    },
)


@pytest.fixture()
def calibrated_engine(engines):
    engine = engines["sdxl"]
    engine.adapter.calibration = CALIBRATION
    yield engine
    engine.adapter.calibration = None


def test_auto_runs_the_chosen_schedule_in_process(calibrated_engine):
    spec = calibrated_engine.resolve(make_input(prompt="a red circle", num_steps=STEPS, seed=2, tau_cap=2))
    stats = calibrated_engine.generate(spec).stats
    choice = stats.auto_choice
    assert choice is not None and choice.basis == "measured costs and calibration"
    assert stats.mode_used == choice.mode and choice.predicted_seconds > 0
    if choice.schedule.window_guidance is not None:
        assert stats.window_guidance == choice.schedule.window_guidance
        assert stats.tau2 - stats.tau1 + 1 <= CALIBRATION.max_window(choice.schedule.window_guidance, STEPS)
    assert stats.to_dict()["auto_choice"]["mode"] == choice.to_dict()["mode"]


def test_auto_without_a_calibration_is_hybrid_in_process(engines):
    spec = engines["sdxl"].resolve(make_input(prompt="a red circle", num_steps=3, seed=2))
    stats = engines["sdxl"].generate(spec).stats
    assert stats.mode_used == Mode.HYBRID and stats.auto_choice is None

"""The calibration record: the longest window above the floor, scaled to a request's steps, and
the record kept beside the model's defaults."""

import json

import pytest

from hybridiff.calibration import (
    Calibration,
    CalibrationError,
    PolicyCalibration,
    read_calibration,
    write_calibration,
)
from hybridiff.protocol import WindowGuidance


def test_the_longest_window_stops_at_the_first_length_below_the_floor():
    measured = PolicyCalibration({2: 52.0, 4: 46.0, 6: 44.0, 8: 45.5})
    assert measured.max_window(45.0) == 4  # 8 is above again, but after 6 fell below: noise
    assert measured.max_window(53.0) == 0
    assert measured.max_window(40.0) == 8


def test_the_window_scales_down_with_fewer_steps_never_up_and_unknown_policies_get_none():
    calibration = Calibration(
        45.0,
        30,
        5.0,
        {
            WindowGuidance.CONDITIONAL: PolicyCalibration({6: 46.0, 9: 45.1}),
            WindowGuidance.FULL_CFG: PolicyCalibration({2: 60.0, 30: 55.0}),
        },
    )
    assert calibration.max_window(WindowGuidance.CONDITIONAL, 30) == 9
    assert calibration.max_window(WindowGuidance.CONDITIONAL, 50) == 9  # not 15: never scaled up
    assert calibration.max_window(WindowGuidance.CONDITIONAL, 10) == 3
    assert calibration.max_window(WindowGuidance.CONDITIONAL, 30, floor_db=46.0) == 6
    assert calibration.max_window(WindowGuidance.FULL_CFG, 50) == 50  # every length kept: any window
    assert calibration.max_window(WindowGuidance.LAST_DIFFERENCE, 30) == 0


def test_written_beside_the_defaults_and_read_back(tmp_path):
    (tmp_path / "hybridiff.json").write_text(json.dumps({"defaults": {"steps": 30}}))
    calibration = Calibration(
        45.0,
        30,
        5.0,
        {
            WindowGuidance.FULL_CFG: PolicyCalibration({29: 47.25}),
            WindowGuidance.CONDITIONAL: PolicyCalibration({2: 50.0}),
        },
        prompts=3,
        seeds=2,
        pipeline_db=43.7,
    )
    write_calibration(tmp_path, calibration)
    document = json.loads((tmp_path / "hybridiff.json").read_text())
    assert document["defaults"] == {"steps": 30}
    assert document["calibration"]["policies"]["full-cfg"] == {"psnr_db": {"29": 47.25}}
    assert document["calibration"]["pipeline"] == {"psnr_db": 43.7}
    assert read_calibration(tmp_path) == calibration and not calibration.pipeline_allowed()
    assert calibration.pipeline_allowed(floor_db=40.0)


def test_pipeline_is_allowed_only_as_measured():
    record = {"num_inference_steps": 30, "guidance_scale": 5.0, "policies": {}}
    assert Calibration.from_json(record).pipeline_db is None  # an older record: never allowed
    assert not Calibration.from_json(record).pipeline_allowed(floor_db=0.0)
    assert Calibration.from_json({**record, "pipeline": {"psnr_db": 47.0}}).pipeline_allowed()
    with pytest.raises(CalibrationError, match="pipeline"):
        Calibration.from_json({**record, "pipeline": {"psnr_db": "nan"}})


def test_a_missing_record_is_none_and_a_broken_one_is_refused(tmp_path):
    assert read_calibration(tmp_path) is None
    (tmp_path / "hybridiff.json").write_text(json.dumps({"defaults": {}}))
    assert read_calibration(tmp_path) is None
    (tmp_path / "hybridiff.json").write_text(json.dumps({"calibration": {"policies": {}}}))
    with pytest.raises(CalibrationError, match="num_inference_steps"):
        read_calibration(tmp_path)
    bad = {
        "num_inference_steps": 30,
        "guidance_scale": 5,
        "policies": {"conditional": {"psnr_db": {"0": 50}}},
    }
    (tmp_path / "hybridiff.json").write_text(json.dumps({"calibration": bad}))
    with pytest.raises(CalibrationError, match="lengths"):
        read_calibration(tmp_path)


def test_a_policy_this_version_does_not_know_is_skipped():
    record = {
        "num_inference_steps": 30,
        "guidance_scale": 5.0,
        "policies": {"from-the-future": {"psnr_db": {"3": 50}}, "conditional": {"psnr_db": {"3": 50}}},
    }
    assert set(Calibration.from_json(record).policies) == {WindowGuidance.CONDITIONAL}


def test_the_window_opening_is_recorded_scaled_to_the_request_and_capped_at_tau_cap(tmp_path):
    """Where the slope rule opened the window on the calibration's images: AUTO prices windows
    from there, scaled to a request's steps; at or past the request's tau_cap, from tau_cap."""
    calibration = Calibration(
        45.0, 30, 5.0, {WindowGuidance.FULL_CFG: PolicyCalibration({30: 60.0})}, tau1=13
    )
    assert calibration.expected_tau1(30, 25) == (13, "slope")
    assert calibration.expected_tau1(50, 25) == (22, "slope")  # 13 of 30 steps, scaled to 50
    assert calibration.expected_tau1(30, 10) == (10, "tau_cap")
    assert Calibration(45.0, 30, 5.0, {}).expected_tau1(30, 25) == (25, "tau_cap")  # not recorded
    write_calibration(tmp_path, calibration)
    assert json.loads((tmp_path / "hybridiff.json").read_text())["calibration"]["tau1"] == 13
    assert read_calibration(tmp_path) == calibration
    record = calibration.to_json()
    for bad in (30, -1, "x"):
        with pytest.raises(CalibrationError, match="tau1|invalid"):
            Calibration.from_json({**record, "tau1": bad})


def test_the_window_opening_crosses_the_worker_wire():
    from hybridiff.calibration_wire import calibration_from_proto, calibration_to_proto

    calibration = Calibration(
        45.0, 30, 5.0, {WindowGuidance.CONDITIONAL: PolicyCalibration({2: 50.0})}, tau1=13
    )
    assert calibration_from_proto(calibration_to_proto(calibration)) == calibration
    unrecorded = Calibration(45.0, 30, 5.0, {})
    assert calibration_from_proto(calibration_to_proto(unrecorded)).tau1 is None
    forged = calibration_to_proto(calibration)
    forged.tau1 = 99  # not a step of its 30: not used
    assert calibration_from_proto(forged).tau1 is None


def _at(steps: int, conditional_k: int, tau1: int | None = None) -> Calibration:
    return Calibration(
        45.0, steps, 5.0, {WindowGuidance.CONDITIONAL: PolicyCalibration({conditional_k: 46.0})}, tau1=tau1
    )


def test_a_request_is_judged_by_the_calibration_at_the_fewest_steps_not_below_its_own(tmp_path):
    """Calibrated at 30 and 50 steps: 30 steps or fewer from the 30-step record (scaled down), 31
    to 50 from the 50-step one, more than 50 from the 50-step one (kept, never scaled up)."""
    both = _at(50, 10, tau1=22).merged(_at(30, 8, tau1=13))
    assert [c.num_steps for c in both.at_other_steps] == [30]
    assert both.for_steps(30).num_steps == 30 and both.for_steps(20).num_steps == 30
    assert both.for_steps(40).num_steps == 50 and both.for_steps(80).num_steps == 50
    assert both.for_steps(40).max_window(WindowGuidance.CONDITIONAL, 40) == 8  # 10 of 50, scaled down
    assert both.for_steps(80).max_window(WindowGuidance.CONDITIONAL, 80) == 10
    assert both.for_steps(30).at_other_steps == () and both.for_steps(30).tau1 == 13
    # written and read back as one record; a newer calibration at 30 steps replaces the older one
    write_calibration(tmp_path, both)
    assert read_calibration(tmp_path) == both
    again = _at(30, 6).merged(read_calibration(tmp_path))
    assert again.num_steps == 30 and [c.num_steps for c in again.at_other_steps] == [50]


def test_calibrations_at_other_steps_cross_the_worker_wire_one_level_deep():
    from hybridiff.calibration_wire import calibration_from_proto, calibration_to_proto

    both = _at(50, 10, tau1=22).merged(_at(30, 8, tau1=13))
    assert calibration_from_proto(calibration_to_proto(both)) == both
    forged = calibration_to_proto(both)
    forged.at_other_steps[0].at_other_steps.add().CopyFrom(calibration_to_proto(_at(10, 9)))
    assert calibration_from_proto(forged) == both  # a nested one is not followed


def test_a_request_between_two_records_takes_the_stricter_and_opens_no_earlier_than_l_slope():
    """31 steps, between a 30-step record (refreshed-difference kept to 13 steps) and a 50-step one
    (every length): 13, not 31, since the 30-step record measured longer windows below the floor.
    PIPELINE needs every record the request is judged by. The expected opening never precedes
    l_slope (the slope rule decides nothing earlier)."""
    rd = WindowGuidance.REFRESHED_DIFFERENCE
    at_30 = Calibration(
        45.0, 30, 5.0, {rd: PolicyCalibration({13: 47.0, 16: 44.5})}, pipeline_db=44.0, tau1=15
    )
    at_50 = Calibration(
        45.0, 50, 5.0, {rd: PolicyCalibration({25: 47.6, 50: 45.3})}, pipeline_db=46.0, tau1=20
    )
    both = at_50.merged(at_30)
    assert [c.num_steps for c in both.judging(31)] == [50, 30]
    assert both.max_window(rd, 31) == 13 and both.max_window(rd, 50) == 50 and both.max_window(rd, 30) == 13
    assert both.max_window(rd, 80) == 80  # past the most steps: the 50-step record, every length
    assert both.pipeline_allowed(num_steps=50) and not both.pipeline_allowed(num_steps=40)
    assert both.expected_tau1(40, 25) == (16, "slope")  # the nearest at or above: 20 of 50
    assert both.expected_tau1(10, 25, l_slope=8) == (8, "slope")  # 15 of 30 scaled to 5: not before 8
    assert both.expected_tau1(10, 8, l_slope=8) == (8, "tau_cap")


@pytest.mark.parametrize("bad", [float("inf"), True, 13.9, "13"])
def test_tau1_must_be_an_integer_step(bad):
    record = {"num_inference_steps": 30, "guidance_scale": 5.0, "policies": {}, "tau1": bad}
    with pytest.raises(CalibrationError):
        Calibration.from_json(record)
    nested = {"num_inference_steps": 50, "guidance_scale": 5.0, "policies": {}, "at_other_steps": [record]}
    with pytest.raises(CalibrationError):
        Calibration.from_json(nested)


def test_records_at_other_steps_are_read_one_level_deep():
    deep: dict = {"num_inference_steps": 10, "guidance_scale": 5.0, "policies": {}}
    for _ in range(3000):  # a forged nesting: not followed, however deep
        deep = {"num_inference_steps": 10, "guidance_scale": 5.0, "policies": {}, "at_other_steps": [deep]}
    record = {"num_inference_steps": 30, "guidance_scale": 5.0, "policies": {}, "at_other_steps": [deep]}
    calibration = Calibration.from_json(record)
    assert [c.num_steps for c in calibration.at_other_steps] == [10]
    assert calibration.at_other_steps[0].at_other_steps == ()

"""``hybridiff calibrate`` on a tiny model: the record is written beside the defaults, read back,
and holds real measurements (a longer conditional window strays further from exact CFG; a
one-step full-CFG window is its synchronous fill, exact CFG itself)."""

import json
import shutil

import pytest

from hybridiff.calibration import Calibration, PolicyCalibration, read_calibration, write_calibration
from hybridiff.protocol import WindowGuidance
from hybridiff_tools.bench.calibrate import main
from hybridiff_tools.bench.frontier import IDENTICAL_DB

STEPS = 6
# The slope rule fires at step 1 (eps 1: any non-negative slope), so the window opens at step 2
# and a window of k steps is exactly k steps long; k=all (6) is clamped to the last step.
DEFAULTS = {
    "steps": STEPS,
    "guidance_scale": 5.0,
    "hybrid": {"l_slope": 1, "eps_slope": 1.0, "k": 3, "tau_cap": 3},
}


@pytest.mark.slow(reason="10 tiny-model images on the in-process engine: 4-9 s on the shared 2-core VM")
def test_calibrate_records_measured_psnr_in_the_models_file(model_dirs, tmp_path, capsys):
    model = shutil.copytree(model_dirs["sdxl"], tmp_path / "model")
    (model / "hybridiff.json").write_text(json.dumps({"defaults": DEFAULTS, "_why": "kept"}))

    assert main(["--model", str(model), "--prompts", "1", "--seeds", "1", "--lengths", "1,2,all"]) == 0

    document = json.loads((model / "hybridiff.json").read_text())
    assert document["defaults"] == DEFAULTS and document["_why"] == "kept"
    calibration = read_calibration(model)
    assert calibration.num_steps == STEPS and calibration.guidance_scale == 5.0
    assert (calibration.prompts, calibration.seeds) == (1, 1)
    assert calibration.extra["command"].startswith("hybridiff calibrate --model ")
    assert set(calibration.policies) == set(WindowGuidance)
    for measured in calibration.policies.values():
        assert set(measured.psnr_db) == {1, 2, STEPS}
    conditional = calibration.policies[WindowGuidance.CONDITIONAL].psnr_db
    assert conditional[STEPS] < conditional[2] < conditional[1] < IDENTICAL_DB
    assert calibration.policies[WindowGuidance.FULL_CFG].psnr_db[1] == IDENTICAL_DB
    assert calibration.policies[WindowGuidance.FULL_CFG].psnr_db[STEPS] < IDENTICAL_DB
    assert calibration.extra["window_steps"]["conditional"] == {"1": 1.0, "2": 2.0, str(STEPS): 4.0}
    assert "longest window above the floor" in capsys.readouterr().out


def _frontier_json(model_dir, pipeline_db: float | None = 44.0) -> dict:
    from hybridiff_tools.bench.frontier import Measurement, ScoredImage

    def image(seed, k, db):
        return ScoredImage("p", seed, "conditional", k, db, 0.99, None, 12, "slope", k, 1, 1.0)

    measured = Measurement(
        30, 5.0, [2, 4], [image(1, 2, 50.0), image(2, 2, 46.0), image(1, 4, 47.0), image(2, 4, 41.0)]
    )
    for seed in (1, 2):
        measured.exact[("p", seed)] = {"cfg_parallel_denoise": 1.0, "adheres": None}
        if pipeline_db is not None:
            measured.exact[("p", seed)]["pipeline_psnr_db"] = pipeline_db + seed
    return {"command": "hybridiff frontier", "model_dir": str(model_dir), "raw": measured.to_json()}


def test_a_frontier_run_is_recorded_as_the_models_calibration(model_dirs, tmp_path, capsys):
    """``--from-frontier``: the frontier's larger sample (the default model's 8 held-out prompts x 4
    seeds) becomes the record, worst image kept, without measuring again."""
    model = shutil.copytree(model_dirs["sdxl"], tmp_path / "model")
    (model / "hybridiff.json").write_text(json.dumps({"defaults": DEFAULTS}))
    run = tmp_path / "frontier.json"
    run.write_text(json.dumps(_frontier_json(model)))
    at_50 = Calibration(45.0, 50, 5.0, {WindowGuidance.CONDITIONAL: PolicyCalibration({10: 46.0})})
    write_calibration(model, at_50)

    assert main(["--model", str(model), "--from-frontier", str(run)]) == 0

    calibration = read_calibration(model)
    assert calibration.at_other_steps == (at_50,)  # the 50-step record is kept beside it
    assert calibration.tau1 == 12  # where the slope rule opened the frontier's windows
    assert calibration.policies[WindowGuidance.CONDITIONAL].psnr_db == {2: 46.0, 4: 41.0}
    assert calibration.policies[WindowGuidance.CONDITIONAL].max_window(45.0) == 2
    assert (calibration.num_steps, calibration.prompts, calibration.seeds) == (30, 1, 2)
    assert calibration.pipeline_db == 45.0 and calibration.pipeline_allowed()
    assert calibration.extra["command"].startswith("hybridiff frontier, recorded by hybridiff calibrate")
    assert json.loads((model / "hybridiff.json").read_text())["defaults"] == DEFAULTS


def test_a_frontier_of_another_model_or_without_pipeline_is_refused(model_dirs, tmp_path, capsys):
    model = shutil.copytree(model_dirs["sdxl"], tmp_path / "model")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_frontier_json(tmp_path / "elsewhere")))
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_frontier_json(model, pipeline_db=None)))

    assert main(["--model", str(model), "--from-frontier", str(other)]) == 2
    assert main(["--model", str(model), "--from-frontier", str(old)]) == 2
    assert read_calibration(model) is None or "recorded by" not in read_calibration(model).extra.get(
        "command", ""
    )
    err = capsys.readouterr().err
    assert "not " + str(model) in err and "no PIPELINE images" in err

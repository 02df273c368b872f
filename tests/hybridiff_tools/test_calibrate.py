"""``hybridiff calibrate`` on a tiny model: the record is written beside the defaults, read back,
and holds real measurements (a longer conditional window strays further from exact CFG; a
one-step full-CFG window is its synchronous fill, exact CFG itself)."""

import json
import shutil

import pytest

from hybridiff.calibration import read_calibration
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

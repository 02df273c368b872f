"""``hybridiff predict``: AUTO's choice on a recorded GPU profile with a model's calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hybridiff.calibration import Calibration, PolicyCalibration, write_calibration
from hybridiff.protocol import WindowGuidance
from hybridiff_launch.cli import main
from hybridiff_launch.model_dirs import EMBEDDED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "docs" / "benchmarks" / "gpu_profile_h200_fp16_cudagraphs.json"
FULL, COND = WindowGuidance.FULL_CFG, WindowGuidance.CONDITIONAL


@pytest.fixture()
def calibrated_model(tmp_path) -> Path:
    """The default model's defaults with the calibration measured on it: PIPELINE's 47-step
    FULL_CFG run keeps 47.2 dB; a 10-step CONDITIONAL window falls to 38.5 dB."""
    shutil.copy(EMBEDDED_MODEL_DIR / "hybridiff.json", tmp_path / "hybridiff.json")
    policies = {
        FULL: PolicyCalibration({2: 62.0, 25: 50.1, 47: 47.2}),
        COND: PolicyCalibration({2: 53.0, 5: 46.1, 10: 38.5}),
    }
    write_calibration(tmp_path, Calibration(45.0, 50, 5.0, policies))
    return tmp_path


def predict(capsys, *argv: str) -> dict:
    assert main(["predict", "--profile", str(PROFILE), "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_chooses_batch_two_windows_for_sdxl_on_the_h200(calibrated_model, capsys):
    out = predict(capsys, "--arch", "sdxl", "--model", str(calibrated_model))
    assert out["calibrated"] and out["choice"]["mode"] == "pipeline"
    assert out["choice"]["window_guidance"] == "full-cfg" and out["choice"]["window_steps"] == 47
    assert out["speedup_vs_single"] == pytest.approx(1.837, abs=0.005)
    assert out["speedup_vs_cfg_parallel"] > 1.15


def test_predict_keeps_sd3_on_batch_one_windows(calibrated_model, capsys):
    out = predict(capsys, "--arch", "sd3", "--model", str(calibrated_model))
    assert out["choice"]["mode"] == "hybrid" and out["choice"]["window_guidance"] == "conditional"
    assert (
        out["choice"]["window_steps"] == 5 and out["speedup_vs_single"] > out["speedup_vs_cfg_parallel"] > 1
    )


def test_predict_defaults_to_the_embedded_model_and_prints_text(capsys):
    out = predict(capsys, "--arch", "sdxl")
    assert out["model"] == str(EMBEDDED_MODEL_DIR) and {"choice", "speedup_vs_single"} <= set(out)
    assert (out["choice"]["basis"] == "no calibration: HYBRID as before") == (not out["calibrated"])
    assert main(["predict", "--profile", str(PROFILE), "--arch", "sd3", "--steps", "30"]) == 0
    text = capsys.readouterr().out
    assert "AUTO:" in text and "x one worker" in text and "30 steps" in text


def test_a_profile_without_the_arch_is_an_invalid_argument(tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"link": {}, "models": {}}))
    assert main(["predict", "--profile", str(bad), "--arch", "sdxl"]) == 2
    assert "no usable sdxl costs" in capsys.readouterr().err

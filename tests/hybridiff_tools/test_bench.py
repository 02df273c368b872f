"""``hybridiff bench`` end to end on the tiny model: the JSON is complete and consistent."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # a bench of every mode through a cluster (~45 s)
def test_bench_json_is_complete_and_consistent(model_dirs, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybridiff_launch.cli",
            "bench",
            "--model-dir",
            str(model_dirs["sdxl"]),
            "--prompts",
            "2",
            "--repeats",
            "1",
            "--steps",
            "8",
            "--tau-cap",
            "3",
            "--k",
            "3",
            "--out-dir",
            str(out),
            "--quiet",
            "--adherence-seeds",
            "1",
            "--adherence-steps",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    modes = result["modes"]
    assert set(modes) == {"single", "cfg-parallel", "pipeline", "hybrid", "hybrid-last-difference", "auto"}
    # AUTO's choice is reported (the tiny model has no calibration: today's HYBRID, k kept)
    choice = modes["auto"]["auto_choice"]
    assert choice["mode"] == "hybrid" and choice["k"] == 3 and choice["predicted_seconds"] > 0
    assert modes["auto"]["auto_choices"] == {"hybrid conditional k=3": 2}
    assert all(m["auto_choice"] is None for name, m in modes.items() if name != "auto")
    single = modes["single"]
    for name, m in modes.items():
        assert m["runs"] == 2 and len(m["latencies"]) == 2
        # speedups are latency ratios; efficiency is measured over ideal
        assert m["speedup"] == pytest.approx(single["latency_median"] / m["latency_median"])
        assert 0 < m["denoising_median"] < m["latency_median"]
        assert m["denoising_speedup"] == pytest.approx(single["denoising_median"] / m["denoising_median"])
        assert m["ideal_speedup"] == pytest.approx(single["ideal_latency_median"] / m["ideal_latency_median"])
        assert m["efficiency"] == pytest.approx(m["speedup"] / m["ideal_speedup"])
        assert m["latency_min"] <= m["latency_median"] <= m["latency_max"]
        assert 0 < m["system_efficiency"] <= 1.0
        assert m["psnr_vs_single"] is not None and m["ssim_vs_single"] is not None
    assert single["psnr_vs_single"] == float("inf") and single["bytes_per_request"] == 0
    assert modes["cfg-parallel"]["psnr_vs_single"] >= 45
    assert modes["hybrid"]["tau1"] == [3] and modes["hybrid"]["tau2"] == [6]
    assert modes["hybrid"]["bytes_per_step_by_phase"]["data-parallel"] > 0
    # the ideal comes from the reported compute times: SINGLE's ideal is its steps at batch-2 cost
    c = result["compute_seconds"]
    assert c["b1"] > 0 and c["b2"] > 0 and c["stage1_b1"] > 0 and c["stage2_b1"] > 0
    assert single["ideal_latency_median"] >= 8 * c["b2"]
    assert result["diffusers_reference"]["psnr_vs_single"] >= 45
    for png in ("latency.png", "rel_mae.png", "timeline_hybrid.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert "hybrid" in proc.stdout and "speedup" in proc.stdout
    # the example stats speak the JSON edge: enums by their labels
    example = result["example_hybrid_stats"]
    assert example["mode_used"] == "hybrid" and example["window_guidance"] == "conditional"
    assert (example["tau1"], example["tau2"]) == (3, 6)
    phases = [s["phase"] for s in example["steps"]]
    assert phases == ["data-parallel"] * 3 + ["pipeline-fill"] + ["pipeline"] * 3 + ["data-parallel"]
    # the quality pass on the trained default model: adherence per mode and window policy
    adherence = result["adherence"]["variants"]
    assert set(adherence) == set(modes)
    for name, a in adherence.items():
        assert a["n"] == 8 and 0 <= a["accuracy"] <= 1
        assert set(a["attributes"]) == {"colour", "shape", "position"}
    assert adherence["cfg-parallel"]["psnr_vs_cfg_parallel"] == float("inf")
    assert adherence["single"]["psnr_vs_cfg_parallel"] >= 45
    assert "adherence" in proc.stdout

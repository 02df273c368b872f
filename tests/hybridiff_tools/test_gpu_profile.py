"""The GPU profile script, run on CPU with tiny configs of the same structure."""

from __future__ import annotations

import json

import pytest
import torch

from hybridiff_tools.bench import gpu_profile
from hybridiff_tools.bench.perfmodel import LinkModel, ScheduleParams, predict_modes

MODES = ("single", "cfg-parallel", "pipeline", "hybrid")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_profile") / "profile.json"
    threads = torch.get_num_threads()
    # one thread times steadily on a shared machine (as the benchmark pins one per worker)
    torch.set_num_threads(1)
    try:
        rc = gpu_profile.main(
            ["--device", "cpu", "--tiny", "--warmup", "1", "--repeats", "3", "--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(out.read_text())


def test_json_is_complete(run):
    assert run["schema"] == "hybridiff.gpu_profile/1"
    assert run["device"]["type"] == "cpu" and run["device"]["dtype"] == "float32"
    assert run["link"] == {"bandwidth": 25e9, "latency": 250e-6, "copies": 2}
    assert set(run["models"]) == {"sdxl", "sd3"}
    for name, p in run["models"].items():
        assert p["topology"] == ("nested" if name == "sdxl" else "sequential")
        assert set(p["modes"]) == set(MODES)
        for key in ("forward_b1", "forward_b2", "stage1_b1", "stage2_b1", "stage1_b2", "stage2_b2"):
            assert p["times"][key] > 0, key
        assert p["paper_hybrid_speedup"] == gpu_profile.PAPER_SPEEDUP[name]
        assert p["schedule"]["num_steps"] == 50 and p["schedule"]["k"] == 5


def test_schedule_defaults(run):
    sdxl, sd3 = run["models"]["sdxl"]["schedule"], run["models"]["sd3"]["schedule"]
    assert (sdxl["tau1"], sdxl["tau2"], sdxl["tau1_source"]) == (15, 20, "tau_cap")
    assert (sd3["tau1"], sd3["tau2"], sd3["tau1_source"]) == (40, 45, "tau_cap")
    for p in run["models"].values():
        for rec in p["modes"].values():
            assert sum(rec["predicted"]["phase_steps"].values()) == 50
        assert rec["predicted"]["phase_steps"] == {"data-parallel": 44, "pipeline-fill": 1, "pipeline": 5}


def test_speedups_are_latency_ratios(run):
    for p in run["models"].values():
        modes = p["modes"]
        single = modes["single"]
        for rec in modes.values():
            assert rec["speedup"] == pytest.approx(
                single["predicted"]["latency"] / rec["predicted"]["latency"]
            )
            assert rec["ideal_speedup"] == pytest.approx(single["ideal"]["latency"] / rec["ideal"]["latency"])
            assert rec["predicted"]["latency"] >= rec["ideal"]["latency"]
        assert modes["single"]["predicted"]["latency"] == pytest.approx(50 * p["times"]["forward_b2"])
        assert modes["cfg-parallel"]["ideal"]["latency"] == pytest.approx(50 * p["times"]["forward_b1"])


def test_stage_times_are_consistent(run):
    for p in run["models"].values():
        t = p["times"]
        for b in (1, 2):
            # Stages run the same modules as a forward, plus one cheap embedding each. Loose bounds:
            # millisecond timings on a shared 2-core machine (on a GPU the ratio is reported, ~1.0).
            assert 1 / 3 < (t[f"stage1_b{b}"] + t[f"stage2_b{b}"]) / t[f"forward_b{b}"] < 3.0
            assert p["checks"][f"b{b}"]["stage_sum_over_forward"] == pytest.approx(
                (t[f"stage1_b{b}"] + t[f"stage2_b{b}"]) / t[f"forward_b{b}"]
            )
        if p["topology"] == "nested":
            assert t["stage1_b1"] == pytest.approx(t["pre_b1"] + t["post_b1"])
            assert t["stage1_b2"] == pytest.approx(t["pre_b2"] + t["post_b2"])
            assert 1 <= p["cut"] <= p["num_units"]
        else:
            assert 1 <= p["cut"] < p["num_units"]
        assert set(p["stage1_units"]) <= set(p["unit_seconds_b1"])


def test_tensor_sizes(run):
    sdxl, sd3 = run["models"]["sdxl"]["bytes"], run["models"]["sd3"]["bytes"]
    assert sdxl["prediction"] == 1 * 4 * 16 * 16 * 4  # one fp32 latent of the tiny 16x16 SDXL
    assert sd3["prediction"] == 1 * 16 * 16 * 16 * 4
    for b in (sdxl, sd3):
        assert b["boundary_b2"] == 2 * b["boundary_b1"] > 0
        assert b["stage_return_b2"] == 2 * b["stage_return_b1"]
    assert sdxl["stage_return_b1"] > 0 and sd3["stage_return_b1"] == 0
    # SD3 boundary: hidden states (8 x 8 patches) and text states (16 tokens), caption dim 32, fp32.
    assert sd3["boundary_b1"] == (8 * 8 + 16) * 32 * 4


def test_predictions_recompute_from_reported_times(run):
    link = LinkModel(**run["link"])
    for p in run["models"].values():
        sched = ScheduleParams(**{k: v for k, v in p["schedule"].items() if k != "tau2"})
        again = predict_modes(gpu_profile.compute_times(p), gpu_profile.tensor_bytes(p), link, sched)
        for mode in MODES:
            reported = p["modes"][mode]
            assert again[mode]["predicted"]["latency"] == pytest.approx(reported["predicted"]["latency"])
            assert again[mode]["ideal_speedup"] == pytest.approx(reported["ideal_speedup"])


def test_table_and_arguments(run, capsys):
    text = gpu_profile.format_table(run)
    assert "hybrid" in text and "paper" in text and "sdxl" in text and "sd3" in text
    with pytest.raises(SystemExit):
        gpu_profile.main(["--models", "sdxl,flux", "--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_profile.main(["--tau1", "sdxl=x"])
    capsys.readouterr()

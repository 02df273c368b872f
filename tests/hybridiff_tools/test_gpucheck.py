"""The GPU end-to-end check (``scripts/gpu-check.sh``): its CPU dry run through the real script and
a real local cluster, what makes it fail (and exit non-zero), and the full-size models' wiring."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_helpers import make_input
from PIL import Image

from hybridiff.errors import Unavailable
from hybridiff.protocol import Mode, Phase, WindowGuidance
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.inprocess import InProcessEngine
from hybridiff_tools.bench.gpu_profile import load_config
from hybridiff_tools.bench.runner import Run
from hybridiff_tools.gpucheck import check
from hybridiff_tools.gpucheck.models import build_full_pipeline

ROOT = Path(__file__).resolve().parents[2]
MODES = ("single", "cfg-parallel", "pipeline", "hybrid")
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "out" / "gpu_check.json"
    proc = gpu_check(
        "--device", "cpu", "--steps", "10", "--tau-cap", "4", "--k", "2", "--run-modes", "hybrid",
        "--out", str(out), "--model-cache", str(tmp / "models"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow  # two cluster start-ups, every mode of both models (.ci/run runs the slow tests)
def test_the_dry_run_checks_every_mode_of_both_models(dry_run):
    stdout, result = dry_run
    assert result["schema"] == "hybridiff.gpu_check/1" and result["failures"] == []
    assert result["config"]["device"] == "cpu" and result["config"]["compile"] == ["none"]
    assert set(result["archs"]) == {"sdxl", "sd3"}
    for arch, passes in result["archs"].items():
        (p,) = passes
        assert p["compile"] == "none" and p["devices"] == ["cpu", "cpu"] and not p["shared_device"]
        assert p["request"]["steps"] == 10 and p["request"]["hybrid"] == {"tau_cap": 4, "k": 2}
        assert p["timings_s"]["start_s"] > 0 and p["timings_s"]["timed_s"] > 0
        assert list(p["modes"]) == list(MODES)
        for name, m in p["modes"].items():
            assert m["mode_used"] == name and m["latency_s"] > 0
            sc = m["step_costs"]
            assert sc["steps"] == 10 and sc["wall_median_s"] > 0 and sc["critical_compute_median_s"] > 0
            assert sc["overhead_median_s"] is not None and sc["by_phase"]
            if name != "single":
                assert m["psnr_vs_single"] >= m["psnr_bound"] == result["config"]["psnr_bounds"][name]
                assert m["psnr_ok"] and m["bytes_per_request"] > 0
        assert (p["modes"]["hybrid"]["tau1"], p["modes"]["hybrid"]["tau2"]) == (4, 6)
        assert p["modes"]["pipeline"]["tau1"] is not None
        assert set(p["modes"]["hybrid"]["step_costs"]["by_phase"]) == {
            "data-parallel",
            "pipeline-fill",
            "pipeline",
        }
        # The ideal replay exists; its value is the machine's (a 64x64 tiny model on a loaded CPU
        # has b2/b1 near 1, where HYBRID's ideal gain is within noise of none: 0.89 to 1.15 seen).
        assert p["compute_seconds"]["b2"] > 0 and p["modes"]["hybrid"]["ideal_speedup"] > 0
        # After the default size: every mode at a second, non-square size, and with two images.
        second, two = p["scenarios"]["second-size"], p["scenarios"]["num-images-2"]
        assert (second["height"], second["width"], second["num_images"]) == (64, 96, 1)
        assert (two["height"], two["width"], two["num_images"]) == (64, 64, 2)
        for sc in (second, two):
            assert list(sc["modes"]) == list(MODES)
            for name, m in sc["modes"].items():
                assert m["mode_used"] == name and m["images"] == sc["num_images"]
                assert name == "single" or m["psnr_ok"]
        # ``hybridiff run`` first (the in-process pair), as asked: HYBRID here.
        (run,) = result["run"][arch]
        assert run["compile"] == "none" and run["failures"] == [] and list(run["modes"]) == ["hybrid"]
    assert "model compile" in stdout and "all checks passed" in stdout
    for arch in ("sdxl", "sd3"):
        for name in MODES:
            assert any(line.split()[:3] == [arch, "none", name] for line in stdout.splitlines()), (arch, name)


@pytest.mark.slow(reason="two workers start, import torch and diffusers, and fail on the model: 8-19 s")
def test_a_cluster_that_does_not_start_fails_loudly(tmp_path, capsys):
    broken = tmp_path / "models" / "sdxl-tiny-s0"  # where the check keeps its tiny SDXL model
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (broken / ".complete").write_text("{}")
    out = tmp_path / "gpu_check.json"
    argv = [
        "--device",
        "cpu",
        "--archs",
        "sdxl",
        "--out",
        str(out),
        "--model-cache",
        str(tmp_path / "models"),
        "--run-modes",
        "",  # the cluster's failure alone (``hybridiff run`` would fail on that model first)
    ]
    assert check.main(argv) == 1
    stdout = capsys.readouterr().out
    assert "FAILED (1)" in stdout and "sdxl none the cluster did not start" in stdout
    assert "FluxPipeline" in stdout  # the worker's own words, from its log
    failures = json.loads(out.read_text())["failures"]
    assert len(failures) == 1 and failures[0].startswith("sdxl none the cluster did not start")


@pytest.mark.parametrize("argv", [["--archs", "flux"], ["--min-psnr", "hybrid"], ["--min-psnr", "fast=3"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        check.parse_args(["--device", "cpu", *argv])
    assert exc.value.code == 2


# --- the decisions, on made-up runs -----------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run(name: str, mode: Mode, image: bytes, window: tuple[int, int] | None = None) -> Run:
    stats = pb.GenerateStats(mode_used=mode, window_guidance=WindowGuidance.CONDITIONAL)
    if window:
        stats.tau1, stats.tau2 = window
    for i in range(4):
        phase = Phase.SINGLE if mode == Mode.SINGLE else Phase.DATA_PARALLEL
        workers = [
            pb.WorkerStep(worker=f"w{j}", phase=phase, compute_seconds=0.01, wall_seconds=0.012)
            for j in (0, 1)
        ]
        stats.steps.append(pb.StepStat(step=i, phase=phase, wall_seconds=0.012, workers=workers))
    return Run(name, check.PROMPT, check.SEED, 0.05, stats, image)


def test_what_fails_the_check():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 16, 3))
    other = rng.integers(0, 256, (16, 16, 3))  # an unrelated image: ~8 dB from base
    p = check.PassResult("sdxl", "none", devices=["cuda:0", "cuda:0"])
    p.runs = {
        "single": [_run("single", Mode.SINGLE, _png(base))],
        "cfg-parallel": [_run("cfg-parallel", Mode.CFG_PARALLEL, _png(base))],  # identical: passes
        "pipeline": [_run("pipeline", Mode.PIPELINE, _png(other), window=(3, 3))],  # below its bound
        "hybrid": [_run("hybrid", Mode.CFG_PARALLEL, _png(np.zeros((16, 16, 3))))],  # fell back, constant
    }
    record = check.summarize_pass(p, check.PSNR_BOUNDS["cuda"], "nested")
    assert record["shared_device"]
    assert record["modes"]["cfg-parallel"]["psnr_ok"] and record["modes"]["cfg-parallel"][
        "psnr_vs_single"
    ] == float("inf")
    assert not record["modes"]["pipeline"]["psnr_ok"]
    failures = record["failures"]
    assert any(f.startswith("pipeline: PSNR vs single") and "< bound 20.0 dB" in f for f in failures)
    assert "hybrid: ran as cfg-parallel" in failures
    assert any(f.startswith("hybrid: no pipeline window") for f in failures)
    assert any(f.startswith("hybrid: the image is constant") for f in failures)
    assert not any(f.startswith(("single", "cfg-parallel")) for f in failures)

    constant = check.PassResult("sd3", "none", devices=["cpu", "cpu"])
    constant.runs = {"single": [_run("single", Mode.SINGLE, _png(np.full((8, 8, 3), 7)))]}
    assert (
        "single: the image is constant (NaN or infinite latents?)"
        in check.summarize_pass(constant, check.PSNR_BOUNDS["cpu"], "sequential")["failures"]
    )


def test_a_failed_request_is_a_failure():
    class Refusing:
        def generate(self, *args, **kwargs):
            raise Unavailable("no pair free")

    p = check.PassResult("sdxl", "none")
    params = {"steps": 4, "guidance": 5.0, "width": 64, "height": 64, "hybrid": {}}
    args = type("Args", (), {"request_timeout": 10.0})()
    check._request(Refusing(), "hybrid", Mode.HYBRID, params, args, p, keep=True)
    check._request(Refusing(), "single", Mode.SINGLE, params, args, p, keep=False)
    assert p.runs == {}
    assert p.failures[0].startswith("hybrid: the request failed:") and "no pair free" in p.failures[0]
    assert p.failures[1].startswith("single (warm-up): the request failed:")


def test_compile_passes():
    assert check.compile_passes("none", None) == (["none"], None)
    assert check.compile_passes("reduce-overhead", None) == (["none"], "the worker has no --compile flag yet")
    choices = ("none", "default", "reduce-overhead", "max-autotune")
    assert check.compile_passes("max-autotune", choices) == (["none", "max-autotune"], None)
    with pytest.raises(ValueError, match="the worker takes none, default"):
        check.compile_passes("fastest", choices)


def test_hybrid_window_fits_the_steps():
    info = pb.ModelInfo(default_steps=50, default_width=1024, default_guidance_scale=7.0)
    info.hybrid_defaults.tau_cap, info.hybrid_defaults.k = 40, 5
    args = check.parse_args(["--device", "cpu", "--models", "full"])
    assert check.request_params(info, args)["hybrid"] == {"tau_cap": 40, "k": 5}  # the paper's SD3 window
    assert args.size == 1024 and args.dtype == "float32"
    args.steps = 20  # tau_cap 40 would never open the window
    assert check.request_params(info, args)["hybrid"] == {"tau_cap": 6, "k": 5}


# --- the full-size models' wiring, on a small denoiser of the same conditioning widths ---
SMALL = {
    "sdxl": dict(
        block_out_channels=[32, 64, 64],
        attention_head_dim=[1, 2, 2],
        transformer_layers_per_block=[1, 1, 1],
        norm_num_groups=8,
        sample_size=16,
    ),
    "sd3": dict(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        caption_projection_dim=32,
        sample_size=16,
        pos_embed_max_size=16,
    ),
}


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_full_model_conditioning_fits_the_worker(arch, tmp_path):
    cfg = {**load_config(arch, tiny=False), **SMALL[arch]}
    pipe = build_full_pipeline(arch, torch.device("cpu"), torch.float32, denoiser_config=cfg)
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (768, 1280)
    assert pipe.vae.config.latent_channels == cfg["in_channels"]
    pipe.save_pretrained(tmp_path / arch, safe_serialization=True)
    engine = InProcessEngine(tmp_path / arch)  # the worker's own loader and adapter
    try:
        assert engine.adapter.default_size == 128
        for mode in ("single", "hybrid"):
            spec = engine.resolve(
                make_input(prompt="a red circle", num_steps=3, seed=0, mode=mode, tau_cap=1, k=1)
            )
            image = Image.open(io.BytesIO(engine.generate(spec).images[0]))
            assert image.size == (128, 128)
    finally:
        engine.close()

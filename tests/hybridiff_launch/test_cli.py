"""The command line as a user runs it: real subprocesses, no traceback on bad input."""

import json
import os
import subprocess
import sys
import time

import pytest

from hybridiff_launch.cli import build_parser

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def hybridiff(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "hybridiff_launch.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_tiny_model_and_run(tmp_path):
    model = tmp_path / "m"
    assert (
        "wrote tiny sd3 model"
        in hybridiff("tiny-model", "--arch", "sd3", "--out", str(model), "--seed", "3").stdout
    )
    out, stats = tmp_path / "img.png", tmp_path / "stats.json"
    proc = hybridiff(
        "run",
        "--model-dir",
        str(model),
        "--prompt",
        "a red circle",
        "--steps",
        "8",
        "--mode",
        "hybrid",
        "--tau-cap",
        "3",
        "--k",
        "2",
        "--out",
        str(out),
        "--stats-json",
        str(stats),
        "--quiet",
    )
    assert f"wrote {out}" in proc.stdout
    assert out.read_bytes().startswith(b"\x89PNG")
    s = json.loads(stats.read_text())
    # The public API's JSON, as `generate` writes it, with 64-bit integers as numbers.
    assert s["mode_used"] == "MODE_HYBRID" and s["tau2"] == s["tau1"] + 2 and len(s["steps"]) == 8
    assert isinstance(s["seed"], int) and isinstance(s["data_plane_bytes"], int) and s["request_id"]
    assert isinstance(s["steps"][0]["workers"], list)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "--model-dir", "/nonexistent/model", "--prompt", "x", "--out", "o.png"], "does not exist"),
        (["run", "--prompt", "x", "--steps", "0", "--out", "o.png"], "num_inference_steps"),
        (["run", "--prompt", "x", "--width", "60", "--out", "o.png"], "width: must be a multiple of 8"),
        (["run", "--prompt", "x", "--guidance", "-2", "--out", "o.png"], "guidance_scale"),
        (["run", "--prompt", "x", "--k", "-1", "--out", "o.png"], "hybrid.k"),
        (["tiny-model", "--arch", "sd9", "--out", "x"], "invalid choice"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, needle, model_dirs):
    if args[0] == "run" and "--model-dir" not in args:
        args = args[:1] + ["--model-dir", str(model_dirs["sdxl"])] + args[1:]
    proc = hybridiff(*args, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_not_a_diffusers_model(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    proc = hybridiff("run", "--model-dir", str(tmp_path), "--prompt", "x", "--out", "o.png", check=False)
    assert proc.returncode == 2 and "supported" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = hybridiff("run", "--model-dir", str(empty), "--prompt", "x", "--out", "o.png", check=False)
    assert proc.returncode == 2 and "not a diffusers model" in proc.stderr


def test_an_unreachable_target_exits_3_within_seconds(tmp_path):
    start = time.monotonic()
    proc = hybridiff(
        "generate",
        "--target",
        "127.0.0.1:1",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o.png"),
        "--quiet",
        check=False,
    )
    assert proc.returncode == 3 and time.monotonic() - start < 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE: "), proc.stderr
    assert "connection refused by 127.0.0.1:1" in lines[0], proc.stderr


def test_version_and_help_on_every_flag():
    assert hybridiff("--version").stdout.startswith("hybridiff ")
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"hybridiff {name} {action.option_strings[0]} has no help"

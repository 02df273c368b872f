"""The command line as a user runs it: real subprocesses, no traceback on bad input."""

import json
import os
import subprocess
import sys
import time

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


def test_tiny_model_and_run(tmp_path, capsys):
    from hybridiff_launch.cli import main

    model = tmp_path / "m"
    # tiny-model in this process (its imports are here already); run as the user runs it
    assert main(["tiny-model", "--arch", "sd3", "--out", str(model), "--seed", "3"]) in (0, None)
    assert "wrote tiny sd3 model" in capsys.readouterr().out
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


# Every bad input in one interpreter (torch and diffusers imported once, not once per case):
# main() of each argv in turn, its exit code and what it wrote to stderr.
IN_ONE_PROCESS = """
import contextlib, io, json, sys
from hybridiff_launch.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as ended:
            code = ended.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_bad_input_is_a_clear_error(tmp_path, model_dirs):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "empty").mkdir()
    model = ["--model-dir", str(model_dirs["sdxl"])]
    flux, empty = str(tmp_path / "flux"), str(tmp_path / "empty")
    cases = [
        (["run", "--model-dir", "/nonexistent/model", "--prompt", "x", "--out", "o.png"], "does not exist"),
        (["run", *model, "--prompt", "x", "--steps", "0", "--out", "o.png"], "num_inference_steps"),
        (
            ["run", *model, "--prompt", "x", "--width", "60", "--out", "o.png"],
            "width: must be a multiple of 8",
        ),
        (["run", *model, "--prompt", "x", "--guidance", "-2", "--out", "o.png"], "guidance_scale"),
        (["run", *model, "--prompt", "x", "--k", "-1", "--out", "o.png"], "hybrid.k"),
        (["tiny-model", "--arch", "sd9", "--out", "x"], "invalid choice"),
        (["run", "--model-dir", flux, "--prompt", "x", "--out", "o.png"], "supported"),
        (["run", "--model-dir", empty, "--prompt", "x", "--out", "o.png"], "not a diffusers model"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", IN_ONE_PROCESS, json.dumps([argv for argv, _ in cases])],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    for (argv, needle), (code, err) in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert code == 2, (argv, err)
        assert needle in err and "Traceback" not in err, (argv, err)


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

"""The CLI as a user meets it, against a stand-in service on loopback (no cluster, no torch):
the progress bar only on a terminal and only once the request is accepted, "cancelled" on
Ctrl-C, a refused connection and an unknown host told apart at once, a wrong flag answered with
the command's usage and a suggestion, ``--out -``, and the developer tools listed apart."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from concurrent import futures

import grpc
import pytest
from PIL import Image

from hybridiff import serving
from hybridiff.errors import InvalidArgument
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_launch import cli

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "100"}
STEPS = 4


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def _progress(step: int) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        progress=pb.StepProgress(request_id="r", step=step, total_steps=STEPS, phase=pb.PHASE_DATA_PARALLEL)
    )


class StandIn(diffusion_pb2_grpc.DiffusionServiceServicer):
    """GenerateStream as the coordinator answers it: width 60 is refused before any step; the
    prompt "hang" runs one step and then waits for the client to leave; anything else runs
    STEPS steps and returns one 32x32 PNG."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def GenerateStream(self, request, context):
        req = request.request
        if req.width == 60:
            serving.abort(context, InvalidArgument("width", "must be a multiple of 8, got 60"))
        if req.prompt == "hang":
            context.add_callback(self.cancelled.set)
            yield _progress(0)
            self.started.set()
            while context.is_active():
                time.sleep(0.02)
            return
        for i in range(STEPS):
            yield _progress(i)
        result = pb.GenerateResponse(
            request_id="r",
            images=[pb.Image(data=PNG, mime_type="image/png")],
            width=32,
            height=32,
            seed=7,
            stats=pb.GenerateStats(mode_used=pb.MODE_HYBRID, tau1=1, tau2=2, data_plane_bytes=1 << 40),
        )
        yield pb.GenerateStreamResponse(result=result)


@pytest.fixture(scope="module")
def service():
    stand_in = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stand_in.target = f"127.0.0.1:{port}"
    yield stand_in
    server.stop(0)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridiff_launch.cli", *args], capture_output=True, env=ENV, timeout=60, **kw
    )


def _on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with its stderr on a pseudo-terminal: the exit code and what the terminal got."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridiff_launch.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=ENV,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_the_bar_is_drawn_only_on_a_terminal_and_only_once_the_request_is_accepted(service, tmp_path):
    out = str(tmp_path / "a.png")
    flags = ("generate", "--target", service.target, "--prompt", "a red circle", "--out", out)
    code, terminal = _on_a_terminal(*flags)
    assert code == 0 and f"{STEPS}/{STEPS}" in terminal and "data-parallel" in terminal, terminal
    # Refused before its first step: the error line alone, no bar.
    code, terminal = _on_a_terminal(*flags, "--width", "60")
    assert code == 2 and "error: INVALID_ARGUMENT: width" in terminal, terminal
    assert "%|" not in terminal and "step" not in terminal, terminal
    # stderr into a pipe (a log, CI): no bar either.
    proc = _cli(*flags)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout.decode() == f"wrote {out}\n"


def test_out_dash_writes_the_image_and_nothing_else_to_stdout(service, tmp_path):
    stats = tmp_path / "stats.json"
    base = ("generate", "--target", service.target, "--prompt", "a red circle", "--out", "-")
    proc = _cli(*base, "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PNG
    assert (
        f"wrote {stats}" in proc.stderr.decode() and '"data_plane_bytes": 1099511627776' in stats.read_text()
    )
    proc = _cli(*base, "--num-images", "2")
    assert proc.returncode == 2 and proc.stdout == b""
    assert b"error: INVALID_ARGUMENT: out: --out - writes one image to stdout, not 2" in proc.stderr


def test_ctrl_c_cancels_the_request_and_says_so(service, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hybridiff_launch.cli",
            "generate",
            "--target",
            service.target,
            "--prompt",
            "hang",
        ]
        + ["--out", str(tmp_path / "h.png")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    if not service.started.wait(30):
        proc.kill()
        pytest.fail(f"the request never started: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.decode().strip() == "cancelled", err
    assert out == b""
    assert service.cancelled.wait(5), "the server never saw the call end"


def test_a_refused_connection_and_an_unknown_host_fail_at_once_each_with_its_own_message(tmp_path):
    errors = {}
    for target in ("127.0.0.1:1", "no-such-host.invalid:50051"):
        start = time.monotonic()
        proc = _cli(
            *("generate", "--target", target, "--connect-timeout", "60"),
            *("--prompt", "x", "--out", str(tmp_path / "o.png")),
        )
        took = time.monotonic() - start
        assert proc.returncode == 3, proc.stderr
        assert took < 20, f"{target}: {took:.1f}s: it waited for the connect timeout"
        errors[target] = proc.stderr.decode().strip()
    refused, unknown = errors["127.0.0.1:1"], errors["no-such-host.invalid:50051"]
    assert refused.startswith("error: UNAVAILABLE: ") and len(refused.splitlines()) == 1
    assert "connection refused by 127.0.0.1:1: nothing listens there (is the service running?)" in refused
    assert "unknown host 'no-such-host.invalid': the name does not resolve" in unknown
    assert "refused" not in unknown and "unknown host" not in refused


@pytest.mark.parametrize(
    "args,hint",
    [
        (["generate", "--promt", "x", "--out", "o.png"], "--promt (did you mean --prompt?)"),
        (["local", "--wokers", "3"], "--wokers (did you mean --workers?)"),
        (["models", "--target=h:1", "--timout", "3"], "--timout (did you mean --timeout?)"),
    ],
)
def test_a_wrong_flag_shows_the_commands_usage_with_a_suggestion(args, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"usage: hybridiff {args[0]} "), err
    assert err.strip().endswith(f"error: unrecognized arguments: {hint}"), err


def test_help_lists_the_user_commands_first_and_the_developer_tools_apart(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    commands, tools = capsys.readouterr().out.split("developer tools:")
    for name in ("local", "generate", "models", "status", "run", "worker", "coordinator", "loadtest"):
        assert f"    {name} " in commands, name
    for name in (
        "tiny-model",
        "train-default-model",
        "adherence",
        "bench",
        "gpu-profile",
        "load-sweep",
        "poolsim",
    ):
        assert f"  {name} " in tools and f" {name} " not in commands, name
    assert commands.index("    local ") < commands.index("    generate ") < commands.index("    worker ")

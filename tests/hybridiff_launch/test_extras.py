"""A plain install (the client, no [server] extras): a server command says in one line what to
install and exits non-zero, instead of a ModuleNotFoundError traceback. The missing packages are
simulated with an import blocker on ``sys.meta_path`` in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What [server] adds over the client's dependencies (pyproject.toml).
SERVER_ONLY = (
    "torch diffusers transformers safetensors numpy zmq huggingface_hub prometheus_client kubernetes "
    "grpc_health grpc_reflection matplotlib"
).split()
BLOCKED = f"""
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {set(SERVER_ONLY)!r} or name.startswith("opentelemetry.sdk"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from hybridiff_launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["local"],
        ["run", "--prompt", "x", "--out", "o.png"],
        ["worker"],
        ["coordinator", "--workers", "127.0.0.1:1"],
        ["bench"],
        ["download", "org/name"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_server_command_without_the_extras_names_what_to_install(argv, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"`hybridiff {argv[0]}`" in lines[0] and "pip install 'hybridiff[server]'" in lines[0]


def test_client_commands_need_no_extras():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, "generate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--prompt" in done.stdout, done.stderr

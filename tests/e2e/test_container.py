"""Opt-in (``-m slow`` and ``HYBRIDIFF_CONTAINER_TEST=1``): the image, run as a deployment runs it.

A coordinator and two workers, each a container of ``$HYBRIDIFF_CONTAINER_IMAGE`` (default
``hybridiff:test``, built by ``scripts/container-base.sh``), hardened as the manifests run them:
read-only root filesystem (a tmpfs on /tmp for caches), the image's non-root user, no
capabilities, no-new-privileges, the model mounted read-only. The workers sit on an internal
network (no route out, nothing published); the coordinator is on it and on a second network
that publishes its API and metrics ports on 127.0.0.1 only. A request goes through the published
port with the project's client; one worker container is killed (``docker kill``) mid-request and
the image still comes back: the lone survivor resumes from the coordinator's checkpoint, and in
the data-parallel phase the PNG is byte for byte that of the unbroken run.

``scripts/container-test.sh`` builds the image and runs this. Skipped, saying why, without the
opt-in or where no Docker engine answers; containers and networks are removed whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster_helpers import make_input, send
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybridiff.client import DiffusionClient

OPT_IN = "HYBRIDIFF_CONTAINER_TEST"
IMAGE = os.environ.get("HYBRIDIFF_CONTAINER_IMAGE", "hybridiff:test")
MODEL_IN_CONTAINER = "/models/tiny-sdxl"
API_PORT, METRICS_PORT, CONTROL_PORT, DATA_PORT, WORKER_METRICS_PORT = 50051, 9090, 50061, 50062, 9091
# No --user: the uid seen inside proves that the image's own user is not root.
HARDENING = [
    "--read-only",
    "--tmpfs",
    "/tmp:rw,nosuid,nodev,size=512m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--pids-limit",
    "1024",
    "--env",
    "HF_HUB_OFFLINE=1",
]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def docker_problem() -> str | None:
    """Why no container can run here, or None."""
    if os.environ.get(OPT_IN) != "1":
        return f"opt-in: set {OPT_IN}=1 (scripts/container-test.sh does, after building the image)"
    if not shutil.which("docker"):
        return "no docker CLI on PATH"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 20 s"
    if info.returncode != 0 or not info.stdout.strip():
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine answers ({reason})"
    return None


class Deployment:
    """Containers and networks of one test, all named with one random suffix."""

    def __init__(self, model_dir: Path) -> None:
        self.suffix = uuid.uuid4().hex[:8]
        self.model_dir = model_dir
        self.internal = f"hybridiff-int-{self.suffix}"
        self.public = f"hybridiff-pub-{self.suffix}"
        self.workers = [f"hybridiff-w{i}-{self.suffix}" for i in (1, 2)]
        self.coordinator = f"hybridiff-coord-{self.suffix}"
        self.containers: list[str] = []
        self.networks: list[str] = []

    def start(self) -> None:
        docker("network", "create", "--internal", self.internal)
        self.networks.append(self.internal)
        docker("network", "create", self.public)
        self.networks.append(self.public)
        cores = sorted(os.sched_getaffinity(0))
        for i, name in enumerate(self.workers):
            self._create(
                name,
                self.internal,
                ["--volume", f"{self.model_dir}:{MODEL_IN_CONTAINER}:ro"],
                "worker",
                "--model-dir",
                MODEL_IN_CONTAINER,
                "--host",
                "0.0.0.0",
                "--advertise-host",
                name,
                "--port",
                str(CONTROL_PORT),
                "--data-port",
                str(DATA_PORT),
                "--metrics-port",
                str(WORKER_METRICS_PORT),
                "--worker-id",
                f"w{i + 1}",
                "--device",
                "cpu",
                "--cpus",
                str(cores[i % len(cores)]),
            )
        self._create(
            self.coordinator,
            self.internal,
            ["--publish", f"127.0.0.1::{API_PORT}", "--publish", f"127.0.0.1::{METRICS_PORT}"],
            "coordinator",
            "--host",
            "0.0.0.0",
            "--port",
            str(API_PORT),
            "--metrics-port",
            str(METRICS_PORT),
            "--workers",
            ",".join(f"{w}:{CONTROL_PORT}" for w in self.workers),
        )
        docker("network", "connect", self.public, self.coordinator)
        for name in self.containers:
            docker("start", name)

    def _create(self, name: str, network: str, extra: list[str], *command: str) -> None:
        docker(
            "create",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            network,
            *HARDENING,
            *extra,
            IMAGE,
            *command,
        )
        self.containers.append(name)

    def published(self, port: int) -> str:
        out = docker("port", self.coordinator, f"{port}/tcp").stdout.split()
        return next(a for a in out if a.startswith("127.0.0.1:"))

    def running(self, name: str) -> bool:
        out = docker("inspect", "--format", "{{.State.Running}}", name, check=False)
        return out.stdout.strip() == "true"

    def logs(self) -> str:
        parts = []
        for name in self.containers:
            out = docker("logs", "--tail", "30", name, check=False)
            parts.append(f"--- {name} ---\n{(out.stdout + out.stderr).strip()}")
        return "\n".join(parts)

    def metrics(self) -> str:
        url = f"http://{self.published(METRICS_PORT)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float) -> None:
        """Until the public API is SERVING and the coordinator counts both workers idle."""
        deadline = time.monotonic() + timeout
        target = self.published(API_PORT)
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                stopped = [n for n in self.containers if not self.running(n)]
                assert not stopped, f"{', '.join(stopped)} stopped during start-up:\n{self.logs()}"
                try:
                    serving = health.Check(
                        health_pb2.HealthCheckRequest(service="hybridiff.v1.DiffusionService"), timeout=2
                    )
                    if serving.status == health_pb2.HealthCheckResponse.SERVING and idle_workers(
                        self.metrics()
                    ) == len(self.workers):
                        return
                except (grpc.RpcError, OSError):
                    pass
                time.sleep(0.5)
        raise AssertionError(f"the containers were not ready within {timeout:.0f} s:\n{self.logs()}")

    def remove(self) -> None:
        for name in self.containers:
            docker("rm", "--force", "--volumes", name, check=False)
        for network in self.networks:
            docker("network", "rm", network, check=False)


def idle_workers(metrics: str) -> float:
    found = re.search(r'^hybridiff_workers\{state="idle"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def counter(metrics: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def engine() -> None:
    problem = docker_problem()
    if problem:
        pytest.skip(f"no container test here: {problem}")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it first (bash scripts/container-base.sh)")


@pytest.fixture
def model_dir(engine: None) -> Iterator[Path]:
    """A tiny random SDXL model in a folder the containers' user (10001) may read."""
    from hybridiff_launch.tiny_model import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="hybridiff-container-model-"))
    try:
        write_tiny_model("sdxl", root / "tiny-sdxl")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield root / "tiny-sdxl"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def deployment(model_dir: Path) -> Iterator[Deployment]:
    d = Deployment(model_dir)
    try:
        d.start()
        d.wait_ready(timeout=600)
        yield d
    finally:
        d.remove()


def hardening_seen_inside(d: Deployment, name: str) -> dict[str, str]:
    """What a process in the container is: its uid, the capabilities it could ever hold, whether
    it may gain privileges, where it may write (not its own home on the read-only root
    filesystem, only the tmpfs), and how the model is mounted."""
    probe = (
        "import os\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "def writable(p):\n"
        "    try:\n"
        "        open(p, 'w').close(); return 'yes'\n"
        "    except OSError:\n"
        "        return 'no'\n"
        "print(os.getuid(), status['CapBnd'].strip(), status['NoNewPrivs'].strip(),\n"
        "      writable(os.path.expanduser('~/probe')), writable('/tmp/probe'),\n"
        f"      [m.split()[3].split(',')[0] for m in open('/proc/self/mounts') if m.split()[1] == "
        f"'{MODEL_IN_CONTAINER}'])\n"
    )
    out = docker("exec", name, "python", "-c", probe).stdout.split()
    keys = ("uid", "cap_bounding", "no_new_privs", "home_writable", "tmp_writable", "model_mount")
    return dict(zip(keys, out, strict=True))


@pytest.mark.slow
def test_hardened_containers_survive_a_killed_worker(deployment: Deployment):
    d = deployment
    for name in [d.coordinator, *d.workers]:
        seen = hardening_seen_inside(d, name)
        model_mount = "[]" if name == d.coordinator else "['ro']"
        assert seen == {
            "uid": "10001",
            "cap_bounding": "0000000000000000",
            "no_new_privs": "1",
            "home_writable": "no",
            "tmp_writable": "yes",
            "model_mount": model_mount,
        }, name

    # Steps of the tiny model take ~10 ms and `docker kill` ~0.2 s: enough of them (and the
    # model's largest size) that the request is still running, by seconds, when the kill lands.
    steps = 300
    raw = make_input(
        prompt="a blue circle", num_steps=steps, seed=5, mode="cfg-parallel", width=128, height=128
    )
    client = DiffusionClient(d.published(API_PORT))
    try:
        unbroken = send(client, raw, timeout=300)
        assert unbroken.images[0].data.startswith(b"\x89PNG")
        assert len(unbroken.stats.workers) == 2, list(unbroken.stats.workers)
        recoveries_before = counter(d.metrics(), "hybridiff_recoveries_total")

        killed: list[str] = []
        lock = threading.Lock()

        def on_progress(p) -> None:
            with lock:
                if p.step + 1 >= 2 and not killed:
                    docker("kill", d.workers[1])
                    killed.append(d.workers[1])

        resp = send(client, raw, timeout=300, on_progress=on_progress)
    finally:
        client.close()

    assert killed and not d.running(d.workers[1])
    notes = " ".join(resp.stats.notes)
    assert "failed" in notes and "resumed at step" in notes, (notes, d.logs())
    assert len(resp.stats.steps) == steps
    assert resp.images[0].data == unbroken.images[0].data  # byte for byte: phase one resumes exactly
    assert counter(d.metrics(), "hybridiff_recoveries_total") == recoveries_before + 1
    assert d.running(d.coordinator) and d.running(d.workers[0])


def test_container_scripts_parse_and_the_test_is_opt_in(monkeypatch):
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    for script in ("container-base.sh", "container-test.sh"):
        parsed = subprocess.run(["bash", "-n", str(scripts / script)], capture_output=True, timeout=30)
        assert parsed.returncode == 0, parsed.stderr
    monkeypatch.delenv(OPT_IN, raising=False)
    assert OPT_IN in (docker_problem() or "")

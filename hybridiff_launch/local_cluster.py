"""``hybridiff local``: the coordinator and its workers as local processes on loopback.

Each worker gets its own share of the CPU cores (pinned, one torch thread per core it owns),
as each pod gets its own GPU, and its own device: the ``devices`` given, round robin, else one
per visible GPU, round robin (two workers may share a GPU), else the CPU. Children die with
the launcher (PR_SET_PDEATHSIG) and are stopped on SIGTERM/SIGINT: SIGTERM first, SIGKILL
after a grace period — no orphans. Each process logs to its own file (``worker0.log`` ...,
``coordinator.log``) in ``log_dir``, a new temporary directory when none is given; a process
that dies during start-up is reported with the end of its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.config import CoordinatorConfig
from gpu_worker.config import WorkerConfig
from hybridiff.errors import InvalidArgument
from hybridiff.options import to_argv
from hybridiff.v1 import diffusion_pb2, diffusion_pb2_grpc
from hybridiff_launch.children import LAUNCHER_PID_ENV


def core_shares(workers: int, cores: list[int] | None = None) -> list[str]:
    """Cores for each worker: disjoint blocks when there are enough, else round robin."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if workers <= len(cores):
        per = len(cores) // workers
        return [",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(workers)]
    return [str(cores[i % len(cores)]) for i in range(workers)]


def free_port() -> int:
    """A loopback port free at the moment (for a flag where 0 does not mean "any")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_devices(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``; each entry cpu, cuda or cuda:N."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise InvalidArgument("devices", f"expected a list like cuda:0,cuda:1 or cpu, got {text!r}")
    for d in devices:
        kind, colon, index = d.partition(":")
        if not (d == "cpu" or (kind == "cuda" and (not colon or index.isdigit()))):
            raise InvalidArgument("devices", f"expected cpu, cuda or cuda:N, got {d!r}")
    return devices


def visible_gpus() -> int:
    """How many CUDA devices this process (and so each child, same environment) can see."""
    import torch  # deferred: slow to import; only the default assignment needs it

    return torch.cuda.device_count()


def assign_devices(workers: int, devices: list[str] | None = None, gpus: int = 0) -> list[str]:
    """The device of each worker: ``devices`` round robin when given, else one per visible GPU
    (``gpus`` of them) round robin, else the CPU for all."""
    pool = devices or [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    return [pool[i % len(pool)] for i in range(workers)]


class LocalCluster:
    def __init__(
        self,
        model_dir: str | Path,
        workers: int = 2,
        port: int = 0,
        metrics_port: int = 0,
        queue_size: int = 16,
        policy: str = "adaptive",
        log_dir: str | Path | None = None,
        extra_env: dict[str, str] | None = None,
        cores: list[int] | None = None,
        log_format: str = "text",
        verbose: bool = True,
        worker_args: dict[int, list[str]] | None = None,
        devices: list[str] | None = None,
        compile_mode: str = "auto",
        coordinator_args: list[str] | None = None,
        served_model_name: str | None = None,
        variant: str | None = None,
        http_port: int | None = None,
        text_encoder_3: bool = False,
        config: str | Path | None = None,
        coordinators: int = 1,
        worker_route: Callable[[int, str], str] | None = None,
    ) -> None:
        """``coordinators``: how many coordinators share the workers (``addresses``; ``address``
        is the first's); ``worker_route(i, control)``: the address the coordinators dial for
        worker i (default its own control address; e.g. a forwarder's);
        ``text_encoder_3``, ``config``: the workers' ``--text-encoder-3 on`` and ``--config``;
        ``http_port``: the coordinator's HTTP API (None: off; 0: a free port, picked here);
        ``model_dir``: a local folder (a launcher fetches a Hub id once, before it starts the
        workers); ``served_model_name``, ``variant``: the workers' flags of those names;
        ``compile_mode``: the workers' ``--compile``; ``log_format``: the processes'
        ``--log-format``; ``verbose``: they log at INFO (``-v``); ``coordinator_args``: more
        flags for the coordinator;
        ``worker_args``: more flags for worker i (they override the defaults); ``devices``: the
        workers' devices, round robin (default: one per visible GPU, round robin, else cpu)."""
        self.model_dir = str(model_dir)
        self.num_workers = workers
        self.num_coordinators = coordinators
        self.worker_route = worker_route
        self.port = port  # 0: the coordinator picks a free port
        self.ports: list[int] = []  # each coordinator's, once started
        self.coordinator_procs: dict[int, subprocess.Popen] = {}
        self.worker_procs: dict[int, subprocess.Popen] = {}
        self._metrics_ports: dict[int, int] = {}
        self.metrics_port = metrics_port
        self.http_port = http_port
        self.queue_size = queue_size
        self.policy = policy
        self.log_dir = Path(log_dir) if log_dir else None  # None: a temporary directory, made at start
        self.log_format = log_format
        self.verbose = verbose
        self.env = {
            **os.environ,
            "TRANSFORMERS_VERBOSITY": "error",
            **(extra_env or {}),
            LAUNCHER_PID_ENV: str(os.getpid()),
        }
        self.cores = cores
        self.worker_args = worker_args or {}
        self.coordinator_args = coordinator_args or []
        # Every worker's flags but its own cores, device, id and ready file (``spawn_worker``).
        self.worker_config = WorkerConfig(
            model=self.model_dir,
            served_model_name=served_model_name,
            variant=variant,
            text_encoder_3=text_encoder_3,
            config=str(config) if config else None,
            host="127.0.0.1",
            port=0,
            data_port=0,
            metrics_port=0,
            data_peer_cidrs="127.0.0.0/8",
            compile=compile_mode,
        )
        self.devices = assign_devices(workers, devices) if devices else None  # None: chosen at start
        self.procs: list[subprocess.Popen] = []
        self._names: dict[int, str] = {}  # pid -> process name (its log file's stem)
        self.worker_addresses: list[str] = []
        self.worker_metrics_ports: list[int] = []

    def _http_port(self) -> int:
        """The coordinator's --http-port: 0 (off) when None, a free port for 0."""
        if self.http_port is None:
            return 0
        return self.http_port or free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def addresses(self) -> list[str]:
        """Every coordinator's address, in order (the first is ``address``)."""
        return [f"127.0.0.1:{p}" for p in self.ports] or [self.address]

    def log_file(self, name: str) -> Path:
        """The log of process ``name`` ("worker0", ..., "coordinator")."""
        return self.log_dir / f"{name}.log"

    def process_name(self, pid: int) -> str:
        """The name of the cluster's process ``pid`` (its log file's stem: coordinator, worker-0 ...)."""
        return self._names.get(pid, str(pid))

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        # A process started again replaces its dead predecessor (a start-up check sees the live one).
        self.procs = [p for p in self.procs if self._names.get(p.pid) != name or p.poll() is None]
        flags = ["-v"] if self.verbose else []
        with open(self.log_file(name), "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hybridiff_launch.cli",
                    *flags,
                    *args,
                    "--log-format",
                    self.log_format,
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        self._names[proc.pid] = name
        return proc

    def start(self, timeout: float = 300.0) -> LocalCluster:
        """Start the workers on ports they pick themselves, then the coordinators, and wait
        until each coordinator is SERVING with every worker idle."""
        deadline = time.monotonic() + timeout
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="hybridiff-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        print(f"hybridiff local: logs in {self.log_dir}", file=sys.stderr, flush=True)
        try:
            if self.devices is None:
                self.devices = assign_devices(self.num_workers, gpus=visible_gpus())
            self._cpus = core_shares(self.num_workers, self.cores)
            ready = [self.spawn_worker(i) for i in range(self.num_workers)]
            workers = [self._await_file(f, deadline) for f in ready]
            self.worker_addresses = [w["control"] for w in workers]
            self.worker_metrics_ports = [w["metrics_port"] for w in workers]
            self.ports = [0] * self.num_coordinators
            for i in range(self.num_coordinators):
                self.start_coordinator(i, max(1.0, deadline - time.monotonic()))
            self.port, self.metrics_port = self.ports[0], self._metrics_ports[0]
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def spawn_worker(self, i: int) -> Path:
        """Start worker i (again, after it died: the same flags, new ports); the file its ports
        will be written to (``await_worker`` reads it)."""
        ready = Path(tempfile.mkdtemp(prefix="hybridiff-local-")) / f"worker{i}.json"
        config = replace(
            self.worker_config,
            cpus=self._cpus[i],
            device=self.devices[i],
            worker_id=f"worker{i}",
            ready_file=str(ready),
        )
        self.worker_procs[i] = self._spawn(
            f"worker{i}", ["worker", *to_argv(config), *self.worker_args.get(i, [])]
        )
        return ready

    def await_worker(self, ready: Path, timeout: float) -> dict:
        """What a worker started by ``spawn_worker`` reported (its ports), once it did."""
        try:
            return self._await_file(ready, time.monotonic() + timeout)
        finally:
            shutil.rmtree(ready.parent, ignore_errors=True)

    def start_coordinator(self, i: int, timeout: float) -> subprocess.Popen:
        """Start coordinator i over every worker (again, after it died: on its own port) and wait
        until it reports its ports."""
        name = "coordinator" if i == 0 else f"coordinator{i}"
        run_dir = Path(tempfile.mkdtemp(prefix="hybridiff-local-"))
        ready = run_dir / f"{name}.json"
        route = self.worker_route or (lambda _, control: control)
        port = self.ports[i] if i < len(self.ports) and self.ports[i] else (self.port if i == 0 else 0)
        try:
            config = CoordinatorConfig(
                host="127.0.0.1",
                port=port,
                metrics_port=self.metrics_port if i == 0 else 0,
                queue_size=self.queue_size,
                policy=self.policy,
                workers=",".join(route(w, a) for w, a in enumerate(self.worker_addresses)),
                ready_file=str(ready),
                http_port=self._http_port() if i == 0 else 0,
            )
            proc = self._spawn(name, ["coordinator", *to_argv(config), *self.coordinator_args])
            self.coordinator_procs[i] = proc
            ports = self._await_file(ready, time.monotonic() + timeout)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        while len(self.ports) <= i:
            self.ports.append(0)
        self.ports[i] = ports["port"]
        self._metrics_ports[i] = ports["metrics_port"]
        if i == 0:
            self.http_port = ports.get("http_port")
        return proc

    def _await_file(self, path: Path, deadline: float) -> dict:
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"the local cluster was not ready in time ({path.stem} never reported)")

    def _check_alive(self) -> None:
        dead = [p for p in self.procs if p.poll() is not None]
        if dead:
            parts = []
            for p in dead:
                name = self._names.get(p.pid, "?")
                parts.append(
                    f"{name} (exit {p.returncode}); the end of {self.log_file(name)}:\n{self.log_tail(name)}"
                )
            raise RuntimeError("a local process exited during start-up: " + "\n".join(parts))

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of process ``name``'s log."""
        try:
            text = self.log_file(name).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> None:
        """Until every coordinator is SERVING and sees every worker idle."""
        deadline = time.monotonic() + timeout
        for address in self.addresses:
            self._wait_ready(address, deadline)

    def _wait_ready(self, address: str, deadline: float) -> None:
        with grpc.insecure_channel(address) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    ready = health_stub.Check(
                        health_pb2.HealthCheckRequest(service="hybridiff.v1.DiffusionService"), timeout=2
                    )
                    if ready.status == health_pb2.HealthCheckResponse.SERVING:
                        status = stub.ClusterStatus(diffusion_pb2.ClusterStatusRequest(), timeout=2)
                        if sum(w.state == "idle" for w in status.workers) == self.num_workers:
                            return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the local cluster's coordinator at {address} was not ready in time")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the coordinator (it drains), then the workers; SIGKILL what is left."""
        for proc in reversed(self.procs):  # the coordinator was started last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_local(
    model_dir: str,
    workers: int,
    port: int,
    metrics_port: int,
    queue_size: int,
    policy: str = "adaptive",
    log_format: str = "text",
    log_dir: str | None = None,
    verbose: bool = False,
    devices: list[str] | None = None,
    compile_mode: str = "auto",
    served_model_name: str | None = None,
    variant: str | None = None,
    http_port: int | None = None,
    text_encoder_3: bool = False,
    config: str | Path | None = None,
) -> int:
    cluster = LocalCluster(
        model_dir,
        workers=workers,
        port=port,
        metrics_port=metrics_port,
        queue_size=queue_size,
        policy=policy,
        log_dir=log_dir,
        log_format=log_format,
        verbose=verbose,
        devices=devices,
        compile_mode=compile_mode,
        served_model_name=served_model_name,
        variant=variant,
        http_port=http_port,
        text_encoder_3=text_encoder_3,
        config=config,
    )
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start(timeout=300.0 if compile_mode == "none" else 1800.0)  # compiling takes minutes
    print(
        f"hybridiff local cluster ready at {cluster.address} ({workers} workers, cores "
        f"{' | '.join(core_shares(workers))}, devices {' | '.join(cluster.devices)}); "
        f"metrics at http://127.0.0.1:{cluster.metrics_port}/metrics",
        flush=True,
    )
    if cluster.http_port:
        print(
            f"OpenAI-compatible API at http://127.0.0.1:{cluster.http_port}/v1, "
            f"playground at http://127.0.0.1:{cluster.http_port}/",
            flush=True,
        )
    try:
        while not stop["now"]:
            if any(p.poll() is not None for p in cluster.procs):
                print("a local process exited; stopping", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0

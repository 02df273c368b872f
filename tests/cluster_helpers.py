"""Shared pieces of the cluster tests: an OTLP/gRPC trace receiver and request helpers."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from gpu_worker.config import WorkerConfig
from hybridiff.options import to_argv
from hybridiff_tools.chaos.forwarder import TcpForwarder  # noqa: F401  (the tests' partitions)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace endpoint that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        with self._lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                service = resource.get("service.name", "")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {}
                        for a in span.attributes:
                            v = a.value
                            attrs[a.key] = (
                                getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                            )
                        self.spans.append(
                            {
                                "service": service,
                                "resource": resource,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "attributes": attrs,
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.spans)

    def start(self) -> OtlpReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)


def compiling_worker(model_dir, **options):
    """An in-process worker on 127.0.0.1 (free ports) that compiles with dynamo's eager backend
    (the compile path, without inductor's minutes); ``options`` add to or replace
    ``WorkerConfig``'s fields. Started."""
    from gpu_worker.process import WorkerProcess

    settings = dict(
        model=str(model_dir),
        port=0,
        data_port=0,
        metrics_port=0,
        host="127.0.0.1",
        device="cpu",
        compile="default",
    )
    return WorkerProcess(WorkerConfig(**(settings | options)), compile_backend="eager").start()


def cfg_modes_match(engine, reference_latents, **fields) -> dict:
    """Run ``fields`` (make_input's names) on the in-process ``engine`` in SINGLE and in
    CFG_PARALLEL and check each ran in its mode with the reference's latents (diffusers' own
    pipeline for the same request, 1e-4); each mode's result, by mode."""
    import torch

    from hybridiff.protocol import label
    from hybridiff.wire import tensor_from_proto

    results = {}
    for mode in ("single", "cfg-parallel"):
        result = engine.generate(engine.resolve(make_input(mode=mode, **fields)))
        assert label(result.stats.mode_used) == mode
        torch.testing.assert_close(
            tensor_from_proto(result.latents), reference_latents.float(), rtol=1e-4, atol=1e-4
        )
        results[mode] = result
    return results


def make_input(
    mode: str = "auto",
    window_guidance: str = "default",
    output_format: str = "png",
    l_slope=None,
    eps_slope=None,
    k=None,
    tau_cap=None,
    refresh_every=None,
    **fields,
):
    """A ``GenerateRequest`` from the CLI's names (``mode="cfg-parallel"``, flat hybrid parameters,
    ``num_steps`` for the steps)."""
    from hybridiff.request import request_from_names

    if "num_steps" in fields:
        fields["steps"] = fields.pop("num_steps")
    return request_from_names(
        fields.pop("prompt"),
        mode=mode,
        output_format=output_format,
        window_guidance=window_guidance,
        hybrid={
            "l_slope": l_slope,
            "eps_slope": eps_slope,
            "k": k,
            "tau_cap": tau_cap,
            "refresh_every": refresh_every,
        },
        **fields,
    )


def send(client, raw, timeout=None, on_progress=None):
    """Send a ``GenerateRequest`` through a ``DiffusionClient``; the ``GenerateResponse``."""
    return client.generate_request(raw, timeout=timeout, on_progress=on_progress)


def free_port() -> int:
    """A TCP port that was free a moment ago (for a process that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def poll_until(condition, within: float, poll: float = 0.05) -> bool:
    """Whether ``condition()`` came true within ``within`` seconds (asked every ``poll``)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def wait_until(condition, within: float, what: str = "the condition", poll: float = 0.05) -> float:
    """Seconds until ``condition()`` came true; fails, naming ``what``, after ``within``."""
    started = time.monotonic()
    if not poll_until(condition, within, poll):
        raise AssertionError(f"not within {within} s: {what}")
    return time.monotonic() - started


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


TEST_ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def start_local(
    args: list[str], within: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``hybridiff local ARGS`` as a process of its own, once it has printed its "ready at" line:
    (the process, that line); fails when it exits first or is not ready ``within`` seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridiff_launch.cli", "local", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or TEST_ENV,
    )
    deadline = time.monotonic() + within
    line = ""
    try:
        while time.monotonic() < deadline and "ready at" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "hybridiff local exited early"
        assert "ready at" in line
    except BaseException:
        proc.kill()
        proc.wait(timeout=60)
        raise
    return proc, line


def spawn_worker(
    model_dir, *flags: str, port: str = "0", log: Path | None = None, verbose: bool = False
) -> subprocess.Popen:
    """A ``hybridiff worker`` process serving ``model_dir`` on loopback (control port ``port``,
    its data and metrics ports picked by the system) with ``flags``; its output goes to ``log``
    (default: this process's)."""
    config = WorkerConfig(model=str(model_dir), host="127.0.0.1", port=int(port), data_port=0, metrics_port=0)
    argv = [sys.executable, "-m", "hybridiff_launch.cli", *(["-v"] if verbose else []), "worker"]
    argv += [*to_argv(config), *flags]
    if log is None:
        return subprocess.Popen(argv, env=TEST_ENV)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=TEST_ENV, stdout=out, stderr=subprocess.STDOUT)


def await_ready_file(proc: subprocess.Popen, ready: Path, within: float, log: Path | None = None) -> dict:
    """The JSON a process wrote to its ``--ready-file``, once written; fails (with the tail of
    ``log``) when the process exits first or after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not (ready.exists() and ready.stat().st_size > 0):
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        assert proc.poll() is None, f"exited with {proc.returncode} before it was ready:\n{tail}"
        assert time.monotonic() < deadline, f"not ready within {within:.0f}s:\n{tail}"
        time.sleep(0.1)
    return json.loads(ready.read_text())


def worker_states(cluster, timeout: float = 10.0) -> dict[str, str]:
    """Each worker's state as the coordinator's ClusterStatus says, by address."""
    from hybridiff.v1 import diffusion_pb2, diffusion_pb2_grpc

    with grpc.insecure_channel(cluster.address) as ch:
        status = diffusion_pb2_grpc.DiffusionServiceStub(ch).ClusterStatus(
            diffusion_pb2.ClusterStatusRequest(), timeout=timeout
        )
    return {w.address: w.state for w in status.workers}


def await_worker_state(
    cluster, address: str, state: str, within: float, poll: float = 0.2, rpc_timeout: float = 10.0
) -> float:
    """Seconds until ``address`` shows ``state`` in ClusterStatus; fails after ``within``."""
    start = time.monotonic()
    seen: dict[str, str] = {}
    while time.monotonic() - start < within:
        seen = worker_states(cluster, rpc_timeout)
        if seen.get(address) == state:
            return time.monotonic() - start
        time.sleep(poll)
    raise AssertionError(f"{address} not {state} within {within}s: {seen}")


def solo_begin(request_id: str, steps: int = 2, **fields):
    """A Begin of a tiny solo request (64 px, guided) for a worker's control Session."""
    from hybridiff.internal.v1 import worker_pb2
    from hybridiff.protocol import Role, WindowGuidance

    return worker_pb2.SessionRequest(
        request_id=request_id,
        begin=worker_pb2.BeginCommand(
            request=worker_pb2.WorkerRequest(
                prompt="a red square", width=64, height=64, num_steps=steps, guidance_scale=2.0, seed=1
            ),
            role=Role.U,
            window_guidance=WindowGuidance.FULL_CFG,
            **({"solo": True} | fields),
        ),
    )


def solo_session(stub, request_id: str, timeout: float) -> list[str]:
    """A whole solo request of 2 SINGLE steps on a worker's Session: its events' kinds."""
    from hybridiff.internal.v1 import worker_pb2
    from hybridiff.protocol import Phase

    cmds = [solo_begin(request_id)] + [
        worker_pb2.SessionRequest(
            request_id=request_id, step=worker_pb2.StepCommand(step=i, phase=Phase.SINGLE)
        )
        for i in range(2)
    ]
    cmds.append(worker_pb2.SessionRequest(request_id=request_id, finish=worker_pb2.FinishCommand()))
    return [e.WhichOneof("event") for e in stub.Session(iter(cmds), timeout=timeout)]


class SessionStream:
    """A client's worker control Session whose commands a test sends one by one."""

    _END = object()

    def __init__(self, stub, timeout: float = 60) -> None:
        self.outbox: queue.Queue = queue.Queue()
        self.call = stub.Session(iter(self.outbox.get, self._END), timeout=timeout)

    def send(self, cmd) -> None:
        self.outbox.put(cmd)

    def close(self) -> None:
        self.outbox.put(self._END)


FREEZE_PLUG = Path(__file__).parent / "e2e" / "freeze_plug"  # its sitecustomize stops a worker on a plan


class Freezer:
    """Holds a worker at an exact point of a request: the worker stops itself there (SIGSTOP,
    freeze_plug/sitecustomize.py); the test kills the stopped process (or lets it go on with
    SIGCONT). Killing at a progress
    event instead races with the request: by the time the client has read the event, the workers
    may have run the next steps, or finished and gone idle (the last step's event comes after
    every step is done; the decode that follows takes milliseconds on a tiny model)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(FREEZE_PLUG), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "HYBRIDIFF_TEST_FREEZE": str(self.dir)}

    def arm(self, request_id: str, where: str) -> None:
        """The next worker to reach ``where`` ("step N" or "decode") of ``request_id`` stops there."""
        for stale in self.dir.glob("frozen*"):
            stale.unlink()
        tmp = self.dir / "plan.tmp"
        tmp.write_text(f"{request_id} {where}")
        tmp.replace(self.dir / "plan")

    def disarm(self) -> None:
        (self.dir / "plan").unlink(missing_ok=True)

    def frozen_pid(self, give_up: threading.Event | None = None, within: float = 300.0) -> int | None:
        """The pid of the worker that stopped, once one has (None when ``give_up`` is set first,
        or after ``within`` seconds)."""
        give_up = give_up or threading.Event()
        deadline = time.monotonic() + within
        while not give_up.is_set() and time.monotonic() < deadline:
            try:
                return int((self.dir / "frozen").read_text())
            except FileNotFoundError:
                give_up.wait(0.01)
        return None


def kill_worker_process(cluster, proc) -> str:
    """SIGKILL worker process ``proc`` of ``cluster`` (stopped or not); its control address."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return cluster.worker_addresses[cluster.procs.index(proc)]


def generate_killing(cluster, freezer: Freezer, raw, where: str):
    """Run ``raw`` (it names its request id) and kill the worker that reaches ``where`` first."""
    freezer.arm(raw.request_id, where)
    killed: list[str] = []
    ended = threading.Event()

    def killer() -> None:
        pid = freezer.frozen_pid(ended)
        if pid is not None:
            killed.append(kill_worker_process(cluster, next(p for p in cluster.procs if p.pid == pid)))

    thread = threading.Thread(target=killer, name="killer")
    thread.start()
    from hybridiff.client import DiffusionClient

    client = DiffusionClient(cluster.address)
    try:
        return send(client, raw, timeout=300), killed
    finally:
        ended.set()
        thread.join()
        freezer.disarm()
        client.close()


class Served:
    """A WorkerService with a real engine behind a real gRPC server on loopback."""

    def __init__(self, model_dir: Path, **options) -> None:
        from gpu_worker.dataplane import Mailbox
        from gpu_worker.engine import WorkerEngine
        from gpu_worker.loader import load_adapter, weights_digest
        from gpu_worker.metrics import WorkerMetrics
        from gpu_worker.service import SERVICE_NAME, WorkerService
        from hybridiff import serving
        from hybridiff.internal.v1 import worker_pb2_grpc

        adapter = load_adapter(model_dir, "cpu", "float32")
        self.metrics = WorkerMetrics()
        self.service = WorkerService("w0", "tiny", self.metrics, **options)
        self.service.attach(WorkerEngine(adapter, "w0", Mailbox("w0"), None), "", weights_digest(model_dir))
        self.server = serving.new_server(8, [])
        self.health = serving.add_health_and_reflection(self.server, [SERVICE_NAME])
        worker_pb2_grpc.add_WorkerControlServiceServicer_to_server(self.service, self.server)
        self.port = serving.bind(self.server, "127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = worker_pb2_grpc.WorkerControlServiceStub(self.channel)

    def info(self):
        from hybridiff.internal.v1 import worker_pb2

        return self.stub.Info(worker_pb2.InfoRequest(), timeout=10)

    def outcomes(self, outcome: str) -> float:
        return (
            self.metrics.registry.get_sample_value("hybridiff_worker_requests_total", {"outcome": outcome})
            or 0
        )

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.service.close()


def with_unipc(src: Path, dst: Path) -> Path:
    """A copy of the model at ``src`` (links to its weights) whose scheduler is UniPC: a multistep
    solver whose history a resumed request must carry in its checkpoint."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name not in ("scheduler", "model_index.json"):
            os.symlink(p.resolve(), dst / p.name)
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (dst / "model_index.json").write_text(json.dumps(index))
    config = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    (dst / "scheduler").mkdir()
    config["_class_name"] = "UniPCMultistepScheduler"
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return dst

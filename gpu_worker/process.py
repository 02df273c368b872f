"""The worker process (``hybridiff worker``), in named steps: start (control API first, so
health answers while the model loads; then the model and the data plane), serve until
signalled, shut down.

Health ("" and the control service: readiness) is NOT_SERVING until the model is loaded
(and, with ``--compile``, until its default size is compiled: in the background, while health
answers; the control service answers Info only from then on, so the pool joins a warm worker),
SERVING after, NOT_SERVING again while it drains on SIGTERM. ``hybridiff.liveness`` is SERVING
from the start; it and readiness turn NOT_SERVING for good when the watchdog sees a command
stall, so Kubernetes restarts the pod.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import torch
import zmq

from gpu_worker import compiled, weights
from gpu_worker.config import WorkerConfig
from gpu_worker.dataplane import Mailbox, message_bound
from gpu_worker.engine import WorkerEngine
from gpu_worker.loader import load_adapter, weights_digest
from gpu_worker.metrics import WorkerMetrics
from gpu_worker.service import LIVENESS_SERVICE, SERVICE_NAME, WorkerService
from gpu_worker.split_balance import SplitPlanner, warm_up
from gpu_worker.zmq_plane import DataPlaneReceiver, ZmqLinks, parse_networks
from hybridiff import security, serving, telemetry
from hybridiff.errors import InvalidArgument
from hybridiff.internal.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)
# Calls the control port runs at once (one thread each; the next is refused with
# RESOURCE_EXHAUSTED): the coordinator makes at most a session, the next one waiting for it to
# unwind, a probe (Check, then Info) and a MeasureSplit; the rest is headroom. Health Watch and
# reflection streams may take CONTROL_LINGERING_STREAMS of them, never the coordinator's share.
CONTROL_CALL_SLOTS = 8
CONTROL_LINGERING_STREAMS = 2


def pin_cpus(cpus: str | None) -> None:
    """Pin this process to ``cpus`` ("0", "0,1", "2-3") with one torch thread per core."""
    if cpus:
        chosen: set[int] = set()
        for part in cpus.split(","):
            lo, _, hi = part.partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
        os.sched_setaffinity(0, chosen)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.set_num_interop_threads(1)


class WorkerProcess:
    def __init__(
        self, config: WorkerConfig, *, grace: float = 30.0, compile_backend: str = "inductor"
    ) -> None:
        """The worker ``config`` describes (``gpu_worker.config``; its ``model`` named: the
        launcher resolves the default). Port 0 picks a free port (``metrics_port`` too).
        ``tls_client_ca``: only the coordinator (a cert that CA signed, naming ``tls_client_name``
        in a subjectAltName) may control this worker; ``health_port``: plaintext gRPC health only
        (kubelet probes), allowed next to TLS only with a client CA. ``curve_keys``: ZeroMQ CURVE
        with the pool keypair found there. ``session_idle_timeout``: a session waiting longer for
        its next command is ended (``session_begin_timeout``: for its Begin); ``watchdog_seconds``:
        a command running longer is a stall (see the module docstring). ``data_peer_cidrs``: the
        only networks it pushes data-plane frames to ("": any, safe only on a private network).
        ``model``: a diffusers folder or a Hub id ``ORG/NAME[@REV]``, fetched (``variant``'s files,
        with the token of ``hf_token_file``) before loading, while health says NOT_SERVING; or a
        single-file checkpoint with ``config``, its pipeline's folder or Hub id.
        ``compile_backend`` other than inductor: tests (see ``gpu_worker.compiled``)."""
        if not config.model:
            raise InvalidArgument("model", "the worker needs a model (a folder, a file or a Hub id)")
        telemetry.setup_tracing("hybridiff-worker")
        self.config, self.grace, self.compile_backend = config, grace, compile_backend
        self.model_dir, self.model_config = config.model, config.config
        self.hf_token = weights.read_token(config.hf_token_file)
        host, tls = config.host, config.tls
        self.host, self.data_port = host, config.data_port
        self.data_address = ""
        self.advertise = config.advertise_host or (
            socket.gethostname() if host in ("0.0.0.0", "::") else host
        )
        self.curve = security.load_curve_keys(config.curve_keys) if config.curve_keys else None
        self.data_networks = parse_networks(config.data_peer_cidrs)
        if config.health_port is not None and tls[0] and not tls[2]:
            raise InvalidArgument("health-port", "a plaintext health port next to TLS needs --tls-client-ca")
        interceptors = telemetry.server_interceptors()
        peer = security.PeerNameInterceptor(config.tls_client_name)
        if tls[2]:  # only the coordinator: a certificate from the client CA naming client_name
            interceptors.append(peer)
        # Health Check from anyone but the coordinator runs in open slots of its own (without a
        # client CA nobody is authenticated, and every Check does).
        self.server = serving.new_server(
            CONTROL_CALL_SLOTS,
            interceptors,
            max_message_bytes=serving.CONTROL_MESSAGE_BYTES,
            max_receive_bytes=serving.CONTROL_RECEIVE_BYTES,  # a checkpoint comes in parts
            lingering_streams=CONTROL_LINGERING_STREAMS,
            authenticated=peer.authenticated if tls[2] else None,
        )
        self.health = serving.add_health_and_reflection(self.server, [SERVICE_NAME])
        self.health.set(LIVENESS_SERVICE, serving.SERVING)  # alive while loading (startup probe waits)
        self.port = serving.bind(self.server, f"{host}:{config.port}", tls)
        # Plaintext, for kubelet's gRPC probes (they cannot speak TLS): a server of its own that
        # answers health Check only, so a probe never waits behind (or is refused for) control calls.
        self.health_server, self.health_port = (
            serving.health_server(f"{host}:{config.health_port}", self.health)
            if config.health_port is not None
            else (None, None)
        )
        self.worker_id = config.worker_id or f"{self.advertise}:{self.port}"
        self.metrics = WorkerMetrics()
        self.metrics_port = self.metrics.serve(config.metrics_port, host)
        self.service = WorkerService(
            self.worker_id,
            config.served_model_name or weights.served_name(config.model),
            self.metrics,
            session_idle_seconds=config.session_idle_timeout,
            watchdog_seconds=config.watchdog_seconds,
            on_stall=self._stalled,
            begin_seconds=config.session_begin_timeout,
        )
        worker_pb2_grpc.add_WorkerControlServiceServicer_to_server(self.service, self.server)
        self._stop = threading.Event()

    def start(self) -> WorkerProcess:
        """Answer health at once, then load the model and open the data plane; SERVING after."""
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        log.info("worker control API on %s:%d (loading model)", self.host, self.port)
        started = time.perf_counter()
        c = self.config
        fetch = dict(variant=c.variant, with_t5=c.text_encoder_3, token=self.hf_token)
        self.model_dir = str(weights.resolve(self.model_dir, **fetch))
        if self.model_config:
            self.model_config = str(weights.resolve(self.model_config, **fetch))
        adapter = load_adapter(
            self.model_dir, c.device, c.dtype, c.variant, c.text_encoder_3, self.model_config
        )
        compiled.enable(
            adapter,
            c.compile,
            backend=self.compile_backend,
            on_compile=self.metrics.compiled,
            on_lookup=self.metrics.compile_lookup,
        )
        self.metrics.compile_mode.labels(adapter.compile_mode).set(1)
        digest_started = time.perf_counter()
        digest = weights_digest(self.model_dir, text_encoder_3=c.text_encoder_3, config=self.model_config)
        self.metrics.weights_digest_seconds.set(time.perf_counter() - digest_started)
        self.metrics.model_load_seconds.set(time.perf_counter() - started)
        self.metrics.watch_device_memory(adapter.device)
        self.context = zmq.Context()
        max_message = c.data_max_message_bytes or message_bound(adapter)
        mailbox = Mailbox(self.worker_id, adapter.device, metrics=self.metrics, max_message_bytes=max_message)
        self.receiver = DataPlaneReceiver(
            self.context, mailbox, self.host, self.data_port, curve=self.curve
        ).start()
        self.links = ZmqLinks(self.context, self.worker_id, curve=self.curve, networks=self.data_networks)
        engine = WorkerEngine(adapter, self.worker_id, mailbox, self.links, metrics=self.metrics)
        # A forwarder or a NAT may stand between the peers: the address they push to, as given.
        self.data_address = c.advertise_data_address or f"tcp://{self.advertise}:{self.receiver.port}"
        if adapter.compiler is None:
            self._serve(engine, digest)
        else:
            threading.Thread(target=self._warm_up, args=(engine, digest), name="warm-up", daemon=True).start()
        return self

    def _warm_up(self, engine: WorkerEngine, digest: str) -> None:
        """Compile the default size, then serve; a warm-up that fails leaves the worker unready
        and not alive (a restart is the cure, as for a stall)."""
        adapter = engine.adapter
        started = time.perf_counter()
        planner = SplitPlanner(adapter)
        try:
            warm_up(adapter, planner, adapter.default_size, adapter.default_size)
        except Exception:
            log.exception("compile warm-up (%s) failed: the worker stays NOT_SERVING", adapter.compile_mode)
            self._stalled()
            return
        log.info(
            "compiled %d graphs for %dpx (%s) in %.1fs",
            adapter.compiler.compilations,
            adapter.default_size,
            adapter.compile_mode,
            time.perf_counter() - started,
        )
        # From now on a shape not compiled yet runs eager while it compiles behind the device
        # thread's work: compile time never counts against a request (docs/design.md section 4).
        adapter.compiler.background = True
        self._serve(engine, digest, planner)

    def _serve(self, engine: WorkerEngine, digest: str, planner: SplitPlanner | None = None) -> None:
        adapter = engine.adapter
        self.service.attach(engine, self.data_address, digest)
        if planner is not None:
            self.service.planner = planner  # the cut the warm-up measured compiled: not measured again
        self.metrics.compile_warm.set(1)
        if not self.service.stalled.is_set():
            for name in ("", SERVICE_NAME):
                self.health.set(name, serving.SERVING)
        log.info(
            "worker %s serving %s (%s, weights %s, compile %s) on %s, data plane %s, metrics on %s",
            self.worker_id,
            self.service.model_name,
            adapter.arch,
            digest,
            adapter.compile_mode,
            adapter.device,
            self.data_address,
            self.metrics_port,
        )
        print(f"worker ready: control {self.advertise}:{self.port} data {self.data_address}", flush=True)

    def serve_until_signalled(self, ready_file: str | None = None) -> None:
        serving.write_ready_file(
            ready_file,
            {
                "control": f"{self.advertise}:{self.port}",
                "data": self.data_address,
                "metrics_port": self.metrics_port,
                "health_port": self.health_port,
            },
        )
        serving.on_termination(self.request_stop)
        self._stop.wait()

    def _stalled(self) -> None:
        """The watchdog fired: readiness and liveness off, for good (a restart is the cure)."""
        for name in ("", SERVICE_NAME, LIVENESS_SERVICE):
            self.health.set(name, serving.NOT_SERVING)

    def request_stop(self) -> None:
        self.health.enter_graceful_shutdown()
        self._stop.set()

    def shutdown(self) -> None:
        """Finish the session in flight (within the grace period), then close everything."""
        self.server.stop(self.grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0)
        self.service.close()
        adapter = getattr(self.service, "adapter", None)
        if adapter is not None and adapter.compiler is not None:
            adapter.compiler.device_thread.close()  # compiles queued in the background are dropped
        self.receiver.stop()
        self.links.close()
        self.context.term()
        telemetry.shutdown_tracing()


def serve_worker(config: WorkerConfig) -> None:
    """Pin to ``config.cpus``, serve until SIGTERM/SIGINT; ``config.ready_file`` receives
    {"control": "host:port", "data": "tcp://host:port", "metrics_port": M, "health_port": H}
    once the model is loaded."""
    pin_cpus(config.cpus)
    process = WorkerProcess(config).start()
    try:
        process.serve_until_signalled(config.ready_file)
    finally:
        process.shutdown()

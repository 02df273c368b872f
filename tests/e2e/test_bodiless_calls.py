"""Nobody starves the probes or the token holders with calls that never send their request (found
by a hostile review: ~150 health Check calls opened on one connection, headers sent and no body,
took every call slot of the coordinator's public port, for as long as the attacker
liked; 8 did the same to a worker's control port), nor swells a worker with oversized messages
(4 x 200 MiB to its control port took its RSS from 406 MB to 1.8 GB when the port received
checkpoints whole; docs/design.md section 5).

Real processes and sockets: a worker process and an in-process coordinator in front of it, each
with a health-only port; the attacker is a raw HTTP/2 client on a plain socket (HEADERS without
END_STREAM, then nothing; it answers the server's SETTINGS and PINGs as a real client would, so
keepalive does not end the attack for it). While the bodiless calls are held, a token holder's
Generate completes, the health ports answer, and every bodiless call is refused or ended within
the body deadline; an attacker who opens new ones as they end holds them for a minute, and still
the requests run and no probe fails."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cluster_helpers import await_ready_file, make_input, proc_status_bytes, send, solo_session, spawn_worker
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker.service import LIVENESS_SERVICE
from hybridiff import serving
from hybridiff.client import DiffusionClient
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc

TOKEN = "bodiless-test-token"
BODILESS = 300
SERVING = health_pb2.HealthCheckResponse.SERVING
CHECK = "/grpc.health.v1.Health/Check"
HOLD_SECONDS = 60.0
MiB = 1024 * 1024
# HTTP/2 (RFC 9113): frame types and flags, error codes.
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x7, 0xB  # the second: beyond the cap before SETTINGS ACK
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def _hpack(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman coding (RFC 7541 6.2.2)."""
    block = b""
    for name, value in headers:
        block += b"\x00" + _hpack_int(len(name)) + name.encode() + _hpack_int(len(value)) + value.encode()
    return block


class BodilessClient:
    """One HTTP/2 connection that opens gRPC calls and never sends their request message. A
    reader thread acknowledges the server's SETTINGS and PINGs and records how and when each
    stream ended: ``refused`` (RST_STREAM REFUSED_STREAM or ENHANCE_YOUR_CALM: never admitted),
    ``answered`` (trailers: a status), ``reset`` (any other RST_STREAM)."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.settimeout(None)
        self.authority = address
        self.ended: dict[int, str] = {}
        self.ended_at: dict[int, float] = {}
        self.goaway = False
        self._lock = threading.Lock()
        self._send_raw(PREFACE + self._frame(SETTINGS, 0, 0, b""))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
        return head + payload

    def _send_raw(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def open(self, count: int, path: str = CHECK, metadata: tuple[tuple[str, str], ...] = ()) -> list[int]:
        """``count`` calls of ``path``: HEADERS only (END_HEADERS, no END_STREAM), never a body."""
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        block, streams, frames = _hpack(headers), [], b""
        for i in range(count):
            stream = 2 * (self._opened + i) + 1
            streams.append(stream)
            frames += self._frame(HEADERS, END_HEADERS, stream, block)
        self._opened += count
        self._send_raw(frames)
        return streams

    _opened = 0

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                head = self._recv_exact(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv_exact(length)
                if kind == SETTINGS and not flags & ACK:
                    self._send_raw(self._frame(SETTINGS, ACK, 0, b""))
                elif kind == PING and not flags & ACK:
                    self._send_raw(self._frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    refused = int.from_bytes(payload[:4], "big") in (REFUSED_STREAM, ENHANCE_YOUR_CALM)
                    self._end(stream, "refused" if refused else "reset")
                elif kind == HEADERS and flags & END_STREAM:
                    self._end(stream, "answered")
                elif kind == GOAWAY:
                    self.goaway = True
        except (ConnectionError, OSError):
            pass

    def _end(self, stream: int, how: str) -> None:
        if stream not in self.ended:
            self.ended[stream], self.ended_at[stream] = how, time.monotonic()

    def held_past(self, streams: list[int], since: float, seconds: float) -> int:
        """How many of ``streams`` were still open ``seconds`` after ``since``."""
        return sum(1 for s in streams if self.ended_at.get(s, float("inf")) > since + seconds)

    def outcomes(self, streams: list[int]) -> dict[str, int]:
        counts = {"refused": 0, "answered": 0, "reset": 0, "open": 0}
        for stream in streams:
            counts[self.ended.get(stream, "open")] += 1
        return counts

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)


class HeldBodiless:
    """``count`` bodiless calls of ``path`` kept open on one connection for as long as it runs: every
    ``every`` seconds it opens a new call for each one that ended (refused, answered, or cut at
    the body deadline), and a new connection if the server closed its own."""

    def __init__(self, address: str, count: int = BODILESS, path: str = CHECK, every: float = 0.25) -> None:
        self.address, self.count, self.path, self.every = address, count, path, every
        self.calls = self.connections = 0
        self.client: BodilessClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HeldBodiless:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            client = self.client
            try:
                if client is None or client.goaway or not client._reader.is_alive():
                    if client is not None:
                        client.close()
                    self.client = client = BodilessClient(self.address)
                    self.connections += 1
                outstanding = client._opened - len(client.ended)
                if outstanding < self.count:
                    self.calls += len(client.open(self.count - outstanding, self.path))
            except OSError:  # the server closed the connection: a new one on the next round
                if client is not None:
                    client.close()
                self.client = None
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.client is not None:
            self.client.close()


def _check(address: str, timeout: float = 3, metadata=None, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return stub.Check(request, timeout=timeout, metadata=metadata).status


def _check_code(address: str, timeout: float = 3, metadata=None) -> grpc.StatusCode:
    try:
        _check(address, timeout, metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _wait_until_all_ended(client: BodilessClient, streams: list[int], within: float) -> dict[str, int]:
    deadline = time.monotonic() + within
    while (outcomes := client.outcomes(streams))["open"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return outcomes


@pytest.fixture(scope="module")
def worker(model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("bodiless")
    ready, log = run / "worker.json", run / "worker.log"
    proc = spawn_worker(model_dirs["sdxl"], "--health-port", "0", "--ready-file", str(ready), log=log)
    try:
        info = await_ready_file(proc, ready, 120, log)
        yield {"control": info["control"], "health": f"127.0.0.1:{info['health_port']}", "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _coordinator(worker):
    from coordinator.discovery import StaticDiscovery
    from coordinator.server import Coordinator

    coordinator = Coordinator(
        StaticDiscovery([worker["control"]]),
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        grace=0,
        token=TOKEN,
        admin_token="bodiless-admin",
        health_port=0,
    ).start()
    probes = f"127.0.0.1:{coordinator.health_port}"
    deadline = time.monotonic() + 60
    while _check(probes) != SERVING or not coordinator.pool.counts()["idle"]:
        assert time.monotonic() < deadline, "the coordinator never saw its worker"
        time.sleep(0.1)
    return coordinator


def _generate(public: str):
    raw = make_input(prompt="a red square", num_steps=2, seed=1, mode="single", width=64, height=64)
    with DiffusionClient(public, token=TOKEN) as client:
        return send(client, raw, timeout=60)


def test_bodiless_health_checks_starve_neither_token_holders_nor_probes(worker):
    coordinator = _coordinator(worker)
    public, probes = f"127.0.0.1:{coordinator.port}", f"127.0.0.1:{coordinator.health_port}"
    attackers: list[BodilessClient] = []
    try:
        started = time.monotonic()
        waves = []
        for _ in range(2):  # two connections: the per-connection cap alone is not the defence
            attacker = BodilessClient(public)
            attackers.append(attacker)
            waves.append((attacker, attacker.open(BODILESS)))
        time.sleep(0.5)  # every call the server admitted now holds what it can
        # While they are held: probes (the health port, and Check with a token) answer, and a
        # token holder's Generate runs to its image.
        assert _check(probes) == SERVING
        assert _check(public, metadata=(("authorization", f"Bearer {TOKEN}"),)) == SERVING
        assert _generate(public).images, "the token holder's request made no image"
        assert _check(probes) == SERVING
        generated_in = time.monotonic() - started
        # Every bodiless call is refused (the per-connection stream cap), answered at once (open
        # slots full) or cancelled once the body deadline passed: none is held longer.
        for attacker, streams in waves:
            outcomes = _wait_until_all_ended(attacker, streams, within=serving.BODY_SECONDS + 5)
            assert outcomes["open"] == 0, outcomes
            assert outcomes["refused"] == BODILESS - serving.STREAMS_PER_CONNECTION, outcomes
            # Only the open slots' calls wait for their body, and only until the deadline.
            assert attacker.held_past(streams, started, 2.0) <= serving.OPEN_CALL_SLOTS
            assert attacker.held_past(streams, started, serving.BODY_SECONDS + 2.0) == 0
        print(f"Generate under attack done in {generated_in:.2f}s; each connection: {outcomes}")
    finally:
        for attacker in attackers:
            attacker.close()
        coordinator.drain_and_stop()


def test_bodiless_calls_on_a_workers_control_port_leave_it_answering(worker):
    """Check and Info calls without a body, 300 on one connection, to a worker without a client CA
    (so nobody is authenticated): its probe port and Info answer while they are held, and each is
    over within the deadline, after which Check on the control port answers too (with a client CA
    the coordinator's Check runs outside the open slots: it answers throughout)."""
    control = worker["control"]
    attacker = BodilessClient(control)
    try:
        started = time.monotonic()
        checks = attacker.open(BODILESS)
        infos = attacker.open(4, path="/hybridiff.internal.v1.WorkerControlService/Info")
        time.sleep(0.5)
        assert _check(worker["health"]) == SERVING
        with grpc.insecure_channel(control) as channel:
            info = worker_pb2_grpc.WorkerControlServiceStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
        assert info.active_request_id == ""
        outcomes = _wait_until_all_ended(attacker, checks + infos, within=serving.BODY_SECONDS + 5)
        assert outcomes["open"] == 0, outcomes
        # The Checks came in one write, before any was answered: all but the cap's are refused. The
        # Info calls came after, when some answered Checks may have freed streams already.
        assert attacker.outcomes(checks)["refused"] == BODILESS - serving.STREAMS_PER_CONNECTION, outcomes
        assert attacker.held_past(checks + infos, started, serving.BODY_SECONDS + 2.0) == 0
        assert _check(control) == SERVING
    finally:
        attacker.close()


@pytest.mark.slow  # the attack is held for a minute
def test_bodiless_checks_held_for_a_minute_starve_neither_requests_nor_probes(worker):
    """300 bodiless health Checks kept open on one connection to the coordinator's public port and
    300 on one connection to the worker's control port (each opened again as it is refused or cut
    at the body deadline), for a minute: every few seconds a token holder's Generate runs on that
    worker through the coordinator, and every second both probe ports answer SERVING (readiness,
    and the worker's liveness: no restart would be triggered). The attack bites: an unauthenticated
    Check on the worker's control port finds the open slots held."""
    coordinator = _coordinator(worker)
    public, probes = f"127.0.0.1:{coordinator.port}", f"127.0.0.1:{coordinator.health_port}"
    holders = [HeldBodiless(public).start(), HeldBodiless(worker["control"]).start()]
    generated: list[float] = []
    bitten: list[grpc.StatusCode] = []
    try:
        time.sleep(1.0)
        started = time.monotonic()
        next_request = started
        while (now := time.monotonic()) < started + HOLD_SECONDS:
            for address, service in (
                (probes, ""),
                (worker["health"], ""),
                (worker["health"], LIVENESS_SERVICE),
            ):
                assert _check(address, timeout=5, service=service) == SERVING, (
                    address,
                    service,
                    now - started,
                )
            bitten.append(_check_code(worker["control"], timeout=5))
            if now >= next_request:
                began = time.monotonic()
                assert _generate(public).images, "the token holder's request made no image"
                generated.append(time.monotonic() - began)
                next_request = began + 5.0
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        held = time.monotonic() - started
        assert all(h._thread.is_alive() for h in holders), "an attacker gave up"
    finally:
        for h in holders:
            h.stop()
        coordinator.drain_and_stop()
    refused = sum(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in bitten)
    print(
        f"held {held:.0f} s; calls opened: {[h.calls for h in holders]}, "
        f"connections: {[h.connections for h in holders]}; {len(generated)} requests, "
        f"slowest {max(generated):.2f} s; control-port Checks refused {refused}/{len(bitten)}"
    )
    assert held >= HOLD_SECONDS and len(generated) >= HOLD_SECONDS // 10
    assert refused >= len(bitten) // 2  # the open slots were held for most of the minute
    assert _check(worker["control"]) == SERVING  # and are free again once the attacker stops


# The 4 x 200 MiB takes about 4 s (the client's copies); the default suite sends 4 x 32 MiB.
@pytest.mark.parametrize("mib", [32, pytest.param(200, marks=pytest.mark.slow)])
def test_oversized_messages_to_a_workers_control_port_are_refused_unread(worker, mib):
    """4 messages of ``mib`` MiB at once to a worker's control port, from callers nobody
    authenticated (two unary Info requests, two Session commands): each is refused with
    RESOURCE_EXHAUSTED, the worker's RSS (and its peak) grows by less than 50 MiB, and it still
    runs a request after. Before, the port took messages of up to 256 MiB from anyone."""
    pid, control = worker["pid"], worker["control"]
    blob = b"\x0a" + b"\xff" * (mib * MiB - 1)  # the size is what counts; the content never parses

    def info(channel) -> grpc.StatusCode:
        call = channel.unary_unary("/hybridiff.internal.v1.WorkerControlService/Info")
        try:
            call(blob, timeout=60)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    def session(channel) -> grpc.StatusCode:
        call = channel.stream_stream("/hybridiff.internal.v1.WorkerControlService/Session")
        try:
            list(call(iter([blob]), timeout=60))
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    with grpc.insecure_channel(control) as channel:
        worker_pb2_grpc.WorkerControlServiceStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
    before = proc_status_bytes(pid, "VmRSS")
    peak, done = [before], threading.Event()

    def sample() -> None:  # the worker's RSS while the messages come (VmHWM holds the model load's)
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc_status_bytes(pid, "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    channels = [
        grpc.insecure_channel(control, options=[("grpc.max_send_message_length", -1)]) for _ in range(4)
    ]
    try:
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda send, ch: send(ch), [info, info, session, session], channels))
    finally:
        for channel in channels:
            channel.close()
        done.set()
        sampler.join()
    grown, peak = proc_status_bytes(pid, "VmRSS") - before, peak[0] - before
    print(
        f"4 x {mib} MiB: {[c.name for c in codes]}; RSS grew {grown / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB"
    )
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
    assert grown < 50 * MiB and peak < 50 * MiB
    with grpc.insecure_channel(control) as channel:
        assert (
            solo_session(worker_pb2_grpc.WorkerControlServiceStub(channel), f"after-{mib}", 60)[-1]
            == "finish"
        )

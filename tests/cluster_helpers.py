"""Shared pieces of the cluster tests: an OTLP/gRPC trace receiver and request helpers."""

from __future__ import annotations

import queue
import socket
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


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


def make_input(
    mode: str = "auto",
    window_guidance: str = "default",
    output_format: str = "png",
    l_slope=None,
    eps_slope=None,
    k=None,
    tau_cap=None,
    **fields,
):
    """A ``RequestInput`` from the CLI's names (``mode="cfg-parallel"``, flat hybrid parameters)."""
    from hybridiff.protocol import Mode, OutputFormat, WindowGuidance, parse
    from hybridiff.request import RequestInput

    return RequestInput(
        mode=parse(Mode, mode),
        output_format=parse(OutputFormat, output_format),
        window_guidance=0 if window_guidance == "default" else parse(WindowGuidance, window_guidance),
        hybrid={"l_slope": l_slope, "eps_slope": eps_slope, "k": k, "tau_cap": tau_cap},
        **fields,
    )


def send(client, raw, timeout=None, on_progress=None):
    """Send a ``RequestInput`` through a ``DiffusionClient``; the ``GenerateResponse``."""
    from hybridiff.client import request_to_proto

    return client.generate_request(request_to_proto(raw), timeout=timeout, on_progress=on_progress)


class TcpForwarder:
    """A TCP forwarder to ``target`` (host, port) that a test can blackhole: a partition, where
    connections stay open and nothing passes either way (the senders' buffers fill, as when
    packets are dropped), until ``heal``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._passing = threading.Event()
        self._passing.set()
        self._closed = False
        self._sockets: list = []

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> TcpForwarder:
        threading.Thread(target=self._accept, name="forwarder", daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while not self._closed:
                self._passing.wait()  # blackholed: nothing is read, nothing passes
                data = src.recv(65536)
                if not data:
                    break
                self._passing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def blackhole(self) -> None:
        self._passing.clear()

    def heal(self) -> None:
        self._passing.set()

    def close(self) -> None:
        self._closed = True
        self._passing.set()
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


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

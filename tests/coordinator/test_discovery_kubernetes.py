"""KubernetesDiscovery against a fake API server that speaks the real pod list/watch protocol.

No Kubernetes API server can run here, so the test starts a small HTTP server on 127.0.0.1
that answers ``GET /api/v1/namespaces/NS/pods`` as the API server does: a ``PodList`` with
``metadata.resourceVersion``; with ``watch=true``, a chunked stream of JSON lines
``{"type": ADDED|MODIFIED|DELETED|ERROR, "object": ...}`` starting after the requested
``resourceVersion``; ``ERROR`` with a 410 ``Status`` when that version was compacted away
(also mid-stream), or an HTTP 410 answer. The official ``kubernetes`` client talks to it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

kubernetes = pytest.importorskip("kubernetes")

from coordinator.discovery.kubernetes import KubernetesDiscovery, pod_address  # noqa: E402

NS = "serving"
SELECTOR = "app.kubernetes.io/component=worker"
WORKER_LABELS = {"app.kubernetes.io/name": "hybridiff", "app.kubernetes.io/component": "worker"}
GONE = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "too old resource version",
    "reason": "Expired",
    "code": 410,
}


def make_pod(
    name: str,
    ip: str | None = "127.0.10.1",
    ready: bool = True,
    uid: str | None = None,
    labels: dict | None = None,
    terminating: bool = False,
) -> dict:
    meta = {
        "name": name,
        "namespace": NS,
        "uid": uid or f"uid-{name}",
        "labels": dict(WORKER_LABELS if labels is None else labels),
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {
        "phase": "Running" if ip else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "worker", "image": "hybridiff:test"}]},
        "status": status,
    }


class FakeApiServer:
    """Pods, a resourceVersion counter and an event log that watches replay and follow."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.pods: dict[str, dict] = {}
        self.log: list[tuple[int, str, dict | None]] = []  # (rv, type, object); type CLOSE ends
        self.compacted_rv = 0
        self.fail_lists = 0  # answer this many LISTs with HTTP 500
        self.http_410_watches = 0  # answer this many WATCHes with HTTP 410
        self.requests: list[tuple[str, str]] = []
        self.closing = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                fake._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- what tests do to the "cluster" ---------------------------------------------------

    def put(self, pod: dict, hidden: bool = False) -> None:
        """Create or update a pod; ``hidden`` changes state without a watch event (missed)."""
        with self.cond:
            self.rv += 1
            name = pod["metadata"]["name"]
            kind = "MODIFIED" if name in self.pods else "ADDED"
            pod = json.loads(json.dumps(pod))
            pod["metadata"]["resourceVersion"] = str(self.rv)
            self.pods[name] = pod
            if not hidden:
                self.log.append((self.rv, kind, pod))
            self.cond.notify_all()

    def delete(self, name: str, hidden: bool = False) -> None:
        with self.cond:
            self.rv += 1
            pod = self.pods.pop(name)
            pod["metadata"]["resourceVersion"] = str(self.rv)
            if not hidden:
                self.log.append((self.rv, "DELETED", pod))
            self.cond.notify_all()

    def expire(self) -> None:
        """Compact history: open watches get an ERROR 410 event mid-stream, old versions 410."""
        with self.cond:
            self.compacted_rv = self.rv
            self.log.append((self.rv, "ERROR", GONE))
            self.cond.notify_all()

    def end_watches(self) -> None:
        with self.cond:
            self.log.append((self.rv, "CLOSE", None))
            self.cond.notify_all()

    def count(self, what: str) -> int:
        with self.cond:
            return sum(1 for kind, _ in self.requests if kind == what)

    def open_watches_after(self, n: int, timeout_s: float = 5.0) -> None:
        """Wait until more than ``n`` watches were opened (the client is following)."""
        deadline = time.monotonic() + timeout_s
        while self.count("watch") <= n:
            assert time.monotonic() < deadline, "no watch was opened"
            time.sleep(0.01)

    # -- the protocol ------------------------------------------------------------------------

    def _matches(self, pod: dict, selector: str) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return all(
            labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",") if term)
        )

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != f"/api/v1/namespaces/{NS}/pods":
            return self._send_json(h, 404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        selector = q.get("labelSelector", "")
        if q.get("watch") == "true":
            return self._watch(
                h, selector, int(q.get("resourceVersion") or 0), float(q.get("timeoutSeconds") or 30)
            )
        with self.cond:
            self.requests.append(("list", selector))
            if self.fail_lists > 0:
                self.fail_lists -= 1
                return self._send_json(
                    h, 500, {"kind": "Status", "code": 500, "reason": "InternalError", "status": "Failure"}
                )
            items = [p for p in self.pods.values() if self._matches(p, selector)]
            body = {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        self._send_json(h, 200, body)

    def _send_json(self, h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _watch(self, h: BaseHTTPRequestHandler, selector: str, since: int, timeout_s: float) -> None:
        with self.cond:
            self.requests.append(("watch", str(since)))
            if self.http_410_watches > 0:
                self.http_410_watches -= 1
                return self._send_json(h, 410, GONE)
            expired = since < self.compacted_rv
            index = next((i for i, e in enumerate(self.log) if e[0] > since), len(self.log))
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        deadline = time.monotonic() + min(timeout_s, 20.0)
        try:
            if expired:
                self._chunk(h, {"type": "ERROR", "object": GONE})
                return self._chunk(h, None)
            while True:
                with self.cond:
                    while index >= len(self.log) and not self.closing:
                        if not self.cond.wait(max(0.0, min(0.1, deadline - time.monotonic()))):
                            if time.monotonic() >= deadline:
                                break
                    entries, index = self.log[index:], len(self.log)
                    done = self.closing or time.monotonic() >= deadline
                for _, kind, obj in entries:
                    if kind == "CLOSE":
                        return self._chunk(h, None)
                    if kind != "ERROR" and not self._matches(obj, selector):
                        continue
                    self._chunk(h, {"type": kind, "object": obj})
                    if kind == "ERROR":
                        return self._chunk(h, None)
                if done:
                    return self._chunk(h, None)
        except OSError:  # the client went away (stop() shut the socket down)
            h.close_connection = True

    @staticmethod
    def _chunk(h: BaseHTTPRequestHandler, event: dict | None) -> None:
        data = b"" if event is None else json.dumps(event).encode() + b"\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()


class RecordingSink:
    """Records every call in order and keeps the pool the calls imply."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple] = []
        self.pool: dict[str, str] = {}

    def worker_ready(self, worker_id: str, address: str) -> None:
        with self.cond:
            self.calls.append(("ready", worker_id, address))
            self.pool[worker_id] = address
            self.cond.notify_all()

    def worker_gone(self, worker_id: str) -> None:
        with self.cond:
            assert worker_id in self.pool, f"worker_gone for unknown worker {worker_id}"
            self.calls.append(("gone", worker_id))
            del self.pool[worker_id]
            self.cond.notify_all()

    def wait_calls(self, n: int, timeout_s: float = 5.0) -> list[tuple]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, timeout_s), (
                f"expected {n} sink calls, got {self.calls}"
            )
            return list(self.calls)


@pytest.fixture
def fake():
    server = FakeApiServer()
    yield server
    server.close()


def start_discovery(fake: FakeApiServer, sink: RecordingSink, **kw) -> KubernetesDiscovery:
    cfg = kubernetes.client.Configuration(host=fake.url, no_proxy="127.0.0.1,localhost")
    api = kubernetes.client.ApiClient(cfg)
    discovery = KubernetesDiscovery(
        NS,
        SELECTOR,
        50061,
        api_client=api,
        watch_timeout_s=10,
        backoff_initial_s=0.02,
        backoff_max_s=0.1,
        **kw,
    )
    discovery.start(sink)
    return discovery


def test_join_unready_terminating_and_delete(fake):
    fake.put(make_pod("worker-0", "127.0.10.1"))
    fake.put(make_pod("worker-1", None, ready=False))  # scheduled, no IP yet
    fake.put(make_pod("coordinator-x", "127.0.10.9", labels={"app.kubernetes.io/component": "coordinator"}))
    sink = RecordingSink()
    discovery = start_discovery(fake, sink)
    try:
        assert sink.wait_calls(1) == [("ready", "worker-0", "127.0.10.1:50061")]
        fake.open_watches_after(0)
        fake.put(make_pod("worker-1", "127.0.10.2", ready=False))  # IP but not Ready: no join
        fake.put(make_pod("worker-1", "127.0.10.2"))  # Ready: joins
        assert sink.wait_calls(2)[1] == ("ready", "worker-1", "127.0.10.2:50061")
        fake.put(make_pod("worker-0", "127.0.10.1", ready=False))  # probe failed: drained
        assert sink.wait_calls(3)[2] == ("gone", "worker-0")
        fake.put(make_pod("worker-0", "127.0.10.1"))  # back
        assert sink.wait_calls(4)[3] == ("ready", "worker-0", "127.0.10.1:50061")
        fake.put(make_pod("worker-1", "127.0.10.2", terminating=True))  # still Ready, but leaving
        assert sink.wait_calls(5)[4] == ("gone", "worker-1")
        fake.delete("worker-1")  # already drained: nothing more
        fake.delete("worker-0")
        calls = sink.wait_calls(6)
        assert calls[5] == ("gone", "worker-0")
        time.sleep(0.1)
        assert len(sink.calls) == 6 and sink.pool == {}
        assert discovery.relists == 1
    finally:
        discovery.stop()


def test_410_mid_stream_relists_without_losing_or_doubling_workers(fake):
    for i in range(3):
        fake.put(make_pod(f"worker-{i}", f"127.0.10.{i + 1}"))
    sink = RecordingSink()
    discovery = start_discovery(fake, sink)
    try:
        assert len(sink.wait_calls(3)) == 3
        fake.open_watches_after(0)
        # Changes the open watch never sees (history compacted), then 410 in the stream.
        fake.delete("worker-1", hidden=True)
        fake.put(make_pod("worker-2", "127.0.10.22", uid="uid-worker-2-new"), hidden=True)
        fake.put(make_pod("worker-3", "127.0.10.4"), hidden=True)
        fake.expire()
        calls = sink.wait_calls(7)
        assert sorted(calls[3:]) == sorted(
            [
                ("gone", "worker-1"),
                ("gone", "worker-2"),
                ("ready", "worker-2", "127.0.10.22:50061"),
                ("ready", "worker-3", "127.0.10.4:50061"),
            ]
        )
        assert calls.index(("gone", "worker-2")) < calls.index(("ready", "worker-2", "127.0.10.22:50061"))
        assert sink.pool == {
            "worker-0": "127.0.10.1:50061",
            "worker-2": "127.0.10.22:50061",
            "worker-3": "127.0.10.4:50061",
        }
        assert discovery.known_workers() == sink.pool
        assert sum(1 for c in calls if c[:2] == ("ready", "worker-0")) == 1  # not doubled
        assert discovery.relists == 2
        # The new watch follows from the fresh list's resourceVersion.
        fake.open_watches_after(1)
        fake.delete("worker-0")
        assert sink.wait_calls(8)[7] == ("gone", "worker-0")
        time.sleep(0.1)
        assert len(sink.calls) == 8
    finally:
        discovery.stop()


def test_http_410_and_ended_watch_relist_without_duplicates(fake):
    fake.put(make_pod("worker-0", "127.0.10.1"))
    fake.http_410_watches = 1  # the first watch is answered HTTP 410 Gone
    sink = RecordingSink()
    discovery = start_discovery(fake, sink)
    try:
        sink.wait_calls(1)
        fake.open_watches_after(1)  # 410, list again, watch again
        assert discovery.relists == 2
        fake.put(make_pod("worker-1", "127.0.10.2"), hidden=True)
        fake.end_watches()  # a watch that simply ends (server timeout): list again
        calls = sink.wait_calls(2)
        fake.open_watches_after(2)
        assert calls == [("ready", "worker-0", "127.0.10.1:50061"), ("ready", "worker-1", "127.0.10.2:50061")]
        assert discovery.relists == 3
    finally:
        discovery.stop()


def test_api_errors_back_off_then_recover(fake):
    fake.put(make_pod("worker-0", "127.0.10.1"))
    fake.fail_lists = 3
    sink = RecordingSink()
    discovery = start_discovery(fake, sink)
    try:
        assert sink.wait_calls(1) == [("ready", "worker-0", "127.0.10.1:50061")]
        assert fake.count("list") == 4
    finally:
        discovery.stop()


def test_stop_ends_an_idle_watch_promptly(fake):
    fake.put(make_pod("worker-0", "127.0.10.1"))
    sink = RecordingSink()
    discovery = start_discovery(fake, sink)
    sink.wait_calls(1)
    fake.open_watches_after(0)
    started = time.monotonic()
    discovery.stop()
    assert time.monotonic() - started < 2.0
    assert not discovery._thread.is_alive()


def test_pod_address_rules():
    assert pod_address(make_pod("w", "127.0.10.1"), 7) == "127.0.10.1:7"
    assert pod_address(make_pod("w", "fd00::5"), 7) == "[fd00::5]:7"
    assert pod_address(make_pod("w", "127.0.10.1", ready=False), 7) is None
    assert pod_address(make_pod("w", None), 7) is None
    assert pod_address(make_pod("w", "127.0.10.1", terminating=True), 7) is None
    with pytest.raises(ValueError):
        KubernetesDiscovery(NS, "no-equals-sign", 1, api_client=object())

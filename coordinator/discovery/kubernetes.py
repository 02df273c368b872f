"""Worker discovery through the Kubernetes API: list, then watch, the worker Pods.

Why Pods and not EndpointSlices: one Pod is one worker, so the pod name is a stable worker id
(a StatefulSet keeps it across restarts; the pod UID tells a recreated pod from the old one),
and the Pod carries everything the pool needs in one object: the Ready condition (which the
kubelet sets from the worker's gRPC readiness probe on ``grpc.health.v1``), the pod IP, and
``deletionTimestamp``, which lets us drain a worker the moment it starts terminating, before its
probe fails. EndpointSlices would add a dependency on a Service, spread one worker set over
several slices (an endpoint can move between slices, which a diff per slice sees as a delete
plus an add), and key endpoints by address rather than by a stable name. The RBAC this needs is
``get``/``list``/``watch`` on ``pods`` in the coordinator's own namespace, nothing else.

The protocol is the standard reflector loop: LIST (which returns the collection's
``resourceVersion``), then WATCH from that version; ADDED/MODIFIED/DELETED events update the
known set. Whenever a watch ends (server timeout, dropped connection, an ``ERROR`` event such as
410 Gone "too old resource version", or an HTTP 410) the loop LISTs again from scratch and diffs
the fresh list against the workers it has reported, so that a worker that vanished while no
watch was open is drained exactly once and a worker that stayed ready is not reported twice.
API errors are retried with a bounded exponential backoff. Everything runs on one daemon
thread; ``stop()`` shuts the open watch socket down so that the thread ends promptly.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

from coordinator.discovery import WorkerSink

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class _Known:
    """What was last reported to the sink for one ready worker."""

    uid: str
    address: str


class WatchExpired(Exception):
    """The API server can no longer serve our resourceVersion (410 Gone): list again."""


def load_api_client(config_file: str | None = None, context: str | None = None) -> Any:
    """An ``ApiClient`` from the in-cluster service account, else from a kubeconfig."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        log.info("kubernetes discovery: using the in-cluster service account")
    except config.ConfigException:
        config.load_kube_config(config_file=config_file, context=context, client_configuration=configuration)
        log.info("kubernetes discovery: using kubeconfig (%s)", config_file or "default")
    return client.ApiClient(configuration)


def pod_address(pod: dict[str, Any], port: int) -> str | None:
    """``podIP:port`` when the pod can take new work, else None.

    A worker can take work when it is Running, its Ready condition is True (its gRPC health
    says SERVING) and it is not terminating (no ``deletionTimestamp``).
    """
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if metadata.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    if not ready or not ip:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class KubernetesDiscovery:
    """Reports the Ready worker Pods matching ``selector`` in ``namespace`` to a ``WorkerSink``.

    ``api_client`` may be injected (tests point one at a local fake API server); by default one
    is built at ``start()`` from the in-cluster service account or the kubeconfig.
    """

    MIN_WATCH_S = 1.0  # a list+watch cycle shorter than this is paced with the backoff

    def __init__(
        self,
        namespace: str | None,
        selector: str,
        port: int = 50061,
        *,
        api_client: Any = None,
        watch_timeout_s: int = 300,
        connect_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        if not selector or "=" not in selector:
            raise ValueError(f"--selector must be a label selector like KEY=VALUE, got {selector!r}")
        self.namespace = namespace or _own_namespace()
        self.selector = selector
        self.port = port
        self.watch_timeout_s = watch_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._api_client = api_client
        self._api: Any = None
        self._sink: WorkerSink | None = None
        self._known: dict[str, _Known] = {}  # written by the discovery thread only
        self._known_lock = threading.Lock()
        self._stop = threading.Event()
        self._resp_lock = threading.Lock()
        self._resp: Any = None
        self._thread: threading.Thread | None = None
        self.relists = 0  # how many times the full list was fetched (observability, tests)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, sink: WorkerSink) -> None:
        if self._thread is not None:
            raise RuntimeError("KubernetesDiscovery already started")
        if self._api_client is None:
            self._api_client = load_api_client()
        self._api = client.CoreV1Api(self._api_client)
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        self._thread.start()
        log.info(
            "kubernetes discovery: watching pods %r in namespace %s (port %d)",
            self.selector,
            self.namespace,
            self.port,
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the watch thread; the workers already reported stay as they are."""
        self._stop.set()
        self._shutdown_response()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("kubernetes discovery thread did not stop within %.1fs", timeout_s)

    def known_workers(self) -> dict[str, str]:
        """Worker id -> address of the workers currently reported ready."""
        with self._known_lock:
            return {name: k.address for name, k in self._known.items()}

    # -- the reflector loop ------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.backoff_initial_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._watch(self._relist())
            except WatchExpired as e:
                log.info("kubernetes discovery: watch expired (%s); listing again", e)
            except Exception as e:  # noqa: BLE001 - any API/transport error: back off and retry
                if self._stop.is_set():
                    break
                log.warning(
                    "kubernetes discovery: API error (%s: %s); retrying in %.1fs",
                    type(e).__name__,
                    _short(e),
                    delay,
                )
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff_max_s)
                continue
            # A watch that keeps ending at once (a misbehaving server or proxy) must not turn
            # into a tight list/watch loop: pace it like an error; a long watch resets that.
            if time.monotonic() - started < self.MIN_WATCH_S:
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
            else:
                delay = self.backoff_initial_s
        log.info("kubernetes discovery stopped")

    def _relist(self) -> str:
        """LIST the pods, reconcile the known set with it, return the list's resourceVersion."""
        resp = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=(self.connect_timeout_s, self.connect_timeout_s + 20),
        )
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self.relists += 1
        pods = {p["metadata"]["name"]: p for p in body.get("items") or []}
        for name in list(self._known):
            if name not in pods:
                self._gone(name, "not in the list any more")
        for name, pod in pods.items():
            self._apply(name, pod)
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, resource_version: str) -> None:
        """WATCH from ``resource_version`` until the stream ends, applying each event."""
        if self._stop.is_set():
            return
        resp = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.selector,
            watch=True,
            resource_version=resource_version or None,
            timeout_seconds=self.watch_timeout_s,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(self.connect_timeout_s, self.watch_timeout_s + 30),
        )
        with self._resp_lock:
            self._resp = resp
        try:
            if self._stop.is_set():  # stop() ran while we were connecting
                return
            for event in _events(resp):
                if self._stop.is_set():
                    return
                self._on_event(event)
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()  # a watch may end half-read: never hand that connection back as is
            resp.release_conn()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise WatchExpired(obj.get("message") or "410 Gone")
            raise RuntimeError(f"watch error {code}: {obj.get('reason')}: {obj.get('message')}")
        if kind == "BOOKMARK":
            return
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        if kind == "DELETED":
            self._gone(name, "pod deleted")
        elif kind in ("ADDED", "MODIFIED"):
            self._apply(name, obj)

    # -- reconciling one pod -----------------------------------------------------------------

    def _apply(self, name: str, pod: dict[str, Any]) -> None:
        address = pod_address(pod, self.port)
        uid = (pod.get("metadata") or {}).get("uid") or ""
        known = self._known.get(name)
        if address is None:
            if known is not None:
                self._gone(name, "pod not ready")
            return
        if known is not None and known.uid != uid:
            self._gone(name, "pod replaced")  # same name, new pod: a different worker process
            known = None
        if known is None or known.address != address:
            with self._known_lock:
                self._known[name] = _Known(uid, address)
            log.info("worker %s ready at %s", name, address)
            assert self._sink is not None
            self._sink.worker_ready(name, address)

    def _gone(self, name: str, why: str) -> None:
        with self._known_lock:
            known = self._known.pop(name, None)
        if known is not None:
            log.info("worker %s drained: %s", name, why)
            assert self._sink is not None
            self._sink.worker_gone(name)

    def _shutdown_response(self) -> None:
        """Unblock a watch read in progress (urllib3 ``shutdown`` works across threads)."""
        with self._resp_lock:
            resp = self._resp
        if resp is None:
            return
        try:
            resp.shutdown()
        except Exception:  # noqa: BLE001 - already closed or released: nothing to unblock
            pass


def _events(resp: Any) -> Iterator[dict[str, Any]]:
    """The watch stream's events: one JSON object per line, possibly split across chunks."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buffer.strip():
        yield json.loads(buffer)


def _own_namespace() -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return "default"


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""

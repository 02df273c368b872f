"""Worker discovery backends: how the coordinator learns which workers exist and are ready.

A backend reports to a ``WorkerSink`` (the coordinator's worker pool): ``worker_ready`` when a
worker can take new work (idempotent: reporting a known worker again only updates its address)
and ``worker_gone`` when it turns unready or disappears (the pool drains it: no new work;
requests in flight on it are resumed elsewhere). Backends: a static list (``static``) and the
Kubernetes API (``kubernetes``).

May import: ``hybridiff`` and the kubernetes client — never ``gpu_worker``, ``launch`` or ``tools``.
"""

from __future__ import annotations

from typing import Protocol


class WorkerSink(Protocol):
    def worker_ready(self, worker_id: str, address: str) -> None:
        """``address`` is the worker's control gRPC endpoint, ``host:port``."""

    def worker_gone(self, worker_id: str) -> None: ...


class StaticDiscovery:
    """A fixed list of ``host:port`` control addresses (``--workers``); the id is the address."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = [a.strip() for a in addresses if a.strip()]

    def start(self, sink: WorkerSink) -> None:
        for address in self.addresses:
            sink.worker_ready(address, address)

    def stop(self) -> None:
        pass

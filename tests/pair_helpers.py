"""A worker pair over real ZeroMQ sockets in one process, for tests of the data plane."""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq
from cluster_helpers import make_input

from coordinator.driver import GenerationResult, drive_request
from gpu_worker.dataplane import Mailbox, message_bound
from gpu_worker.engine import WorkerEngine
from gpu_worker.zmq_plane import DataPlaneReceiver, ZmqLinks, parse_networks
from hybridiff.protocol import Mode
from hybridiff.request import resolve_spec
from hybridiff_launch.inprocess import InProcessWorker


class ZmqPair:
    """Two worker engines of one model, each with its own mailbox, ZeroMQ receiver and links,
    driven by the coordinator's driver: the cluster's data plane without the processes.

    ``transfers()`` / ``metrics()`` make each engine's own (default: by device / none);
    ``record``: keep a copy of every frame delivered to either mailbox (``take_recorded``)."""

    def __init__(
        self,
        adapter,
        transfers: Callable[[], object] | None = None,
        metrics: Callable[[], object] | None = None,
        record: bool = False,
    ) -> None:
        self.adapter = adapter
        self.metrics = [metrics() if metrics else None for _ in range(2)]
        self.ctx = zmq.Context()
        self.receivers: list[DataPlaneReceiver] = []
        self.links: list[ZmqLinks] = []
        self.workers: list[InProcessWorker] = []
        self.recorded: list[bytes] = []
        self._recording = threading.Lock()
        for i, name in enumerate(("U", "C")):
            box = Mailbox(name, max_message_bytes=message_bound(adapter))
            if record:
                box.deliver = self._recorder(box.deliver)
            receiver = DataPlaneReceiver(self.ctx, box, "127.0.0.1", 0).start()
            links = ZmqLinks(self.ctx, name, networks=parse_networks("127.0.0.0/8"))
            engine = WorkerEngine(
                adapter,
                name,
                box,
                links,
                transfers=transfers() if transfers else None,
                metrics=self.metrics[i],
            )
            worker = InProcessWorker(engine)
            worker.data_address = f"tcp://127.0.0.1:{receiver.port}"
            self.receivers.append(receiver)
            self.links.append(links)
            self.workers.append(worker)

    def _recorder(self, deliver):
        def recording_deliver(frame):
            with self._recording:
                self.recorded.append(bytes(frame))
            return deliver(frame)

        return recording_deliver

    @property
    def addresses(self) -> list[str]:
        return [w.data_address for w in self.workers]

    def boxes(self) -> list[Mailbox]:
        return [w.engine.mailbox for w in self.workers]

    def run(self, mode: str, check_alive=None, **fields) -> GenerationResult:
        """One request in ``mode`` (the CLI's name) of the request ``fields``."""
        spec = resolve_spec(
            make_input(mode=mode, **fields), self.adapter.size_limits(), self.adapter.defaults
        )
        return drive_request(
            spec, Mode[mode.upper().replace("-", "_")], self.workers, check_alive=check_alive
        )

    def take_recorded(self) -> list[bytes]:
        with self._recording:
            out, self.recorded = self.recorded, []
        return out

    def close(self) -> None:
        for w in self.workers:
            w.close()
        for r in self.receivers:
            r.stop()
        for links in self.links:
            links.close()
        self.ctx.term()

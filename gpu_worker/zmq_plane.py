"""The ZeroMQ data plane between workers (DESIGN sections 2 and 6).

Each worker binds one PULL socket; its IO thread receives multipart messages (header frame +
raw buffer frames, ``hybridiff.wire``) and files them in the worker's ``Mailbox``, which
decodes and checks them — a malformed frame or an unknown request id is rejected and logged,
and the worker keeps serving. To send, a worker keeps one PUSH socket per peer address
(``ZmqLinks``). PUSH/PULL over TCP reconnects by itself (PAIR does not); ``IMMEDIATE`` keeps
messages from queueing for a peer that is not connected yet; ``MAXMSGSIZE`` bounds what a
peer can make us buffer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from gpu_worker.dataplane import Mailbox, PeerLink
from hybridiff.errors import BadCommand, Cancelled, PeerTimeout
from hybridiff.wire import MAX_TENSOR_BYTES

log = logging.getLogger(__name__)

HWM = 64  # messages; a step has at most a few in flight per direction
MAX_MESSAGE_BYTES = 4 * MAX_TENSOR_BYTES
SEND_SLICE_MS = 100  # a blocked send checks this often whether its request was aborted


CurveKeys = tuple[bytes, bytes]  # (public, secret) of the pool keypair (hybridiff.security)


class _PoolKeyOnly:
    """ZAP credentials provider: admit a CURVE client only if it holds the pool keypair."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in (self.public, z85.decode(self.public))
        if not allowed:
            log.warning("data plane: refused a CURVE client with an unknown key")
        return allowed


class DataPlaneReceiver:
    """Binds ``tcp://host:port`` and feeds every received message to ``mailbox``; with ``curve``
    the socket is a CURVE server that only admits clients holding the pool keypair."""

    def __init__(
        self, context: zmq.Context, mailbox: Mailbox, host: str, port: int, curve: CurveKeys | None = None
    ) -> None:
        self.mailbox = mailbox
        self._auth = None
        self._socket = context.socket(zmq.PULL)
        if curve is not None:
            self._auth = ThreadAuthenticator(context)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_PoolKeyOnly(curve[0]))
            self._socket.curve_publickey, self._socket.curve_secretkey = curve
            self._socket.curve_server = True
        self._socket.setsockopt(zmq.RCVHWM, HWM)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.setsockopt(zmq.LINGER, 0)
        if port == 0:
            self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        else:
            self._socket.bind(f"tcp://{host}:{port}")
            self.port = port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dataplane-rx", daemon=True)

    def start(self) -> DataPlaneReceiver:
        self._thread.start()
        return self

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self._socket.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                log.warning("data plane receive failed: %s", exc)
                continue
            self.mailbox.deliver([f.buffer for f in frames])
        self._socket.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._auth is not None:
            self._auth.stop()


class ZmqLink(PeerLink):
    """A PUSH socket connected to one peer's receiver; used only by the worker's compute thread."""

    def __init__(
        self,
        context: zmq.Context,
        sender: str,
        address: str,
        send_timeout_ms: int = 60_000,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(sender)
        self.address = address
        self._socket = context.socket(zmq.PUSH)
        if curve is not None:
            self._socket.curve_serverkey = curve[0]
            self._socket.curve_publickey, self._socket.curve_secretkey = curve
        self.send_timeout = send_timeout_ms / 1000
        self._socket.setsockopt(zmq.SNDHWM, HWM)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDTIMEO, min(send_timeout_ms, SEND_SLICE_MS))
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)

    def _send_frames(
        self, frames: list[bytes | memoryview], cancelled: Callable[[], bool] | None = None
    ) -> None:
        # A dead peer leaves no pipe (IMMEDIATE), so the send blocks: wait in short slices and
        # give up as soon as the request is aborted, or the handler thread would stay stuck here
        # (holding the worker) long after the coordinator moved the request on.
        deadline = time.monotonic() + self.send_timeout
        while True:
            try:
                # copy=True: the tensors behind these views may be reused right after this call returns.
                # A multipart message goes all or nothing: Again means no frame was queued.
                self._socket.send_multipart(frames, copy=True)
                return
            except zmq.Again:
                if cancelled is not None and cancelled():
                    raise Cancelled(
                        f"{self.sender}: the request was closed while sending to {self.address}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise PeerTimeout(
                        f"{self.sender}: peer {self.address} did not take data-plane frames in time",
                        peer=self.address,
                    ) from None

    def close(self) -> None:
        self._socket.close(linger=0)


class ZmqLinks:
    """One link per peer address, created on first use (the ``links`` factory of WorkerEngine)."""

    def __init__(self, context: zmq.Context, sender: str, curve: CurveKeys | None = None) -> None:
        self.context = context
        self.sender = sender
        self.curve = curve
        self._links: dict[str, ZmqLink] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str) -> ZmqLink:
        if not address.startswith("tcp://"):
            raise BadCommand("peer_data_address", f"expected tcp://host:port, got {address!r}")
        with self._lock:
            if address not in self._links:
                self._links[address] = ZmqLink(self.context, self.sender, address, curve=self.curve)
            return self._links[address]

    def close(self) -> None:
        with self._lock:
            for link in self._links.values():
                link.close()
            self._links.clear()

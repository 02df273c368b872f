"""The ZeroMQ data plane between workers (docs/design.md sections 6 and 9).

Each worker binds one PULL socket; its IO thread receives messages of ONE frame each (prefix,
header, payload: ``hybridiff.wire``) and files them in the worker's ``Mailbox``, which decodes
and checks them — a malformed frame or an unknown request id is rejected and logged, and the
worker keeps serving. A multipart message is refused at its first part and the rest is drained
part by part into a scratch buffer, building no Python object per part. To send, a worker
keeps one PUSH socket per peer address (``ZmqLinks``): only to addresses within its allowed
networks, at most ``MAX_LINKS`` of them (least recently used closed first), and a link whose
peer stopped taking frames is dropped.
PUSH/PULL over TCP reconnects by itself (PAIR does not); ``IMMEDIATE`` keeps messages from
queueing for a peer that is not connected yet; ``MAXMSGSIZE`` (the mailbox's message bound
plus header and padding) makes ZeroMQ drop the connection of an oversized frame before
buffering it; heartbeats close a connection whose peer went silent (a half-open TCP connection
would otherwise stay for hours).

``MAXMSGSIZE`` bounds each *part*, and libzmq queues every part of a multipart message before
the reader sees the first; no ZeroMQ option bounds the parts of a message or their total. So
an unauthenticated peer can still make libzmq hold one message of many parts, each within the
bound (about 64 bytes per empty part): the residual risk of a data port without CURVE, which
CURVE closes (a client without the pool key never gets past the handshake). The receiver
drains such a message at once, so it is held only until it has fully arrived.

A send hands ZeroMQ the message's one frame without copying it (pyzmq still copies one below
its 64 KiB threshold): a fresh buffer of the message (``hybridiff.wire.encode``), or with
``track`` a staged ``Payload``'s own buffer, whose tracker turns done once ZeroMQ's IO thread has
written it to the connection (or dropped it with the connection) and let go of it.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from gpu_worker.dataplane import Mailbox, PeerLink
from hybridiff.errors import BadCommand, Cancelled, PeerTimeout
from hybridiff.wire import max_frame_bytes

log = logging.getLogger(__name__)
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc
    _libc = None

HWM = 64  # messages; a step has at most a few in flight per direction
SEND_SLICE_MS = 100  # a blocked send checks this often whether its request was aborted
SEND_TIMEOUT_MS = 60_000  # a send the peer does not take within this fails with PeerTimeout
MAX_LINKS = 8  # a worker talks to one peer at a time; a few more keep a flapping pair warm
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000  # no traffic for this long: the connection is closed (and redialled)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def _return_freed_memory() -> None:
    """Hands the heap pages libzmq just freed back to the OS (glibc keeps freed blocks of a
    multipart flood mapped otherwise: the review measured +1 GiB RSS that never went away)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _heartbeats(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


class DataPlaneReceiver:
    """Binds ``tcp://host:port`` and feeds every received message to ``mailbox``; with ``curve``
    the socket is a CURVE server that only admits clients holding the pool keypair. A frame
    larger than the mailbox's message bound (plus a header) makes ZeroMQ drop the connection
    before it buffers the frame."""

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
        self.max_frame_bytes = max_frame_bytes(mailbox.max_message_bytes)
        self._socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        _heartbeats(self._socket)
        if port == 0:
            self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        else:
            self._socket.bind(f"tcp://{host}:{port}")
            self.port = port
        self._scratch = bytearray()  # pyzmq: receiving into an empty buffer discards the part
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
                frame = self._socket.recv(copy=False)
                if frame.more:
                    parts, nbytes = self._drain(frame)
                    del frame
                    detail = f"a message of {parts} parts ({nbytes} bytes); one frame expected"
                    self.mailbox.refuse("multipart", detail)
                    _return_freed_memory()
                    continue
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                log.warning("data plane receive failed: %s", exc)
                continue
            self.mailbox.deliver(frame.buffer)  # the tensors may view it: the frame stays theirs
        self._socket.close(linger=0)

    def _drain(self, first: zmq.Frame) -> tuple[int, int]:
        """Receives and drops the rest of a multipart message (already all queued by libzmq)
        into a scratch buffer: no Python object per part. Returns its parts and bytes."""
        parts, nbytes = 1, len(first)
        while self._socket.getsockopt(zmq.RCVMORE):
            nbytes += self._socket.recv_into(self._scratch)
            parts += 1
        return parts, nbytes

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
        send_timeout_ms: int = SEND_TIMEOUT_MS,
        curve: CurveKeys | None = None,
        on_peer_timeout: Callable[[ZmqLink], None] | None = None,
    ) -> None:
        """``on_peer_timeout(link)``: called when the peer did not take a message in time."""
        super().__init__(sender)
        self.address = address
        self._on_peer_timeout = on_peer_timeout
        self._socket = context.socket(zmq.PUSH)
        if curve is not None:
            self._socket.curve_serverkey = curve[0]
            self._socket.curve_publickey, self._socket.curve_secretkey = curve
        self.send_timeout = send_timeout_ms / 1000
        self._socket.setsockopt(zmq.SNDHWM, HWM)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDTIMEO, min(send_timeout_ms, SEND_SLICE_MS))
        self._socket.setsockopt(zmq.LINGER, 0)
        _heartbeats(self._socket)
        if address.startswith("tcp://["):
            self._socket.setsockopt(zmq.IPV6, 1)
        self._socket.connect(address)

    def _send_frame(
        self, frame: memoryview, cancelled: Callable[[], bool] | None = None, track: bool = False
    ) -> zmq.MessageTracker | None:
        # A dead peer leaves no pipe (IMMEDIATE), so the send blocks: wait in short slices and
        # give up as soon as the request is aborted, or the handler thread would stay stuck here
        # (holding the worker) long after the coordinator moved the request on.
        if self._socket.closed:
            raise PeerTimeout(f"{self.sender}: the link to {self.address} was closed", peer=self.address)
        # copy=None: pyzmq's threshold decides; a retried send re-sends the same Frame.
        message = zmq.Frame(frame, track=track)
        deadline = time.monotonic() + self.send_timeout
        while True:
            try:
                self._socket.send(message, copy=False)
                return message.tracker if track else None
            except zmq.Again:
                if cancelled is not None and cancelled():
                    raise Cancelled(
                        f"{self.sender}: the request was closed while sending to {self.address}"
                    ) from None
                if time.monotonic() >= deadline:
                    if self._on_peer_timeout is not None:
                        self._on_peer_timeout(self)
                    raise PeerTimeout(
                        f"{self.sender}: peer {self.address} did not take data-plane frames in time",
                        peer=self.address,
                    ) from None

    def close(self) -> None:
        self._socket.close(linger=0)


def parse_networks(text: str | Sequence[str] | None) -> list[Network] | None:
    """``"10.0.0.0/8,fd00::/8"`` as networks; None or empty: no restriction (``ValueError`` when
    an entry is not a network)."""
    if not text:
        return None
    entries = text.split(",") if isinstance(text, str) else list(text)
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()] or None


class ZmqLinks:
    """One link per peer endpoint, created on first use (the ``links`` factory of WorkerEngine).

    A peer address is resolved once, here; every address it resolves to must be within
    ``networks`` (None: any, which is only safe on a private network), and the link connects to
    the resolved address, so a later DNS answer cannot redirect it. At most ``max_links`` links
    stay open (least recently used closed first); a link whose peer timed out is dropped."""

    def __init__(
        self,
        context: zmq.Context,
        sender: str,
        curve: CurveKeys | None = None,
        networks: Sequence[Network] | None = None,
        max_links: int = MAX_LINKS,
        send_timeout_ms: int = SEND_TIMEOUT_MS,
    ) -> None:
        self.context = context
        self.sender = sender
        self.curve = curve
        self.networks = list(networks) if networks else None
        self.max_links = max(1, max_links)
        self.send_timeout_ms = send_timeout_ms
        self._links: OrderedDict[str, ZmqLink] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, address: str) -> ZmqLink:
        endpoint = self.endpoint(address)
        with self._lock:
            link = self._links.get(endpoint)
            if link is None:
                link = ZmqLink(
                    self.context,
                    self.sender,
                    endpoint,
                    send_timeout_ms=self.send_timeout_ms,
                    curve=self.curve,
                    on_peer_timeout=self.drop,
                )
                self._links[endpoint] = link
                while len(self._links) > self.max_links:
                    _, evicted = self._links.popitem(last=False)
                    evicted.close()
            self._links.move_to_end(endpoint)
            return link

    def endpoint(self, address: str) -> str:
        """``tcp://IP:port`` of a peer address, its host resolved and allowed; ``BadCommand`` if not."""
        if not address.startswith("tcp://"):
            raise BadCommand("peer_data_address", f"expected tcp://host:port, got {address!r}")
        host, sep, port = address[len("tcp://") :].rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadCommand("peer_data_address", f"expected tcp://host:port, got {address!r}")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise BadCommand("peer_data_address", f"cannot resolve {host!r}: {exc}") from None
        ips = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not ips:
            raise BadCommand("peer_data_address", f"{host!r} resolves to no address")
        refused = [str(ip) for ip in ips if not self.allows(ip)]
        if refused:
            raise BadCommand(
                "peer_data_address",
                f"{address} resolves to {', '.join(refused)}, outside the allowed data-plane networks",
            )
        ip = ips[0]
        return f"tcp://[{ip}]:{port}" if ip.version == 6 else f"tcp://{ip}:{port}"

    def allows(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.networks is None:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def drop(self, link: ZmqLink) -> None:
        """Forget and close ``link`` (its peer failed); the next use of its address dials anew."""
        with self._lock:
            if self._links.get(link.address) is link:
                del self._links[link.address]
        link.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        with self._lock:
            for link in self._links.values():
                link.close()
            self._links.clear()

"""A TCP forwarder that can cut the connections through it (a partition) and heal them, and be
pointed at a process restarted on another port: the chaos run's network faults (and the
tests' partitions)."""

from __future__ import annotations

import socket
import threading


class TcpForwarder:
    """A TCP forwarder to ``target`` (host, port) that a test can blackhole: a partition, where
    connections stay open and nothing passes either way (the senders' buffers fill, as when
    packets are dropped), until ``heal``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target  # new connections go here (``retarget`` moves them)
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

    def retarget(self, target: tuple[str, int]) -> None:
        """Send new connections to ``target`` (a process restarted on another port); the open
        ones are closed (their peer is gone)."""
        self.target = target
        sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.close()
            except OSError:
                pass

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``, as a gRPC target."""
        return f"127.0.0.1:{self.port}"

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

"""How a process of the local cluster dies with its launcher (no orphans)."""

from __future__ import annotations

import ctypes
import os
import signal

# A child started by the local cluster finds its launcher's pid here and dies with it
# (``die_with_launcher``). Set by the child itself after exec, not by a ``preexec_fn``: a
# preexec_fn makes Python fork without exec'ing at once, and a forked copy of a process running
# gRPC can abort before it execs (gRPC restarts its poller in the child, on an epoll descriptor the
# fork closed: grpc/grpc#43055) — the launcher and the tests run gRPC clients and servers.
LAUNCHER_PID_ENV = "HYBRIDIFF_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a child of the local cluster: receive SIGTERM when the launcher dies (PR_SET_PDEATHSIG),
    and exit at once if it already has."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if not launcher:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # the launcher died before the request took effect
        os._exit(1)

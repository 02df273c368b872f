"""A late close must not end the next attempt's session: the Session RPC closes
its request's mailbox from gRPC's callback, which can run after the handler freed the worker and
the coordinator's recovery began the same request id here again."""

from __future__ import annotations

from types import SimpleNamespace

from gpu_worker.dataplane import Expect, Mailbox
from gpu_worker.service import ControlSession, WorkerService
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import Role

OLD, NEW = b"\1" * 16, b"\2" * 16


def _expect(nonce: bytes) -> Expect:
    return Expect(nonce=nonce, peer="peer", kinds=frozenset({1}))


def test_a_close_of_an_earlier_attempt_leaves_the_new_session_open():
    box = Mailbox("w")
    box.open("r", _expect(OLD))
    box.open("r", _expect(NEW))  # recovery re-begins the id on this worker
    box.close("r", OLD)
    assert box.is_open("r")
    box.close("r", NEW)
    assert not box.is_open("r")


def test_a_close_of_an_earlier_attempt_leaves_a_solo_session_open():
    box = Mailbox("w")
    box.open("r", _expect(OLD))
    box.open("r", None)  # the lone survivor goes on solo
    box.close("r", OLD)
    assert box.is_open("r")
    box.close("r")  # the engine's own close (finish, abort) closes whatever is open
    assert not box.is_open("r")


class _Context:
    def __init__(self) -> None:
        self.callbacks = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True


def _begin(nonce: bytes) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(
        request_id="r", begin=worker_pb2.BeginCommand(role=Role.U, session_nonce=nonce)
    )


def test_the_rpc_callback_closes_only_the_session_its_begin_opened():
    service = WorkerService("w", "tiny")
    try:
        box = Mailbox("w")
        service.engine = SimpleNamespace(mailbox=box)  # all the callback touches
        old = _Context()
        service._accept(_begin(OLD), ControlSession(1.0), old)
        box.open("r", _expect(OLD))
        box.close("r")  # the old session's handler ended: abort closed it, the worker is free

        new = _Context()
        service._accept(_begin(NEW), ControlSession(1.0), new)
        box.open("r", _expect(NEW))
        for late in old.callbacks:  # gRPC runs the old RPC's callback only now
            late()
        assert box.is_open("r")

        for callback in new.callbacks:  # its own RPC ending (cancelled mid-step) still closes it
            callback()
        assert not box.is_open("r")
    finally:
        service.close()

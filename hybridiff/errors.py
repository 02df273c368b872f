"""Typed errors of the service, each mapped to one gRPC status code at the edge (docs/design.md section 3).

An error keeps its type across a process boundary: ``to_status`` writes it as a gRPC status with
``google.rpc`` details (``ErrorInfo`` with a stable ``reason``, ``BadRequest`` naming the field,
``RetryInfo`` where a retry may succeed) and ``from_rpc_error`` reads it back into the same
class. No code matches on message text.
"""

from __future__ import annotations

import datetime

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "hybridiff.ai"


class HybridiffError(Exception):
    """Base of every error a user may see: ``code`` is its gRPC status, ``reason`` its stable
    machine-readable name, ``metadata`` what a program may need to act on it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    retry_after: float | None = None  # seconds, for RetryInfo

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(HybridiffError):
    """A request field is out of range; ``field`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.field = field
        self.description = message


class BadCommand(InvalidArgument):
    """A worker got a command it cannot run (a coordinator bug or a forged command, never the user)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "BAD_COMMAND"


class Unauthenticated(HybridiffError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(HybridiffError):
    """The caller is known but may not call this method (``ClusterStatus`` without the admin token)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ModelNotFound(HybridiffError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class ModelLoadError(HybridiffError):
    """A model directory is missing or is not a diffusers model of a supported architecture."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MODEL_LOAD_FAILED"


class QueueFull(HybridiffError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"
    retry_after = 1.0


class TooManyCalls(QueueFull):
    """A server's bound on concurrent calls (of one kind) is reached: refused at once, retry later."""

    reason = "TOO_MANY_CALLS"


class Unavailable(HybridiffError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"
    retry_after = 1.0


class WorkerBusy(Unavailable):
    """A worker was asked to run a second request at once."""

    reason = "WORKER_BUSY"


class DeadlineExceeded(HybridiffError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(HybridiffError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class PeerTimeout(HybridiffError):
    """A worker waited in vain for its peer (``metadata["peer"]``): the peer is to blame."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "PEER_TIMEOUT"


class SessionIdle(HybridiffError):
    """A worker ended a control session whose next command did not come in time (an abandoned or
    stalled stream): the request was aborted there and may be resumed elsewhere."""

    code = grpc.StatusCode.ABORTED
    reason = "SESSION_IDLE"


class WorkerFailed(HybridiffError):
    """A worker raised while executing a command; the message says which and why."""

    code = grpc.StatusCode.INTERNAL
    reason = "WORKER_FAILED"


def _all_subclasses(cls: type) -> list[type]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _all_subclasses(sub)]


_BY_REASON: dict[str, type[HybridiffError]] = {c.reason: c for c in _all_subclasses(HybridiffError)}
_BY_CODE: dict[grpc.StatusCode, type[HybridiffError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFull,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: HybridiffError) -> grpc.Status:
    """The error as a gRPC status with its ``google.rpc`` details (for ``context.abort_with_status``)."""
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata))
    ]
    if isinstance(exc, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=exc.field, description=exc.description
                        )
                    ]
                )
            )
        )
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=exc.retry_after))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=exc.code.value[0], message=str(exc), details=details)
    return rpc_status.to_status(status)


def status_details(err: grpc.RpcError) -> dict[str, object]:
    """The ``google.rpc`` details of a failed call by type name: ErrorInfo, BadRequest, RetryInfo."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details that do not match the status code
        return {}
    found: dict[str, object] = {}
    for detail in status.details if status else ():
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                found[cls.DESCRIPTOR.name] = message
    return found


def from_rpc_error(err: grpc.RpcError, prefix: str = "") -> HybridiffError:
    """The typed error a failed call carried (by its ErrorInfo reason, else by its status code)."""
    details = status_details(err)
    text = f"{prefix}{err.details()}"
    info = details.get("ErrorInfo")
    cls = _BY_REASON.get(info.reason) if info is not None and info.domain == ERROR_DOMAIN else None
    cls = cls or _BY_CODE.get(err.code(), WorkerFailed)
    metadata = dict(info.metadata) if info is not None else {}
    if issubclass(cls, InvalidArgument):
        bad = details.get("BadRequest")
        field = bad.field_violations[0].field if bad and bad.field_violations else metadata.get("field", "")
        description = bad.field_violations[0].description if bad and bad.field_violations else text
        exc = cls(field, description)
    else:
        exc = cls(text, **metadata)
    return exc

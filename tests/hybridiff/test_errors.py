"""Typed errors keep their class across a real gRPC call (hybridiff.errors): the server ends the
call with ``hybridiff.serving.abort`` and the client reads the very same error back with
``from_rpc_error``; a status without details still maps by its code."""

from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from hybridiff.errors import (
    ERROR_DOMAIN,
    BadCommand,
    Cancelled,
    DeadlineExceeded,
    HybridiffError,
    InvalidArgument,
    ModelLoadError,
    ModelNotFound,
    PeerTimeout,
    QueueFull,
    Unauthenticated,
    Unavailable,
    WorkerBusy,
    WorkerFailed,
    from_rpc_error,
    status_details,
)
from hybridiff.serving import abort

SERVICE, METHOD = "hybridiff.test.Errors", "Raise"

# What the server raises, by the request's bytes.
TYPED: dict[str, HybridiffError] = {
    "invalid_argument": InvalidArgument("width", "must be a multiple of 8, got 100"),
    "bad_command": BadCommand("step", "step 7 arrived before step 6"),
    "queue_full": QueueFull("admission queue is full (16 waiting)"),
    "unavailable": Unavailable("no workers are ready"),
    "worker_busy": WorkerBusy("worker w1 already runs request r0"),
    "peer_timeout": PeerTimeout("c: no message for step 5 within 2.0s", peer="tcp://127.0.0.1:4000"),
    "deadline_exceeded": DeadlineExceeded("no workers became free in time"),
    "cancelled": Cancelled("the client cancelled the request"),
    "model_not_found": ModelNotFound("model 'sd9' is not served here; served: sdxl"),
    "model_load_error": ModelLoadError("no model_index.json in /models/x"),
    "worker_failed": WorkerFailed("worker u: RuntimeError: CUDA error"),
    "unauthenticated": Unauthenticated("missing bearer token"),
}
WITH_RETRY_INFO = {"queue_full", "unavailable", "worker_busy"}

# Plain ``context.abort(code, text)`` without details, by the request's bytes.
PLAIN: dict[str, tuple[grpc.StatusCode, type[HybridiffError]]] = {
    "plain_invalid_argument": (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    "plain_not_found": (grpc.StatusCode.NOT_FOUND, ModelNotFound),
    "plain_resource_exhausted": (grpc.StatusCode.RESOURCE_EXHAUSTED, QueueFull),
    "plain_unavailable": (grpc.StatusCode.UNAVAILABLE, Unavailable),
    "plain_deadline_exceeded": (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    "plain_cancelled": (grpc.StatusCode.CANCELLED, Cancelled),
    "plain_unauthenticated": (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    # Codes no typed error claims: a failure of the worker.
    "plain_internal": (grpc.StatusCode.INTERNAL, WorkerFailed),
    "plain_failed_precondition": (grpc.StatusCode.FAILED_PRECONDITION, WorkerFailed),
    "plain_permission_denied": (grpc.StatusCode.PERMISSION_DENIED, WorkerFailed),
}


def _handler(request: bytes, context: grpc.ServicerContext) -> bytes:
    case = request.decode()
    if case in TYPED:
        abort(context, TYPED[case])
    if case in PLAIN:
        context.abort(PLAIN[case][0], f"plain {case}")
    if case == "foreign_domain":
        # An ErrorInfo of another service: its reason means nothing here, the status code decides.
        info = error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="other.example.com")
        detail = status_pb2.Status().details.add()
        detail.Pack(info)
        status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="elsewhere")
        status.details.append(detail)
        context.abort_with_status(rpc_status.to_status(status))
    if case == "crash":
        raise RuntimeError("an unexpected bug")
    return b"ok"


@pytest.fixture(scope="module")
def method():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel.unary_unary(f"/{SERVICE}/{METHOD}")
    channel.close()
    server.stop(0)


@pytest.fixture
def call(method):
    """The failed call of a case, as the client sees it."""

    def _call(case: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as failure:
            method(case.encode(), timeout=5)
        return failure.value

    return _call


def test_the_server_answers_when_nothing_fails(method):
    assert method(b"nothing", timeout=5) == b"ok"


@pytest.mark.parametrize("case", sorted(TYPED))
def test_typed_error_round_trip(call, case):
    sent = TYPED[case]
    err = call(case)
    assert err.code() == sent.code
    assert err.details() == str(sent)

    got = from_rpc_error(err)
    assert type(got) is type(sent)
    assert got.code == sent.code and got.reason == sent.reason
    assert got.metadata == sent.metadata
    if isinstance(sent, InvalidArgument):
        assert (got.field, got.description) == (sent.field, sent.description)
        assert str(got) == str(sent)
    else:
        assert str(got) == str(sent)


@pytest.mark.parametrize("case", sorted(TYPED))
def test_status_details_carry_error_info_bad_request_and_retry_info(call, case):
    sent = TYPED[case]
    details = status_details(call(case))

    info = details["ErrorInfo"]
    assert info.reason == sent.reason and info.domain == ERROR_DOMAIN
    assert dict(info.metadata) == sent.metadata

    if isinstance(sent, InvalidArgument):
        violation = details["BadRequest"].field_violations[0]
        assert (violation.field, violation.description) == (sent.field, sent.description)
    else:
        assert "BadRequest" not in details

    if case in WITH_RETRY_INFO:
        delay = details["RetryInfo"].retry_delay
        assert delay.ToTimedelta().total_seconds() == sent.retry_after == 1.0
    else:
        assert "RetryInfo" not in details


def test_peer_timeout_names_the_peer(call):
    got = from_rpc_error(call("peer_timeout"))
    assert isinstance(got, PeerTimeout) and got.metadata["peer"] == "tcp://127.0.0.1:4000"
    # Same status code as Unavailable, yet a different class: the reason decides, not the code.
    assert got.code == Unavailable.code and not isinstance(got, Unavailable)


def test_bad_command_is_a_failed_precondition_not_the_users_fault(call):
    err = call("bad_command")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    got = from_rpc_error(err)
    assert type(got) is BadCommand and got.field == "step"


def test_prefix_is_put_before_the_message(call):
    got = from_rpc_error(call("worker_failed"), prefix="worker u: ")
    assert type(got) is WorkerFailed
    assert str(got) == "worker u: " + str(TYPED["worker_failed"])


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_status_without_details_maps_by_code(call, case):
    code, expected = PLAIN[case]
    err = call(case)
    assert err.code() == code
    assert status_details(err) == {}

    got = from_rpc_error(err)
    assert type(got) is expected
    if expected is InvalidArgument:
        # No BadRequest to name the field: the field is unknown, the text is the description.
        assert got.field == "" and got.description == f"plain {case}"
    else:
        assert str(got) == f"plain {case}" and got.metadata == {}


def test_error_info_of_another_domain_maps_by_code(call):
    err = call("foreign_domain")
    assert status_details(err)["ErrorInfo"].domain == "other.example.com"
    got = from_rpc_error(err)
    assert type(got) is Unavailable and str(got) == "elsewhere"


def test_an_unexpected_exception_in_the_server_is_a_worker_failure(call):
    err = call("crash")
    assert err.code() == grpc.StatusCode.UNKNOWN
    got = from_rpc_error(err)
    assert type(got) is WorkerFailed and got.code == grpc.StatusCode.INTERNAL


def test_every_reason_names_exactly_one_class():
    # from_rpc_error finds the class by its reason: two classes with one reason would be confused.
    classes, todo = [], [HybridiffError]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    reasons = [c.reason for c in classes]
    assert len(reasons) == len(set(reasons)), reasons
    assert {type(e) for e in TYPED.values()} <= set(classes)

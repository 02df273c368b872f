"""Transport security and authentication for both roles (docs/design.md section 5).

- gRPC: optional TLS, and mutual TLS when a client CA is given. Control-plane certificates
  name roles (``WORKER_NAME``, ``COORDINATOR_NAME`` as subjectAltNames): the coordinator checks
  the worker's as hostname verification does, a worker checks the coordinator's with
  ``PeerNameInterceptor``, so a certificate the same CA signed for the other role is refused.
- The public API: health ``Check`` stays open so probes work (it answers at once and holds no
  thread); everything else, health ``Watch`` and reflection included (streams that hold a server
  thread for as long as the caller likes), can require a bearer token, and the admin methods
  (``ClusterStatus``) an admin token.
- Every refusal is decided before the request is read: a caller without the right token or
  certificate cannot make a server receive (and hold) a large message.
- ZeroMQ: CURVE between workers with one pool keypair from files (a Kubernetes Secret); a ZAP
  handler admits only clients that hold that keypair, so a peer without it cannot feed a worker.
Nothing here deserialises code; keys and certificates are read as PEM / Z85 text.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import grpc

from hybridiff.errors import HybridiffError, InvalidArgument, PermissionDenied, Unauthenticated, to_status

# Only the probe: Watch and reflection are streams a caller may hold open (each holds a server
# thread), so with a token configured they take it like the API does.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})  # the same as HEALTH_CHECK_METHOD
CURVE_KEY_NAME = "pool"


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(what, f"cannot read {path}: {exc.strerror}") from None


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS when ``cert`` and ``key`` are given; clients must present a cert from ``client_ca`` when given."""
    if not cert and not key:
        if client_ca:
            raise InvalidArgument("tls-client-ca", "needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise InvalidArgument("tls-cert", "--tls-cert and --tls-key go together")
    pair = [(_read(key, "tls-key"), _read(cert, "tls-cert"))]
    if client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(client_ca, "tls-client-ca"), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS to a server signed by ``ca``; with ``cert``/``key`` also present a client certificate."""
    if not ca:
        if cert or key:
            raise InvalidArgument("tls-ca", "a client certificate needs the server's CA too")
        return None
    if bool(cert) != bool(key):
        raise InvalidArgument("tls-cert", "--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "tls-ca"),
        private_key=_read(key, "tls-key") if key else None,
        certificate_chain=_read(cert, "tls-cert") if cert else None,
    )


def read_token(path: str | None, env: str = "HYBRIDIFF_TOKEN") -> str | None:
    """A bearer token from a file (a mounted Secret), else from ``$HYBRIDIFF_TOKEN``."""
    if path:
        token = _read(path, "auth-token-file").decode().strip()
        if not token:
            raise InvalidArgument("auth-token-file", f"{path} is empty")
        return token
    return os.environ.get(env) or None


def denying_handler(handler: grpc.RpcMethodHandler | None, error: HybridiffError) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s method (None: any method, even one not served) that ends the
    call with ``error`` without reading the request. Every denial takes a request stream, whatever
    the method's cardinality (the wire is the same): gRPC Python reads a unary request before it
    calls the handler, and an oversized message sent by someone without a token must be refused
    before it is received, not after."""

    def deny(request_iterator, context):
        context.abort_with_status(to_status(error))

    def deny_stream(request_iterator, context):
        deny(request_iterator, context)
        yield  # unreachable: abort raises; makes this a generator for streaming handlers

    if handler is None:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    kw = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.stream_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches (constant-time compare),
    decided from the call's metadata before its request is read.

    ``admin_methods`` (``ClusterStatus``: worker addresses and request ids) take only the
    ``admin_token``: an ordinary token gets PERMISSION_DENIED there, and without an admin token
    configured nobody may call them. The admin token is accepted everywhere. ``token`` None with
    an ``admin_token``: the other methods are open, the admin methods are not."""

    def __init__(
        self, token: str | None, admin_token: str | None = None, admin_methods: Iterable[str] = ()
    ) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token else None
        self._admin_methods = frozenset(admin_methods)

    def _verdict(self, method: str, presented: bytes) -> HybridiffError | None:
        """None to let the call through, else the error that ends it."""
        is_admin = self._admin is not None and hmac.compare_digest(presented, self._admin)
        if is_admin or method in OPEN_METHODS:
            return None
        is_user = self._expected is not None and hmac.compare_digest(presented, self._expected)
        if method in self._admin_methods:
            if is_user:
                return PermissionDenied("this method takes the admin token")
            return Unauthenticated("missing or invalid admin bearer token")
        if is_user or self._expected is None:
            return None
        return Unauthenticated("missing or invalid bearer token")

    def authenticated(self, context: grpc.ServicerContext) -> bool:
        """Whether the call presents the token or the admin token (an open method's caller
        without one runs in the open slots, ``serving.new_server``)."""
        presented = str(dict(context.invocation_metadata() or ()).get("authorization", "")).encode()
        return any(
            expected is not None and hmac.compare_digest(presented, expected)
            for expected in (self._expected, self._admin)
        )

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        verdict = self._verdict(handler_call_details.method, str(metadata.get("authorization", "")).encode())
        handler = continuation(handler_call_details)
        if verdict is None or handler is None:
            return handler
        return denying_handler(handler, verdict)


# --- control-plane identity ----------------------------------------------------------------
# Certificates name a role, not an address (pods come and go by IP): the workers' server
# certificates carry WORKER_NAME and the coordinator's client certificate COORDINATOR_NAME as a
# subjectAltName. The coordinator checks the worker's name as TLS hostname verification does
# (``grpc.ssl_target_name_override``); the worker checks the coordinator's with PeerNameInterceptor.
WORKER_NAME = "worker.hybridiff.internal"
COORDINATOR_NAME = "coordinator.hybridiff.internal"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> set[str]:
    """The subjectAltNames (DNS names and URIs) of a TLS peer's verified certificate."""
    return {
        value.decode(errors="replace")
        for key in ("x509_subject_alternative_name", "peer_dns", "peer_spiffe_id")
        for value in auth_context.get(key, ())
    }


class PeerNameInterceptor(grpc.ServerInterceptor):
    """PERMISSION_DENIED unless the caller came over TLS with a certificate that names ``name`` in
    a subjectAltName (a chain from the client CA alone proves only that the CA signed it: the CA
    may sign the workers' certificates too). Health Check stays open (a probe over plaintext on
    the same server answers health and nothing else); Watch, a stream a caller may hold open,
    does not."""

    def __init__(self, name: str, open_prefixes: tuple[str, ...] = (HEALTH_CHECK_METHOD,)) -> None:
        self._name = name
        self._open = open_prefixes

    def authenticated(self, context: grpc.ServicerContext) -> bool:
        """Whether the caller's certificate names ``name`` (an open method's caller without one
        runs in the open slots, ``serving.new_server``)."""
        return self._name in peer_names(context.auth_context())

    def _check(self, context: grpc.ServicerContext) -> None:
        if not self.authenticated(context):
            error = PermissionDenied(f"the peer's certificate does not name {self._name}")
            context.abort_with_status(to_status(error))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        return checked_handler(handler, self._check)


def checked_handler(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    """``handler`` with ``check(context)`` run before its request is read: a unary request is
    taken from a request stream after the check (gRPC Python reads it before calling a unary
    handler), so a refused peer's message is never received."""

    def first(requests, context):
        for request in requests:
            return request
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")

    def unary(behavior):
        def run(requests, context):
            check(context)
            return behavior(first(requests, context), context)

        return run

    def streaming(behavior):
        def run(requests, context):
            check(context)
            return behavior(requests, context)

        return run

    kw = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.unary_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.stream_stream_rpc_method_handler(unary(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(streaming(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)


class TokenAuth(grpc.AuthMetadataPlugin):
    """Client side: adds the bearer token to every call."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, context, callback) -> None:
        callback((("authorization", f"Bearer {self._token}"),), None)


# --- ZeroMQ CURVE ---------------------------------------------------------------------------
def write_curve_keys(directory: str | Path) -> Path:
    """Create the pool keypair (``pool.key`` public, ``pool.key_secret`` secret) in ``directory``."""
    import zmq.auth  # deferred: zmq is a server dependency, not the light client's

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(directory), CURVE_KEY_NAME)
    os.chmod(directory / f"{CURVE_KEY_NAME}.key_secret", 0o600)
    return directory


def load_curve_keys(directory: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) of the pool keypair."""
    import zmq.auth  # deferred: zmq is a server dependency, not the light client's

    path = Path(directory) / f"{CURVE_KEY_NAME}.key_secret"
    if not path.is_file():
        raise InvalidArgument(
            "curve-keys", f"no {path.name} in {directory} (create it with `hybridiff curve-keys`)"
        )
    public, secret = zmq.auth.load_certificate(str(path))
    if not secret:
        raise InvalidArgument("curve-keys", f"{path} holds no secret key")
    return public, secret

"""Transport security and authentication for both roles (DESIGN section 5).

- gRPC: optional TLS, and mutual TLS when a client CA is given (a worker started with the
  coordinator's CA accepts control only from the coordinator); ``grpc.health.v1`` and
  reflection stay open so probes work, everything else can require a bearer token.
- ZeroMQ: CURVE between workers with one pool keypair from files (a Kubernetes Secret); a ZAP
  handler admits only clients that hold that keypair, so a peer without it cannot feed a worker.
Nothing here deserialises code; keys and certificates are read as PEM / Z85 text.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from hybridiff.errors import InvalidArgument

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
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


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        def deny_stream(request_or_iterator, context):
            deny(request_or_iterator, context)
            yield  # unreachable: abort raises; makes this a generator for streaming handlers

        kw = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kw)
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)


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

"""The load generator's client for the HTTP edge (``hybridiff loadtest --api http``): the same
``generate_request`` / ``list_models`` as ``DiffusionClient``, over ``POST /v1/images/generations``
with one kept-alive connection per load thread (as an HTTP client pool would), so that HTTP and
gRPC are measured alike."""

from __future__ import annotations

import http.client
import json
import threading
from types import SimpleNamespace
from urllib.parse import urlsplit

from hybridiff.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    QueueFull,
    Unauthenticated,
    Unavailable,
    WorkerFailed,
)
from hybridiff.protocol import Mode, label, parse
from hybridiff.v1 import diffusion_pb2 as pb

ERRORS = {400: InvalidArgument, 401: Unauthenticated, 404: ModelNotFound, 429: QueueFull, 503: Unavailable}


def body_of(req: pb.GenerateRequest) -> dict:
    """The HTTP body of a ``GenerateRequest`` (the fields the load generator sets)."""
    body: dict = {"prompt": req.prompt, "response_format": "b64_json"}
    if req.model:
        body["model"] = req.model
    if req.HasField("num_inference_steps"):
        body["num_inference_steps"] = req.num_inference_steps
    if req.HasField("seed"):
        body["seed"] = req.seed
    if req.mode:
        body["mode"] = label(Mode(req.mode))
    if req.HasField("width") and req.HasField("height"):
        body["size"] = f"{req.width}x{req.height}"
    return body


class HttpImagesClient:
    """``target``: ``http://HOST:PORT`` (or ``HOST:PORT``) of a coordinator's ``--http-port``."""

    def __init__(self, target: str, timeout: float = 300.0, token: str | None = None) -> None:
        parts = urlsplit(target if "://" in target else f"http://{target}")
        self.host, self.port, self.https = parts.hostname, parts.port, parts.scheme == "https"
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=timeout)
        conn.timeout = timeout
        return conn

    def _call(self, method: str, path: str, body: dict | None, timeout: float | None) -> dict:
        conn = self._connection(timeout or self.timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=self.headers)
            response = conn.getresponse()
            payload = response.read()
        except TimeoutError:
            self._drop()
            raise DeadlineExceeded("no answer within the request's timeout") from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise Unavailable(f"HTTP connection failed: {exc}") from None
        if response.status != 200:
            try:
                message = json.loads(payload)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = payload[:200].decode(errors="replace")
            if response.status == 400:
                raise InvalidArgument("request", message)
            error = ERRORS.get(response.status, DeadlineExceeded if response.status == 504 else WorkerFailed)
            raise error(f"HTTP {response.status}: {message}")
        return json.loads(payload)

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def list_models(self, timeout: float | None = None) -> list[dict]:
        return self._call("GET", "/v1/models", None, timeout)["data"]

    def generate_request(self, request: pb.GenerateRequest, timeout: float | None = None):
        """The response as the load generator reads it: ``.stats.queued_seconds``, ``.mode_used``
        (a ``Mode``), ``.workers``, ``.notes``; raises ``HybridiffError``."""
        answer = self._call("POST", "/v1/images/generations", body_of(request), timeout)
        details, timings = answer["hybridiff"], answer["timings"]
        stats = SimpleNamespace(
            queued_seconds=timings["queued"],
            mode_used=parse(Mode, details["mode"]),
            workers=details["workers"],
            notes=details["notes"],
        )
        return SimpleNamespace(stats=stats, seed=answer["seed"], images=answer["data"])

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> HttpImagesClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The HTTP edge of the coordinator: the OpenAI Images API (``POST /v1/images/generations``,
``GET /v1/models``), health and readiness, and the playground page, on FastAPI and uvicorn in a
thread of the coordinator process (docs/design.md section 3).

A thin front end over the same request runner as the gRPC edge (``coordinator.runner``): the
same admission queue, limits, metrics, traces and logs, so the same request gives the same image
through either. Each generation runs on a thread of the edge's own bounded pool while the event
loop watches its client: a client that disconnects cancels the request (the runner aborts its
workers and frees them). Every error leaves as OpenAI's error body (``error.message``, ``type``,
``param``, ``code``) with the HTTP status of its typed error; a bearer token (the gRPC API's)
and the body limit are checked before the body is read or kept.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import propagate
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.driver import StepStat
from coordinator.http_schema import (
    ErrorDetail,
    ErrorResponse,
    GenerationDetails,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    Timings,
    http_argument_error,
)
from coordinator.previews import PreviewDecoder
from coordinator.runner import Generation, RequestRunner, as_typed_error
from hybridiff import __version__
from hybridiff.errors import Cancelled, HybridiffError, InvalidArgument, TooManyCalls, Unauthenticated
from hybridiff.protocol import OutputFormat, label
from hybridiff.request import MAX_REQUEST_ID_CHARS, side_multiple
from hybridiff.v1 import diffusion_pb2 as pb

log = logging.getLogger(__name__)

PLAYGROUND = Path(__file__).with_name("static") / "playground.html"
# How often the event loop looks whether a waiting client is still there (the runner then stops
# the request between steps, and within 0.1 s of any wait: docs/design.md section 5).
DISCONNECT_POLL_SECONDS = 0.1
# A body over the limit is read on and thrown away up to this many bytes, so that the client,
# still sending, gets its 413 instead of a reset connection; a longer one is not read at all.
DISCARD_BYTES = 4 * 1024 * 1024
# Paths that take no token: probes, the page and the API's own description.
OPEN_PATHS = ("/", "/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")

# Our typed errors' gRPC codes -> HTTP status and OpenAI error type.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),  # nginx's "client closed request": nobody reads it
    grpc.StatusCode.ABORTED: (503, "service_unavailable_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class HttpCall:
    """An HTTP request as the runner sees its client (``runner.ClientCall``): ``gone`` is set by
    the event loop once the client disconnected."""

    def __init__(self) -> None:
        self.gone = threading.Event()

    def check_alive(self) -> None:
        if self.gone.is_set():
            raise Cancelled("the HTTP client disconnected")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(exc: HybridiffError) -> JSONResponse:
    """A typed error as OpenAI's error body, with its HTTP status (and Retry-After); a bad field
    is named as the HTTP body names it (``size``, not ``width``)."""
    if isinstance(exc, InvalidArgument):
        exc = http_argument_error(exc)
    status, type_ = HTTP_STATUS.get(exc.code, (500, "server_error"))
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    param = getattr(exc, "field", None)
    return JSONResponse(error_body(str(exc), type_, param, exc.reason.lower()), status, headers=headers)


def request_id_of(headers: Headers) -> str:
    """The client's ``x-request-id`` when it is one we can use, else a new one."""
    given = headers.get("x-request-id", "")
    ok = 0 < len(given) <= MAX_REQUEST_ID_CHARS and given.isascii() and given.isprintable()
    return given if ok else uuid.uuid4().hex


class EdgeGuard:
    """ASGI middleware, outermost: names every request (``x-request-id`` on every response),
    refuses a missing or wrong bearer token (401) before the body is read, and a body over
    ``max_body`` bytes (413) before it is kept; the body, read up to the limit, is handed on."""

    def __init__(self, app, token: str | None, admin_token: str | None, max_body: int) -> None:
        self.app = app
        self._accepted = [f"Bearer {t}".encode() for t in (token, admin_token) if t]
        self._open = token is None  # as on gRPC: no user token, the public API is open
        self.max_body = max_body

    def authorized(self, headers: Headers) -> bool:
        presented = headers.get("authorization", "").encode()
        matches = [hmac.compare_digest(presented, expected) for expected in self._accepted]
        return self._open or any(matches)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        request_id = request_id_of(headers)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        if scope["path"] not in OPEN_PATHS and not self.authorized(headers):
            refusal = error_response(Unauthenticated("missing or invalid bearer token"))
            return await refusal(scope, receive, send_named)
        body, complete = await self._read_body(headers, receive)
        if not complete:
            if body is not None:  # None: the client went away
                await self._too_large(scope, receive, send_named)
            return
        replay = iter(body)

        async def receive_replayed():
            message = next(replay, None)
            return message if message is not None else await receive()

        await self.app(scope, receive_replayed, send_named)

    async def _read_body(self, headers: Headers, receive) -> tuple[list | None, bool]:
        """(the body's messages, True) within the limit; ([], False) over it; (None, False) when
        the client disconnected."""
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > DISCARD_BYTES:
            return [], False
        messages, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            total += len(message.get("body", b""))
            more = message.get("more_body", False)
            if total > self.max_body:
                while more and total <= DISCARD_BYTES:  # thrown away as it comes
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, False
                    total += len(message.get("body", b""))
                    more = message.get("more_body", False)
                return [], False
            messages.append(message)
        return messages, True

    async def _too_large(self, scope, receive, send) -> None:
        body = error_body(
            f"the request body is over {self.max_body} bytes",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)


class _Run:
    """One generation on the edge's pool, its events (steps, latents, the end) on the event loop."""

    def __init__(self, edge: HttpEdge, request: Request, proto: pb.GenerateRequest, previews: bool) -> None:
        if not edge.slots.acquire(blocking=False):
            raise TooManyCalls(f"at most {edge.max_calls} HTTP generations at once; retry later")
        self.call = HttpCall()
        self.request = request
        self.events: asyncio.Queue = asyncio.Queue()
        self._next_look = 0.0  # when to look for a disconnected client next
        self.spec = None
        loop = asyncio.get_running_loop()

        def put(*item) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, item)

        def on_resolved(spec) -> None:
            self.spec = spec

        def on_step(stat: StepStat, total: int) -> None:
            put("step", stat, total)

        parent = propagate.extract(request.headers)  # the W3C traceparent, if any: the request joins it
        attributes = {
            "hybridiff.api": "http",
            "http.request.method": request.method,
            "url.path": request.url.path,
        }

        def work() -> Generation:
            token = otel_context.attach(parent)
            try:
                return edge.runner.generate(
                    proto,
                    self.call,
                    on_step=on_step,
                    on_resolved=on_resolved,
                    span_attributes=attributes,
                    on_latents=(lambda step, latents: put("latents", step, latents)) if previews else None,
                    api="http",
                )
            finally:
                otel_context.detach(token)
                edge.slots.release()

        try:
            self.future = loop.run_in_executor(edge.executor, work)
        except BaseException:
            edge.slots.release()
            raise
        self.future.add_done_callback(lambda _: self.events.put_nowait(("done",)))

    async def next_event(self) -> tuple:
        """The next event; meanwhile, a client that went away cancels the request. The client is
        looked at every ``DISCONNECT_POLL_SECONDS`` however fast the events come (fast steps
        would otherwise keep the check from ever running)."""
        while True:
            if time.monotonic() >= self._next_look:
                self._next_look = time.monotonic() + DISCONNECT_POLL_SECONDS
                if not self.call.gone.is_set() and await self.request.is_disconnected():
                    log.info("the HTTP client disconnected: cancelling its request")
                    self.call.gone.set()
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                continue

    def result(self) -> Generation:
        """The generation, once ``done`` came; its typed error otherwise."""
        exc = self.future.exception()
        if exc is not None:
            raise as_typed_error(exc)
        return self.future.result()

    def abandon(self) -> None:
        """The response ended before the generation (the client went away): stop it."""
        if not self.future.done():
            self.call.gone.set()


def _size(spec) -> str:
    return f"{spec.width}x{spec.height}"


def _format_name(spec) -> str:
    return label(OutputFormat(spec.output_format))


class HttpEdge:
    """The HTTP edge of one coordinator: the FastAPI app over its request runner."""

    def __init__(
        self,
        runner: RequestRunner,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        max_body: int = 64 * 1024,
        max_calls: int = 40,
    ) -> None:
        self.runner = runner
        self.max_calls = max_calls
        self.slots = threading.BoundedSemaphore(max_calls)
        self.executor = ThreadPoolExecutor(max_workers=max_calls, thread_name_prefix="http-generate")
        self.previews = PreviewDecoder()
        self.app = self._build(token, admin_token, max_body)

    # --- readiness ------------------------------------------------------------------
    def ready(self) -> bool:
        counts = self.runner.pool.counts()
        return not self.runner.draining and counts["idle"] + counts["busy"] + counts["elsewhere"] > 0

    # --- conversions ----------------------------------------------------------------
    def _learn_previews(self, done: Generation) -> None:
        """Fit the model's preview colours to this result, off the request's path."""
        result = done.result
        if result.images and result.latents.data:
            asyncio.get_running_loop().run_in_executor(
                None, self.previews.learn, done.spec.model, result.latents, result.images[0]
            )

    @staticmethod
    def _details(done: Generation, total_seconds: float) -> dict:
        st, spec = done.result.stats, done.spec
        return {
            "seed": done.result.seed,
            "timings": Timings(
                queued=st.queued_seconds,
                encoding=st.encoding_seconds,
                denoising=st.denoising_seconds,
                decoding=st.decoding_seconds,
                total=total_seconds,
            ),
            "hybridiff": GenerationDetails(
                request_id=done.result.request_id,
                mode=label(st.mode_used),
                tau1=st.tau1,
                tau2=st.tau2,
                tau1_source=st.tau1_source,
                steps=spec.num_steps,
                workers=list(st.workers),
                notes=list(st.notes),
            ),
        }

    def _images_response(self, done: Generation, total_seconds: float) -> ImagesResponse:
        return ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=base64.b64encode(image).decode()) for image in done.result.images],
            output_format=_format_name(done.spec),
            size=_size(done.spec),
            **self._details(done, total_seconds),
        )

    # --- handlers -------------------------------------------------------------------
    async def generate(self, body: ImageGenerationRequest, request: Request):
        proto = body.to_proto(request.state.request_id)
        if proto.output_format == OutputFormat.RAW_LATENTS:
            proto.output_format = OutputFormat.PNG
        start = time.perf_counter()
        if body.stream:
            return await self._stream(body, request, proto, start)
        run = _Run(self, request, proto, previews=False)
        try:
            while (await run.next_event())[0] != "done":
                pass
        except asyncio.CancelledError:
            run.abandon()
            raise
        done = run.result()
        self._learn_previews(done)
        if body.user:
            log.info("request %s for user %r done", done.result.request_id, body.user)
        return self._images_response(done, time.perf_counter() - start)

    async def _stream(self, body: ImageGenerationRequest, request: Request, proto, start: float):
        """Server-sent events: step progress and ``partial_images`` previews at evenly spaced
        steps, then ``image_generation.completed``. The response starts with the first step, so
        a request refused before it runs (a bad field, a full queue) gets its HTTP status."""
        partials = body.partial_images or 0
        run = _Run(self, request, proto, previews=partials > 0)
        try:
            first = await run.next_event()
        except asyncio.CancelledError:
            run.abandon()
            raise
        if first[0] == "done":
            run.result()  # raises the request's error, answered with its status
        return StreamingResponse(
            self._events(run, first, partials, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, run: _Run, first: tuple, partials: int, start: float):
        spec = run.spec
        common = {
            "size": _size(spec),
            "quality": "auto",
            "background": "opaque",
            "output_format": _format_name(spec),
        }
        # Partial images after evenly spaced steps (fewer when there are fewer steps).
        at = sorted({max(0, round((k + 1) * spec.num_steps / (partials + 1)) - 1) for k in range(partials)})
        at = [s for s in at if s < spec.num_steps - 1]
        sent = 0
        event = first
        try:
            yield _sse(
                "hybridiff.accepted",
                {"request_id": spec.request_id, "total_steps": spec.num_steps, "seed": spec.seed, **common},
            )
            while event[0] != "done":
                if event[0] == "step":
                    _, stat, total = event
                    yield _sse("hybridiff.step_progress", _step_event(stat, total))
                elif event[0] == "latents" and sent < len(at) and event[1] == at[sent]:
                    image = await asyncio.to_thread(
                        self.previews.preview,
                        spec.model,
                        event[2],
                        spec.width,
                        spec.height,
                        common["output_format"],
                    )
                    if image is not None:
                        yield _sse(
                            "image_generation.partial_image",
                            {
                                "b64_json": base64.b64encode(image).decode(),
                                "created_at": int(time.time()),
                                "partial_image_index": sent,
                                "step": event[1],
                                **common,
                            },
                        )
                        sent += 1
                event = await run.next_event()
            try:
                done = run.result()
            except HybridiffError as exc:
                failed = json.loads(error_response(exc).body)
                yield _sse("error", failed)
                return
            self._learn_previews(done)
            details = self._details(done, time.perf_counter() - start)
            for image in done.result.images:
                yield _sse(
                    "image_generation.completed",
                    {
                        "b64_json": base64.b64encode(image).decode(),
                        "created_at": int(time.time()),
                        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
                        **common,
                        "seed": details["seed"],
                        "timings": details["timings"].model_dump(),
                        "hybridiff": details["hybridiff"].model_dump(),
                    },
                )
        finally:  # the client went away (the response was cancelled) or the stream ended
            run.abandon()

    async def list_models(self) -> ModelList:
        cards = []
        for info in self.runner.models():
            lim = info.limits
            cards.append(
                ModelCard(
                    id=info.model_name,
                    arch=info.arch,
                    default_size=f"{lim.default_side}x{lim.default_side}",
                    max_size=f"{lim.max_side}x{lim.max_side}",
                    size_multiple=side_multiple(lim.multiple),
                    max_images=lim.max_images,
                    default_steps=info.defaults.steps,
                    default_guidance_scale=info.defaults.guidance_scale,
                )
            )
        return ModelList(data=cards)

    # --- the app --------------------------------------------------------------------
    def _build(self, token: str | None, admin_token: str | None, max_body: int) -> FastAPI:
        app = FastAPI(
            title="Hybridiff",
            version=__version__,
            description="OpenAI-compatible Images API over Hybridiff's hybrid data-pipeline parallel "
            "diffusion serving (docs/design.md section 3).",
        )
        errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503, 504)}
        app.add_api_route(
            "/v1/images/generations",
            self.generate,
            methods=["POST"],
            response_model=ImagesResponse,
            responses={
                **errors,
                200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream: true"},
            },
        )
        app.add_api_route("/v1/models", self.list_models, methods=["GET"], response_model=ModelList)

        @app.get("/healthz", include_in_schema=False)
        async def healthz():
            live = not self.runner.draining
            return JSONResponse({"status": "ok" if live else "draining"}, 200 if live else 503)

        @app.get("/readyz", include_in_schema=False)
        async def readyz():
            ready = self.ready()
            return JSONResponse({"status": "ready" if ready else "not ready"}, 200 if ready else 503)

        @app.get("/", include_in_schema=False)
        async def playground():
            return FileResponse(PLAYGROUND, media_type="text/html")

        @app.exception_handler(HybridiffError)
        async def typed_error(request: Request, exc: HybridiffError):
            return error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(request: Request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            param = ".".join(loc) or None
            message = f"{param}: {first.get('msg', 'invalid')}" if param else "the body is not valid JSON"
            return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_argument"), 400)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            return JSONResponse(
                error_body(str(exc.detail), "invalid_request_error", None, None),
                exc.status_code,
                headers=exc.headers,
            )

        @app.exception_handler(Exception)
        async def internal(request: Request, exc: Exception):
            log.error("HTTP request failed", exc_info=exc)
            return JSONResponse(error_body("internal error; see the coordinator log", "server_error"), 500)

        return EdgeGuard(app, token, admin_token, max_body)

    def close(self, timeout: float) -> None:
        """Stop the pool: the generations still running end with the runner's drain."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for thread in list(getattr(self.executor, "_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))


def _step_event(stat: StepStat, total: int) -> dict:
    event = {
        "step": stat.step,
        "total_steps": total,
        "phase": label(stat.phase),
        "seconds": stat.wall_seconds,
    }
    if stat.rel_mae is not None:
        event["rel_mae"] = stat.rel_mae
    return event


def _sse(event: str, data: dict) -> str:
    """One server-sent event; its data carries its ``type`` too, as OpenAI's do."""
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"


class HttpServer:
    """uvicorn serving ``app`` on a thread of its own; the socket is bound at construction (port
    0: any free port, ``self.port`` the one bound). ``tls`` = (cert, key, client CA) as on gRPC."""

    def __init__(self, app, host: str, port: int, tls=(None, None, None), grace: float = 60.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        cert, key, client_ca = tls
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=grace,
            ssl_certfile=cert,
            ssl_keyfile=key,
            ssl_ca_certs=client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="http-edge", daemon=True
        )

    def start(self, timeout: float = 10.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")
        return self

    def begin_stop(self) -> None:
        """Stop accepting; the requests in flight go on (within the grace period)."""
        self.server.should_exit = True

    def wait_stopped(self, timeout: float) -> bool:
        self._thread.join(timeout)
        self.socket.close()
        return not self._thread.is_alive()

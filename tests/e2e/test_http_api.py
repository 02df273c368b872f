"""The OpenAI-compatible HTTP edge (coordinator/http_api.py) on a real local cluster: the official
``openai`` SDK, unmodified, against the same runner as gRPC; streaming with partial images; the
OpenAI error body; the token, the body limit, a disconnecting client, the trace context."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest
from cluster_helpers import free_port, wait_until, worker_states
from PIL import Image

from hybridiff.client import DiffusionClient
from hybridiff.request import request_from_names

PROMPT = "a red circle on the left"
FAST = {"num_inference_steps": 4}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Reply:
    status_code: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)


def _call(method: str, url: str, *, json_body=None, content: bytes | None = None, headers=None) -> Reply:
    """One plain HTTP call (the standard library's client), 4xx and 5xx answers included."""
    data = json.dumps(json_body).encode() if json_body is not None else content
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode())


def _get(url, headers=None) -> Reply:
    return _call("GET", url, headers=headers)


def _post(url, json=None, content=None, headers=None) -> Reply:
    return _call("POST", url, json_body=json, content=content, headers=headers)


@pytest.fixture(scope="module")
def base_url(sdxl_cluster) -> str:
    assert sdxl_cluster.http_port, "the shared cluster serves HTTP (tests/conftest.py)"
    return f"http://127.0.0.1:{sdxl_cluster.http_port}"


@pytest.fixture(scope="module")
def sdk(base_url) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def _model(sdk) -> str:
    return sdk.models.list().data[0].id


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# --- the SDK --------------------------------------------------------------------------------
def test_openai_sdk_gets_the_grpc_apis_images_for_a_seed(sdk, sdxl_cluster):
    model = _model(sdk)
    calls = [
        sdk.images.generate(
            model=model,
            prompt=PROMPT,
            n=2,
            size="64x64",
            response_format="b64_json",
            extra_body={"seed": 7, **FAST},
        )
        for _ in range(2)
    ]
    images = [[base64.b64decode(d.b64_json) for d in call.data] for call in calls]
    assert images[0] == images[1]  # the same call with the same seed: the same bytes
    assert len(images[0]) == 2 and images[0][0] != images[0][1]
    for b64 in (d.b64_json for d in calls[0].data):
        assert _png(b64).size == (64, 64) and _png(b64).format == "PNG"
    body = calls[0].model_dump()
    assert body["seed"] == 7 and body["timings"]["denoising"] > 0 and body["hybridiff"]["mode"]
    with DiffusionClient(sdxl_cluster.address) as client:
        grpc_response = client.generate_request(
            request_from_names(PROMPT, width=64, height=64, seed=7, num_images=2, steps=4, model=model),
            timeout=60,
        )
    assert [i.data for i in grpc_response.images] == images[0]  # one runner behind both edges


def test_a_stream_sends_partial_images_before_the_completed_image(sdk):
    events = list(
        sdk.images.generate(
            model=_model(sdk),
            prompt=PROMPT,
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={"seed": 11, "num_inference_steps": 8},
        )
    )
    kinds = [e.type for e in events]
    assert kinds.count("image_generation.partial_image") == 2
    assert kinds[-1] == "image_generation.completed"
    assert kinds.index("image_generation.completed") > max(
        i for i, k in enumerate(kinds) if k == "image_generation.partial_image"
    )
    progress = [e for e in events if e.type == "hybridiff.step_progress"]
    assert [p.step for p in progress] == list(range(8))  # every step, in order, with its phase
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert [p.partial_image_index for p in partials] == [0, 1]
    assert all(_png(p.b64_json).size == (64, 64) for p in partials)
    unstreamed = sdk.images.generate(
        model=_model(sdk), prompt=PROMPT, size="64x64", extra_body={"seed": 11, "num_inference_steps": 8}
    )
    assert events[-1].b64_json == unstreamed.data[0].b64_json  # streaming changes nothing of the image


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, status, param",
    [
        ({"size": "65x64"}, 400, "size"),
        ({"size": "big"}, 400, "size"),
        ({"n": 0}, 400, "n"),
        ({"n": 99}, 400, "n"),
        ({"num_inference_steps": 0}, 400, "num_inference_steps"),
        ({"guidance_scale": 1e9}, 400, "guidance_scale"),
        ({"mode": "fastest"}, 400, "mode"),
        ({"response_format": "url"}, 400, "response_format"),
        ({"output_format": "gif"}, 400, "output_format"),
        ({"output_compression": 101}, 400, "output_compression"),
        ({"partial_images": 4}, 400, "partial_images"),
        ({"temperature": 1}, 400, "temperature"),
        ({"model": "no-such-model"}, 404, None),
    ],
)
def test_a_bad_field_gets_openais_error_body_naming_it(base_url, fields, status, param):
    r = _post(f"{base_url}/v1/images/generations", json={"prompt": PROMPT, **FAST, **fields})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] and error["code"]
    assert r.headers["x-request-id"]


def test_the_sdk_raises_its_typed_error_with_the_param(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(model=_model(sdk), prompt=PROMPT, size="63x63")
    assert caught.value.status_code == 400 and caught.value.param == "size"


def test_a_megabyte_body_gets_413_without_being_kept(base_url):
    body = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    r = _post(
        f"{base_url}/v1/images/generations",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_client_that_disconnects_frees_both_workers_within_2s(base_url, sdxl_cluster):
    """A long request over a raw socket; once its workers are busy the client goes away."""
    body = json.dumps({"prompt": PROMPT, "size": "64x64", "num_inference_steps": 400, "mode": "hybrid"})
    request = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", sdxl_cluster.http_port))
    try:
        sock.sendall(request)
        wait_until(
            lambda: list(worker_states(sdxl_cluster).values()).count("busy") == 2,
            within=30,
            what="two workers busy",
        )
    finally:
        sock.close()
    gone = time.monotonic()
    wait_until(
        lambda: set(worker_states(sdxl_cluster).values()) == {"idle"}, within=2.0, what="every worker idle"
    )
    assert time.monotonic() - gone <= 2.0


# --- the rest of the surface -----------------------------------------------------------------
def test_requests_are_counted_by_the_api_they_came_through(base_url, sdxl_cluster):
    """The same request path as gRPC, the same metrics: the edge is a label (the dashboard splits by it)."""
    reply = _post(f"{base_url}/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 2})
    assert reply.status_code == 200
    scrape = _get(f"http://127.0.0.1:{sdxl_cluster.metrics_port}/metrics").text
    counted = [
        line
        for line in scrape.splitlines()
        if line.startswith("hybridiff_requests_total{") and 'api="http"' in line and 'code="OK"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1


def test_models_health_readiness_openapi_and_request_ids(base_url):
    models = _get(f"{base_url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["size_multiple"] > 0
    assert _get(f"{base_url}/healthz").status_code == 200
    assert _get(f"{base_url}/readyz").status_code == 200
    schema = _get(f"{base_url}/openapi.json").json()
    assert "/v1/images/generations" in schema["paths"]
    page = _get(f"{base_url}/")
    assert page.status_code == 200 and "Hybridiff playground" in page.text
    named = _get(f"{base_url}/v1/models", headers={"x-request-id": "abc-123"})
    assert named.headers["x-request-id"] == "abc-123"
    missing = _get(f"{base_url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    assert missing.headers["x-request-id"]


def test_a_traceparent_header_joins_the_requests_trace(base_url, otlp):
    trace_id = secrets.token_hex(16)
    r = _post(
        f"{base_url}/v1/images/generations",
        json={"prompt": PROMPT, "size": "64x64", **FAST},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert r.status_code == 200, r.text

    def joined():
        return [
            s
            for s in otlp.snapshot()
            if s["trace_id"] == trace_id
            and s["name"] == "hybridiff.generate"
            and s["service"] == "hybridiff-coordinator"
        ]

    wait_until(lambda: joined(), within=10, what="the request's span in the caller's trace")
    assert joined()[0]["attributes"]["hybridiff.api"] == "http"


# --- the token ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A coordinator process with a token and no reachable worker: the token is checked before
    any worker is needed."""
    token = secrets.token_hex(8)
    ready = tmp_path_factory.mktemp("guarded") / "ready.json"
    argv = [sys.executable, "-m", "hybridiff_launch.cli", "coordinator", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--metrics-port", "0", "--workers", "127.0.0.1:9", "--http-port", str(free_port())]
    argv += ["--ready-file", str(ready)]
    proc = subprocess.Popen(
        argv, env={**os.environ, "HYBRIDIFF_AUTH_TOKEN": token}, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: ready.exists() and ready.stat().st_size > 0 or proc.poll() is not None, within=60)
        assert proc.poll() is None, "the coordinator exited"
        yield f"http://127.0.0.1:{json.loads(ready.read_text())['http_port']}", token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_wrong_or_missing_token_gets_401(guarded):
    url, token = guarded
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = _get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.images.generate(prompt=PROMPT)
    assert _get(f"{url}/v1/models", headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert _get(f"{url}/healthz").status_code == 200  # probes need no token
    assert _get(f"{url}/readyz").status_code == 503  # no worker reachable

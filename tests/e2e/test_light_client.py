"""The Python clients (sync and asyncio) against a running cluster, and the light install: the
package without extras (no torch) in a fresh virtual environment, whose client and CLI work."""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from PIL import Image

from hybridiff.client import AsyncDiffusionClient, DiffusionClient, Generation
from hybridiff.errors import InvalidArgument, Unavailable

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(steps=4, width=64, height=64)  # the tiny model: a fraction of a second a request
PROMPT = "a red circle on the left"


def _generate_async(address: str, **kw) -> Generation:
    async def run() -> Generation:
        async with AsyncDiffusionClient(address) as client:
            return await client.generate(**kw)

    return asyncio.run(run())


def _pixels(generation: Generation) -> list[bytes]:
    return [image.tobytes() for image in generation.images]


# --- the clients ----------------------------------------------------------------------------
def test_sync_and_async_generate_the_same_images_for_a_seed(sdxl_cluster):
    with DiffusionClient(sdxl_cluster.address) as client:
        sync = client.generate(PROMPT, num_images=2, seed=1234, **SMALL)
        again = client.generate(PROMPT, num_images=2, seed=1234, **SMALL)
    async_ = _generate_async(sdxl_cluster.address, prompt=PROMPT, num_images=2, seed=1234, **SMALL)
    for generation in (sync, again, async_):
        assert generation.seed == 1234
        assert len(generation.images) == 2
        assert all(isinstance(i, Image.Image) and i.size == (64, 64) for i in generation.images)
        assert generation.stats.mode_used and len(generation.stats.steps) == 4
    assert sync.data == again.data == async_.data  # same seed: the same PNG bytes
    assert sync.data[0] != sync.data[1]  # two images of one batch, not one twice


def test_without_a_seed_requests_draw_their_own(sdxl_cluster):
    with DiffusionClient(sdxl_cluster.address) as client:
        first = client.generate(PROMPT, **SMALL)
    second = _generate_async(sdxl_cluster.address, prompt=PROMPT, **SMALL)
    assert first.seed != second.seed
    assert _pixels(first) != _pixels(second)


def test_jpeg_and_webp_decode(sdxl_cluster):
    with DiffusionClient(sdxl_cluster.address) as client:
        jpeg = client.generate(PROMPT, seed=5, output_format="jpeg", quality=80, **SMALL)
    webp = _generate_async(sdxl_cluster.address, prompt=PROMPT, seed=5, output_format="webp", **SMALL)
    for generation, fmt, mime in ((jpeg, "JPEG", "image/jpeg"), (webp, "WEBP", "image/webp")):
        assert generation.response.images[0].mime_type == mime
        image = Image.open(io.BytesIO(generation.data[0]))
        assert image.format == fmt and image.size == (64, 64)
        image.load()


def test_invalid_argument_names_its_field(sdxl_cluster):
    with DiffusionClient(sdxl_cluster.address) as client, pytest.raises(InvalidArgument) as err:
        client.generate(PROMPT, width=60, steps=4)
    assert err.value.field == "width"
    with pytest.raises(InvalidArgument) as err:
        _generate_async(sdxl_cluster.address, prompt=PROMPT, width=60, steps=4)
    assert err.value.field == "width"


def test_async_models_status_progress_and_trace_context(sdxl_cluster, otlp):
    trace_id = secrets.randbits(128)
    parent = trace.SpanContext(trace_id, secrets.randbits(64), False, trace.TraceFlags(1))
    progress = []

    async def run():
        async with AsyncDiffusionClient(sdxl_cluster.address) as client:
            models = await client.list_models()
            status = await client.cluster_status()
            with trace.use_span(trace.NonRecordingSpan(parent)):  # the caller's application traces
                result = await client.generate(
                    PROMPT, request_id="async-traced", on_progress=progress.append, **SMALL
                )
            return models, status, result

    models, status, result = asyncio.run(run())
    assert [m.arch for m in models] == ["sdxl"] and status.queue_capacity == 16
    assert len(status.workers) == 4
    assert [p.step for p in progress] == [0, 1, 2, 3] and result.request_id == "async-traced"
    deadline = time.monotonic() + 20  # the coordinator's request span joins the caller's trace
    while time.monotonic() < deadline:
        spans = otlp.snapshot()
        root = next((s for s in spans if s["attributes"].get("hybridiff.request_id") == "async-traced"), None)
        if root:
            break
        time.sleep(0.5)
    assert root is not None, "the coordinator's request span never arrived"
    assert root["trace_id"] == f"{trace_id:032x}"


def test_values_the_wire_cannot_carry_fail_before_sending():
    """A negative seed, a fractional k or an unknown mode name never reach the server: InvalidArgument."""
    client = DiffusionClient("127.0.0.1:1")
    cases = ((dict(seed=-1), "seed"), (dict(hybrid={"k": 1.5}), "hybrid.k"), (dict(mode="fast"), "mode"))
    for fields, name in cases:
        with pytest.raises(InvalidArgument) as err:
            client.generate(PROMPT, **fields)
        assert err.value.field == name
    client.close()


@pytest.mark.parametrize("client", ["sync", "async"])
def test_an_unreachable_target_fails_fast(client):
    start = time.monotonic()
    with pytest.raises(Unavailable):
        if client == "sync":
            with DiffusionClient("127.0.0.1:1") as c:
                c.list_models()
        else:
            _generate_async("127.0.0.1:1", prompt=PROMPT)
    assert time.monotonic() - start < 10


# --- the light install ----------------------------------------------------------------------
SOURCES = ("pyproject.toml", "setup.py", "README.md", "proto", "hybridiff", "coordinator", "gpu_worker")
SOURCES += ("hybridiff_launch", "hybridiff_tools")  # what the Dockerfile builds the wheel from
UNGENERATED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install <this package>``, no extras, built from a clean copy of the
    sources (no generated code: the build generates it from proto/; the work tree stays untouched)."""
    root = tmp_path_factory.mktemp("light")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=UNGENERATED)
        else:
            shutil.copy2(path, src / name)
    for generated in ("hybridiff/v1", "hybridiff/internal"):
        shutil.rmtree(src / generated, ignore_errors=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    start = time.monotonic()
    install = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_env(),
    )
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"light install: {time.monotonic() - start:.1f}s")
    return venv


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH or virtualenv of the test run: the light venv sees only what it installed."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``args[0]`` from the venv's bin/, run outside the repository."""
    command = [str(venv / "bin" / args[0]), *args[1:]]
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow(reason="builds a venv and installs the light package into it: ~23 s")
def test_light_install_has_no_torch_and_its_client_works(light_venv, sdxl_cluster, tmp_path):
    missing = _run(light_venv, ["python", "-c", "import torch"], tmp_path)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    script = textwrap.dedent(
        f"""
        import json, sys
        import hybridiff.client
        from hybridiff.client import DiffusionClient
        with DiffusionClient({sdxl_cluster.address!r}) as client:
            result = client.generate("a blue square", seed=9, steps=4, width=64, height=64)
            models = client.list_models()
        heavy = sorted(m for m in ("torch", "diffusers", "numpy", "zmq") if m in sys.modules)
        print(json.dumps({{"module": hybridiff.client.__file__, "seed": result.seed,
                          "sizes": [i.size for i in result.images], "models": [m.arch for m in models],
                          "heavy": heavy}}))
        """
    )
    done = _run(light_venv, ["python", "-c", script], tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["module"].startswith(str(light_venv))
    assert report["seed"] == 9 and report["sizes"] == [[64, 64]] and report["models"] == ["sdxl"]
    assert report["heavy"] == []


@pytest.mark.slow(reason="builds the light venv (its module fixture): 25-39 s")
def test_light_install_cli(light_venv, sdxl_cluster, tmp_path):
    target = ["--target", sdxl_cluster.address]
    flags = ["--prompt", "a blue square", "--steps", "4", "--width", "64", "--height", "64", "--quiet"]
    made = _run(light_venv, ["hybridiff", "generate", *target, *flags, "--out", "x.png"], tmp_path)
    assert made.returncode == 0, made.stderr
    assert Image.open(tmp_path / "x.png").size == (64, 64)
    models = _run(light_venv, ["hybridiff", "models", *target], tmp_path)
    assert models.returncode == 0, models.stderr
    assert [m["arch"] for m in json.loads(models.stdout)] == ["sdxl"]
    bad = _run(
        light_venv, ["hybridiff", "generate", *target, *flags, "--width", "60", "--out", "y.png"], tmp_path
    )
    assert bad.returncode == 2 and "width" in bad.stderr
    away = _run(
        light_venv, ["hybridiff", "models", "--target", "127.0.0.1:1", "--connect-timeout", "1"], tmp_path
    )
    assert away.returncode == 3

"""The cluster as deployed: real worker and coordinator processes on loopback, real gRPC and
ZeroMQ, compared with the diffusers pipelines and with the in-process engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
import zmq
from cluster_helpers import child_pids, make_input, send, start_local
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hybridiff
from hybridiff.client import DiffusionClient
from hybridiff.errors import status_details
from hybridiff.protocol import Mode
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff.v1 import diffusion_pb2_grpc
from hybridiff_tools.quality import psnr


def _client(cluster) -> DiffusionClient:
    return DiffusionClient(cluster.address)


def _request(**kw) -> pb.GenerateRequest:
    base = dict(prompt="a blue square at the top", num_steps=10, seed=21, guidance_scale=5.0, tau_cap=4, k=3)
    base.update(kw)
    return make_input(**base)


def _diffusers_image(engines, arch, req: pb.GenerateRequest):
    """The reference: the diffusers pipeline for the same model, prompt and seed."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    path = engines[arch].adapter.pipe.name_or_path
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusion3Pipeline
    extra = {} if arch == "sdxl" else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = cls.from_pretrained(path, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    size = engines[arch].adapter.default_size
    with torch.no_grad():
        return pipe(
            prompt=req.prompt,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(req.seed),
        ).images[0]


@pytest.mark.slow  # the pipeline beside the cluster (~15 s each); test_parity.py holds parity in-process
@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_single_and_cfg_parallel_equal_diffusers_through_the_cluster(arch, request, engines):
    cluster = request.getfixturevalue(f"{arch}_cluster")
    client = _client(cluster)
    reference = _diffusers_image(engines, arch, _request())
    for mode in ("single", "cfg-parallel"):
        resp = send(client, _request(mode=mode), timeout=120)
        assert pb.Mode.Name(resp.stats.mode_used) == "MODE_" + mode.upper().replace("-", "_")
        assert psnr(resp.images[0].data, reference) >= 45.0
    client.close()


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_hybrid_switches_at_the_same_step_on_both_workers(arch, request, engines):
    cluster = request.getfixturevalue(f"{arch}_cluster")
    client = _client(cluster)
    progress = []
    resp = send(client, _request(mode="hybrid"), timeout=120, on_progress=progress.append)
    s = resp.stats
    assert s.tau1_source == "tau_cap" and s.tau1 == 4 and s.tau2 == 7
    assert len(s.workers) == 2 and len(progress) == 10
    for step in s.steps:
        phases = {w.phase for w in step.workers}
        assert len(phases) == 1 and step.phase in phases, f"step {step.step}: workers disagree {phases}"
        in_window = s.tau1 <= step.step <= s.tau2
        assert (step.phase in (pb.PHASE_PIPELINE, pb.PHASE_PIPELINE_FILL)) == in_window
    assert s.steps[s.tau1].phase == pb.PHASE_PIPELINE_FILL
    # the cluster runs the same arithmetic as the in-process engine
    local = engines[arch].generate(engines[arch].resolve(_request(mode="hybrid")))
    assert psnr(resp.images[0].data, local.images[0]) >= 45.0
    client.close()


@pytest.mark.parametrize("policy", ["refreshed-difference", "extrapolated-difference"])
def test_a_refreshing_window_through_the_cluster(sdxl_cluster, engines, policy):
    """Both workers run the refresh fills at the same steps (the window 4..7, every 2nd step a
    data-parallel fill) and make the in-process engine's image."""
    client = _client(sdxl_cluster)
    req = _request(mode="hybrid", window_guidance=policy, refresh_every=2)
    resp = send(client, req, timeout=120)
    s = resp.stats
    assert pb.WindowGuidance.Name(s.window_guidance) == "WINDOW_GUIDANCE_" + policy.upper().replace("-", "_")
    assert (s.tau1, s.tau2) == (4, 7)
    fill, pipelined = pb.PHASE_PIPELINE_FILL, pb.PHASE_PIPELINE
    assert [step.phase for step in s.steps][4:8] == [fill, pipelined, fill, pipelined]
    for step in s.steps:
        assert {w.phase for w in step.workers} == {step.phase}, f"step {step.step}: workers disagree"
    local = engines["sdxl"].generate(engines["sdxl"].resolve(req))
    assert psnr(resp.images[0].data, local.images[0]) >= 45.0
    client.close()


def test_four_workers_eight_concurrent_mixed_requests(sdxl_cluster):
    modes = ["single", "cfg-parallel", "pipeline", "hybrid", "auto", "hybrid", "cfg-parallel", "single"]
    reqs = [_request(mode=m, seed=100 + i, request_id=f"mixed-{i}") for i, m in enumerate(modes)]
    client = _client(sdxl_cluster)
    alone = {r.request_id: send(client, r, timeout=120) for r in reqs}

    seen_assignments: list[dict[str, str]] = []
    stop = threading.Event()
    channel = grpc.insecure_channel(sdxl_cluster.address)
    stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)

    def watch():
        while not stop.is_set():
            status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
            seen_assignments.append(
                {w.address: w.current_request_id for w in status.workers if w.state == "busy"}
            )
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda r: send(client, r, timeout=300), reqs))
    finally:
        stop.set()
        watcher.join()
    for req, resp in zip(reqs, together):
        before = alone[req.request_id]
        if req.mode == Mode.AUTO and resp.stats.mode_used != before.stats.mode_used:
            # AUTO takes what is free: under load a lone worker runs SINGLE rather than waiting
            assert resp.stats.mode_used == pb.MODE_SINGLE
            single = _request(mode="single", seed=req.seed, request_id="auto-as-single")
            assert resp.images[0].data == send(client, single, timeout=120).images[0].data
        else:
            assert resp.images[0].data == before.images[0].data, (
                req.request_id
            )  # equal to the same request alone
    for snapshot in seen_assignments:  # a request holds at most a pair; a worker one request
        per_request: dict[str, int] = {}
        for rid in snapshot.values():
            per_request[rid] = per_request.get(rid, 0) + 1
        assert all(n <= 2 for n in per_request.values())
    assert any(len(s) >= 3 for s in seen_assignments), "requests never overlapped"
    status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
    assert [w.state for w in status.workers] == ["idle"] * 4 and status.queue_depth == 0
    channel.close()
    client.close()


def test_malformed_data_plane_frames_are_rejected_and_the_worker_keeps_serving(sdxl_cluster, tmp_path):
    logs = sdxl_cluster.log_dir
    ctx = zmq.Context()
    # find the workers' data addresses from their start-up lines
    data = [
        line.split("data ")[1].strip()
        for f in sorted(logs.glob("worker*.log"))
        for line in f.read_text().splitlines()
        if line.startswith("worker ready")
    ]
    assert len(data) == 4
    from hybridiff.wire import FrameKind, encode

    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)  # deliver before close
    push.connect(data[0])
    good = bytes(encode("no-such-request", 0, FrameKind.BRANCH_PREDICTION, {"p": torch.zeros(4)}))
    push.send(b"\x00garbage, not a frame")
    push.send(good[:-2])  # wrong size
    push.send(good)  # unknown request id
    push.close()
    ctx.term()
    deadline = time.monotonic() + 10
    log0 = next(f for f in sorted(logs.glob("worker*.log")) if data[0] in f.read_text())
    while time.monotonic() < deadline and log0.read_text().count("rejected") < 3:
        time.sleep(0.1)
    text = log0.read_text()
    assert text.count("rejected") >= 3
    assert "not a data-plane frame" in text
    assert "lie outside" in text and "unknown request 'no-such-request'" in text
    client = _client(sdxl_cluster)
    for mode in ("cfg-parallel", "hybrid"):
        assert send(client, _request(mode=mode), timeout=120).images[0].data
    client.close()


def test_health_metrics_reflection_and_models(sdxl_cluster):
    channel = grpc.insecure_channel(sdxl_cluster.address)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="hybridiff.v1.DiffusionService")).status == 1
    stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.arch for m in models] == ["sdxl"] and models[0].hybrid_defaults.l_slope == 12
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert "hybridiff.v1.DiffusionService" in names and "grpc.health.v1.Health" in names
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{sdxl_cluster.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    for name in (
        "hybridiff_queue_depth",
        'hybridiff_workers{state="idle"}',
        "hybridiff_requests_total",
        "hybridiff_step_seconds_bucket",
        "hybridiff_data_plane_bytes_total",
    ):
        assert name in metrics
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", width=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "width" in err.value.details()
    details = status_details(err.value)  # the field, read without parsing text
    assert details["BadRequest"].field_violations[0].field == "width"
    assert details["ErrorInfo"].reason == "INVALID_ARGUMENT" and details["ErrorInfo"].domain == "hybridiff.ai"
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", model="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert status_details(err.value)["ErrorInfo"].reason == "MODEL_NOT_FOUND"
    channel.close()


def test_one_trace_per_request_across_processes(sdxl_cluster, otlp, tmp_path):
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    out = tmp_path / "t.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hybridiff_launch.cli",
            "generate",
            "--target",
            sdxl_cluster.address,
            "--prompt",
            "a red circle",
            "--steps",
            "8",
            "--mode",
            "hybrid",
            "--tau-cap",
            "3",
            "--k",
            "2",
            "--request-id",
            "traced-1",
            "--out",
            str(out),
            "--quiet",
        ],
        env=env,
        check=True,
        timeout=120,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = otlp.snapshot()
        root = next(
            (
                s
                for s in spans
                if s["name"] == "hybridiff.generate"
                and s["attributes"].get("hybridiff.request_id") == "traced-1"
            ),
            None,
        )
        if (
            root
            and sum(s["trace_id"] == root["trace_id"] and s["name"] == "worker.step" for s in spans) >= 16
        ):
            break
        time.sleep(0.5)
    assert root is not None, "the coordinator's request span never arrived"
    tree = [s for s in otlp.snapshot() if s["trace_id"] == root["trace_id"]]
    by_id = {s["span_id"]: s for s in tree}
    services = {s["service"] for s in tree}
    assert services >= {"hybridiff-client", "hybridiff-coordinator", "hybridiff-worker"}
    client_span = next(s for s in tree if s["name"] == "hybridiff.client.generate")
    assert client_span["parent"] == ""  # the trace starts at the client
    a = root["attributes"]
    assert a["hybridiff.mode"] == "hybrid" and a["hybridiff.tau1"] == 3 and a["hybridiff.tau2"] == 5
    assert a["hybridiff.model"] and a["gen_ai.request.model"] == a["hybridiff.model"]
    assert a["rpc.system"] == "grpc" and a["rpc.service"] == "hybridiff.v1.DiffusionService"
    assert a["rpc.method"] == "GenerateStream" and a["server.address"] == "127.0.0.1"
    # Every process names its version and itself (host:pid) on the resource.
    resources = {(s["service"], s["resource"].get("service.instance.id")) for s in tree}
    assert all(s["resource"].get("service.version") == hybridiff.__version__ for s in tree)
    assert all(instance and ":" in instance for _, instance in resources)
    assert len({i for svc, i in resources if svc == "hybridiff-worker"}) == 2  # the pair
    phases = [s for s in tree if s["name"].startswith("phase ")]
    assert {p["name"] for p in phases} == {"phase data_parallel", "phase pipeline"}
    assert all(p["parent"] == root["span_id"] for p in phases)
    steps = [s for s in tree if s["name"] == "worker.step"]
    assert len(steps) == 16  # 8 steps on 2 workers
    assert all(by_id[s["parent"]]["name"].startswith("phase ") for s in steps)

    def ancestors(span):
        while span["parent"] in by_id:
            span = by_id[span["parent"]]
            yield span

    assert client_span in list(ancestors(root))


@pytest.mark.slow  # a whole `hybridiff local` started and stopped (~15 s)
def test_local_leaves_no_process_behind(model_dirs, tmp_path):
    proc, _ = start_local(
        ["--model-dir", str(model_dirs["sdxl"]), "--port", "0", "--metrics-port", "0", "--workers", "1"],
        within=120,
    )

    kids = child_pids(proc.pid)
    assert len(kids) == 2  # the worker and the coordinator
    proc.send_signal(15)
    assert proc.wait(timeout=60) == 0
    # No grace after the launcher's exit: it waited for its children, so none may be left now.
    alive = [
        k
        for k in kids
        if os.path.exists(f"/proc/{k}") and "Z" not in open(f"/proc/{k}/stat").read().split()[2]
    ]
    assert alive == []


def test_progress_carries_the_servers_request_id_from_the_first_event(sdxl_cluster):
    client = _client(sdxl_cluster)
    progress = []
    resp = send(client, _request(mode="cfg-parallel", num_steps=4), timeout=120, on_progress=progress.append)
    assert resp.request_id and len(progress) == 4
    assert {p.request_id for p in progress} == {resp.request_id}
    client.close()


def test_models_and_status_commands(sdxl_cluster):
    env = {**os.environ, "HYBRIDIFF_TARGET": sdxl_cluster.address, "TRANSFORMERS_VERBOSITY": "error"}
    run = [sys.executable, "-m", "hybridiff_launch.cli"]
    models = json.loads(
        subprocess.run([*run, "models"], env=env, capture_output=True, text=True, check=True).stdout
    )
    assert models[0]["arch"] == "sdxl" and models[0]["max_images"] >= 1 and models[0]["size_multiple"] == 8
    status = json.loads(
        subprocess.run([*run, "status"], env=env, capture_output=True, text=True, check=True).stdout
    )
    assert len(status["workers"]) == 4 and status["queue_capacity"] == 16

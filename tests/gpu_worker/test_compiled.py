"""Compiled workers (docs/design.md section 4): the compile policy, the bounded per-shape cache, the
cut chosen from compiled timings, readiness only once warm, and compiled = eager images.

The fast tests compile with dynamo's ``eager`` backend (a real trace, no code generation); the
one inductor test is ``slow`` (inductor + gcc take about a minute per graph here)."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from cluster_helpers import compiling_worker, make_input
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker import compiled
from gpu_worker.compiled import CompileCache, resolve_mode
from gpu_worker.loader import load_adapter
from gpu_worker.split_balance import SplitPlanner, measure_stage_costs, valid_cuts
from hybridiff.errors import InvalidArgument
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import Mode, label
from hybridiff_tools.quality import psnr


def graphs() -> int:
    """Graphs dynamo compiled in this process so far (whoever asked)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_auto_resolves_by_device_and_unknown_modes_are_refused():
    assert resolve_mode("auto", torch.device("cpu")) == "none"
    assert resolve_mode(None, torch.device("cuda")) == "reduce-overhead"
    assert resolve_mode("max-autotune", torch.device("cpu")) == "max-autotune"
    with pytest.raises(InvalidArgument):
        resolve_mode("fast", torch.device("cpu"))


def _scale(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * k) + 1


def test_the_cache_compiles_once_per_shape_and_evicts_the_least_recently_used():
    heard, lookups = [], []
    cache = CompileCache(
        "default",
        torch.device("cpu"),
        capacity=2,
        backend="eager",
        on_compile=lambda n, s: heard.append(n),
        on_lookup=lookups.append,
    )
    k = torch.tensor(2.0)
    a, b, c = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(1, 4, 16, 8)
    before = graphs()
    for _ in range(3):
        assert torch.equal(compiled.run(cache, "scale", _scale, a, a, k), _scale(a, k))
        assert torch.equal(compiled.run(cache, "scale", _scale, b, b, k), _scale(b, k))
    assert cache.compilations == 2 and graphs() - before == 2 and heard == ["scale", "scale"]
    assert lookups == [False, False] + [True, True] * 2 and cache.hits == 4  # hits and misses, in order
    compiled.run(cache, "scale", _scale, c, c, k)  # a third shape: the oldest (batch 1, 8x8) goes
    assert cache.keys() == [("scale", 2, 8, 8), ("scale", 1, 16, 8)] and cache.evictions == 1
    compiled.run(cache, "scale", _scale, a, a, k)  # back again: compiled again, from a fresh graph
    assert cache.compilations == 4 and graphs() - before == 4 and len(cache) == 2


def test_each_entry_compiles_its_own_code_so_the_recompile_limit_never_bites():
    cache = CompileCache("default", torch.device("cpu"), capacity=64, backend="eager")
    k = torch.tensor(3.0)
    limit = torch._dynamo.config.recompile_limit
    for side in range(1, limit + 3):  # more shapes than dynamo recompiles one code object for
        x = torch.randn(1, 2, side, 4)
        assert torch.equal(compiled.run(cache, "scale", _scale, x, x, k), _scale(x, k))
    assert cache.compilations == limit + 2


def test_the_cut_comes_from_the_compiled_stages(model_dirs):
    adapter = load_adapter(model_dirs["sd3"], "cpu")
    compiled.enable(adapter, "default", backend="eager")
    size = adapter.default_size
    plan = SplitPlanner(adapter).plan(size, size)
    measured = {key[0] for key in adapter.compiler.keys()}
    cuts = {int(name.split("@cut")[1]) for name in measured}
    assert plan.cut in cuts and measured == {f"sd3.stage{s}@cut{c}" for s in (1, 2) for c in cuts}
    # Measuring that cut again runs the same compiled callables: nothing compiles again.
    compilations = adapter.compiler.compilations
    measure_stage_costs(adapter, size, size, plan.cut)
    assert adapter.compiler.compilations == compilations
    assert cuts <= set(valid_cuts(adapter)) and plan.stage1_seconds > 0 and plan.stage2_seconds > 0


def _hybrid_input(seed: int = 7):
    # 12 steps, tau_cap 6, k 3: data parallel 0..5, the window 6..9, data parallel 10..11.
    return make_input(
        prompt="a blue circle",
        num_steps=12,
        guidance_scale=5.0,
        seed=seed,
        mode="hybrid",
        window_guidance="conditional",
        l_slope=3,
        tau_cap=6,
        k=3,
    )


@pytest.mark.slow  # dynamo traces four graphs for each of the pair's two workers (about a minute here)
def test_a_request_compiles_its_shapes_at_begin_before_any_step(model_dirs):
    """A step must not compile: its peer waits for it with a timeout sized for compiled steps."""
    from hybridiff_launch.inprocess import InProcessEngine

    engine = InProcessEngine(
        model_dirs["sdxl"], device="cpu", split_cut=2, compile="default", compile_backend="eager"
    )
    events = []
    engine.adapter.compiler.on_compile = lambda name, seconds: events.append(("compile", name))
    try:
        result = engine.generate(
            engine.resolve(_hybrid_input()), on_step=lambda stat, total: events.append(("step", stat.step))
        )
        assert (result.stats.tau1, result.stats.tau2) == (6, 9)
        compiles = [i for i, e in enumerate(events) if e[0] == "compile"]
        first_step = next(i for i, e in enumerate(events) if e[0] == "step")
        assert len(compiles) == 4 and max(compiles) < first_step, events
        assert {k[:2] for k in engine.adapter.compiler.keys()} == {
            ("sdxl.forward", 1),
            ("sdxl.stage1_pre@cut2", 1),
            ("sdxl.stage2@cut2", 1),
            ("sdxl.stage1_post@cut2", 1),
        }
    finally:
        engine.close()


def _health(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.slow  # a worker process compiling its warm-up (.ci/run runs the slow tests)
def test_a_compiling_worker_is_ready_only_once_its_default_size_is_warm(model_dirs):
    process = compiling_worker(model_dirs["sdxl"])
    channel = grpc.insecure_channel(f"127.0.0.1:{process.port}")
    try:
        stub = worker_pb2_grpc.WorkerControlServiceStub(channel)
        # start() returned with the warm-up under way: health answers, NOT_SERVING; Info refuses,
        # so the pool does not take the worker yet.
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(worker_pb2.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.metrics.compile_warm._value.get() == 0
        deadline = time.monotonic() + 600
        while _health(channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the warm-up never finished"
            time.sleep(0.2)
        assert (
            _health(channel, "hybridiff.internal.v1.WorkerControlService")
            == health_pb2.HealthCheckResponse.SERVING
        )
        assert stub.Info(worker_pb2.InfoRequest(), timeout=5).arch == "sdxl"
        compiler = process.service.adapter.compiler
        warm = compiler.compilations
        assert {("sdxl.forward", 1), ("sdxl.forward", 2)} <= {k[:2] for k in compiler.keys()}
        assert process.metrics.compile_warm._value.get() == 1
        assert process.metrics.compile_mode.labels("default")._value.get() == 1
        # The split the coordinator asks for is the one the warm-up measured: nothing compiles.
        size = process.service.adapter.default_size
        answer = stub.MeasureSplit(worker_pb2.MeasureSplitRequest(height=size, width=size), timeout=30)
        assert compiler.compilations == warm
        shapes = {k[:2] for k in compiler.keys()}  # (function, batch)
        for stage in ("stage1_pre", "stage2", "stage1_post"):  # batch 1 and the CFG batch 2
            assert {(f"sdxl.{stage}@cut{answer.cut}", 1), (f"sdxl.{stage}@cut{answer.cut}", 2)} <= shapes
    finally:
        channel.close()
        process.request_stop()
        process.shutdown()


@pytest.mark.slow
def test_compiled_hybrid_matches_eager_and_compiles_each_shape_once(model_dirs, engines):
    """Inductor for real: a HYBRID request (data-parallel steps at batch 1 around a window of the
    three stages at batch 1), compiled and eager, gives the same image; the shapes compile at
    Begin, once: the same request again compiles nothing."""
    from hybridiff_launch.inprocess import InProcessEngine

    eager = engines["sdxl"]
    raw = _hybrid_input()
    spec = eager.resolve(raw)
    cut = eager.split_plan(spec.height, spec.width).cut
    reference = eager.generate(spec)
    assert (reference.stats.tau1, reference.stats.tau2) == (6, 9)
    engine = InProcessEngine(model_dirs["sdxl"], device="cpu", split_cut=cut, compile="default")
    try:
        first = engine.generate(engine.resolve(raw))
        assert label(first.stats.mode_used) == label(Mode.HYBRID)
        assert (first.stats.tau1, first.stats.tau2) == (6, 9)
        compiler = engine.adapter.compiler
        assert {k[:2] for k in compiler.keys()} == {
            ("sdxl.forward", 1),
            (f"sdxl.stage1_pre@cut{cut}", 1),
            (f"sdxl.stage2@cut{cut}", 1),
            (f"sdxl.stage1_post@cut{cut}", 1),
        }
        assert compiler.compilations == len(compiler) == 4
        assert psnr(first.images[0], reference.images[0]) >= 40
        before = graphs()
        again = engine.generate(engine.resolve(raw))
        assert compiler.compilations == 4 and graphs() == before
        assert psnr(again.images[0], first.images[0]) >= 40
    finally:
        engine.close()

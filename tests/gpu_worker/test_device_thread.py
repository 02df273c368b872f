"""Every compiled call of a worker runs on its one device thread, compile time stays outside the
request budgets, and CUDA-graph handling follows what inductor does for a mode.

torch.compile is replaced by a recorder: the "compiled" callable is the function itself, which
notes the thread that enters it (and, when asked, sleeps on its first call, as a slow compile
would). What is tested is where the worker's code calls compiled callables from, not torch.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from cluster_helpers import compiling_worker, make_input, solo_begin, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_worker import compiled
from gpu_worker.compiled import CompileCache, makes_cuda_graphs
from gpu_worker.device_thread import DeviceThread
from hybridiff.internal.v1 import worker_pb2, worker_pb2_grpc
from hybridiff.protocol import Mode, Phase, label

SECOND = (64, 96)  # a second, non-square size (height, width)
THIRD = (96, 64)


class Recorder:
    """Stands in for ``torch.compile``: records (callable, thread) for every call of a compiled
    callable; the first call of each sleeps ``slow`` seconds (a compile)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, int]] = []
        self.slow = 0.0
        self.compiling = threading.Event()  # a slow first call is under way
        self._lock = threading.Lock()
        self._made = 0

    def compile(self, cache: CompileCache, fn):
        with self._lock:
            self._made += 1
            token = self._made
        first = [True]

        def entered(*args):
            with self._lock:
                self.calls.append((token, getattr(fn, "__name__", "?"), threading.get_ident()))
            if first[0]:
                first[0] = False
                if self.slow:
                    self.compiling.set()
                    time.sleep(self.slow)
            return fn(*args)

        return entered

    def threads_by_callable(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for token, _, ident in self.calls:
            out.setdefault(token, set()).add(ident)
        return out


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(CompileCache, "_compile", lambda self, fn: rec.compile(self, fn))
    return rec


def test_the_in_process_pair_enters_each_compiled_callable_from_its_own_device_thread_only(
    model_dirs, recorder
):
    from hybridiff_launch.inprocess import InProcessEngine

    engine = InProcessEngine(model_dirs["sdxl"], device="cpu", compile="default", compile_backend="eager")
    try:
        u, c = (w.engine.adapter.compiler for w in engine.workers)
        assert u is not c and u.device_thread is not c.device_thread
        raw = make_input(
            prompt="a blue circle",
            num_steps=8,
            guidance_scale=5.0,
            seed=3,
            mode="hybrid",
            window_guidance="full-cfg",
            l_slope=2,
            tau_cap=4,
            k=2,
        )
        result = engine.generate(engine.resolve(raw))  # measures the cut on U's device thread first
        assert label(result.stats.mode_used) == label(Mode.HYBRID)
        assert result.stats.tau1 is not None and result.stats.tau1 < 8
        by_callable = recorder.threads_by_callable()
        assert by_callable and all(len(threads) == 1 for threads in by_callable.values()), by_callable
        entered = set().union(*by_callable.values())
        assert entered == {u.device_thread.ident, c.device_thread.ident}
        assert u.compilations > 0 and c.compilations > 0
    finally:
        engine.close()


# --- a worker process ---------------------------------------------------------------------------
WATCHDOG = 2.0


@pytest.fixture(scope="module")
def worker(model_dirs):
    """A compiling worker process (the recorder for torch.compile) with a short watchdog."""
    rec = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompileCache, "_compile", lambda self, fn: rec.compile(self, fn))
        process = compiling_worker(model_dirs["sdxl"], watchdog_seconds=WATCHDOG)
        channel = grpc.insecure_channel(f"127.0.0.1:{process.port}")
        try:
            wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING, 120, "warm-up")
            yield process, rec, worker_pb2_grpc.WorkerControlServiceStub(channel), channel
        finally:
            channel.close()
            process.request_stop()
            process.shutdown()


def _health(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _session(stub, request_id: str, size: tuple[int, int], steps: int = 2) -> list[str]:
    begin = solo_begin(request_id, steps)
    begin.begin.request.height, begin.begin.request.width = size
    cmds = [begin] + [
        worker_pb2.SessionRequest(
            request_id=request_id, step=worker_pb2.StepCommand(step=i, phase=Phase.SINGLE)
        )
        for i in range(steps)
    ]
    cmds.append(worker_pb2.SessionRequest(request_id=request_id, finish=worker_pb2.FinishCommand()))
    return [e.WhichOneof("event") for e in stub.Session(iter(cmds), timeout=30)]


def _idle(device: DeviceThread, compiler: CompileCache) -> bool:
    with device._cond:
        return not (device._urgent or device._background or device.background_running or compiler._pending)


def test_every_compiled_call_of_a_worker_runs_on_its_device_thread(worker):
    """Warm-up, MeasureSplit (its compiled measurement), Begin's compiles and the steps."""
    process, rec, stub, _ = worker
    compiler = process.service.adapter.compiler
    device = compiler.device_thread
    warm_up_calls = len(rec.calls)
    assert warm_up_calls > 0 and compiler.background
    size = process.service.adapter.default_size
    assert _session(stub, "warm", (size, size)) == ["begin", "step", "step", "finish"]
    # A new size: MeasureSplit answers from eager costs at once and measures compiled behind;
    # a request at it runs eager while its shapes compile on the device thread, then compiled.
    answer = stub.MeasureSplit(worker_pb2.MeasureSplitRequest(height=SECOND[0], width=SECOND[1]), timeout=30)
    assert answer.cut > 0
    assert _session(stub, "cold", SECOND) == ["begin", "step", "step", "finish"]
    wait_until(lambda: _idle(device, compiler), 60, "the background compiles")
    assert compiler.warm(("sdxl.forward", 2, SECOND[0] // 8, SECOND[1] // 8))
    assert any(k[0].startswith("sdxl.stage2@cut") and k[2:] == (8, 12) for k in compiler.keys())
    before = len(rec.calls)
    assert _session(stub, "warmed", SECOND) == ["begin", "step", "step", "finish"]
    assert len(rec.calls) == before + 2  # both steps entered the compiled forward
    assert {ident for _, _, ident in rec.calls} == {device.ident}


def test_a_slow_compile_stays_outside_the_request_budgets(worker):
    """A compile that takes longer than the watchdog's bound: the request at its size completes
    (eager), the watchdog does not fire, the worker stays SERVING and MeasureSplit answers."""
    process, rec, stub, channel = worker
    compiler = process.service.adapter.compiler
    eager_before = compiler.eager_calls
    rec.slow, rec.compiling = 1.5 * WATCHDOG, threading.Event()
    try:
        started = time.monotonic()
        assert _session(stub, "slow", THIRD) == ["begin", "step", "step", "finish"]
        assert rec.compiling.wait(10)  # Begin queued the compile; the device thread runs it
        answer = stub.MeasureSplit(
            worker_pb2.MeasureSplitRequest(height=THIRD[0], width=THIRD[1]), timeout=WATCHDOG
        )
        assert answer.cut > 0
        assert compiler.eager_calls >= eager_before + 2
        # Past the watchdog's bound with the compile still running: nothing fired.
        time.sleep(max(0.0, WATCHDOG + 0.5 - (time.monotonic() - started)))
        assert not process.service.stalled.is_set()
        for service in ("", "hybridiff.liveness"):
            assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    finally:
        rec.slow = 0.0


# --- CUDA graphs by what inductor does ----------------------------------------------------------
def test_graph_handling_follows_inductors_options_for_every_mode():
    """Every mode torch lists whose inductor options set triton.cudagraphs gets step marking and
    output clones on CUDA; the others do not (read from torch, not from a list of names)."""
    import torch._inductor

    modes = torch._inductor.list_mode_options()
    assert any(options.get("triton.cudagraphs") for options in modes.values())
    thread = DeviceThread("graphs")
    try:
        for mode, options in modes.items():
            makes = bool(options.get("triton.cudagraphs", False))
            assert makes_cuda_graphs(mode) == makes, mode
            if mode in compiled.COMPILE_MODES:
                cache = CompileCache(mode, torch.device("cuda"), device_thread=thread)
                assert cache.graphs == makes, mode
                assert not CompileCache(mode, torch.device("cpu"), device_thread=thread).graphs
        # Every mode torch makes graphs for is one a worker accepts.
        assert {m for m, o in modes.items() if o.get("triton.cudagraphs")} <= set(compiled.COMPILE_MODES)
    finally:
        thread.close()


def test_a_graph_mode_marks_each_call_and_clones_its_outputs(monkeypatch):
    import torch._inductor

    # A mode torch says makes graphs is handled so, whatever its name.
    monkeypatch.setattr(
        torch._inductor, "list_mode_options", lambda mode=None, dynamic=None: {"triton.cudagraphs": True}
    )
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    thread = DeviceThread("graphs")
    try:
        cache = CompileCache("default", torch.device("cuda"), device_thread=thread)
        assert cache.graphs
        static = torch.zeros(3)
        out = cache._run(lambda x: (static.add_(x), {"b": static}), (torch.ones(3),))
        assert marks == [1]
        assert out[0] is not static and out[1]["b"] is not static
        static.fill_(7)  # the next replay overwrites the static output: the clone is unchanged
        assert torch.equal(out[0], torch.ones(3))
    finally:
        thread.close()

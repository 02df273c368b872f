"""The engine in one process (``hybridiff run``): two worker engines, one device thread each.

The two engines share one loaded model (weights are read-only) but nothing else: each has its
own mailbox, scheduler and latents, and, compiled, its own compile cache whose graphs only its
own device thread enters (``gpu_worker.device_thread``: CUDA graphs are per thread, and two
threads replaying one graph would share its static buffers). The driver sends them the control
API's own messages, and they exchange tensors only as encoded data-plane frames through
``InMemoryLink`` — the same messages the cluster carries over gRPC and ZeroMQ.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from coordinator.auto_mode import AutoChoice, DeviceCosts, applied, choose
from coordinator.driver import GenerationResult, StepStat, drive_request
from coordinator.latency_model import ComputeTimes, StageTimes
from coordinator.remote import WorkerFault
from gpu_worker import compiled
from gpu_worker.dataplane import InMemoryLink, Mailbox
from gpu_worker.device_thread import DeviceThread
from gpu_worker.engine import WorkerEngine
from gpu_worker.loader import load_adapter
from gpu_worker.split_balance import SplitPlan, SplitPlanner
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import Mode
from hybridiff.request import GenerationSpec, resolve_spec
from hybridiff.v1 import diffusion_pb2 as pb


class InProcessWorker:
    """A ``WorkerHandle`` over a local engine: commands run in order on the worker's device
    thread (the one its compiled graphs run on, so that no call hops threads); a speculative
    step's resolution goes to a queue the running step reads (it has no event)."""

    def __init__(self, engine: WorkerEngine, thread: DeviceThread | None = None) -> None:
        self.engine = engine
        self.name = engine.name
        self.identity = engine.name
        self.data_address = ""
        self._thread = thread if thread is not None else DeviceThread(f"worker-{engine.name}")
        self._resolutions: queue.Queue[worker_pb2.SessionRequest | None] = queue.Queue()

    def send(self, cmd: worker_pb2.SessionRequest) -> Future:
        which = cmd.WhichOneof("command")
        if which == "begin":
            self._resolutions = queue.Queue()  # one per attempt: nothing of an earlier one is read
        resolutions = self._resolutions
        if which == "resolve":
            resolutions.put(cmd)
            done: Future = Future()
            done.set_result(None)
            return done
        return self._thread.submit(self.engine.handle, cmd, None, lambda timeout: _get(resolutions, timeout))

    def abort(self, request_id: str) -> None:
        # Closing the mailbox first wakes a step that waits for its peer (and the None one that
        # waits for its resolution); the abort itself is queued.
        self.engine.mailbox.close(request_id)
        self._resolutions.put(None)
        self._thread.submit(self.engine.abort, request_id)

    def close(self) -> None:
        self._resolutions.put(None)
        self._thread.close()
        self.engine.close()


def _get(resolutions: queue.Queue, timeout: float) -> worker_pb2.SessionRequest | None:
    try:
        return resolutions.get(timeout=timeout)
    except queue.Empty:
        return None


def plan_costs(plan: SplitPlan, topology: str) -> DeviceCosts:
    """A split plan's measured costs as the schedule model takes them (a free link: in memory)."""

    def stages(batch: int) -> StageTimes:
        c = plan.costs[batch]
        return (
            StageTimes.nested(c.pre, c.stage2, c.post)
            if topology == "nested"
            else StageTimes(c.stage1, c.stage2)
        )

    b1, b2 = plan.costs[1], plan.costs[2]
    return DeviceCosts(ComputeTimes(topology, b1.forward, b2.forward, stages(1), stages(2)))


class InProcessEngine:
    """Loads a model once and runs requests on an in-process pair of worker engines."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        dtype: str | None = None,
        split_cut: int | None = None,
        compile: str | None = None,
        compile_backend: str = "inductor",
        variant: str | None = None,
        text_encoder_3: bool = False,
        config: str | Path | None = None,
    ) -> None:
        """``compile``: none | default | reduce-overhead | max-autotune (None or auto: by device;
        see ``gpu_worker.compiled``); shapes compile at their first use. ``variant``: the weights'
        (e.g. fp16), as ``from_pretrained`` takes it; ``text_encoder_3``: SD3's T5 encoder too;
        ``config``: the pipeline folder of a single-file checkpoint ``model_dir``."""
        self.adapter = load_adapter(model_dir, device, dtype, variant, text_encoder_3, config)
        # One adapter per worker over the same model, each with its own compile cache on its
        # own device thread (``self.adapter`` is U's; the split is measured there).
        threads = [DeviceThread("worker-U"), DeviceThread("worker-C")]
        adapters = [self.adapter, copy.copy(self.adapter)]
        for adapter, thread in zip(adapters, threads, strict=True):
            compiled.enable(adapter, compile, backend=compile_backend, device_thread=thread)
        self.limits = self.adapter.size_limits()
        self.defaults = self.adapter.defaults
        self._split_cut = split_cut
        self.planner = SplitPlanner(self.adapter)
        boxes = [Mailbox("U", self.adapter.device), Mailbox("C", self.adapter.device)]
        self.workers = [
            InProcessWorker(
                WorkerEngine(adapters[0], "U", boxes[0], lambda _: InMemoryLink("U", boxes[1])), threads[0]
            ),
            InProcessWorker(
                WorkerEngine(adapters[1], "C", boxes[1], lambda _: InMemoryLink("C", boxes[0])), threads[1]
            ),
        ]

    def resolve(self, request: pb.GenerateRequest) -> GenerationSpec:
        return resolve_spec(request, self.limits, self.defaults)

    def split_plan(self, height: int, width: int) -> SplitPlan:
        """The balanced cut at this resolution, measured once and cached."""
        return self.planner.plan(height, width)

    def generate(
        self,
        spec: GenerationSpec,
        on_step: Callable[[StepStat, int], None] | None = None,
        check_alive: Callable[[], None] | None = None,
    ) -> GenerationResult:
        mode, choice = spec.mode, None
        if mode == Mode.AUTO:
            spec, mode, choice = self.auto(spec)
        cut = self._split_cut
        if cut is None and mode in (Mode.HYBRID, Mode.PIPELINE):
            cut = self.split_plan(spec.height, spec.width).cut
        try:
            result = drive_request(
                spec, mode, self.workers, split_cut=cut, on_step=on_step, check_alive=check_alive
            )
        except WorkerFault as fault:  # no pool to quarantine in: what the caller is told
            raise fault.error from None
        result.stats.auto_choice = choice
        return result

    def auto(self, spec: GenerationSpec) -> tuple[GenerationSpec, Mode, AutoChoice | None]:
        """AUTO in one process, where a pair is always free: with the model's calibration, the
        schedule cost-aware AUTO chooses from the split planner's measured costs (one image);
        without one, HYBRID as the cluster runs it then (docs/design.md section 10)."""
        calibration = self.adapter.calibration
        if not spec.guided:
            return spec, Mode.SINGLE, None
        if calibration is None or spec.num_images != 1:
            return spec, Mode.HYBRID, None
        plan = self.split_plan(spec.height, spec.width)
        topology = self.adapter.make_split(plan.cut).topology.value
        k = spec.hybrid.k if "k" in spec.hybrid_set else None
        costs = plan_costs(plan, topology)
        choice = choose(costs, calibration, spec.num_steps, spec.hybrid, spec.window_guidance, k)
        return applied(choice, spec), choice.mode, choice

    def close(self) -> None:
        for w in self.workers:
            w.close()

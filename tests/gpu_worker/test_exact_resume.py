"""Exact resume (docs/design.md section 5): a request resumed from its checkpoint on other
workers computes the very image of the unbroken run, whatever the scheduler — the checkpoint
carries the scheduler's history (DPMSolverMultistep, UniPC) and the window policy's state (the
last measured e_c - e_u of ``last-difference``).

The break is the driver's own recovery: a worker fails a step, the driver aborts and resumes
from the last checkpoint on fresh engines (real in-process engines, real data-plane frames)."""

from __future__ import annotations

import inspect
import json
import os
from concurrent.futures import Future
from pathlib import Path

import diffusers
import pytest
import torch
from cluster_helpers import make_input

from coordinator.driver import drive_request, worker_request
from coordinator.remote import WorkerFault
from gpu_worker import scheduler_state
from gpu_worker.dataplane import InMemoryLink, Mailbox
from gpu_worker.engine import WorkerEngine
from gpu_worker.loader import load_adapter
from hybridiff.errors import BadCommand, WorkerFailed
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import Mode, Phase, Role, WindowGuidance
from hybridiff.request import resolve_spec
from hybridiff.wire import tensor_from_proto, tensor_to_proto
from hybridiff_launch.inprocess import InProcessWorker

FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
SCHEDULERS = {  # name: (architecture, scheduler class, config changes)
    "euler": ("sdxl", "EulerDiscreteScheduler", {}),  # the tiny SDXL model's own: one-step, the control
    "dpm": ("sdxl", "DPMSolverMultistepScheduler", {}),
    "dpm-sde": ("sdxl", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("sdxl", "UniPCMultistepScheduler", {}),
    "sd3-flow": ("sd3", "FlowMatchEulerDiscreteScheduler", {}),  # the tiny SD3 model's own
    "sd3-unipc": ("sd3", "UniPCMultistepScheduler", FLOW),
}


def _with_scheduler(src: Path, dst: Path, cls: str, extra: dict) -> Path:
    """``src`` with another scheduler: a model that ships a multistep one (weights linked)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name not in ("scheduler", "model_index.json"):
            os.symlink(p.resolve(), dst / p.name)
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls]
    (dst / "model_index.json").write_text(json.dumps(index))
    accepted = inspect.signature(getattr(diffusers, cls).__init__).parameters
    config = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    config = {k: v for k, v in config.items() if k in accepted}  # FlowMatch's shift is not UniPC's
    (dst / "scheduler").mkdir()
    (dst / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, **extra, "_class_name": cls})
    )
    return dst


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("schedulers")
    made = {}
    for name, (arch, cls, extra) in SCHEDULERS.items():
        made[name] = load_adapter(_with_scheduler(Path(model_dirs[arch]), root / name, cls, extra))
        assert type(made[name].pipe.scheduler).__name__ == cls
    return made


@pytest.fixture
def pairs():
    """Fresh in-process pairs of worker engines over an adapter, each with its own mailboxes."""
    made: list[InProcessWorker] = []

    def pair(adapter, tag: str) -> list[InProcessWorker]:
        boxes = [Mailbox(f"{tag}U", adapter.device), Mailbox(f"{tag}C", adapter.device)]
        workers = [
            InProcessWorker(
                WorkerEngine(adapter, f"{tag}U", boxes[0], lambda _: InMemoryLink(f"{tag}U", boxes[1]))
            ),
            InProcessWorker(
                WorkerEngine(adapter, f"{tag}C", boxes[1], lambda _: InMemoryLink(f"{tag}C", boxes[0]))
            ),
        ]
        made.extend(workers)
        return workers

    yield pair
    for w in made:
        w.close()


class _Handle:
    """A worker handle over an in-process worker that fails step ``fail_at`` (as a crashed
    worker would) and lets a test edit the checkpoint it is asked to resume from."""

    def __init__(self, worker: InProcessWorker, fail_at: int = -1, edit_resume=None) -> None:
        self.worker, self.fail_at, self.edit_resume = worker, fail_at, edit_resume
        self.name, self.identity, self.data_address = worker.name, worker.identity, worker.data_address

    def send(self, cmd: worker_pb2.SessionRequest) -> Future:
        which = cmd.WhichOneof("command")
        if which == "step" and cmd.step.step == self.fail_at:
            failed: Future = Future()
            failed.set_exception(WorkerFailed(f"{self.name} crashed at step {self.fail_at}"))
            return failed
        if which == "begin" and cmd.begin.HasField("resume") and self.edit_resume is not None:
            self.edit_resume(cmd.begin.resume)
        return self.worker.send(cmd)

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)


class _Recording:
    """A worker handle that keeps the checkpoint of every step it reports."""

    def __init__(self, worker: InProcessWorker) -> None:
        self.worker = worker
        self.name, self.identity, self.data_address = worker.name, worker.identity, worker.data_address
        self.checkpoints: dict[int, worker_pb2.Checkpoint] = {}

    def send(self, cmd: worker_pb2.SessionRequest) -> Future:
        future = self.worker.send(cmd)
        future.add_done_callback(self._keep)
        return future

    def _keep(self, future: Future) -> None:
        if (
            future.exception() is None
            and future.result() is not None
            and future.result().step.HasField("checkpoint")
        ):
            cp = future.result().step.checkpoint
            self.checkpoints[cp.next_step] = cp

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)


def _spec(adapter, **kw):
    base = dict(prompt="a blue circle on the left", num_steps=12, seed=5, guidance_scale=5.0)
    return resolve_spec(make_input(**{**base, **kw}), adapter.size_limits(), adapter.defaults)


def _run(spec, mode: Mode, workers, recover):
    return drive_request(spec, mode, workers, recover=recover)


def _resumed_at_8(adapter, pairs, spec, edit_resume) -> torch.Tensor:
    """HYBRID's final latents when worker U fails at step 8 and a new pair resumes from its
    checkpoint, edited first by ``edit_resume`` (None: as sent)."""
    broken, new = pairs(adapter, "b"), pairs(adapter, "c")
    result = _run(
        spec,
        Mode.HYBRID,
        [_Handle(broken[0], 8), broken[1]],
        lambda failed, survivors, needs_pair: [_Handle(w, edit_resume=edit_resume) for w in new],
    )
    assert any("resumed at step 8" in n for n in result.stats.notes)
    return _latents(result)


def _latents(result) -> torch.Tensor:
    return tensor_from_proto(result.latents)


# --- the driver's recovery, end to end in one process ----------------------------------------------
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("recovery", ["new-pair", "lone-survivor", "single"])
def test_a_request_resumed_mid_way_is_bit_identical(adapters, pairs, scheduler, recovery):
    adapter = adapters[scheduler]
    single = recovery == "single"
    mode = Mode.SINGLE if single else Mode.CFG_PARALLEL
    spec = _spec(adapter, mode="single" if single else "cfg-parallel")
    first = pairs(adapter, "a")
    unbroken = _run(
        spec, mode, first, recover=lambda failed, survivors, needs_pair: pytest.fail("nothing failed")
    )

    second = pairs(adapter, "b")
    replacements = pairs(adapter, "c")

    def recover(failed, survivors, needs_pair):
        if recovery == "lone-survivor":
            return survivors  # runs both branches one after the other at batch 1
        return replacements[:1] if single else replacements

    workers = [_Handle(second[0], 5)] + ([] if single else [second[1]])
    broken = _run(spec, mode, workers, recover)

    assert any("resumed at step 5" in n for n in broken.stats.notes), broken.stats.notes
    assert [s.step for s in broken.stats.steps] == list(range(12))
    assert torch.equal(_latents(broken), _latents(unbroken))
    assert broken.images[0] == unbroken.images[0]


def test_a_checkpoint_without_the_schedulers_state_is_refused(adapters, pairs):
    """Resuming a multistep scheduler from the step index alone would lose its history and give
    another image: a worker refuses such a checkpoint rather than resume inexactly."""
    adapter = adapters["dpm"]
    spec = _spec(adapter, mode="cfg-parallel")
    second, third = pairs(adapter, "b"), pairs(adapter, "c")
    with pytest.raises(WorkerFault) as failed:
        _run(
            spec,
            Mode.CFG_PARALLEL,
            [_Handle(second[0], 5), second[1]],
            lambda failed, survivors, needs_pair: [
                _Handle(w, edit_resume=lambda cp: cp.ClearField("scheduler")) for w in third
            ],
        )
    assert "resume.scheduler" in str(failed.value.error)


# --- the window policy's state ----------------------------------------------------------------------
def _hybrid(adapter, policy: str = "last-difference"):
    # tau_cap 6, k 3 on 12 steps: data parallel 0..5, the window 6..9 (6 fills), data parallel 10..11
    return _spec(adapter, mode="hybrid", window_guidance=policy, l_slope=3, tau_cap=6, k=3)


@pytest.mark.parametrize("scheduler", ["euler", "dpm"])
def test_a_last_difference_resume_at_the_window_keeps_the_difference(adapters, pairs, scheduler):
    adapter = adapters[scheduler]
    spec = _hybrid(adapter)
    unbroken = _run(spec, Mode.HYBRID, pairs(adapter, "a"), recover=None)
    assert (unbroken.stats.tau1, unbroken.stats.tau2) == (6, 9)
    conditional = _run(_hybrid(adapter, "conditional"), Mode.HYBRID, pairs(adapter, "k"), recover=None)
    assert not torch.equal(_latents(conditional), _latents(unbroken))  # the policy matters here

    second, third = pairs(adapter, "b"), pairs(adapter, "c")
    # U fails the window's fill step: the new pair resumes there, with the difference of step 5
    broken = _run(spec, Mode.HYBRID, [_Handle(second[0], 6), second[1]], lambda f, s, needs_pair: third)
    assert any("resumed at step 6" in n for n in broken.stats.notes)
    assert torch.equal(_latents(broken), _latents(unbroken))
    assert broken.images[0] == unbroken.images[0]


@pytest.mark.parametrize("policy", ["conditional", "full-cfg"])
@pytest.mark.parametrize("fail_at", [5, 6])
def test_a_resume_in_the_speculative_steps_is_bit_identical(adapters, pairs, policy, fail_at):
    """Steps 4-6 go out speculative (L = 3; 6 becomes the fill). A pair resumed at one of them
    already knows its phase, yet gets it as a speculative step resolved at once: it computes
    what the unbroken run computed (a FULL_CFG fill from two batch-1 halves, not a batch of 2)."""
    adapter = adapters["euler"]
    spec = _hybrid(adapter, policy)
    unbroken = _run(spec, Mode.HYBRID, pairs(adapter, "a"), recover=None)
    assert (unbroken.stats.tau1, unbroken.stats.tau2) == (6, 9)
    second, third = pairs(adapter, "b"), pairs(adapter, "c")
    broken = _run(spec, Mode.HYBRID, [_Handle(second[0], fail_at), second[1]], lambda f, s, needs_pair: third)
    assert any(f"resumed at step {fail_at}" in n for n in broken.stats.notes)
    resolved = [
        s.step for s in broken.stats.steps if all(w.resolve_wait_seconds > 0 for w in s.workers.values())
    ]
    assert resolved == [4, 5, 6]
    assert torch.equal(_latents(broken), _latents(unbroken))


def test_every_window_checkpoint_carries_the_last_difference(adapters, pairs):
    """Deeper in the window a resumed pair restarts the pipeline with a fill step (it has no
    stale activations), so the image is not the unbroken one; the difference still comes along."""
    adapter = adapters["euler"]
    spec = _hybrid(adapter)
    first = pairs(adapter, "a")
    u = _Recording(first[0])
    _run(spec, Mode.HYBRID, [u, first[1]], recover=lambda f, s, needs_pair: pytest.fail("nothing failed"))
    assert set(u.checkpoints) == set(range(1, 13))
    assert all(cp.HasField("last_difference") for cp in u.checkpoints.values())  # every phase-1 step measures
    measured = tensor_from_proto(u.checkpoints[6].last_difference)  # of step 5, the last before the window
    assert measured.shape == tensor_from_proto(u.checkpoints[6].latents).shape and measured.abs().sum() > 0
    for n in range(7, 11):  # the window measures nothing: the difference of step 5 all along
        assert torch.equal(tensor_from_proto(u.checkpoints[n].last_difference), measured)

    # a resume at step 8 uses it: without it the window would run ``conditional``
    with_difference = _resumed_at_8(adapter, pairs, spec, None)
    without = _resumed_at_8(adapter, pairs, spec, lambda cp: cp.ClearField("last_difference"))
    assert not torch.equal(with_difference, without)


# --- the refreshing policies: refreshed and extrapolated difference -------------------------------
def _refreshed(adapter, policy: str = "refreshed-difference", refresh_every: int = 2):
    # as _hybrid, the window 6..9; every 2nd window step measures again: fills at 6 and 8
    return _spec(
        adapter,
        mode="hybrid",
        window_guidance=policy,
        l_slope=3,
        tau_cap=6,
        k=3,
        refresh_every=refresh_every,
    )


def _nothing_fails(failed, survivors, needs_pair):
    pytest.fail("nothing failed")


@pytest.mark.parametrize("policy", ["refreshed-difference", "extrapolated-difference"])
def test_a_refresh_step_measures_the_difference_again(adapters, pairs, policy):
    adapter = adapters["euler"]
    first = pairs(adapter, "a")
    u = _Recording(first[0])
    result = _run(_refreshed(adapter, policy), Mode.HYBRID, [u, first[1]], recover=_nothing_fails)
    fill, pipelined = Phase.PIPELINE_FILL, Phase.PIPELINE
    assert [s.phase for s in result.stats.steps][6:10] == [fill, pipelined, fill, pipelined]
    # a refresh step exchanges one prediction each way, like a data-parallel step
    latent = tensor_from_proto(u.checkpoints[1].latents)
    prediction_bytes = latent.numel() * latent.element_size()
    assert all(w.bytes_sent >= prediction_bytes for w in result.stats.steps[8].workers.values())
    difference = {n: tensor_from_proto(u.checkpoints[n].last_difference) for n in range(6, 11)}  # of step n-1
    assert not torch.equal(difference[7], difference[6])  # the fill at 6 measured it
    assert torch.equal(difference[8], difference[7])  # the pipelined step 7 re-used it
    assert not torch.equal(difference[9], difference[8])  # the refresh at 8 measured it again
    assert torch.equal(difference[10], difference[9])
    # with the step that measured it: the extrapolated policy's trend runs from there
    assert [u.checkpoints[n].last_difference_step for n in range(6, 11)] == [5, 6, 6, 8, 8]


@pytest.mark.parametrize(
    "policy,scheduler,fail_at,recovery",
    [
        ("refreshed-difference", "euler", 8, "new-pair"),
        ("refreshed-difference", "dpm", 8, "new-pair"),
        ("refreshed-difference", "euler", 6, "new-pair"),
        ("refreshed-difference", "euler", 10, "lone-survivor"),
        ("extrapolated-difference", "euler", 8, "new-pair"),
        ("extrapolated-difference", "dpm", 10, "lone-survivor"),
    ],
)
def test_a_refreshed_window_resumes_bit_identical(adapters, pairs, policy, scheduler, fail_at, recovery):
    """A pair resumed at a refresh step computes the very step the unbroken pair did (a refresh
    starts from fresh activations, and the extrapolated trend runs from the checkpoint's last
    difference and its step); a lone survivor after the window runs both branches alone."""
    adapter = adapters[scheduler]
    spec = _refreshed(adapter, policy)
    unbroken = _run(spec, Mode.HYBRID, pairs(adapter, "a"), recover=None)
    assert (unbroken.stats.tau1, unbroken.stats.tau2) == (6, 9)
    last_difference = _run(_hybrid(adapter), Mode.HYBRID, pairs(adapter, "k"), recover=None)
    assert not torch.equal(_latents(last_difference), _latents(unbroken))  # the refresh matters here

    second, third = pairs(adapter, "b"), pairs(adapter, "c")
    asked = []

    def recover(failed, survivors, needs_pair):
        asked.append(needs_pair)
        return third if recovery == "new-pair" else survivors

    broken = _run(spec, Mode.HYBRID, [_Handle(second[0], fail_at), second[1]], recover)
    assert any(f"resumed at step {fail_at}" in n for n in broken.stats.notes)
    assert asked == [recovery == "new-pair"]  # the window's steps need a pair, the steps after it not
    assert torch.equal(_latents(broken), _latents(unbroken))
    assert broken.images[0] == unbroken.images[0]


def test_the_extrapolated_trend_runs_from_the_checkpoint_s_step(adapters, pairs):
    """Resumed at the refresh step 8, the pair measures the difference again and takes its trend
    from the checkpoint's difference of step 6: told another step, it extrapolates otherwise."""
    adapter = adapters["euler"]
    spec = _refreshed(adapter, "extrapolated-difference")
    unbroken = _run(spec, Mode.HYBRID, pairs(adapter, "a"), recover=None)

    def resumed(edit_resume):
        return _resumed_at_8(adapter, pairs, spec, edit_resume)

    def step_5(checkpoint):
        assert checkpoint.last_difference_step == 6
        checkpoint.last_difference_step = 5

    assert torch.equal(resumed(None), _latents(unbroken))
    assert not torch.equal(resumed(step_5), _latents(unbroken))


def test_a_difference_from_a_step_not_yet_run_is_refused(adapters, pairs):
    adapter = adapters["euler"]
    spec = _refreshed(adapter, "extrapolated-difference")
    second, third = pairs(adapter, "b"), pairs(adapter, "c")

    def future(checkpoint):
        checkpoint.last_difference_step = checkpoint.next_step

    with pytest.raises(WorkerFault) as failed:
        _run(
            spec,
            Mode.HYBRID,
            [_Handle(second[0], 8), second[1]],
            lambda f, s, needs_pair: [_Handle(w, edit_resume=future) for w in third],
        )
    assert "resume.last_difference_step" in str(failed.value.error)


# --- scheduler_state on its own ---------------------------------------------------------------------
def _scheduler(cls: str, **extra):
    config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    made = getattr(diffusers, cls).from_config({**config, **extra})
    made.set_timesteps(8)
    if hasattr(made, "set_begin_index"):
        made.set_begin_index(0)
    return made


def _steps(scheduler, x: torch.Tensor, steps: range, generator: torch.Generator) -> torch.Tensor:
    kw = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i in steps:
        t = scheduler.timesteps[i]
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)
        eps = torch.sin(x * (i + 1)) + 0.1 * i  # a stand-in denoiser, the same on every run
        x = scheduler.step(eps, t, x, **kw, return_dict=False)[0]
    return x


# What set_timesteps builds from the config and the step count: never in a state.
REBUILT = {"_internal_dict", "betas", "alphas_cumprod", "timesteps", "sigmas"}
ROUND_TRIP = [
    ("EulerDiscreteScheduler", {}, False),
    ("EulerAncestralDiscreteScheduler", {}, False),
    ("DDIMScheduler", {}, False),
    ("FlowMatchEulerDiscreteScheduler", {}, False),  # SD3's
    ("DPMSolverMultistepScheduler", {}, True),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, True),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
    ("UniPCMultistepScheduler", {}, True),
    ("DEISMultistepScheduler", {}, True),
    ("DPMSolverSinglestepScheduler", {}, True),
    ("HeunDiscreteScheduler", {}, False),  # two evaluations per step: its history is not a list
    ("PNDMScheduler", {}, False),  # keeps a growing list of outputs (ets)
]


def _make(cls: str, extra: dict):
    if cls == "FlowMatchEulerDiscreteScheduler":
        made = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        made.set_timesteps(8)
        return made
    return _scheduler(cls, **extra)


@pytest.mark.parametrize("cls,extra,has_history", ROUND_TRIP)
def test_capture_and_restore_continue_the_same_sampler(cls, extra, has_history):
    """After any number of steps, the last one included: what the check lets through is every
    state a genuine run leaves, and the resumed run is bit-identical."""
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    n = len(_make(cls, extra).timesteps)
    straight = _steps(_make(cls, extra), x0, range(n), torch.Generator().manual_seed(1))

    for k in range(n + 1):
        first, gen = _make(cls, extra), torch.Generator().manual_seed(1)
        fresh = scheduler_state.snapshot(first)
        mid = _steps(first, x0, range(k), gen)
        wire = worker_pb2.SchedulerState.FromString(scheduler_state.capture(first, fresh).SerializeToString())
        assert wire.scheduler_class == type(first).__name__
        names = {f.name for f in wire.fields}
        assert not names & REBUILT

        resumed, gen2 = _make(cls, extra), torch.Generator()
        gen2.set_state(gen.get_state())
        scheduler_state.restore(resumed, wire, torch.device("cpu"), mid.shape, k)
        assert torch.equal(_steps(resumed, mid, range(k, n), gen2), straight), k

    if has_history:  # the step index alone is not enough: the history is what the test checks
        assert "model_outputs" in names
        first, gen = _make(cls, extra), torch.Generator().manual_seed(1)
        mid = _steps(first, x0, range(3), gen)
        naive, gen3 = _make(cls, extra), torch.Generator()
        gen3.set_state(gen.get_state())
        naive.set_begin_index(3)
        assert not torch.equal(_steps(naive, mid, range(3, n), gen3), straight)


def test_none_entries_of_the_history_round_trip():
    first = _scheduler("DPMSolverMultistepScheduler", solver_order=3)
    fresh = scheduler_state.snapshot(first)
    _steps(first, torch.ones(1, 4, 8, 8), range(1), torch.Generator())
    state = scheduler_state.capture(first, fresh)
    outputs = next(f for f in state.fields if f.name == "model_outputs")
    assert outputs.is_list and [v.WhichOneof("value") for v in outputs.values] == ["none", "none", "tensor"]
    resumed = _scheduler("DPMSolverMultistepScheduler", solver_order=3)
    scheduler_state.restore(resumed, state, torch.device("cpu"), (1, 4, 8, 8), 1)
    assert resumed.model_outputs[:2] == [None, None]
    assert torch.equal(resumed.model_outputs[2], first.model_outputs[2])
    assert (resumed.lower_order_nums, resumed._step_index) == (1, 1)


def _captured(cls: str, steps: int, shape=(1, 4, 8, 8), **extra) -> worker_pb2.SchedulerState:
    first = _scheduler(cls, **extra)
    fresh = scheduler_state.snapshot(first)
    _steps(first, torch.ones(shape), range(steps), torch.Generator().manual_seed(0))
    return scheduler_state.capture(first, fresh)


def test_a_state_goes_back_to_the_device_or_the_host_as_it_was():
    state = _captured("UniPCMultistepScheduler", 2)
    outputs = next(f for f in state.fields if f.name == "model_outputs")
    outputs.values[0].host = False  # as a CUDA worker sends its history
    outputs.values[0].tensor.CopyFrom(
        tensor_to_proto(tensor_from_proto(outputs.values[0].tensor).half(), "model_outputs")
    )
    target = _scheduler("UniPCMultistepScheduler")
    scheduler_state.restore(target, state, torch.device("meta"), (1, 4, 8, 8), 2)  # "meta": not the host
    on_device, on_host = target.model_outputs
    assert (on_device.device.type, on_device.dtype) == ("meta", torch.float16)
    assert on_host.device.type == "cpu" and target.this_order == 2 and target.lower_order_nums == 2


def test_a_state_of_another_class_is_refused():
    state = _captured("DPMSolverMultistepScheduler", 2)
    target = _scheduler("UniPCMultistepScheduler")
    before = dict(vars(target))
    with pytest.raises(BadCommand) as err:
        scheduler_state.restore(target, state, torch.device("cpu"), (1, 4, 8, 8), 2)
    assert err.value.field == "resume.scheduler.scheduler_class"
    assert vars(target).keys() == before.keys() and target.model_outputs == [None, None]


def _value(v):
    if isinstance(v, torch.Tensor):
        return worker_pb2.SchedulerValue(tensor=tensor_to_proto(v, "x"), host=True)
    if v is None:
        return worker_pb2.SchedulerValue(none=True)
    if isinstance(v, bool):
        return worker_pb2.SchedulerValue(flag=v)
    if isinstance(v, int):
        return worker_pb2.SchedulerValue(integer=v)
    return worker_pb2.SchedulerValue(number=v)


def _forged(state: worker_pb2.SchedulerState, name: str, value=None, drop: bool = False):
    """``state`` with field ``name`` set to ``value`` (a list: a list field), or dropped."""
    out = worker_pb2.SchedulerState(scheduler_class=state.scheduler_class)
    out.fields.extend(f for f in state.fields if f.name != name)
    if not drop:
        values = value if isinstance(value, list) else [value]
        out.fields.append(
            worker_pb2.SchedulerField(
                name=name, values=[_value(v) for v in values], is_list=isinstance(value, list)
            )
        )
    return out


def _history(state, name="model_outputs"):
    field = next(f for f in state.fields if f.name == name)
    values = [None if v.HasField("none") else tensor_from_proto(v.tensor) for v in field.values]
    return values if field.is_list else values[0]


NAN = float("nan")
SAMPLE = torch.ones(1, 4, 8, 8)
# (scheduler, config, steps done, field, forged value or "drop"): each one a state no genuine run
# of that timeline leaves after that many steps. The first four are what a one-step scheduler
# could be given before this check existed: a crash at the next step or a non-finite image.
FORGED = {
    "step-index-huge": ("EulerDiscreteScheduler", {}, 3, "_step_index", 10**12),
    "step-index-negative": ("EulerDiscreteScheduler", {}, 3, "_step_index", -5),
    "step-index-not-the-step": ("EulerDiscreteScheduler", {}, 3, "_step_index", 5),
    "step-index-a-number": ("EulerDiscreteScheduler", {}, 3, "_step_index", 3.0),
    "step-index-none": ("EulerDiscreteScheduler", {}, 3, "_step_index", None),
    "sigmas-int": ("EulerDiscreteScheduler", {}, 3, "sigmas", 7),
    "sigmas-nan": ("EulerDiscreteScheduler", {}, 3, "sigmas", torch.full((9,), NAN)),
    "sigmas-shape": ("EulerDiscreteScheduler", {}, 3, "sigmas", torch.ones(2)),
    "sigmas-dtype": ("EulerDiscreteScheduler", {}, 3, "sigmas", torch.ones(9, dtype=torch.float64)),
    "timesteps-zeros": ("EulerDiscreteScheduler", {}, 3, "timesteps", torch.zeros(8)),
    "steps-none": ("EulerDiscreteScheduler", {}, 3, "num_inference_steps", None),
    "steps-other": ("EulerDiscreteScheduler", {}, 3, "num_inference_steps", 7),
    "new-attribute": ("EulerDiscreteScheduler", {}, 3, "foo", 1),
    "property": ("EulerDiscreteScheduler", {}, 3, "init_noise_sigma", 1e30),
    "config": ("EulerDiscreteScheduler", {}, 3, "_internal_dict", None),
    "dunder": ("EulerDiscreteScheduler", {}, 3, "__class__", None),
    "method": ("EulerDiscreteScheduler", {}, 3, "step", None),
    "not-a-name": ("EulerDiscreteScheduler", {}, 3, "not an identifier", None),
    "init-sigma-huge": ("DPMSolverMultistepScheduler", {}, 3, "init_noise_sigma", 1e30),
    "begin-index-ahead": ("DPMSolverMultistepScheduler", {}, 3, "_begin_index", 5),
    "order-too-high": ("DPMSolverMultistepScheduler", {}, 3, "lower_order_nums", 7),
    "order-negative": ("DPMSolverMultistepScheduler", {}, 3, "lower_order_nums", -1),
    "order-ahead-of-history": ("DPMSolverMultistepScheduler", {"solver_order": 3}, 1, "lower_order_nums", 3),
    "history-dropped": ("DPMSolverMultistepScheduler", {}, 3, "model_outputs", "drop"),
    "history-short": ("DPMSolverMultistepScheduler", {}, 3, "model_outputs", [SAMPLE]),
    "history-long": ("DPMSolverMultistepScheduler", {}, 3, "model_outputs", [SAMPLE] * 17),
    "history-gap": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 3},
        3,
        "model_outputs",
        [None, SAMPLE, SAMPLE],
    ),
    "history-shape": (
        "DPMSolverMultistepScheduler",
        {},
        3,
        "model_outputs",
        [SAMPLE, torch.ones(1, 4, 2, 2)],
    ),
    "history-nan": (
        "DPMSolverMultistepScheduler",
        {},
        3,
        "model_outputs",
        [SAMPLE, torch.full((1, 4, 8, 8), NAN)],
    ),
    "history-inf": ("DPMSolverMultistepScheduler", {}, 3, "model_outputs", [SAMPLE, SAMPLE / 0]),
    "history-int": ("DPMSolverMultistepScheduler", {}, 3, "model_outputs", [SAMPLE, SAMPLE.long()]),
    "history-not-a-list": ("DPMSolverMultistepScheduler", {}, 3, "model_outputs", SAMPLE),
    "unipc-order": ("UniPCMultistepScheduler", {}, 3, "this_order", 7),
    "unipc-last-sample-shape": ("UniPCMultistepScheduler", {}, 3, "last_sample", torch.ones(1, 4, 9, 9)),
    "unipc-last-sample-none": ("UniPCMultistepScheduler", {}, 3, "last_sample", None),
    "unipc-timestep-list": (
        "UniPCMultistepScheduler",
        {},
        3,
        "timestep_list",
        [torch.tensor(1), torch.tensor(2.0)],
    ),
    "heun-dt-nan": ("HeunDiscreteScheduler", {}, 3, "dt", torch.tensor(NAN)),
    "heun-prev-derivative": ("HeunDiscreteScheduler", {}, 3, "prev_derivative", torch.ones(4)),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_state_is_refused_naming_the_field_and_nothing_is_set(case):
    cls, extra, steps, name, value = FORGED[case]
    state = _forged(_captured(cls, steps, **extra), name, value, drop=value == "drop")
    target = _scheduler(cls, **extra)
    before = scheduler_state.snapshot(target)
    with pytest.raises(BadCommand) as err:
        scheduler_state.restore(target, state, torch.device("cpu"), tuple(SAMPLE.shape), steps)
    assert err.value.field == f"resume.scheduler.{name}", err.value
    assert scheduler_state.snapshot(target).keys() == before.keys() and callable(target.step)
    assert all(scheduler_state._same(v, before[k]) for k, v in scheduler_state.snapshot(target).items())


def test_a_genuine_state_is_checked_against_its_own_step_count_and_sample():
    state = _captured("DPMSolverMultistepScheduler", 3)
    for steps, shape, field in (
        (4, (1, 4, 8, 8), "resume.scheduler._step_index"),  # resumed at another step than captured
        (3, (2, 4, 8, 8), "resume.scheduler.model_outputs"),  # latents of another batch or size
    ):
        with pytest.raises(BadCommand) as err:
            scheduler_state.restore(
                _scheduler("DPMSolverMultistepScheduler"), state, torch.device("cpu"), shape, steps
            )
        assert err.value.field == field
    scheduler_state.restore(
        _scheduler("DPMSolverMultistepScheduler"), state, torch.device("cpu"), (1, 4, 8, 8), 3
    )


@pytest.mark.parametrize(
    "field",
    [
        worker_pb2.SchedulerField(name="_step_index", values=[]),  # a single value, none given
        worker_pb2.SchedulerField(name="_step_index", values=[worker_pb2.SchedulerValue()]),  # nothing set
        worker_pb2.SchedulerField(
            name="last_sample",
            values=[worker_pb2.SchedulerValue(tensor=dict(dtype=1, shape=[4], nbytes=16, data=b"\0" * 3))],
        ),
    ],
    ids=["no-value", "empty-value", "bad-tensor"],
)
def test_a_state_that_does_not_decode_is_refused_and_nothing_is_set(field):
    target = _scheduler("UniPCMultistepScheduler")
    state = worker_pb2.SchedulerState(scheduler_class="UniPCMultistepScheduler", fields=[field])
    with pytest.raises(BadCommand):
        scheduler_state.restore(target, state, torch.device("cpu"), (1, 4, 8, 8), 3)
    assert target.lower_order_nums == 0 and target._step_index is None


def test_a_state_the_message_cannot_carry_is_refused_at_capture():
    first = _scheduler("EulerDiscreteScheduler")
    fresh = scheduler_state.snapshot(first)
    first.custom = {"a": 1}  # e.g. a scheduler that keeps a dict
    with pytest.raises(WorkerFailed, match="custom"):
        scheduler_state.capture(first, fresh)


def test_the_engine_refuses_a_checkpoint_that_does_not_fit(adapters, pairs):
    adapter = adapters["dpm"]
    spec = _spec(adapter, mode="cfg-parallel")
    first = pairs(adapter, "a")
    u = _Recording(first[0])
    _run(
        spec, Mode.CFG_PARALLEL, [u, first[1]], recover=lambda f, s, needs_pair: pytest.fail("nothing failed")
    )
    good = u.checkpoints[4]
    engine = pairs(adapter, "b")[0].engine

    def begin(checkpoint):
        cmd = worker_pb2.BeginCommand(
            request=worker_request(spec),
            role=Role.U,
            window_guidance=WindowGuidance.CONDITIONAL,
            solo=True,
            resume=checkpoint,
        )
        return engine.begin("r", cmd)

    wrong_class = worker_pb2.Checkpoint()
    wrong_class.CopyFrom(good)
    wrong_class.scheduler.scheduler_class = "EulerDiscreteScheduler"
    wrong_shape = worker_pb2.Checkpoint()
    wrong_shape.CopyFrom(good)
    wrong_shape.latents.CopyFrom(tensor_to_proto(torch.zeros(1, 4, 2, 2), "latents"))
    bad_generator = worker_pb2.Checkpoint()
    bad_generator.CopyFrom(good)
    bad_generator.generator_state = b"\1\2\3"
    latents = tensor_from_proto(good.latents)
    not_finite = []
    for bad in (float("nan"), float("-inf")):
        forged = worker_pb2.Checkpoint()
        forged.CopyFrom(good)
        forged.latents.CopyFrom(tensor_to_proto(latents.clone().index_fill_(3, torch.tensor([1]), bad)))
        not_finite.append(forged)
    for checkpoint, field in (
        (wrong_class, "resume.scheduler.scheduler_class"),
        (wrong_shape, "resume.latents"),
        (bad_generator, "resume.generator_state"),
        *((forged, "resume.latents") for forged in not_finite),
    ):
        with pytest.raises(BadCommand) as err:
            begin(checkpoint)
        assert err.value.field == field
    begin(good)
    engine.abort("r")


# Forgeries a hostile review found, as any client of a worker's control port can send
# them: before the check each was accepted at Begin, then crashed a step (blamed on the resuming
# worker) or gave a non-finite image.
REVIEW_FORGERIES = {
    "_step_index=10**12": ("_step_index", 10**12),
    "_step_index=-5": ("_step_index", -5),
    "sigmas=int": ("sigmas", 7),
    "sigmas=NaN": ("sigmas", torch.full((13,), NAN)),
    "sigmas=(2,)": ("sigmas", torch.ones(2)),
    "timesteps=zeros": ("timesteps", torch.zeros(12)),
    "num_inference_steps=None": ("num_inference_steps", None),
    "foo": ("foo", 1),
    "init_noise_sigma=1e30": ("init_noise_sigma", 1e30),
    "model_outputs=NaN": ("model_outputs", "nan-history"),
}


@pytest.mark.parametrize("scheduler", ["euler", "dpm"])
def test_the_engine_refuses_the_review_s_forged_states(adapters, pairs, scheduler):
    adapter = adapters[scheduler]
    spec = _spec(adapter, mode="single")
    u = _Recording(pairs(adapter, "a")[0])
    _run(spec, Mode.SINGLE, [u], recover=lambda f, s, needs_pair: pytest.fail("nothing failed"))
    good = u.checkpoints[4]
    engine = pairs(adapter, "b")[0].engine
    cmd = worker_pb2.BeginCommand(
        request=worker_request(spec), role=Role.U, window_guidance=WindowGuidance.CONDITIONAL, solo=True
    )
    for case, (name, value) in REVIEW_FORGERIES.items():
        if value == "nan-history":
            if scheduler != "dpm":
                continue
            value = [torch.full_like(t, NAN) for t in _history(good.scheduler)]
        cmd.resume.CopyFrom(good)
        cmd.resume.scheduler.CopyFrom(_forged(good.scheduler, name, value))
        with pytest.raises(BadCommand) as err:
            engine.begin("r", cmd)
        assert err.value.field == f"resume.scheduler.{name}", case
        assert "r" not in engine._active
    cmd.resume.CopyFrom(good)
    engine.begin("r", cmd)
    engine.abort("r")

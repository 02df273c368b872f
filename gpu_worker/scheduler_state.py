"""A diffusers scheduler's mutable state as a typed ``SchedulerState`` message, and back.

A checkpoint lets another worker continue a request with the very same arithmetic
(docs/design.md section 5). For a one-step scheduler (Euler, DDIM, flow matching) the latents,
the generator and the step index are enough; a multistep one (DPMSolverMultistep, UniPC, DEIS) also keeps a
history that its next steps read: model outputs, the last sample, order counters.

What travels: the attributes in the scheduler's ``__dict__`` whose value differs from the one
they had when the request's timeline was made (``snapshot``, taken after ``set_timesteps``).
The resuming worker makes that same timeline from the same config and step count, so every
attribute left out is already equal there — no list of names per scheduler class to keep up,
and the tables ``set_timesteps`` builds (betas, sigmas, timesteps) never travel. Values are
typed (tensors, numbers, integers, flags, None, flat lists of them), never pickled: a
checkpoint comes over the network.

A checkpoint is checked before anything is set, since anyone who may send a Begin can forge one
(a crash it caused would be blamed on the resuming worker; a NaN would give a black image).
What a genuine state may hold is learnt from the scheduler itself, not listed per class: a copy
of the fresh scheduler runs the whole timeline on a tiny stand-in sample (``_profile``, cached
per class, config, step count and device). Its steps show which attributes they set or change;
every other one is a table of the timeline and must equal the fresh value. After ``k`` steps the
*layout* of each attribute that steps change is a function of ``k`` alone: whether it is None,
its integers (step index, order counters), list lengths, which history slots are filled, and
the shape and dtype of every tensor that is not sample-shaped. A state must show the layout of
the profile after ``next_step`` steps; the one thing left to the data, the values of the
sample-shaped history (model outputs, last sample), must be finite, floating point and of the
checkpoint latents' shape.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hybridiff.errors import BadCommand, WorkerFailed
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.wire import FrameError, tensor_from_proto, tensor_to_proto

# The scheduler's config (ConfigMixin keeps it here): the model's, never state.
_NOT_STATE = frozenset({"_internal_dict"})
_INT64 = (-(2**63), 2**63 - 1)
# The stand-in sample of a profile: small, and of a shape no table of a timeline has.
_PROBE_SHAPE = (1, 4, 6, 5)
_PROFILES_KEPT = 32
# Set by ``set_begin_index`` when an older checkpoint without a state resumed (it is read only
# while the step index is None): a step of the past, never one to come.
_BEGIN_INDEX = "_begin_index"

Snapshot = dict[str, Any]
Layout = tuple  # what ``_layout`` gives: hashable, comparable


def snapshot(scheduler: Any) -> Snapshot:
    """The scheduler's attributes as they are now, copied so that later steps cannot change them."""
    return {name: _copy(value) for name, value in vars(scheduler).items() if name not in _NOT_STATE}


def capture(scheduler: Any, fresh: Snapshot) -> wpb.SchedulerState:
    """What ``scheduler`` holds that differs from ``fresh`` (its ``snapshot`` when the request's
    timeline was made). ``WorkerFailed`` when such a value has a type the message cannot carry:
    a checkpoint that would resume to another image is refused, not sent."""
    state = wpb.SchedulerState(scheduler_class=type(scheduler).__name__)
    for name, value in vars(scheduler).items():
        if name in _NOT_STATE or (name in fresh and _same(value, fresh[name])):
            continue
        state.fields.append(_field(type(scheduler).__name__, name, value))
    return state


def restore(
    scheduler: Any,
    state: wpb.SchedulerState,
    device: torch.device,
    sample_shape: Sequence[int],
    steps: int,
) -> None:
    """Set ``state`` on ``scheduler`` (fresh from the same timeline), the state of one that has
    run ``steps`` steps on a sample of ``sample_shape`` (the checkpoint's latents): tensors go
    back to host memory or to ``device`` as they were, in their own dtype. ``BadCommand`` naming
    the field for a state of another scheduler class, one that does not decode, or one no run of
    this timeline could leave (see the module's doc); nothing is set then."""
    cls = type(scheduler)
    if state.scheduler_class != cls.__name__:
        raise BadCommand(
            "resume.scheduler.scheduler_class",
            f"a {state.scheduler_class or 'missing'} state cannot resume a {cls.__name__}",
        )
    profile = _profile(scheduler)
    if not 0 <= steps < len(profile.layouts):
        raise BadCommand("resume.next_step", f"{steps} outside 0..{len(profile.layouts) - 1}")
    fresh = snapshot(scheduler)
    decoded: dict[str, Any] = {}
    hosts: dict[str, list[bool]] = {}
    for f in state.fields:
        where = f"resume.scheduler.{f.name}"
        if f.name in _NOT_STATE or f.name not in profile.names:
            raise BadCommand(where, f"not a state attribute of {cls.__name__}")
        if f.name in decoded:
            raise BadCommand(where, "the field appears twice")
        values = [_decode(v, where) for v in f.values]
        hosts[f.name] = [v.host for v in f.values]
        if f.is_list:
            decoded[f.name] = values
        elif len(values) == 1:
            decoded[f.name] = values[0]
        else:
            raise BadCommand(where, f"a single value, got {len(values)}")
        if f.name not in profile.changing:
            _check_table(f.name, decoded[f.name], fresh[f.name], steps, where)
    shape = tuple(sample_shape)
    for name, expected in profile.layouts[steps].items():
        value = decoded.get(name, fresh.get(name, _ABSENT))
        got = _layout(value, shape)
        if got != expected:
            raise BadCommand(
                f"resume.scheduler.{name}",
                f"{_describe(got)} where {cls.__name__} holds {_describe(expected)} after {steps} steps",
            )
        if name in decoded:
            _check_values(value, shape, f"resume.scheduler.{name}")
    vars(scheduler).update({name: _placed(value, hosts[name], device) for name, value in decoded.items()})


# --- what a genuine state looks like -----------------------------------------------------------
@dataclass(frozen=True)
class _Profile:
    names: frozenset[str]  # every attribute a run of the timeline has, fresh or set by a step
    changing: frozenset[str]  # those a step sets or changes
    layouts: tuple[dict[str, Layout], ...]  # after k steps: the layout of each changing attribute


_profiles: dict[tuple, _Profile] = {}
_profiles_lock = threading.Lock()


def _profile(scheduler: Any) -> _Profile:
    """The profile of ``scheduler`` (fresh from its timeline), made once per class, config, step
    count and device: a few milliseconds of stand-in steps."""
    timesteps = getattr(scheduler, "timesteps", None)
    device = timesteps.device if isinstance(timesteps, torch.Tensor) else torch.device("cpu")
    config = json.dumps(dict(getattr(scheduler, "config", {})), sort_keys=True, default=repr)
    key = (type(scheduler).__name__, config, _length(timesteps), str(device))
    with _profiles_lock:
        known = _profiles.get(key)
    if known is not None:
        return known
    made = _make_profile(scheduler, device)
    with _profiles_lock:
        while len(_profiles) >= _PROFILES_KEPT:
            _profiles.pop(next(iter(_profiles)))
        _profiles[key] = made
    return made


def _make_profile(scheduler: Any, device: torch.device) -> _Profile:
    probe = copy.deepcopy(scheduler)  # never the request's own: its steps are to come
    fresh = snapshot(probe)
    kwargs: dict[str, Any] = {}
    if "generator" in inspect.signature(probe.step).parameters:  # never the request's generator
        kwargs["generator"] = torch.Generator("cpu").manual_seed(0)
    x = torch.linspace(-1.0, 1.0, math.prod(_PROBE_SHAPE), device=device).reshape(_PROBE_SHAPE)
    seen: list[Snapshot] = [fresh]
    try:
        for i, t in enumerate(probe.timesteps):
            if hasattr(probe, "scale_model_input"):
                probe.scale_model_input(x, t)
            x = probe.step(torch.sin(x * (i + 1)), t, x, **kwargs, return_dict=False)[0]
            seen.append({name: _copy(v) for name, v in vars(probe).items() if name not in _NOT_STATE})
    except Exception as exc:  # a scheduler this worker cannot check is one it cannot resume
        raise WorkerFailed(f"{type(scheduler).__name__} cannot be checked for a resume: {exc}") from None
    names = frozenset().union(*seen)
    # A table a step only moves (DPMSolver keeps its sigmas on the host) stays the timeline's.
    changing = frozenset(
        n
        for n in names
        if any(n not in s or not _same(s[n], fresh.get(n, _ABSENT), devices=False) for s in seen)
    )
    layouts = tuple({n: _layout(s.get(n, _ABSENT), _PROBE_SHAPE) for n in changing} for s in seen)
    return _Profile(names, changing, layouts)


def _length(timesteps: Any) -> int:
    return len(timesteps) if timesteps is not None else 0


class _Absent:
    """An attribute a scheduler does not hold (yet): a step may create it."""


_ABSENT = _Absent()


def _layout(value: Any, sample_shape: tuple[int, ...]) -> Layout:
    """What a step count fixes of ``value``; the values of floats and sample-shaped tensors are the
    data's."""
    if value is _ABSENT:
        return ("absent",)
    if value is None:
        return ("none",)
    if isinstance(value, bool):
        return ("flag",)  # e.g. is_scale_input_called: whether the caller scaled its input
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float",)
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) == sample_shape:
            return ("sample",)
        return ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."))
    if isinstance(value, list):
        return ("list", tuple(_layout(v, sample_shape) for v in value))
    return ("object", type(value).__name__)


def _describe(layout: Layout) -> str:
    kind = layout[0]
    if kind == "int":
        return f"the integer {layout[1]}"
    if kind == "sample":
        return "a tensor of the sample's shape"
    if kind == "tensor":
        return f"a {layout[2]} tensor of shape {list(layout[1])}"
    if kind == "list":
        return "a list of [" + ", ".join(_describe(item) for item in layout[1]) + "]"
    if kind == "object":
        return f"a {layout[1]}"
    return {"absent": "nothing", "none": "None", "flag": "a flag", "float": "a number"}[kind]


def _check_table(name: str, value: Any, fresh: Any, steps: int, where: str) -> None:
    """An attribute no step changes is the timeline's, the same on every worker."""
    if name == _BEGIN_INDEX and type(value) is int and 0 <= value <= steps:
        return
    if not _same(value, _on_host(fresh), devices=False):
        raise BadCommand(where, "differs from the timeline's own value, which no step changes")


def _check_values(value: Any, sample_shape: tuple[int, ...], where: str) -> None:
    """The data of a state (its layout already checked): finite numbers, and sample-shaped
    tensors in a floating-point dtype (which one is the data's too: the worker's)."""
    if isinstance(value, list):
        for item in value:
            _check_values(item, sample_shape, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadCommand(where, f"{value} is not a finite number")
    elif isinstance(value, torch.Tensor):
        if tuple(value.shape) == sample_shape and not value.is_floating_point():
            raise BadCommand(where, f"a {value.dtype} tensor where the sample's history is")
        if not bool(torch.isfinite(value).all()):
            raise BadCommand(where, "a tensor with values that are not finite")


def _on_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [_on_host(v) for v in value]
    return value


def _placed(value: Any, hosts: list[bool], device: torch.device) -> Any:
    """``value`` (decoded on the host) where its field said: the host, or ``device``."""
    if isinstance(value, list):
        return [_to(v, host, device) for v, host in zip(value, hosts)]
    return _to(value, hosts[0], device)


def _to(value: Any, host: bool, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and not host:
        return value.to(device)
    return value


# --- helpers -------------------------------------------------------------------------------
def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _same(a: Any, b: Any, devices: bool = True) -> bool:
    """``a`` and ``b`` hold the same: tensors of one shape, dtype (and device, unless not
    ``devices``) with equal values, NaN where the other has NaN (a table may hold one)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype) == (b.shape, b.dtype)
            and (not devices or a.device == b.device)
            and _equal(a, b.to(a.device))
        )
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list)
            and isinstance(b, list)
            and len(a) == len(b)
            and all(_same(x, y, devices) for x, y in zip(a, b))
        )
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an object whose == is not a truth value (an array): treat it as changed
        return False


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def _field(cls: str, name: str, value: Any) -> wpb.SchedulerField:
    if isinstance(value, list):
        return wpb.SchedulerField(name=name, values=[_value(cls, name, v) for v in value], is_list=True)
    return wpb.SchedulerField(name=name, values=[_value(cls, name, value)])


def _value(cls: str, name: str, value: Any) -> wpb.SchedulerValue:
    if value is None:
        return wpb.SchedulerValue(none=True)
    if isinstance(value, bool):
        return wpb.SchedulerValue(flag=value)
    if isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        return wpb.SchedulerValue(integer=value)
    if isinstance(value, float):
        return wpb.SchedulerValue(number=value)
    if isinstance(value, torch.Tensor):
        try:
            return wpb.SchedulerValue(
                tensor=tensor_to_proto(value.detach(), name), host=value.device.type == "cpu"
            )
        except FrameError as exc:
            raise WorkerFailed(f"{cls}.{name} cannot be checkpointed: {exc}") from None
    raise WorkerFailed(f"{cls}.{name} holds a {type(value).__name__}, which a checkpoint cannot carry")


def _decode(value: wpb.SchedulerValue, where: str) -> Any:
    """On the host: checked there before anything reaches the device."""
    which = value.WhichOneof("value")
    if which == "tensor":
        try:
            return tensor_from_proto(value.tensor, "cpu")
        except FrameError as exc:
            raise BadCommand(where, str(exc)) from None
    if which == "number":
        return value.number
    if which == "integer":
        return value.integer
    if which == "flag":
        return value.flag
    if which == "none":
        return None
    raise BadCommand(where, "a value with nothing set")

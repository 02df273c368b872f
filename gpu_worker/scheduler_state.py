"""A diffusers scheduler's mutable state as a typed ``SchedulerState`` message, and back.

A checkpoint lets another worker continue a request with the very same arithmetic (DESIGN
section 5). For a one-step scheduler (Euler, DDIM, flow matching) the latents, the generator and
the step index are enough; a multistep one (DPMSolverMultistep, UniPC, DEIS) also keeps a
history that its next steps read: model outputs, the last sample, order counters.

What travels: the attributes in the scheduler's ``__dict__`` whose value differs from the one
they had when the request's timeline was made (``snapshot``, taken after ``set_timesteps``).
The resuming worker makes that same timeline from the same config and step count, so every
attribute left out is already equal there — no list of names per scheduler class to keep up,
and the tables ``set_timesteps`` builds (betas, sigmas, timesteps) never travel. Values are
typed (tensors, numbers, integers, flags, None, flat lists of them), never pickled: a
checkpoint comes over the network.
"""

from __future__ import annotations

from typing import Any

import torch

from hybridiff.errors import BadCommand, WorkerFailed
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.wire import FrameError, tensor_from_proto, tensor_to_proto

# The scheduler's config (ConfigMixin keeps it here): the model's, never state.
_NOT_STATE = frozenset({"_internal_dict"})
_INT64 = (-(2**63), 2**63 - 1)

Snapshot = dict[str, Any]


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


def restore(scheduler: Any, state: wpb.SchedulerState, device: torch.device) -> None:
    """Set ``state`` on ``scheduler`` (fresh from the same timeline): tensors go back to host
    memory or to ``device`` as they were, in their own dtype. ``BadCommand`` for a state of
    another scheduler class or one that does not decode; nothing is set then."""
    cls = type(scheduler)
    if state.scheduler_class != cls.__name__:
        raise BadCommand(
            "resume.scheduler.scheduler_class",
            f"a {state.scheduler_class or 'missing'} state cannot resume a {cls.__name__}",
        )
    decoded: dict[str, Any] = {}
    for f in state.fields:
        where = f"resume.scheduler.{f.name}"
        _check_name(scheduler, f.name, where)
        if f.name in decoded:
            raise BadCommand(where, "the field appears twice")
        values = [_decode(v, device, where) for v in f.values]
        if f.is_list:
            decoded[f.name] = values
        elif len(values) == 1:
            decoded[f.name] = values[0]
        else:
            raise BadCommand(where, f"a single value, got {len(values)}")
    vars(scheduler).update(decoded)


# --- helpers -------------------------------------------------------------------------------
def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            and torch.equal(a, b)
        )
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list)
            and isinstance(b, list)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an object whose == is not a truth value (an array): treat it as changed
        return False


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


def _decode(value: wpb.SchedulerValue, device: torch.device, where: str) -> Any:
    which = value.WhichOneof("value")
    if which == "tensor":
        try:
            return tensor_from_proto(value.tensor, "cpu" if value.host else device)
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


def _check_name(scheduler: Any, name: str, where: str) -> None:
    """A name a step may have set: never the config, a dunder, or (unless the scheduler already
    holds it) anything its class defines, such as a method a forged state would shadow."""
    if not name.isidentifier() or name.startswith("__") or name in _NOT_STATE:
        raise BadCommand(where, "not a scheduler state attribute")
    if name not in vars(scheduler) and hasattr(type(scheduler), name):
        raise BadCommand(where, f"{type(scheduler).__name__}.{name} is not a state attribute")

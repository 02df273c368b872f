"""Compiled denoiser calls: the compile policy and a bounded cache of compiled graphs.

Every compiled callable serves one shape: ``torch.compile(..., dynamic=False)`` of the function,
kept in an LRU cache keyed by (function, batch, height, width). The function is compiled from a
fresh copy of its code object, because dynamo keeps its graphs (and its recompile limit) on the
code object: a copy per shape gives each entry its own graph, and evicting the entry frees it.

A cached function must depend only on its arguments and on what its name fixes (the split's cut
belongs in the name): a hit calls the callable made for the first function of that name.

Every compiled callable is entered on the cache's one ``DeviceThread`` (``gpu_worker.device_thread``),
whoever calls it; a shape is compiled with ``fullgraph=True`` (a graph break fails loudly, never
falls back to eager in diffusers' shared code) and run twice when compiled, so that a CUDA graph is
recorded before the first real step. With ``background`` set (a serving worker), a call whose
shape is not compiled yet runs eager on the caller's thread while the compile is queued behind
the device thread's work, and a call made while a compile holds the device thread runs eager too:
compile time never counts against a step, a watchdog or ``MeasureSplit`` (docs/design.md section 4).

CUDA graphs are handled by what inductor does for the mode, not by its name: every mode whose
inductor options set ``triton.cudagraphs`` (``reduce-overhead``, ``max-autotune``) marks each call
as a new step and clones its outputs before the next replay overwrites them.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_map

from gpu_worker.device_thread import DeviceThread
from hybridiff.errors import InvalidArgument

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
COMPILE_MODES = (NONE, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Per worker: the full forward at batch 1 and 2 plus the stages at a few sizes and cuts.
DEFAULT_CAPACITY = 32

ShapeKey = tuple[str, int, int, int]


def resolve_mode(mode: str | None, device: torch.device) -> str:
    """``auto`` (or nothing): ``reduce-overhead`` (CUDA graphs) on CUDA, ``none`` on CPU."""
    if mode in (None, "", AUTO):
        return "reduce-overhead" if device.type == "cuda" else NONE
    if mode not in COMPILE_MODES:
        raise InvalidArgument(
            "compile", f"expected {AUTO} or one of {', '.join(COMPILE_MODES)}, got {mode!r}"
        )
    return mode


def makes_cuda_graphs(mode: str) -> bool:
    """Whether inductor records CUDA graphs under ``mode``: its options for the mode, as torch
    lists them, set ``triton.cudagraphs``."""
    if mode == NONE:
        return False
    import torch._inductor  # deferred: heavy, and only a compiling worker needs it

    options = torch._inductor.list_mode_options(None if mode == "default" else mode)
    return bool(options.get("triton.cudagraphs", False))


def size_dynamo_caches(capacity: int) -> None:
    """Dynamo's recompile limits raised to what a cache of ``capacity`` shapes may hold: each entry
    has its own code object, but the accumulated limit counts them all, and a function that
    inlines shared code re-guards it per shape."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * capacity)


def fresh_copy(fn: Callable) -> Callable:
    """``fn`` with its own code object (bound methods stay bound), so dynamo caches apart."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(fresh_copy(fn.__func__), fn.__self__)
    if isinstance(fn, types.FunctionType):
        copy = types.FunctionType(
            fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
        )
        copy.__kwdefaults__ = fn.__kwdefaults__
        return copy
    raise TypeError(f"cannot compile {fn!r}: a function or a bound method is needed")


@dataclass
class _Entry:
    fn: Callable
    lock: threading.Lock = field(default_factory=threading.Lock)
    warm: bool = False


class CompileCache:
    """Compiled callables by (function, batch, height, width), the least recently used evicted
    beyond ``capacity``. ``compilations`` counts shapes compiled (the first call of an entry);
    ``on_compile(name, seconds)`` hears of each. ``backend``: ``inductor`` (with ``mode``) or
    another dynamo backend (``eager`` traces without code generation: for tests).
    ``device_thread``: the thread every compiled call runs on (its own when not given);
    ``background``: compile a cold shape behind the device thread's work and run the call eager
    meanwhile (see the module docstring); ``eager_calls`` counts calls that ran eager so."""

    def __init__(
        self,
        mode: str,
        device: torch.device,
        capacity: int = DEFAULT_CAPACITY,
        backend: str = "inductor",
        on_compile: Callable[[str, float], None] | None = None,
        on_lookup: Callable[[bool], None] | None = None,
        device_thread: DeviceThread | None = None,
        background: bool = False,
    ) -> None:
        """``on_lookup(hit)`` hears of every call: whether its shape was compiled already."""
        if mode not in COMPILE_MODES or mode == NONE:
            raise InvalidArgument("compile", f"a compile cache needs a compile mode, got {mode!r}")
        if capacity < 1:
            raise InvalidArgument("compile_capacity", f"must be at least 1, got {capacity}")
        self.mode, self.device, self.capacity, self.backend = mode, device, capacity, backend
        self.on_compile, self.on_lookup = on_compile, on_lookup
        self.hits = 0
        self.compilations = 0
        self.compile_seconds = 0.0
        self.evictions = 0
        self.eager_calls = 0
        self.device_thread = device_thread if device_thread is not None else DeviceThread(str(device))
        self.background = background
        self._entries: OrderedDict[ShapeKey, _Entry] = OrderedDict()
        self._pending: set[ShapeKey] = set()  # compiles queued in the background
        self._lock = threading.Lock()
        # CUDA graphs replay into the same output memory: each call marks a new step (the
        # previous outputs may be overwritten) and its outputs are copied out at once.
        self.graphs = backend == "inductor" and device.type == "cuda" and makes_cuda_graphs(mode)
        size_dynamo_caches(capacity)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[ShapeKey]:
        with self._lock:
            return list(self._entries)

    def warm(self, key: ShapeKey) -> bool:
        """Whether ``key`` (function, batch, height, width) is compiled and cached."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.warm

    def call(self, name: str, fn: Callable, shape: tuple[int, int, int], *args: Any) -> Any:
        """``fn(*args)`` through the callable compiled for ``(name, *shape)``, on the device
        thread; eager on this thread when the shape compiles in the background or a background
        compile holds the device thread."""
        key = (name, *shape)
        entry = self._entry(key, fn)
        warm = entry.warm
        if warm:
            self.hits += 1
        if self.on_lookup is not None:
            self.on_lookup(warm)
        device = self.device_thread
        if warm:
            ran, out = device.try_call(self._run, entry.fn, args)
            if ran:
                return out
        elif not self.background or device.on_thread():
            return device.call(self._warm, key, entry, args)
        else:
            self._compile_later(key, entry, args)
        with self._lock:
            self.eager_calls += 1
        return fn(*args)

    def _warm(self, key: ShapeKey, entry: _Entry, args: tuple) -> Any:
        """On the device thread: compile ``entry`` on ``args`` and run it a second time (under
        CUDA graphs the first run warms up, the second records); the second run's output."""
        with entry.lock:
            if entry.warm:
                return self._run(entry.fn, args)
            start = time.perf_counter()
            self._run(entry.fn, args)
            out = self._run(entry.fn, args)
            self._compiled(key[0], key[1:], time.perf_counter() - start)
            entry.warm = True
            return out

    def _compile_later(self, key: ShapeKey, entry: _Entry, args: tuple) -> None:
        """Queue the compile of ``entry`` on these arguments (which nobody writes: the engine
        never changes a tensor in place) behind the device thread's work, once per shape."""
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)

        def compile_now() -> None:
            try:
                with self._lock:
                    current = self._entries.get(key) is entry
                if current:  # not evicted meanwhile
                    self._warm(key, entry, args)
            finally:
                with self._lock:
                    self._pending.discard(key)

        log.info("compiling %s for batch %d at %dx%d latents in the background", *key)
        self.device_thread.background(compile_now)

    def _run(self, fn: Callable, args: tuple) -> Any:
        if not self.graphs:
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, fn(*args))

    def _compiled(self, name: str, shape: tuple[int, int, int], seconds: float) -> None:
        with self._lock:
            self.compilations += 1
            self.compile_seconds += seconds
        log.info("compiled %s for batch %d at %dx%d latents in %.1fs (%s)", name, *shape, seconds, self.mode)
        if self.on_compile is not None:
            self.on_compile(name, seconds)

    def _entry(self, key: ShapeKey, fn: Callable) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            entry = self._entries[key] = _Entry(self._compile(fn))
            while len(self._entries) > self.capacity:
                evicted, _ = self._entries.popitem(last=False)
                self.evictions += 1
                log.info("compile cache full (%d): dropped %s", self.capacity, evicted)
            return entry

    def _compile(self, fn: Callable) -> Callable:
        copy = fresh_copy(fn)
        if self.backend != "inductor":
            return torch.compile(copy, backend=self.backend, dynamic=False, fullgraph=True)
        mode = None if self.mode == "default" else self.mode
        return torch.compile(copy, mode=mode, dynamic=False, fullgraph=True)


def shape_of(sample: torch.Tensor) -> tuple[int, int, int]:
    """(batch, height, width) of a [B, C, H, W] tensor: the cache key's shape."""
    return int(sample.shape[0]), int(sample.shape[-2]), int(sample.shape[-1])


def run(compiler: CompileCache | None, name: str, fn: Callable, like: torch.Tensor, *args: Any) -> Any:
    """``fn(*args)``, compiled for the shape of ``like`` when ``compiler`` is set."""
    if compiler is None:
        return fn(*args)
    return compiler.call(name, fn, shape_of(like), *args)


def enable(
    adapter: Any,
    mode: str | None,
    capacity: int = DEFAULT_CAPACITY,
    backend: str = "inductor",
    on_compile: Callable[[str, float], None] | None = None,
    on_lookup: Callable[[bool], None] | None = None,
    device_thread: DeviceThread | None = None,
) -> CompileCache | None:
    """Resolve ``mode`` for the adapter's device and give the adapter a compile cache (None and
    eager calls for ``none``) whose compiled calls run on ``device_thread`` (its own if none)."""
    resolved = resolve_mode(mode, adapter.device)
    adapter.compile_mode = resolved
    adapter.compiler = (
        None
        if resolved == NONE
        else CompileCache(
            resolved,
            adapter.device,
            capacity,
            backend=backend,
            on_compile=on_compile,
            on_lookup=on_lookup,
            device_thread=device_thread,
        )
    )
    log.info("compile mode %s on %s (%s)", resolved, adapter.device, backend if adapter.compiler else "eager")
    return adapter.compiler


def on_device(adapter: Any, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on the device thread of the adapter's compile cache (here when it
    compiles nothing): work that enters compiled graphs many times (a warm-up, a compiled split
    measurement) runs there whole, so that its timings hold no thread hand-overs."""
    compiler = adapter.compiler
    if compiler is None:
        return fn(*args, **kwargs)
    return compiler.device_thread.call(fn, *args, **kwargs)

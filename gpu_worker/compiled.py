"""Compiled denoiser calls: the compile policy and a bounded cache of compiled graphs.

Every compiled callable serves one shape: ``torch.compile(..., dynamic=False)`` of the function,
kept in an LRU cache keyed by (function, batch, height, width). The function is compiled from a
fresh copy of its code object, because dynamo keeps its graphs (and its recompile limit) on the
code object: a copy per shape gives each entry its own graph, and evicting the entry frees it.

A cached function must depend only on its arguments and on what its name fixes (the split's cut
belongs in the name): a hit calls the callable made for the first function of that name.
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

from hybridiff.errors import InvalidArgument

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
COMPILE_MODES = (NONE, "default", "reduce-overhead", "max-autotune")
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
    another dynamo backend (``eager`` traces without code generation: for tests)."""

    def __init__(
        self,
        mode: str,
        device: torch.device,
        capacity: int = DEFAULT_CAPACITY,
        backend: str = "inductor",
        on_compile: Callable[[str, float], None] | None = None,
        on_lookup: Callable[[bool], None] | None = None,
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
        self._entries: OrderedDict[ShapeKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        # CUDA graphs replay into the same output memory: outputs are copied out at once.
        self._graphs = backend == "inductor" and mode == "reduce-overhead" and device.type == "cuda"

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
        """``fn(*args)`` through the callable compiled for ``(name, *shape)``."""
        entry = self._entry((name, *shape), fn)
        if entry.warm:
            self.hits += 1
        if self.on_lookup is not None:
            self.on_lookup(entry.warm)
        if not entry.warm:
            with entry.lock:  # one thread compiles a shape; a second waits for it
                if not entry.warm:
                    start = time.perf_counter()
                    out = self._run(entry.fn, args)
                    self._compiled(name, shape, time.perf_counter() - start)
                    entry.warm = True
                    return out
        return self._run(entry.fn, args)

    def _run(self, fn: Callable, args: tuple) -> Any:
        if not self._graphs:
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
            return torch.compile(copy, backend=self.backend, dynamic=False)
        return torch.compile(copy, mode=None if self.mode == "default" else self.mode, dynamic=False)


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
) -> CompileCache | None:
    """Resolve ``mode`` for the adapter's device and give the adapter a compile cache (None and
    eager calls for ``none``)."""
    resolved = resolve_mode(mode, adapter.device)
    adapter.compile_mode = resolved
    adapter.compiler = (
        None
        if resolved == NONE
        else CompileCache(
            resolved, adapter.device, capacity, backend=backend, on_compile=on_compile, on_lookup=on_lookup
        )
    )
    log.info("compile mode %s on %s (%s)", resolved, adapter.device, backend if adapter.compiler else "eager")
    return adapter.compiler

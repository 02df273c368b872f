"""No control round trip on the critical path: in HYBRID between L and tau1 the driver
issues the undecided step speculatively and resolves it once the monitor has seen the step
before. Run on the in-process pair, whose commands go through the same driver and engines as
the cluster's, with the coordinator's messages delayed both ways."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest
from cluster_helpers import make_input

from coordinator.driver import drive_request
from hybridiff.protocol import Mode, Phase
from hybridiff.wire import tensor_from_proto
from hybridiff_tools.quality import psnr

# 12 steps, L = 3, tau_cap = 6: the monitor may decide at steps 3..5, and with this tiny model
# the slope never settles, so tau1 = tau_cap = 6 and the window is 6..9. Steps 4, 5 and 6 go
# out speculatively; 6 becomes the fill.
REQUEST = dict(
    prompt="a blue circle on the left", num_steps=12, seed=11, guidance_scale=5.0, l_slope=3, tau_cap=6, k=3
)
SPECULATIVE = (4, 5, 6)


class DelayedWorker:
    """A ``WorkerHandle`` whose commands reach the worker ``delay()`` seconds late and whose
    events come back ``delay()`` seconds late: a slow or distant coordinator. Commands keep their
    order (as on a gRPC stream); aborts are not delayed."""

    def __init__(self, inner, delay: Callable[[], float]) -> None:
        self.inner, self.delay = inner, delay
        self.name, self.identity, self.data_address = inner.name, inner.identity, inner.data_address
        self._outbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._deliver, daemon=True)
        self._thread.start()

    def send(self, cmd) -> Future:
        outer: Future = Future()
        self._outbox.put((time.monotonic() + self.delay(), cmd, outer))
        return outer

    def _deliver(self) -> None:
        while (item := self._outbox.get()) is not None:
            due, cmd, outer = item
            time.sleep(max(0.0, due - time.monotonic()))
            self.inner.send(cmd).add_done_callback(lambda f, outer=outer: self._answer(f, outer))

    def _answer(self, inner: Future, outer: Future) -> None:
        def complete() -> None:
            if inner.exception() is not None:
                outer.set_exception(inner.exception())
            else:
                outer.set_result(inner.result())

        threading.Timer(self.delay(), complete).start()

    def abort(self, request_id: str) -> None:
        self.inner.abort(request_id)

    def close(self) -> None:
        self._outbox.put(None)


POLICIES = ["conditional", "last-difference", "full-cfg", "refreshed-difference", "extrapolated-difference"]


def _drive(eng, delay: Callable[[], float] | None = None, speculate: bool = True, **kw):
    spec = eng.resolve(make_input(mode="hybrid", **{**REQUEST, **kw}))
    workers = [DelayedWorker(w, delay) for w in eng.workers] if delay else eng.workers
    try:
        cut = eng.split_plan(spec.height, spec.width).cut
        return drive_request(spec, Mode.HYBRID, workers, split_cut=cut, speculate=speculate)
    finally:
        for w in workers:
            if isinstance(w, DelayedWorker):
                w.close()


def _control_waits(result) -> dict[int, float]:
    """Per step, the longest a worker waited on the coordinator: for its command, or for a
    speculative step's resolution."""
    return {
        s.step: max(w.command_wait_seconds + w.resolve_wait_seconds for w in s.workers.values())
        for s in result.stats.steps
    }


def test_workers_never_wait_for_the_monitor_between_l_and_tau1(engines, monkeypatch):
    """Every step computes for 0.2 s; every message between coordinator and workers takes 0.06 s
    each way. Without speculation each step after L waits a round trip (>= 0.12 s) for its
    command; with it no worker waits, and the image and window are the undelayed run's."""
    eng = engines["sdxl"]  # nested split: the fill's core output goes to U after the resolution
    compute, delay = 0.2, 0.06
    plain = eng.adapter.model_input

    def slow_model_input(*args):
        time.sleep(compute)
        return plain(*args)

    reference = _drive(eng)
    monkeypatch.setattr(eng.adapter, "model_input", slow_model_input)
    fast = _drive(eng, lambda: delay)
    slow = _drive(eng, lambda: delay, speculate=False)

    assert (reference.stats.tau1, reference.stats.tau2) == (6, 9) and reference.stats.tau1_source == "tau_cap"
    for run in (fast, slow):
        assert run.images[0] == reference.images[0]
        assert (run.stats.tau1, run.stats.tau2) == (6, 9)
        assert [s.phase for s in run.stats.steps] == [s.phase for s in reference.stats.steps]
    assert reference.stats.steps[6].phase == Phase.PIPELINE_FILL

    waits = _control_waits(fast)
    # Step 0 waits for the Begin round trip: the pair's barrier (a peer's frames are filed only
    # once the receiving worker's Begin has opened its session).
    assert all(waits[i] < delay / 2 for i in range(1, 12)), waits
    baseline = _control_waits(slow)
    assert all(baseline[i] > 1.5 * delay for i in SPECULATIVE), baseline  # the round trip, paid
    # The speculative steps' control share of the step, as the stats split it.
    assert all(fast.stats.steps[i].control_seconds < delay for i in SPECULATIVE)


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_the_switch_is_the_same_whatever_the_message_timing(engines, arch, policy):
    """Random delays of every control message, up to longer than a step: the same window, the
    same phases and the same image as undelayed; with the conditional and last-difference
    policies also bit for bit the image of the round-trip protocol (the speculative branch runs
    through the very stages a fill runs)."""
    eng = engines[arch]
    jitter = random.Random(7)
    timed = _drive(eng, lambda: jitter.uniform(0.0, 0.03), window_guidance=policy)
    reference = _drive(eng, window_guidance=policy)
    round_trip = _drive(eng, window_guidance=policy, speculate=False)
    assert timed.images[0] == reference.images[0]
    assert [(s.step, s.phase, s.rel_mae) for s in timed.stats.steps] == [
        (s.step, s.phase, s.rel_mae) for s in reference.stats.steps
    ]
    assert (timed.stats.tau1, timed.stats.tau2) == (reference.stats.tau1, reference.stats.tau2) == (6, 9)
    if policy == "full-cfg":  # the fill's activations are two batch-1 halves instead of one batch of 2
        a, b = tensor_from_proto(reference.latents), tensor_from_proto(round_trip.latents)
        assert psnr(a, b) >= 40
    else:
        assert reference.images[0] == round_trip.images[0]
    speculative = [
        s for s in reference.stats.steps if any(w.resolve_wait_seconds for w in s.workers.values())
    ]
    assert [s.step for s in speculative] == list(SPECULATIVE)

"""The conditional-guidance schedule: which phase every step runs (docs/design.md section 1).

Pure and deterministic: the phase of a step depends only on the request and on the rel-MAE
values of earlier steps, never on message timing. ``StepSchedule.decided_through()`` tells the
driver how far ahead it may issue steps without waiting for another rel-MAE value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridiff.errors import InvalidArgument
from hybridiff.protocol import Mode, Phase
from hybridiff.request import HybridParams

# PIPELINE mode (the AsyncDiff baseline) warms up with synchronous full forwards before the
# stale pipeline starts; AsyncDiff-style, these steps run the exact CFG batch.
PIPELINE_WARMUP_STEPS = 3


def rel_mae_slope(values: list[float], l_slope: int) -> float | None:
    """``(d[-L] - d[-1]) / L`` once more than L values exist, else None."""
    if len(values) <= l_slope:
        return None
    return (values[-l_slope] - values[-1]) / l_slope


@dataclass
class DiscrepancyMonitor:
    """Detects the step where the branches have settled (tau1) from the rel-MAE curve."""

    params: HybridParams
    values: list[float] = field(default_factory=list)
    tau1: int | None = None
    tau1_source: str = ""
    decided_at: int | None = None  # index of the step whose value decided tau1

    def observe(self, rel_mae: float) -> None:
        self.values.append(rel_mae)
        if self.tau1 is not None:
            return
        index = len(self.values) - 1
        slope = rel_mae_slope(self.values, self.params.l_slope)
        if slope is not None and 0 <= slope < self.params.eps_slope:
            self.tau1, self.tau1_source, self.decided_at = index, "slope", index
        elif index >= self.params.tau_cap - 1:
            # The reference crashes here; the fallback is a valid tau1 like any other.
            self.tau1, self.tau1_source, self.decided_at = self.params.tau_cap, "tau_cap", index

    def earliest_decision_step(self) -> int:
        """The first step index whose value could possibly decide tau1."""
        return min(self.params.l_slope, self.params.tau_cap - 1)


class StepSchedule:
    """Phase of every step of one request, for a concrete (non-AUTO) mode."""

    def __init__(
        self,
        mode: Mode,
        num_steps: int,
        params: HybridParams,
        guidance: bool,
        pipeline_warmup: int = PIPELINE_WARMUP_STEPS,
        refresh_every: int = 0,
    ) -> None:
        """``refresh_every`` (m >= 1; HYBRID, the policies that measure the difference again in
        the window): the window's steps ``start + n·m`` are fills too, each a data-parallel fill
        that measures e_c − e_u again (docs/design.md section 7); 0: the first step only."""
        if mode == Mode.AUTO:
            raise ValueError("resolve AUTO to a concrete mode before scheduling")
        if num_steps < 1:
            raise InvalidArgument("num_inference_steps", f"must be >= 1, got {num_steps}")
        if not guidance and mode in (Mode.CFG_PARALLEL, Mode.HYBRID):
            mode = Mode.SINGLE  # one branch only: nothing to partition by condition
        self.mode = mode
        self.num_steps = num_steps
        self.last = num_steps - 1
        self.guidance = guidance
        self.monitor = DiscrepancyMonitor(params)
        self._window: tuple[int, int] | None = None
        self._observed = 0
        self.refresh_every = refresh_every if mode == Mode.HYBRID else 0
        if mode == Mode.PIPELINE:
            start = min(max(1, pipeline_warmup), num_steps)  # the first step always fills
            self._window = (start, self.last) if start <= self.last else None
            self._fill_until = start  # warm-up steps are synchronous full forwards
            self._tau_source = "fixed"

    # --- decisions ------------------------------------------------------------------
    @property
    def tau1(self) -> int | None:
        if self.mode == Mode.PIPELINE:
            return self._window[0] if self._window else None
        if self.mode == Mode.HYBRID and self._window is not None:
            return self.monitor.tau1
        return None

    @property
    def tau2(self) -> int | None:
        return self._window[1] if self._window and self.mode in (Mode.HYBRID, Mode.PIPELINE) else None

    @property
    def tau1_source(self) -> str:
        if self.mode == Mode.PIPELINE:
            return self._tau_source if self._window else ""
        return self.monitor.tau1_source if self._window else ""

    def window(self) -> tuple[int, int] | None:
        """(first, last) step of the pipeline window once known."""
        return self._window

    def _fill(self, step: int) -> bool:
        """The window's first step, and with refreshes every ``refresh_every``-th after it."""
        offset = step - self._window[0]
        return offset == 0 or (self.refresh_every > 0 and offset % self.refresh_every == 0)

    def last_in_window(self, step: int) -> bool:
        """Nothing of window step ``step`` feeds a pipelined step: it ends the window, or a fill
        (which starts from fresh activations) follows it."""
        window = self._window
        if window is None or not window[0] <= step <= window[1]:
            return False
        return step == window[1] or self._fill(step + 1)

    def decided_through(self) -> int:
        """Highest step index whose phase is known now."""
        if self.mode != Mode.HYBRID or self.monitor.tau1 is not None:
            return self.last
        # A value observed at step e can open the window at e + 1 at the earliest, so steps up to
        # the earliest deciding step are surely phase 1; each observed value decides the next step.
        return min(self.last, max(self.monitor.earliest_decision_step(), self._observed))

    def phase(self, step: int) -> Phase:
        if not 0 <= step <= self.last:
            raise IndexError(f"step {step} outside 0..{self.last}")
        if step > self.decided_through():
            raise LookupError(f"phase of step {step} depends on rel-MAE values not yet observed")
        if self.mode == Mode.SINGLE:
            return Phase.SINGLE
        if self.mode == Mode.CFG_PARALLEL:
            return Phase.DATA_PARALLEL
        if self.mode == Mode.PIPELINE:
            if step < self._fill_until:
                return Phase.PIPELINE_FILL
            return Phase.PIPELINE
        if self._window and self._window[0] <= step <= self._window[1]:
            return Phase.PIPELINE_FILL if self._fill(step) else Phase.PIPELINE
        return Phase.DATA_PARALLEL

    def observe(self, step: int, rel_mae: float | None) -> None:
        """Feed the rel-MAE of a phase-1 step, in step order (HYBRID only uses them before tau1)."""
        if self.mode != Mode.HYBRID:
            return
        if step != self._observed:
            raise ValueError(f"rel-MAE of step {step} observed out of order (expected {self._observed})")
        self._observed += 1
        if rel_mae is None or self.monitor.tau1 is not None:
            return
        self.monitor.observe(rel_mae)
        if self.monitor.tau1 is not None:
            # The window opens on the step after the deciding one (which already ran in phase 1):
            # for a slope detection that is tau1 + 1, for the tau_cap fallback it is tau1 itself.
            start = self.monitor.decided_at + 1
            tau2 = min(self.monitor.tau1 + self.monitor.params.k, self.last)
            self._window = (start, tau2) if start <= tau2 else None

    def phases(self) -> list[Phase]:
        return [self.phase(i) for i in range(self.decided_through() + 1)]

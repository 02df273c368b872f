"""What a step's parts cost on a model's workers, per image size (docs/design.md section 10): the
schedule model's inputs for cost-aware AUTO.

A worker measures them once per size with its stage cut (``MeasureSplit``: a forward and each
stage at batch 1 and 2); the steps of every request then refine them (moving averages of the
step wall times, which also carry what the exchange between the workers costs):

- a step alone with guidance (Phase.SINGLE) is a forward at batch 2;
- a data-parallel step is a forward at batch 1 plus the exchange of the predictions;
- the stages at a batch are parts of its forward: they scale with it (a compiled worker's
  forward, cheaper than the eager timings measured, makes its stages cheaper too, so a window is
  not priced at eager costs forever);
- a steady pipeline-window step costs the slower of the two stages at the window's batch: both
  stages at that batch are scaled further so that it matches.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass

from coordinator.auto_mode import WINDOW_BATCH, DeviceCosts
from coordinator.driver import StepStat
from coordinator.latency_model import ComputeTimes, StageTimes
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import Phase, WindowGuidance

Key = tuple[str, int, int]  # model, height, width


@dataclass
class _Costs:
    topology: str
    forward: dict[int, float]  # batch -> seconds
    stages: dict[int, StageTimes]

    def compute(self) -> ComputeTimes:
        return ComputeTimes(self.topology, self.forward[1], self.forward[2], self.stages[1], self.stages[2])


def _stages(topology: str, c: worker_pb2.PhaseCosts) -> StageTimes:
    if topology == "nested":
        return StageTimes.nested(c.stage1_pre_seconds, c.stage2_seconds, c.stage1_post_seconds)
    return StageTimes(c.stage1_seconds, c.stage2_seconds)


def _scaled(st: StageTimes, topology: str, ratio: float) -> StageTimes:
    if topology == "nested":
        return StageTimes.nested(st.pre * ratio, st.stage2 * ratio, st.post * ratio)
    return StageTimes(st.stage1 * ratio, st.stage2 * ratio)


class DeviceCostBook:
    """Per model and size: the costs a worker measured, refined by the steps requests ran."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self._costs: dict[Key, _Costs] = {}
        self._lock = threading.Lock()

    def measured(self, key: Key, response: worker_pb2.MeasureSplitResponse) -> None:
        """A worker's ``MeasureSplit`` answer; the first one of a size is kept (later requests
        refine it). Ignored when it carries no costs (an older worker)."""
        if response.topology not in ("nested", "sequential") or not (
            response.HasField("batch1") and response.HasField("batch2")
        ):
            return
        b1, b2 = response.batch1, response.batch2
        if min(b1.forward_seconds, b2.forward_seconds) <= 0:
            return
        topo = response.topology
        with self._lock:
            self._costs.setdefault(
                key,
                _Costs(
                    topo,
                    {1: b1.forward_seconds, 2: b2.forward_seconds},
                    {1: _stages(topo, b1), 2: _stages(topo, b2)},
                ),
            )

    def costs(self, key: Key) -> DeviceCosts | None:
        with self._lock:
            c = self._costs.get(key)
            return None if c is None else DeviceCosts(c.compute())

    def observe(self, key: Key, steps: list[StepStat], window_guidance: WindowGuidance | None) -> None:
        """Refine the size's costs with a request's steps (the first, after a begin, is left out)."""
        by_phase: dict[Phase, list[float]] = {}
        for i, s in enumerate(steps[1:], start=1):
            last_in_window = i + 1 == len(steps) or steps[i + 1].phase != Phase.PIPELINE
            if s.phase == Phase.PIPELINE and last_in_window:
                continue  # the window's last step sends nothing forward: not a steady step
            by_phase.setdefault(s.phase, []).append(s.wall_seconds)
        w = self.weight
        with self._lock:
            c = self._costs.get(key)
            if c is None:
                return
            for phase, batch in ((Phase.SINGLE, 2), (Phase.DATA_PARALLEL, 1)):
                if by_phase.get(phase):
                    old = c.forward[batch]
                    c.forward[batch] = (1 - w) * old + w * statistics.median(by_phase[phase])
                    c.stages[batch] = _scaled(c.stages[batch], c.topology, c.forward[batch] / old)
            if by_phase.get(Phase.PIPELINE) and window_guidance is not None:
                batch = WINDOW_BATCH[window_guidance]
                st = c.stages[batch]
                steady = max(st.stage1, st.stage2)
                if steady > 0:
                    ratio = statistics.median(by_phase[Phase.PIPELINE]) / steady
                    c.stages[batch] = _scaled(st, c.topology, 1 - w + w * ratio)

"""The schedule latency model, as the bench tools name it: one definition, in the coordinator
(``coordinator.latency_model``), whose cost-aware AUTO predicts with it; the tools re-export it."""

from __future__ import annotations

from coordinator.latency_model import (
    MODES,
    TAU1_SOURCES,
    TOPOLOGIES,
    ComputeTimes,
    FixedCosts,
    LinkModel,
    ModePrediction,
    ScheduleParams,
    StageTimes,
    TensorBytes,
    predict_modes,
    simulate,
)

__all__ = [
    "MODES",
    "TAU1_SOURCES",
    "TOPOLOGIES",
    "ComputeTimes",
    "FixedCosts",
    "LinkModel",
    "ModePrediction",
    "ScheduleParams",
    "StageTimes",
    "TensorBytes",
    "predict_modes",
    "simulate",
]

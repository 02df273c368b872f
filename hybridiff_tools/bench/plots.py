"""PNG plots of a benchmark run (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

from hybridiff.protocol import Phase
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_tools.pyplot import headless_pyplot

PHASE_COLORS = {
    Phase.SINGLE: "#7f7f7f",
    Phase.DATA_PARALLEL: "#1f77b4",
    Phase.PIPELINE_FILL: "#ff7f0e",
    Phase.PIPELINE: "#2ca02c",
}
PHASE_LABELS = {
    Phase.SINGLE: "single (CFG batch 2)",
    Phase.DATA_PARALLEL: "data parallel (one branch)",
    Phase.PIPELINE_FILL: "pipeline fill",
    Phase.PIPELINE: "pipelined stage",
}


def latency_bars(result: dict, path: Path) -> None:
    plt = headless_pyplot()
    modes = result["modes"]
    labels = list(modes)
    med = [modes[m]["latency_median"] for m in labels]
    lo = [modes[m]["latency_median"] - modes[m]["latency_min"] for m in labels]
    hi = [modes[m]["latency_max"] - modes[m]["latency_median"] for m in labels]
    ideal = [modes["single"]["latency_median"] / modes[m]["ideal_speedup"] for m in labels]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(labels))
    ax.bar(x, med, yerr=[lo, hi], capsize=4, color="#1f77b4", label="measured (median, min-max)")
    ax.scatter(x, ideal, marker="_", s=900, color="#d62728", zorder=3, label="schedule's ideal")
    for i, m in enumerate(labels):
        ax.text(i, med[i], f"{modes[m]['speedup']:.2f}x", ha="center", va="bottom", fontsize=9)
    ref = result.get("diffusers_reference")
    if ref:
        ax.axhline(ref["latency_median"], color="#7f7f7f", ls="--", lw=1, label="diffusers pipeline (1 core)")
    ax.set_xticks(list(x), labels, rotation=15)
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("Latency by mode (speedup vs single above each bar)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rel_mae_curve(stats: pb.GenerateStats, window: tuple[int, int] | None, path: Path, title: str) -> None:
    """The rel-MAE of every step of a run that measured it, and a pipeline ``window`` (tau1, tau2)."""
    plt = headless_pyplot()
    measured = [s for s in stats.steps if s.HasField("rel_mae")]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(
        [s.step for s in measured],
        [s.rel_mae for s in measured],
        marker=".",
        color="#1f77b4",
        label="rel-MAE  mean|e_c - e_u| / mean|e_u|",
    )
    if window is not None:
        tau1, tau2 = window
        ax.axvspan(
            tau1, tau2, color="#2ca02c", alpha=0.15, label=f"pipeline window (tau1={tau1}, tau2={tau2})"
        )
        ax.axvline(tau1, color="#2ca02c", ls="--")
        ax.axvline(tau2, color="#2ca02c", ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("rel-MAE")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timeline(stats: pb.GenerateStats, path: Path, title: str) -> None:
    """What each worker computed at each step: bars of compute time on a wall-clock axis."""
    plt = headless_pyplot()
    steps = stats.steps
    workers = [w.worker for w in steps[0].workers] if steps else []
    fig, ax = plt.subplots(figsize=(11, 2.2 + 0.5 * len(workers)))
    t = 0.0
    seen = set()
    for s in steps:
        for row, w in enumerate(s.workers):
            phase = Phase(w.phase)
            legend = PHASE_LABELS[phase] if phase not in seen else None
            seen.add(phase)
            ax.barh(
                row,
                w.compute_seconds,
                left=t,
                color=PHASE_COLORS[phase],
                edgecolor="white",
                lw=0.3,
                label=legend,
            )
        t += s.wall_seconds
    ax.set_yticks(range(len(workers)), [f"worker {'UC'[i]} ({w})" for i, w in enumerate(workers)])
    ax.set_xlabel("seconds since the first step (bar = compute; gaps = waiting)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier(result: dict, device: str, path: Path, title: str) -> None:
    """Quality (mean PSNR against exact CFG) against speedup over SINGLE, one curve per window
    policy, each point a window length; ``device`` names the speedup (a predicted device, or
    ``cpu`` for the measured one)."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for policy, rows in result["policies"].items():
        points = [
            (r["cpu_speedup"] if device == "cpu" else r["predicted_speedup"][device], r["psnr_db_mean"], k)
            for k, r in rows.items()
            if (device == "cpu" and "cpu_speedup" in r) or device in r.get("predicted_speedup", {})
        ]
        if not points:
            continue
        xs, ys, ks = zip(*points)
        ax.plot(xs, ys, marker="o", label=policy)
        for x, y, k in points:
            ax.annotate(
                "k=all" if int(k) >= result.get("steps", math.inf) else f"k={k}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
            )
    stale = result.get("pipeline")
    if stale:
        x = stale.get("cpu_speedup") if device == "cpu" else stale["predicted_speedup"].get(device)
        if x:
            ax.plot(
                [x], [stale["psnr_db_mean"]], marker="*", ms=11, ls="none", color="k", label="PIPELINE (mode)"
            )
    ref = result["reference"]
    exact = (
        ref.get("cpu_cfg_parallel_speedup")
        if device == "cpu"
        else ref["predicted_cfg_parallel_speedup"].get(device)
    )
    if exact:
        ax.axvline(exact, color="#7f7f7f", ls="--", lw=1, label=f"cfg-parallel (exact CFG) {exact:.2f}x")
    floor = result.get("floor_db")
    if floor:
        ax.axhline(floor, color="#d62728", ls=":", lw=1, label=f"quality floor {floor:g} dB")
    ax.set_xlabel(
        "speedup over single (" + ("measured, CPU stand-in" if device == "cpu" else "predicted") + ")"
    )
    ax.set_ylabel("mean PSNR vs exact CFG (dB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

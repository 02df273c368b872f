"""Plots of load tests: one run's latencies over time, and latency and SLO attainment against
offered load per policy."""

from __future__ import annotations

from pathlib import Path

from hybridiff_tools.pyplot import headless_pyplot


def plot_run(records, summary: dict, out: str | Path) -> None:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for ok, colour in ((True, "tab:blue"), (False, "tab:red")):
        rs = [r for r in records if (r.code == "OK") == ok]
        ax.scatter(
            [r.sent_at for r in rs], [r.latency_s for r in rs], s=8, c=colour, label="ok" if ok else "error"
        )
    ax.axhline(summary["slo_s"], ls="--", c="grey", label=f"SLO {summary['slo_s']:g} s")
    ax.set_xlabel("sent at (s)")
    ax.set_ylabel("latency (s)")
    ax.set_title(
        f"p50 {summary['p50_s']:.2f} s, p95 {summary['p95_s']:.2f} s, {summary['throughput_rps']:.2f} req/s"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_sweep(points: dict[str, list[dict]], out: str | Path, title: str) -> None:
    """``points[policy]``: summaries ordered by offered load (each with ``load_fraction``)."""
    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for policy, summaries in points.items():
        x = [s["load_fraction"] * 100 for s in summaries]
        axes[0].plot(x, [s["p50_s"] for s in summaries], marker="o", label=policy)
        axes[1].plot(x, [s["p95_s"] for s in summaries], marker="o", label=policy)
        axes[2].plot(x, [s["slo_attainment"] * 100 for s in summaries], marker="o", label=policy)
    for ax, name in zip(axes, ("p50 latency (s)", "p95 latency (s)", "SLO attainment (%)")):
        ax.set_xlabel("offered load (% of the throughput policy's capacity)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)

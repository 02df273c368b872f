"""``hybridiff loadtest``: bad input is refused clearly; a short run against a live local cluster
(loopback) gives per-request records and a summary that add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hybridiff_tools.loadtest.generator import (
    LoadConfig,
    LoadConfigError,
    RequestRecord,
    percentile,
    summarize,
)

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "hybridiff_launch.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "config,needle",
    [
        (LoadConfig(rate=0), "--rate must be > 0"),
        (LoadConfig(rate=-1), "--rate must be > 0"),
        (LoadConfig(rate=1, duration=-5), "--duration must be > 0"),
        (LoadConfig(concurrency=0), "--concurrency must be >= 1"),
        (LoadConfig(), "exactly one of --rate"),
        (LoadConfig(rate=1, concurrency=2), "exactly one of --rate"),
        (LoadConfig(rate=1, duration=5, warmup=5), "--warmup"),
    ],
)
def test_impossible_loads_are_refused(config, needle):
    with pytest.raises(LoadConfigError, match=needle):
        config.check()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["loadtest", "--rate", "0"], "--rate must be > 0"),
        (["loadtest", "--rate", "1", "--duration", "-1"], "--duration must be > 0"),
        (["local", "--policy", "fastest"], "invalid choice: 'fastest'"),
        (["coordinator", "--workers", "x:1", "--policy", "fastest"], "invalid choice: 'fastest'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle):
    proc = _cli(*args)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_percentiles_and_summary_add_up():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and percentile([5.0], 0.95) == 5.0
    records = [
        RequestRecord(0, 0.0, 9.0, "OK", warmup=True),
        RequestRecord(1, 1.0, 1.0, "OK", warmup=False),
        RequestRecord(2, 2.0, 3.0, "OK", warmup=False),
        RequestRecord(3, 3.0, 0.1, "RESOURCE_EXHAUSTED", warmup=False),
    ]
    s = summarize(records, LoadConfig(rate=1.0, duration=4, warmup=1, slo=2.0), wall=5.0)
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, {"RESOURCE_EXHAUSTED": 1})
    assert s["p50_s"] == 2.0 and s["throughput_rps"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(1 / 3)  # a refused request misses the SLO
    assert s["ran"] == {"unknown": 2} and s["mean_control_s"] != s["mean_control_s"]  # no step timings: nan


def test_the_summary_says_where_the_denoising_went():
    def done(index, workers, control, elastic=()):
        return RequestRecord(
            index, float(index), 2.0, "OK", warmup=False, workers=workers, elastic=list(elastic),
            denoising_s=1.5, compute_s=1.2, control_s=control, command_wait_s=control / 2,
        )  # fmt: skip

    records = [
        done(0, ["u", "c"], 0.2),
        done(1, ["u"], 0.4),
        done(2, ["u", "c"], 0.3, ["shrink at step 4: u, c -> u"]),
    ]
    s = summarize(records, LoadConfig(concurrency=2, duration=4), wall=4.0)
    assert s["ran"] == {"paired": 1, "alone": 1, "switched": 1} and s["elastic_events"] == {"shrink": 1}
    assert s["mean_control_s"] == pytest.approx(0.3) and s["mean_command_wait_s"] == pytest.approx(0.15)
    assert s["mean_denoising_s"] == pytest.approx(1.5) and s["mean_compute_s"] == pytest.approx(1.2)


def test_open_and_closed_loop_against_a_live_cluster(sdxl_cluster, tmp_path):
    out, plot = tmp_path / "load.json", tmp_path / "load.png"
    proc = _cli(
        "loadtest",
        "--target",
        sdxl_cluster.address,
        "--rate",
        "6",
        "--duration",
        "2",
        "--steps",
        "3",
        "--slo",
        "30",
        "--json",
        str(out),
        "--plot",
        str(plot),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    s, records = report["summary"], report["requests"]
    assert s["requests"] == len(records) >= 1 and s["completed"] == sum(r["code"] == "OK" for r in records)
    assert s["completed"] >= 1 and s["throughput_rps"] > 0 and 0 < s["p50_s"] <= s["p95_s"] <= s["p99_s"]
    assert all(
        r["mode_used"] and r["workers"] and r["queue_s"] is not None for r in records if r["code"] == "OK"
    )
    assert plot.read_bytes().startswith(b"\x89PNG")
    proc = _cli(
        "loadtest",
        "--target",
        sdxl_cluster.address,
        "--concurrency",
        "3",
        "--duration",
        "1.5",
        "--steps",
        "3",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])["completed"] >= 3


def test_an_unreachable_target_exits_3():
    proc = _cli(
        "loadtest", "--target", "127.0.0.1:1", "--rate", "1", "--duration", "1", "--quiet", timeout=30
    )
    assert proc.returncode == 3 and "UNAVAILABLE" in proc.stderr


def test_the_http_api_under_load(sdxl_cluster, tmp_path):
    """``--api http``: the same closed loop through the OpenAI-compatible edge (its --http-port)."""
    out = tmp_path / "http.json"
    proc = _cli(
        "loadtest",
        "--api",
        "http",
        "--target",
        f"127.0.0.1:{sdxl_cluster.http_port}",
        "--concurrency",
        "2",
        "--duration",
        "1.5",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--json",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["summary"]["completed"] >= 2 and report["summary"]["errors"] == {}
    assert all(r["mode_used"] and r["workers"] for r in report["requests"])

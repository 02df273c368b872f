"""Elastic pairs through the cluster (adaptive policy, 2 workers): a paired request shrinks when
another arrives, which starts at once; a lone request grows when a worker frees. Both images match
their unbroken runs."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cluster_helpers import make_input, send

from hybridiff.client import DiffusionClient
from hybridiff_launch.local_cluster import LocalCluster
from hybridiff_tools.quality import psnr

STEPS = 120


PLUG = Path(__file__).with_name("freeze_plug")  # its sitecustomize can slow the lone steps down


@pytest.fixture(scope="module")
def plug_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plug")


@pytest.fixture(scope="module")
def pair_cluster(model_dirs, tmp_path_factory, plug_dir):
    path = os.pathsep.join(p for p in (str(PLUG), os.environ.get("PYTHONPATH", "")) if p)
    with LocalCluster(
        model_dirs["sdxl"],
        workers=2,
        log_dir=tmp_path_factory.mktemp("logs"),
        policy="adaptive",
        extra_env={"PYTHONPATH": path, "HYBRIDIFF_TEST_FREEZE": str(plug_dir)},
    ) as c:
        yield c


def _auto(seed: int, steps: int = STEPS, **kw):
    # tau_cap beyond the run: phase 1 throughout, where a switch is exact
    return make_input(
        prompt="a red circle", num_steps=steps, seed=seed, mode="auto", l_slope=500, tau_cap=500, **kw
    )


def _metric(cluster, name: str) -> str:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5).read().decode()
    )
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def _in_background(client, raw, started: threading.Event | None = None):
    box: dict = {}

    def run():
        box["resp"] = send(client, raw, timeout=300, on_progress=lambda p: started and started.set())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


@pytest.mark.slow  # a cluster of its own and a shrink (~14 s)
def test_a_pair_shrinks_for_a_newcomer_and_both_images_hold(pair_cluster):
    client = DiffusionClient(pair_cluster.address)
    unbroken_first = send(client, _auto(1), timeout=300)
    unbroken_second = send(client, _auto(2, steps=20), timeout=300)
    assert [len(s.workers) for s in unbroken_first.stats.steps] == [2] * STEPS  # alone: a pair throughout

    started = threading.Event()
    first, box = _in_background(client, _auto(1), started)
    assert started.wait(60)
    time.sleep(0.2)
    arrived = time.perf_counter()
    second = send(client, _auto(2, steps=20), timeout=300)
    waited = time.perf_counter() - arrived
    first.join(300)
    shrunk = box["resp"]

    widths = [len(s.workers) for s in shrunk.stats.steps]
    assert widths[0] == 2 and 1 in widths and len(widths) == STEPS, widths
    assert any(n.startswith("shrink at step") for n in shrunk.stats.notes)
    # the newcomer started at once: it queued for about one step of the pair, not the whole request
    pair_step = max(s.wall_seconds for s in unbroken_first.stats.steps[1:])
    assert second.stats.queued_seconds < 10 * pair_step + 1.0 and waited < sum(
        s.wall_seconds for s in unbroken_first.stats.steps
    )
    assert psnr(shrunk.images[0].data, unbroken_first.images[0].data) >= 45.0
    assert psnr(second.images[0].data, unbroken_second.images[0].data) >= 45.0
    assert 'kind="shrink"' in _metric(pair_cluster, "hybridiff_elastic_events_total")
    client.close()


@pytest.mark.slow  # a 250-step request beside a blocker (~12 s)
def test_a_lone_request_grows_when_a_worker_frees(pair_cluster, plug_dir):
    # A lone step (the CFG batch) of the tiny model costs about what a paired one does, so under
    # load the policy's cost gate may never open; 20 ms more per lone step opens it for sure.
    (plug_dir / "slow_single").write_text("0.02")
    client = DiffusionClient(pair_cluster.address)
    steps = 250  # long enough alone to outlast the blocker, whose end frees the second worker
    unbroken = send(client, _auto(3, steps=steps), timeout=300)  # also teaches the pool the paired step cost
    # a SINGLE request holds one worker, so the AUTO one starts alone; when it ends, the AUTO one grows
    started = threading.Event()
    blocker, _ = _in_background(
        client, make_input(prompt="a blue square", num_steps=60, seed=4, mode="single"), started
    )
    assert started.wait(60)
    grown = send(client, _auto(3, steps=steps), timeout=300)
    blocker.join(300)
    widths = [len(s.workers) for s in grown.stats.steps]
    assert widths[0] == 1 and widths[-1] == 2 and len(widths) == steps, (widths[:5], grown.stats.notes)
    assert any(n.startswith("grow at step") for n in grown.stats.notes)
    assert psnr(grown.images[0].data, unbroken.images[0].data) >= 45.0
    assert 'kind="grow"' in _metric(pair_cluster, "hybridiff_elastic_events_total")
    status = client.cluster_status()
    assert [w.state for w in status.workers] == ["idle", "idle"]
    client.close()
    (plug_dir / "slow_single").unlink()

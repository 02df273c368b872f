"""Two coordinators over the same workers (docs/design.md section 10): a worker serves one
coordinator's session at a time and refuses another's Begin at once with WORKER_BUSY; the
refused coordinator holds the worker aside (``elsewhere``), not quarantined, and runs the
request on another worker or waits for one. Many concurrent requests through both: every one
completes with the image it makes alone, and no worker is quarantined."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_helpers import make_input, send

from hybridiff.client import DiffusionClient
from hybridiff_launch.local_cluster import LocalCluster

pytestmark = pytest.mark.slow  # two coordinators, two workers, a few dozen requests: about a minute

REQUESTS = [
    dict(prompt="a red square", num_steps=6, seed=11, mode="single"),
    dict(prompt="a blue circle", num_steps=6, seed=12, mode="cfg-parallel"),
    dict(prompt="a green star", num_steps=8, seed=13, mode="hybrid", tau_cap=3, k=2),
    dict(prompt="a grey cat", num_steps=5, seed=14, mode="single"),
]


def test_two_coordinators_share_two_workers_without_quarantine(model_dirs, tmp_path):
    with LocalCluster(model_dirs["sdxl"], workers=2, coordinators=2, log_dir=tmp_path / "logs") as cluster:
        clients = [DiffusionClient(a) for a in cluster.addresses]
        try:
            alone = [send(clients[0], make_input(**r), timeout=120).images[0].data for r in REQUESTS]

            def one(n: int):
                which = n % len(REQUESTS)
                raw = make_input(**REQUESTS[which], request_id=f"r{n}")
                resp = send(clients[n % 2], raw, timeout=240)
                return which, resp

            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(one, range(24)))
            assert len(results) == 24
            for which, resp in results:
                assert resp.images[0].data == alone[which], f"request {resp.request_id} differs"

            for client in clients:
                states = [w.state for w in client.cluster_status(timeout=10).workers]
                assert "unhealthy" not in states, states
            logs = "".join(cluster.log_file(n).read_text() for n in ("coordinator", "coordinator1"))
            assert "quarantined" not in logs
            # The arbitration was exercised: some Begin was refused as busy elsewhere.
            assert "busy with another coordinator" in logs
        finally:
            for client in clients:
                client.close()

"""Both roles' Prometheus metrics, scraped from a real cluster after a real request."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import yaml
from cluster_helpers import make_input, send
from prometheus_client.parser import text_string_to_metric_families

import hybridiff
from hybridiff.client import DiffusionClient


def scrape(port: int) -> dict[str, list]:
    """Every sample on ``/metrics`` of ``port``, by sample name: [(labels, value), ...]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict[str, list], name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_coordinator_and_worker_metrics_after_a_paired_request(sdxl_cluster):
    assert len(sdxl_cluster.worker_metrics_ports) == 4 and all(sdxl_cluster.worker_metrics_ports)
    with DiffusionClient(sdxl_cluster.address) as client:
        resp = send(
            client,
            make_input(mode="cfg-parallel", prompt="a red circle", num_steps=4, seed=3, guidance_scale=5.0),
            timeout=120,
        )
    assert len(resp.stats.workers) == 2
    ports = dict(zip(sdxl_cluster.worker_addresses, sdxl_cluster.worker_metrics_ports, strict=True))
    worker = scrape(ports[resp.stats.workers[0]])
    assert total(worker, "hybridiff_worker_step_seconds_count", phase="data_parallel") >= 4
    assert total(worker, "hybridiff_worker_step_compute_seconds_count", phase="data_parallel") >= 4
    assert total(worker, "hybridiff_worker_data_plane_sent_bytes_total") > 0
    assert total(worker, "hybridiff_worker_data_plane_received_bytes_total") > 0
    assert total(worker, "hybridiff_worker_peer_wait_seconds_count") >= 4
    # A CPU worker copies each tensor it sends into the message's frame: one per data-parallel step.
    assert total(worker, "hybridiff_worker_copies_total", direction="to_frame") >= 4
    assert total(worker, "hybridiff_worker_copy_seconds_total", direction="to_frame") > 0
    assert total(worker, "hybridiff_worker_model_load_seconds") > 0
    assert total(worker, "hybridiff_worker_requests_total", outcome="ok") >= 1

    coordinator = scrape(sdxl_cluster.metrics_port)
    assert total(coordinator, "process_cpu_seconds_total") > 0
    assert "python_gc_objects_collected_total" in coordinator and "python_info" in coordinator
    assert coordinator["hybridiff_build_info"] == [({"version": hybridiff.__version__}, 1.0)]
    assert total(coordinator, "hybridiff_queue_wait_seconds_count") >= 1
    assert total(coordinator, "hybridiff_requests_in_flight") == 0


def _families(port: int) -> set[str]:
    """Every metric family and sample name on ``/metrics`` of ``port`` (labelled families with no
    child yet still show by their family name)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_alerts_and_dashboard_name_only_series_the_live_roles_export(sdxl_cluster):
    """The shipped alert rules and dashboard queries, checked against live scrapes of both roles."""
    root = Path(__file__).resolve().parents[2]
    rules = yaml.safe_load((root / "k8s/components/monitoring/prometheusrule.yaml").read_text())
    exprs = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads((root / "k8s/dashboards/hybridiff.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    named = {m for e in exprs for m in re.findall(r"\bhybridiff_[a-z_]+\b", e)}
    coordinator = _families(sdxl_cluster.metrics_port)
    worker = _families(sdxl_cluster.worker_metrics_ports[0])

    live = coordinator | worker  # a series of either role

    def exported(name: str) -> bool:
        return name in live or re.sub(r"_(total|bucket|count|sum)$", "", name) in live

    assert len(named) >= 8 and sorted(m for m in named if not exported(m)) == []

"""The pool simulator: hand-checked timelines, the limits of the policies, conservation, determinism."""

from __future__ import annotations

import json
import random

import pytest

import coordinator.elastic
from coordinator.allocation import Policy
from hybridiff_tools.bench import poolsim
from hybridiff_tools.bench.poolsim import DeviceCosts, PoolSim, device_costs, load_point


def toy(steps: int, switch: float, window: tuple[int, int] | None = None) -> DeviceCosts:
    """A step alone 1.5 s (b2/b1 = 1.5), as a pair 1.0 s."""
    return DeviceCosts("toy", single=1.5, paired=(1.0,) * steps, window=window, switch=switch)


def timeline(requests) -> list[tuple]:
    """Per request: start, done (s, rounded to the nanosecond), workers at start, shrinks, grows,
    steps run as a pair."""
    return [
        (round(r.start, 9), round(r.done, 9), r.start_workers, r.shrinks, r.grows, r.paired_steps)
        for r in requests
    ]


@pytest.fixture(scope="module")
def sdxl() -> DeviceCosts:
    return device_costs("h200-sdxl")


def test_two_requests_together_on_two_workers_each_policy():
    """4 steps, a begin 0.25 s. ADAPTIVE: A takes the pair, B waits (it would start alone). After
    A's step 0 (1.25 s) the rule says shrink; step 1 is in flight, so the shrink happens when it
    completes (2.25 s): B starts on worker C, A begins again alone (2.5 s) and runs steps 2 and 3
    at 1.5 s (done 5.5 s); B: 2.25 + 0.25 + 4 x 1.5 = 8.5 s, no grow (A frees its worker at
    B's step-1 boundary, after B decided; at the next, B's last step is in flight already)."""
    dev = toy(steps=4, switch=0.25)
    expected = {
        Policy.ADAPTIVE: [(0.0, 5.5, 2, 1, 0, 2), (2.25, 8.5, 1, 0, 0, 0)],
        Policy.LATENCY: [(0.0, 4.25, 2, 0, 0, 4), (4.25, 8.5, 2, 0, 0, 4)],
        Policy.THROUGHPUT: [(0.0, 6.25, 1, 0, 0, 0), (0.0, 6.25, 1, 0, 0, 0)],
    }
    for policy, want in expected.items():
        sim = PoolSim(dev, policy, workers=2)
        assert timeline(sim.run([0.0, 0.0])) == want, policy
        assert sim.idle == 2 and sim.queue.depth == 0
        assert sim.events == {"shrink": int(policy == Policy.ADAPTIVE), "grow": 0}


def test_every_boundary_decision_goes_through_the_service_rule(monkeypatch):
    calls = []
    rule = coordinator.elastic.at_boundary

    def spy(policy, paired, pool, steps_left, costs):
        decision = rule(policy, paired, pool, steps_left, costs)
        calls.append((paired, pool.idle, pool.waiting, steps_left, decision.value))
        return decision

    monkeypatch.setattr(coordinator.elastic, "at_boundary", spy)
    sim = PoolSim(toy(steps=4, switch=0.25), Policy.ADAPTIVE, workers=2)
    sim.run([0.0, 0.0])
    # A after step 0 (shrink; applied after step 1, where nothing is decided) and step 2; B after
    # steps 0, 1 and 2. A and B run in step since the shrink: at equal times B's event comes first
    # (it was scheduled first, when A's worker C passed to it), so A still holds U at B's step 1.
    assert calls == [
        # steps_left: the steps after the one in flight (a change takes effect after it)
        (True, 0, 1, 2, "shrink"),  # A, step 0 (1.25 s)
        (False, 0, 0, 2, "keep"),  # B, step 0 (4.0 s)
        (False, 0, 0, 0, "keep"),  # A, step 2 (4.0 s)
        (False, 0, 0, 1, "keep"),  # B, step 1 (5.5 s)
        (False, 1, 0, 0, "keep"),  # B, step 2 (7.0 s): the last step is in flight, nothing to gain
    ]
    assert sim.events == {"shrink": 1, "grow": 0}


def test_a_lone_request_grows_when_a_worker_frees():
    """3 workers, 8 steps, a begin 0.1 s: A takes a pair (done 0.1 + 8 = 8.1 s), B the last
    worker alone. B's boundaries: step 4 at 7.6 s (nothing idle), step 5 at 9.1 s: two idle,
    nothing waits, step 7 after the one in flight: 0.5 s > 2 x 0.1 s: grow, applied after step 6 (10.6 s); a
    new begin (10.7 s) and step 7 as a pair: done 11.7 s."""
    sim = PoolSim(toy(steps=8, switch=0.1), Policy.ADAPTIVE, workers=3)
    assert timeline(sim.run([0.0, 0.0])) == [(0.0, 8.1, 2, 0, 0, 8), (0.0, 11.7, 1, 0, 1, 1)]
    assert sim.events == {"shrink": 0, "grow": 1}


def test_a_pair_resumed_inside_the_window_fills_first():
    dev = DeviceCosts("w", single=1.5, paired=(1.0, 1.0, 0.9, 0.5, 0.5, 1.0), window=(2, 4), switch=0.0)
    assert [dev.pair_step(i, first=0) for i in range(6)] == [1.0, 1.0, 0.9, 0.5, 0.5, 1.0]
    assert dev.pair_step(3, first=3) == 0.9  # resumed at a PIPELINE step: the fill step's cost
    assert dev.pair_step(5, first=5) == 1.0
    assert dev.rule_costs().paired == 1.0  # the data-parallel median, as the CostBook learns it


def test_devices_from_the_profiles(sdxl):
    assert sdxl.steps == poolsim.STEPS and sdxl.window == (15, 20)
    assert sdxl.single == pytest.approx(0.0418, abs=1e-4)  # forward_b2 of the H200 profile
    # perfmodel's HYBRID prediction plus one begin
    profile = json.loads((poolsim.PROFILE_DIR / "gpu_profile_h200_fp16_cudagraphs.json").read_text())
    hybrid = profile["models"]["sdxl"]["modes"]["hybrid"]["predicted"]["latency"]
    assert sdxl.pair_latency == pytest.approx(hybrid + sdxl.switch)
    doubled = device_costs("2x-batch")
    assert doubled.single == pytest.approx(2 * profile["models"]["sdxl"]["times"]["forward_b1"])
    assert doubled.paired == sdxl.paired  # batch-1 times unchanged


def test_low_load_pairs_for_latency_and_adaptive_singles_for_throughput(sdxl):
    for policy, latency in (
        (Policy.LATENCY, sdxl.pair_latency),
        (Policy.ADAPTIVE, sdxl.pair_latency),
        (Policy.THROUGHPUT, sdxl.alone_latency),
    ):
        point = load_point(sdxl, policy, 8, 0.02, 300, 20, seed=3, queue_capacity=16, slo=1.0)
        assert point["p50_s"] == pytest.approx(latency), policy
        assert point["started_paired"] == (0.0 if policy == Policy.THROUGHPUT else 1.0)


def test_at_saturation_throughput_serves_more_than_latency(sdxl):
    served = {
        policy: load_point(sdxl, policy, 8, 1.2, 600, 100, seed=5, queue_capacity=16, slo=4.0)[
            "throughput_rps"
        ]
        for policy in (Policy.THROUGHPUT, Policy.LATENCY, Policy.ADAPTIVE)
    }
    assert served[Policy.THROUGHPUT] >= served[Policy.LATENCY] * 1.1  # batch 2 costs 1.57 x batch 1
    assert served[Policy.THROUGHPUT] == pytest.approx(8 / sdxl.alone_latency, rel=0.05)
    assert served[Policy.ADAPTIVE] == pytest.approx(served[Policy.THROUGHPUT], rel=0.03)


@pytest.mark.parametrize("policy", list(Policy))
def test_every_arrival_completes_or_is_rejected(sdxl, policy):
    rng = random.Random(7)
    t, arrivals = 0.0, []
    for _ in range(400):
        t += rng.expovariate(6.0)  # past the capacity of 8 workers: the queue fills
        arrivals.append(t)
    sim = PoolSim(sdxl, policy, workers=8, queue_capacity=4)
    requests = sim.run(arrivals)
    rejected = [r for r in requests if r.rejected]
    done = [r for r in requests if r.done is not None]
    assert len(requests) == 400 and rejected and len(rejected) + len(done) == 400
    assert all(r.start is None for r in rejected)
    assert all(r.arrival <= r.start < r.done for r in done)
    assert sim.idle == 8 and sim.queue.depth == 0  # every worker came back
    assert sum(r.shrinks for r in done) == sim.events["shrink"]
    assert sum(r.grows for r in done) == sim.events["grow"]


def test_deterministic_for_a_seed(sdxl):
    args = (sdxl, Policy.ADAPTIVE, 8, 0.8, 300, 50)
    first = load_point(*args, seed=11, queue_capacity=16, slo=4.0)
    assert load_point(*args, seed=11, queue_capacity=16, slo=4.0) == first
    assert load_point(*args, seed=12, queue_capacity=16, slo=4.0) != first


def test_cli_writes_json_and_plot(tmp_path, capsys):
    argv = ["--out-dir", str(tmp_path), "--requests", "60", "--warmup", "10", "--seed", "1"]
    argv += ["--devices", "h200-sdxl", "--pool-sizes", "4", "--loads", "0.5", "1.0"]
    assert poolsim.main(argv) == 0
    result = json.loads((tmp_path / "poolsim.json").read_text())
    pool = result["devices"]["h200-sdxl"]["pools"]["4"]
    assert set(pool["policies"]) == {"latency", "throughput", "adaptive"}
    assert [p["load_fraction"] for p in pool["policies"]["adaptive"]] == [0.5, 1.0]
    assert {"p50_s", "p95_s", "mean_s", "throughput_rps", "slo_attainment"} <= set(
        pool["policies"]["latency"][0]
    )
    assert len(pool["adaptive_vs_static"]) == 2
    assert (tmp_path / "poolsim.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert poolsim.main(argv) == 0  # deterministic: the same file again
    assert json.loads((tmp_path / "poolsim.json").read_text()) == result

"""How far an elastic request's steps go out ahead (coordinator.driver, ELASTIC_LOOKAHEAD): the
next step is on its way while one computes, alone as well as paired, so the workers never wait
for the coordinator between steps. Real in-process engines; the policy always keeps."""

import pytest
from cluster_helpers import make_input

from coordinator.allocation import Decision
from coordinator.driver import drive_request
from hybridiff.protocol import Mode, Phase


class _Sent:
    """An in-process worker whose step commands are noted as they go out."""

    def __init__(self, worker, sent: list[int]) -> None:
        self.worker, self.sent = worker, sent
        self.name, self.data_address, self.identity = worker.name, worker.data_address, worker.identity

    def send(self, cmd):
        if cmd.WhichOneof("command") == "step":
            self.sent.append(cmd.step.step)
        return self.worker.send(cmd)

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)


class _Keep:
    """Never changes anything; notes, at each boundary, the steps already sent."""

    def __init__(self, sent: list[int]) -> None:
        self.sent = sent
        self.ahead: dict[int, int] = {}  # next step -> the highest step sent when it was decided

    def decide(self, next_step, used):
        self.ahead[next_step] = max(self.sent)
        return Decision.KEEP

    def apply(self, decision, used):
        raise AssertionError("nothing to apply")


@pytest.mark.parametrize("workers", [1, 2], ids=["alone", "paired"])
def test_an_elastic_request_has_its_next_step_out_while_one_computes(engines, workers):
    """While the monitor has not decided tau1 (steps past l_slope, up to tau_cap), a paired request
    sends the undecided step speculatively; alone, every step is the CFG batch whatever the
    monitor decides, so the next one goes out as well (it used to wait for the round trip)."""
    eng = engines["sdxl"]
    spec = eng.resolve(
        make_input(
            prompt="a red circle", num_steps=12, seed=3, mode="auto", l_slope=2, eps_slope=1e-9, tau_cap=10
        )
    )
    sent: list[int] = []
    handles = [_Sent(w, sent) for w in eng.workers[:workers]]
    elastic = _Keep(sent)
    result = drive_request(
        spec, Mode.HYBRID, handles, split_cut=eng.split_plan(spec.height, spec.width).cut, elastic=elastic
    )
    steps = result.stats.steps
    assert [s.step for s in steps] == list(range(12))
    if workers == 1:
        assert {s.phase for s in steps} == {Phase.SINGLE}
    assert result.stats.tau1 == 10  # decided by tau_cap: steps 3..9 were undecided when they went out
    assert len(elastic.ahead) == 11
    late = {step: ahead for step, ahead in elastic.ahead.items() if ahead < step}
    assert not late, f"steps not yet sent when the one before completed: {late}"

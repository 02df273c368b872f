"""Transfers around the data plane (docs/design.md section 9), on CPU.

- A staged send puts the message's tensors straight into ONE pool buffer laid out as the
  message (header written in front at send time) and hands ZeroMQ that buffer itself, as the
  message's one frame; the buffer goes back to its pool only when ZeroMQ's tracker says done:
  the next send of the same shapes gets another buffer, and a frame is never overwritten in
  flight. Over ``inproc`` a message stays in flight until the receiver lets go of it, which
  makes the timing exact.
- The pool is bounded: with every buffer of a shape in flight, a send waits, then fails typed.
- The staged path (pool + zero-copy, the CUDA path without pinning or streams) run by a real
  pair over ZeroMQ gives the very same image as the plain CPU path, and counts its copies.
- Through a real cluster, every step's stats split into compute, copies, wire, the worker's
  other work and control, which add up to the step's wall time.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import zmq
from cluster_helpers import make_input, poll_until, send
from pair_helpers import ZmqPair

from gpu_worker.dataplane import Mailbox, PeerLink
from gpu_worker.engine import WorkerEngine
from gpu_worker.transfers import DirectTransfers, HostBufferPool, StagedTransfers, StepCosts, transfers_for
from gpu_worker.zmq_plane import ZmqLink
from hybridiff.client import DiffusionClient
from hybridiff.errors import Cancelled, PeerTimeout
from hybridiff.protocol import Phase
from hybridiff.wire import ALIGN, HEADER_ROOM, FrameKind, Payload, decode

BIG = 256 * 1024  # float32 elements: 1 MiB, far above pyzmq's 64 KiB copy threshold


@pytest.fixture
def inproc():
    """A ZeroMQ context, a PULL socket bound on inproc that reads only when told, and a link to it."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://peer")
    link = ZmqLink(ctx, "U", "inproc://peer", send_timeout_ms=5_000)
    yield pull, link
    link.close()
    pull.close(linger=0)
    ctx.term()


def _send(link, transfers, step: int, value: float, costs: StepCosts):
    staged = transfers.to_host({"p": torch.full((BIG,), value)}, costs, timeout=5.0)
    sent = link.send("r", step, FrameKind.BRANCH_PREDICTION, staged.tensors, zero_copy=True)
    staged.release(sent.tracker)
    return sent


def _received(pull) -> torch.Tensor:
    return decode(pull.recv(copy=True)).tensors["p"]


def test_zero_copy_send_reads_the_buffer_itself(inproc):
    """The premise of the pool: a zero-copy frame is the sender's memory until ZeroMQ lets go."""
    pull, link = inproc
    transfers = StagedTransfers(torch.device("cpu"), HostBufferPool(per_key=1))
    staged = transfers.to_host({"p": torch.full((BIG,), 1.0)}, StepCosts(), timeout=5.0)
    assert isinstance(staged.tensors, Payload)
    sent = link.send("r", 0, FrameKind.BRANCH_PREDICTION, staged.tensors, zero_copy=True)
    assert sent.tracker is not None and not sent.tracker.done
    staged.tensors["p"].fill_(7.0)  # changed after send returned, before the peer read it
    assert torch.equal(_received(pull), torch.full((BIG,), 7.0))
    assert poll_until(lambda: sent.tracker.done, 30.0, poll=0.01)
    for zero_copy in (False, True):  # not a staged payload, or not zero-copy: encoded, a copy
        tensor = torch.full((BIG,), 2.0)
        copied = link.send("r", 1, FrameKind.BRANCH_PREDICTION, {"p": tensor}, zero_copy=zero_copy)
        tensor.fill_(5.0)
        assert copied.tracker is None and torch.equal(_received(pull), torch.full((BIG,), 2.0))


def test_pooled_buffer_is_not_reused_while_in_flight(inproc):
    pull, link = inproc
    pool = HostBufferPool(per_key=2)
    transfers, costs = StagedTransfers(torch.device("cpu"), pool), StepCosts()
    first = _send(link, transfers, 0, 1.0, costs)
    second = _send(link, transfers, 1, 2.0, costs)  # the first is still in flight: another buffer
    assert not first.tracker.done
    assert torch.equal(_received(pull), torch.full((BIG,), 1.0))  # not overwritten by the second send
    assert torch.equal(_received(pull), torch.full((BIG,), 2.0))
    assert pool.allocated == 2
    assert poll_until(lambda: first.tracker.done and second.tracker.done, 30.0, poll=0.01)
    _send(link, transfers, 2, 3.0, costs)  # done: reused, not allocated
    assert pool.allocated == 2 and len(pool) == 2
    assert torch.equal(_received(pull), torch.full((BIG,), 3.0))
    assert costs.device_to_host_copies == 3


def test_a_full_pool_waits_then_fails_typed(inproc):
    pull, link = inproc
    pool = HostBufferPool(per_key=1)
    transfers = StagedTransfers(torch.device("cpu"), pool)
    _send(link, transfers, 0, 1.0, StepCosts())
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="no send buffer"):
        transfers.to_host({"p": torch.zeros(BIG)}, StepCosts(), timeout=0.3)
    assert time.monotonic() - started >= 0.3 and pool.allocated == 1
    assert torch.equal(_received(pull), torch.full((BIG,), 1.0))


def test_one_pool_buffer_is_the_whole_message_and_its_tracker_waits_for_the_reader(inproc):
    """Every tensor of a message is staged into one buffer; the frame on the wire is that very
    buffer (header in front, tensors 64-byte aligned). A receiver's decode views the aligned
    frame, so the tracker (and the pool) waits until the last tensor viewing it is gone."""
    pull, link = inproc
    pool = HostBufferPool(per_key=1)
    transfers, costs = StagedTransfers(torch.device("cpu"), pool), StepCosts()
    a, b = torch.full((BIG,), 1.0), torch.arange(10, dtype=torch.int64)
    staged = transfers.to_host({"a": a, "b": b}, costs, timeout=5.0)
    assert len(staged.slots) == 1 and costs.device_to_host_copies == 2
    buffer = staged.slots[0].buffer
    assert buffer.data_ptr() % ALIGN == 0 and buffer.numel() == HEADER_ROOM + BIG * 4 + 80
    assert staged.tensors["a"].data_ptr() == buffer.data_ptr() + HEADER_ROOM
    assert staged.tensors["b"].data_ptr() == buffer.data_ptr() + HEADER_ROOM + BIG * 4
    sent = link.send("r", 0, FrameKind.STAGE_ACTIVATIONS, staged.tensors, zero_copy=True)
    staged.release(sent.tracker)
    frame = pull.recv(copy=False)
    start = torch.frombuffer(frame.buffer, dtype=torch.uint8).data_ptr()
    assert start % ALIGN == 0 and buffer.data_ptr() < start < buffer.data_ptr() + HEADER_ROOM
    msg = decode(frame.buffer)
    assert msg.tensors["a"].data_ptr() == staged.tensors["a"].data_ptr()  # not a byte copied
    assert torch.equal(msg.tensors["a"], a) and torch.equal(msg.tensors["b"], b)
    del frame
    time.sleep(0.2)  # the release travels through pyzmq's gc thread; give it every chance
    assert not sent.tracker.done  # the decoded tensors still view the buffer
    a_view = msg.tensors["a"]
    del msg
    time.sleep(0.2)
    assert not sent.tracker.done and a_view[0] == 1.0
    del a_view
    assert poll_until(lambda: sent.tracker.done, 30.0, poll=0.01)
    transfers.to_host({"a": a, "b": b}, costs, timeout=5.0)  # done: the one buffer is reused
    assert pool.allocated == 1


def test_a_failed_send_gives_its_buffers_back(engines):
    """The engine's send: a send the peer never takes (nobody listens; the request is closed)
    returns its pool buffers, or the pool would run dry after ``per_key`` failures; it fails on
    the sending thread, and the step's flush raises its error."""
    ctx = zmq.Context()
    link = ZmqLink(ctx, "U", "tcp://127.0.0.1:1", send_timeout_ms=200)
    pool = HostBufferPool(per_key=1)
    engine = WorkerEngine(
        engines["sdxl"].adapter, "U", Mailbox("U"), None, transfers=StagedTransfers(torch.device("cpu"), pool)
    )
    session = SimpleNamespace(request_id="r", link=link, nonce=b"", peer_timeout=0.5)
    try:
        for step in range(3):
            exchange = engine.exchange(session)
            exchange.send(step, FrameKind.BRANCH_PREDICTION, {"p": torch.zeros(BIG)})
            with pytest.raises(Cancelled):  # the mailbox has no open session "r": cancelled at once
                exchange.flush()
        assert pool.allocated == 1
    finally:
        engine.close()
        link.close()
        ctx.term()


class _SlowLink(PeerLink):
    """A transport that takes ``seconds`` to take each message, and keeps them in order."""

    zero_copy = False

    def __init__(self, seconds: float) -> None:
        super().__init__("U")
        self.seconds, self.frames = seconds, []

    def _send_frame(self, frame, cancelled=None, track=False):
        time.sleep(self.seconds)
        self.frames.append(decode(bytes(frame)))


def test_staged_sends_leave_the_compute_thread_and_keep_their_order(engines):
    """With staged transfers the copy and the send run on the engine's sending thread: a step's
    ``send`` returns at once, the compute after it overlaps them, and the step's flush waits only for
    the rest. Messages reach the transport in the order sent."""
    link = _SlowLink(0.3)
    engine = WorkerEngine(
        engines["sdxl"].adapter, "U", Mailbox("U"), None, transfers=StagedTransfers(torch.device("cpu"))
    )
    engine.mailbox.open("r")
    session = SimpleNamespace(request_id="r", link=link, nonce=b"", peer_timeout=5.0)
    try:
        exchange = engine.exchange(session)
        start = time.perf_counter()
        exchange.send(0, FrameKind.STAGE_ACTIVATIONS, {"a": torch.full((BIG,), 1.0)})
        exchange.send(0, FrameKind.GUIDED_PREDICTION, {"p": torch.full((BIG,), 2.0)})
        handed_over = time.perf_counter() - start
        time.sleep(0.4)  # the compute that overlaps the first send
        exchange.flush()
        costs = exchange.costs
        assert handed_over < 0.1  # neither send held the compute thread
        assert [f.kind for f in link.frames] == [FrameKind.STAGE_ACTIVATIONS, FrameKind.GUIDED_PREDICTION]
        assert float(link.frames[1].tensors["p"][0]) == 2.0
        assert costs.overlapped_send_seconds >= 0.6 and costs.device_to_host_copies == 2
        assert costs.send_seconds < 0.35  # waited only for the second send's rest
        assert costs.bytes_sent > 2 * BIG * 4
    finally:
        engine.close()


def test_transfers_by_device():
    assert isinstance(transfers_for("cpu"), DirectTransfers)
    costs = StepCosts()
    tensors = {"p": torch.ones(3)}
    assert DirectTransfers(torch.device("cpu")).to_host(tensors, costs, 1.0).tensors["p"] is tensors["p"]
    assert DirectTransfers(torch.device("cpu")).to_device(tensors, costs)["p"] is tensors["p"]
    assert (costs.device_to_host_copies, costs.host_to_device_copies) == (0, 0)


# --- the CUDA path (runs only where CUDA is; this suite's machines have none) ---------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_staging_is_pinned_pooled_and_exact():
    device = torch.device("cuda")
    transfers, costs = StagedTransfers(device), StepCosts()
    assert isinstance(transfers_for(device), StagedTransfers) and transfers.pool.pin
    source = {
        "a": torch.randn(64, 64, device=device, dtype=torch.float16),
        "b": torch.randn(3, 5, device=device).t(),
    }
    staged = transfers.to_host(source, costs, timeout=5.0)
    assert len(staged.slots) == 1 and staged.slots[0].buffer.is_pinned()
    for name, t in source.items():
        host = staged.tensors[name]
        assert host.is_pinned() and host.device.type == "cpu" and torch.equal(host, t.cpu())
        assert host.data_ptr() % ALIGN == 0  # straight into the one message buffer, at its offset
    frame = staged.tensors.seal("r", 0, FrameKind.STAGE_ACTIVATIONS)
    assert all(torch.equal(decode(bytes(frame)).tensors[k], source[k].cpu()) for k in source)
    staged.release(None)
    assert costs.device_to_host_copies == 2 and costs.device_to_host_seconds > 0
    again = transfers.to_host(source, costs, timeout=5.0)  # released at once: the same buffer
    assert [s.buffer.data_ptr() for s in again.slots] == [s.buffer.data_ptr() for s in staged.slots]
    back = transfers.to_device({k: v.clone().pin_memory() for k, v in again.tensors.items()}, costs)
    costs.finish()
    assert costs.host_to_device_copies == 2 and costs.host_to_device_seconds > 0
    assert all(torch.equal(back[k], source[k].contiguous()) for k in source)


@cuda
def test_cuda_mailbox_decodes_into_pinned_memory():
    from hybridiff.wire import decode_payload, encode, parse_header

    t = torch.randn(4, 8).to(torch.bfloat16)
    frame = encode("r", 0, FrameKind.BRANCH_PREDICTION, {"p": t})
    out = decode_payload(parse_header(frame), frame, pin_memory=True).tensors["p"]
    assert out.is_pinned() and out.dtype == torch.bfloat16 and torch.equal(out, t)
    assert Mailbox("w", torch.device("cuda")).pin_memory


# --- a real pair over ZeroMQ ---------------------------------------------------------------
REQUEST = dict(prompt="a green cone", num_steps=12, guidance_scale=5.0, l_slope=3, tau_cap=6, k=3, seed=5)


def _run(pair: ZmqPair, mode: str):
    return pair.run(mode, request_id=f"r-{mode}", **REQUEST)


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_staged_zero_copy_pair_gives_the_same_image(engines, arch):
    adapter = engines[arch].adapter
    cpu = torch.device("cpu")
    direct, staged = (
        ZmqPair(adapter, lambda: DirectTransfers(cpu)),
        ZmqPair(adapter, lambda: StagedTransfers(cpu, HostBufferPool(per_key=2))),
    )
    try:
        for mode in ("hybrid", "cfg-parallel"):
            a, b = _run(direct, mode), _run(staged, mode)
            assert a.images[0] == b.images[0], mode
            for step_a, step_b in zip(a.stats.steps, b.stats.steps):
                for w_a, w_b in zip(step_a.workers.values(), step_b.workers.values()):
                    assert w_a.bytes_sent == w_b.bytes_sent and w_a.bytes_received == w_b.bytes_received
                    assert w_a.device_to_host_copies == w_a.host_to_device_copies == 0
                    # staged: one copy into a pool buffer per tensor sent; nothing to move on receipt
                    assert (w_b.device_to_host_copies > 0) == (w_b.bytes_sent > 0)
                    assert w_b.host_to_device_copies == 0
                    if w_b.phase == Phase.DATA_PARALLEL:
                        assert w_b.device_to_host_copies == 1
    finally:
        direct.close()
        staged.close()


def test_worker_metrics_count_the_copies_the_stats_report(engines):
    """hybridiff_worker_copies / _copy_seconds add up what the steps' stats say, per direction;
    a CPU worker exports no device memory."""
    from gpu_worker.metrics import WorkerMetrics

    cpu = torch.device("cpu")
    pair = ZmqPair(
        engines["sdxl"].adapter, lambda: StagedTransfers(cpu, HostBufferPool(per_key=2)), WorkerMetrics
    )
    try:
        result = _run(pair, "cfg-parallel")
    finally:
        pair.close()
    for name, metrics in zip(("U", "C"), pair.metrics):
        copies = sum(s.workers[name].device_to_host_copies for s in result.stats.steps)
        # staged sends copy on the sending thread: overlapped, reported apart from the split
        seconds = sum(
            s.workers[name].device_to_host_seconds + s.workers[name].overlapped_copy_seconds
            for s in result.stats.steps
        )
        assert all(s.workers[name].device_to_host_seconds == 0 for s in result.stats.steps)
        sample = metrics.registry.get_sample_value
        assert copies > 0 and sample("hybridiff_worker_copies_total", {"direction": "to_host"}) == copies
        assert sample("hybridiff_worker_copy_seconds_total", {"direction": "to_host"}) == pytest.approx(
            seconds
        )
        metrics.watch_device_memory(cpu)
        assert sample("hybridiff_worker_device_memory_bytes", {"kind": "allocated"}) is None


# --- through a real cluster -----------------------------------------------------------------
def test_cluster_stats_split_each_step(sd3_cluster):
    with DiffusionClient(sd3_cluster.address) as client:
        response = send(client, make_input(mode="hybrid", **REQUEST))
    steps = response.stats.steps
    assert steps
    for s in steps:
        assert len(s.workers) == 2
        for w in s.workers:
            parts = (
                w.compute_seconds
                + w.device_to_host_seconds
                + w.host_to_device_seconds
                + w.frame_copy_seconds
                + w.send_seconds
                + w.receive_wait_seconds
                + w.resolve_wait_seconds
                + w.other_seconds
            )
            assert min(w.compute_seconds, w.send_seconds, w.receive_wait_seconds, w.other_seconds) >= 0
            assert parts == pytest.approx(w.wall_seconds, rel=1e-6, abs=1e-6)
            assert w.device_to_host_copies == w.host_to_device_copies == 0  # CPU: none of ours
            assert w.compute_seconds > 0 or w.receive_wait_seconds > 0
            if s.phase == Phase.DATA_PARALLEL:  # one prediction each way, copied into its frame
                assert w.compute_seconds > 0 and w.send_seconds > 0 and w.bytes_received > 0
                assert w.frame_copies == 1 and w.frame_copy_seconds > 0
        slowest = max(s.workers, key=lambda w: w.wall_seconds)
        assert s.critical_compute_seconds == slowest.compute_seconds
        assert s.wire_seconds == pytest.approx(slowest.send_seconds + slowest.receive_wait_seconds)
        assert s.control_seconds >= 0
        total = s.critical_compute_seconds + s.copy_seconds + s.wire_seconds + s.worker_other_seconds
        # control is measured as the step's wall time outside its slowest worker's work (its wait
        # for a resolution is control), never below 0; the sum is the wall time, or the worker's
        # own work when the coordinator saw the step shorter.
        work = slowest.wall_seconds - slowest.resolve_wait_seconds
        assert total + s.control_seconds == pytest.approx(max(s.wall_seconds, work), abs=1e-6)
        assert max(s.wall_seconds, work) - s.wall_seconds < 0.05 + 0.2 * s.wall_seconds
    # Steps after L = 3 up to the window's fill went out speculatively: each waited for its
    # resolution, which came over the Session stream.
    fill = next(s.step for s in steps if s.phase == Phase.PIPELINE_FILL)
    resolved = [s.step for s in steps if all(w.resolve_wait_seconds > 0 for w in s.workers)]
    assert resolved == list(range(4, fill + 1))
    for s in (s for s in steps if s.phase == Phase.DATA_PARALLEL):
        for w, peer in zip(s.workers, reversed(s.workers)):
            assert 0 < peer.bytes_sent - w.bytes_received < 1024  # the peer's prediction and its header

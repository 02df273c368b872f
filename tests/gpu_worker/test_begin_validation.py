"""A worker checks every Begin against its own limits, whoever sent it: sizes, steps,
images, guidance, the split cut, the peer's identity and session nonce, the peer address it is
told to push to, and the peer timeout. Each refusal is a BadCommand naming the field, and
nothing of the session is left behind."""

import math
import os

import pytest
import zmq

from gpu_worker.dataplane import Mailbox
from gpu_worker.engine import MAX_PEER_TIMEOUT, WorkerEngine
from gpu_worker.zmq_plane import ZmqLinks, parse_networks
from hybridiff.errors import BadCommand
from hybridiff.internal.v1 import worker_pb2 as wpb
from hybridiff.protocol import Role, WindowGuidance


@pytest.fixture(scope="module")
def zmq_engine(engines):
    """A worker engine of the tiny SDXL model whose links may push only to 127.0.0.0/8."""
    ctx = zmq.Context()
    links = ZmqLinks(ctx, "w", networks=parse_networks("127.0.0.0/8"))
    engine = WorkerEngine(engines["sdxl"].adapter, "w", Mailbox("w"), links)
    yield engine
    links.close()
    ctx.term()


def _begin(engine: WorkerEngine, solo: bool = False, **request) -> wpb.BeginCommand:
    limits = engine.adapter.size_limits()
    fields = dict(
        prompt="a red square",
        width=limits.default_side,
        height=limits.default_side,
        num_steps=4,
        guidance_scale=5.0,
        seed=1,
    )
    fields.update(request)
    cmd = wpb.BeginCommand(
        request=wpb.WorkerRequest(**fields),
        role=Role.U,
        window_guidance=WindowGuidance.CONDITIONAL,
        solo=solo,
    )
    if not solo:
        cmd.peer_data_address = "tcp://127.0.0.1:5999"
        cmd.peer_worker_id = "peer"
        cmd.session_nonce = os.urandom(16)
    return cmd


def _refused(engine: WorkerEngine, cmd: wpb.BeginCommand, field: str) -> None:
    with pytest.raises(BadCommand) as err:
        engine.begin("r", cmd)
    assert err.value.field == field, str(err.value)
    assert "r" not in engine._active and not engine.mailbox.is_open("r")


def test_a_valid_begin_opens_a_session_bound_to_its_nonce_and_peer(zmq_engine):
    cmd = _begin(zmq_engine)
    cmd.peer_timeout_seconds = 7.5
    zmq_engine.begin("r", cmd)
    try:
        st = zmq_engine.active("r")
        assert st.nonce == cmd.session_nonce and st.peer_timeout == 7.5
        session = zmq_engine.mailbox._open["r"]
        assert session.expect.nonce == cmd.session_nonce and session.expect.peer == "peer"
    finally:
        zmq_engine.abort("r")


@pytest.mark.parametrize(
    "field, change",
    [
        ("request.width", lambda lim: {"width": lim.default_side + 1}),  # not a multiple
        ("request.width", lambda lim: {"width": lim.max_side + lim.multiple}),
        ("request.height", lambda lim: {"height": 0}),
        ("request.height", lambda lim: {"height": 1 << 20}),
        ("request.num_steps", lambda lim: {"num_steps": 0}),
        ("request.num_steps", lambda lim: {"num_steps": 100_000}),
        ("request.num_images", lambda lim: {"num_images": lim.max_images + 1}),
        ("request.guidance_scale", lambda lim: {"guidance_scale": math.nan}),
        ("request.guidance_scale", lambda lim: {"guidance_scale": math.inf}),
        ("request.guidance_scale", lambda lim: {"guidance_scale": -1.0}),
        ("request.guidance_scale", lambda lim: {"guidance_scale": 1e9}),
    ],
)
def test_requests_outside_the_workers_limits_are_refused(zmq_engine, field, change):
    limits = zmq_engine.adapter.size_limits()
    _refused(zmq_engine, _begin(zmq_engine, **change(limits)), field)
    _refused(zmq_engine, _begin(zmq_engine, solo=True, **change(limits)), field)


@pytest.mark.parametrize("cut", [0, 7, 1000])
def test_a_split_cut_outside_the_models_range_is_refused(zmq_engine, cut):
    # The tiny SDXL UNet has 6 residuals: cuts 1..6 are valid.
    cmd = _begin(zmq_engine)
    cmd.split_cut = cut
    _refused(zmq_engine, cmd, "split_cut")


def test_every_valid_cut_is_accepted(zmq_engine):
    for cut in range(1, 7):
        cmd = _begin(zmq_engine)
        cmd.split_cut = cut
        zmq_engine.begin("r", cmd)
        zmq_engine.abort("r")


@pytest.mark.parametrize(
    "address", ["tcp://10.0.0.1:5555", "tcp://8.8.8.8:53", "tcp://[::1]:5555", "ipc:///tmp/x", "tcp://x"]
)
def test_a_peer_address_outside_the_allowed_networks_is_refused(zmq_engine, address):
    cmd = _begin(zmq_engine)
    cmd.peer_data_address = address
    _refused(zmq_engine, cmd, "peer_data_address")


def test_a_pair_needs_a_peer_identity_and_a_session_nonce(zmq_engine):
    cmd = _begin(zmq_engine)
    cmd.peer_worker_id = ""
    _refused(zmq_engine, cmd, "peer_worker_id")
    for nonce in (b"", b"short", b"x" * 65):
        cmd = _begin(zmq_engine)
        cmd.session_nonce = nonce
        _refused(zmq_engine, cmd, "session_nonce")
    # A solo session needs neither.
    zmq_engine.begin("r", _begin(zmq_engine, solo=True))
    assert zmq_engine.mailbox._open["r"].expect is None
    zmq_engine.abort("r")


def test_the_peer_timeout_is_the_coordinators_within_a_bound(zmq_engine):
    for value, expected in ((0.0, zmq_engine.peer_timeout), (3.0, 3.0), (1e9, MAX_PEER_TIMEOUT)):
        cmd = _begin(zmq_engine)
        cmd.peer_timeout_seconds = value
        zmq_engine.begin("r", cmd)
        assert zmq_engine.active("r").peer_timeout == expected
        zmq_engine.abort("r")
    for bad in (-1.0, math.nan, math.inf):
        cmd = _begin(zmq_engine)
        cmd.peer_timeout_seconds = bad
        _refused(zmq_engine, cmd, "peer_timeout_seconds")

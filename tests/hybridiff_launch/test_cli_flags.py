"""Bad flag values are usage errors at parse time (exit 2, one line naming the flag), never a
traceback or a server that starts with them (``--timeout 0``, ``-5`` or ``nan`` used to exit 3
after trying; the coordinator started with ``--queue-size -1`` or ``--step-timeout -1``; a bad
``--data-peer-cidrs`` was a traceback); an unwritable output is one line too."""

from __future__ import annotations

import pytest

from hybridiff_launch.cli import build_parser

BAD = [
    (["generate", "--prompt", "x", "--timeout", "0"], "--timeout"),
    (["generate", "--prompt", "x", "--timeout", "-5"], "--timeout"),
    (["generate", "--prompt", "x", "--timeout", "nan"], "--timeout"),
    (["generate", "--prompt", "x", "--timeout", "inf"], "--timeout"),
    (["models", "--connect-timeout", "0"], "--connect-timeout"),
    (["coordinator", "--queue-size", "-1"], "--queue-size"),
    (["coordinator", "--step-timeout", "-1"], "--step-timeout"),
    (["coordinator", "--step-timeout", "nan"], "--step-timeout"),
    (["local", "--queue-size", "-1"], "--queue-size"),
    (["worker", "--watchdog-seconds", "0"], "--watchdog-seconds"),
    (["worker", "--session-idle-timeout", "-1"], "--session-idle-timeout"),
    (["worker", "--session-begin-timeout", "nan"], "--session-begin-timeout"),
    (["worker", "--data-peer-cidrs", "10.0.0.0/33"], "--data-peer-cidrs"),
    (["worker", "--data-peer-cidrs", "pods"], "--data-peer-cidrs"),
    (["worker", "--data-peer-cidrs", "10.0.0.0/8,10.1.2.300/32"], "--data-peer-cidrs"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_bad_values_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as ended:
        build_parser().parse_args(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > len("error: ") and err.count("error:") == 1


def test_good_values_parse():
    args = build_parser().parse_args(["coordinator", "--queue-size", "0", "--step-timeout", "0.5"])
    assert (args.queue_size, args.step_timeout) == (0, 0.5)
    assert build_parser().parse_args(["models", "--timeout", "2.5"]).timeout == 2.5


def test_good_networks_parse_as_given():
    args = build_parser().parse_args(["worker", "--data-peer-cidrs", "10.0.0.0/8, fd00::/8,192.168.1.7"])
    assert args.data_peer_cidrs == "10.0.0.0/8, fd00::/8,192.168.1.7"
    assert build_parser().parse_args(["worker"]).data_peer_cidrs == ""


class _FakeClient:
    """What ``client_for`` returns in ``generate``: answers one image at once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def generate_request(self, request, on_progress=None):
        from hybridiff.v1 import diffusion_pb2 as pb

        return pb.GenerateResponse(request_id="r1", images=[pb.Image(data=b"\x89PNG image")], seed=7)


@pytest.mark.parametrize("where", ["a-file/stats.json", "read-only/stats.json"])
def test_an_unwritable_stats_json_is_one_line_after_the_image(where, tmp_path, monkeypatch, capsys):
    """The image is written; then one line names --stats-json and why, exit 2, no traceback."""
    import os

    from hybridiff_launch import cli

    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "read-only").mkdir(mode=0o500)
    if where.startswith("read-only") and os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    monkeypatch.setattr(cli, "client_for", lambda args: _FakeClient())
    out, stats = tmp_path / "out.png", tmp_path / where
    code = cli.main(["generate", "--prompt", "x", "--quiet", "--out", str(out), "--stats-json", str(stats)])
    captured = capsys.readouterr()
    assert code == 2 and out.read_bytes() == b"\x89PNG image" and not stats.exists()
    assert f"wrote {out}" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert "stats-json" in line and str(stats) in line and "Traceback" not in captured.err

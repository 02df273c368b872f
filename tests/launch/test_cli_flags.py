"""Bad flag values are usage errors at parse time (exit 2, one line naming the flag), never a
traceback or a server that starts with them (issue 24: ``--timeout 0``, ``-5`` or ``nan`` exited
3 after trying; the coordinator started with ``--queue-size -1`` or ``--step-timeout -1``)."""

from __future__ import annotations

import pytest

from launch.cli import build_parser

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
]


@pytest.mark.parametrize(("argv", "flag"), BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_bad_values_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as ended:
        build_parser().parse_args(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_good_values_parse():
    args = build_parser().parse_args(["coordinator", "--queue-size", "0", "--step-timeout", "0.5"])
    assert (args.queue_size, args.step_timeout) == (0, 0.5)
    assert build_parser().parse_args(["models", "--timeout", "2.5"]).timeout == 2.5

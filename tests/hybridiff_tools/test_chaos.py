"""``hybridiff chaos``, short: 4 workers and 2 coordinators under load for 20 s while faults are
injected; nothing is lost and every image equals its seed's fault-free one."""

from __future__ import annotations

import json

import pytest

from hybridiff_tools.chaos.cli import main, parse_args


def test_bad_flags_are_usage_errors():
    for argv in (["--workers", "1"], ["--duration", "0"], ["--coordinator-share", "2"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2


@pytest.mark.slow  # a 6-process cluster, fault-free images, 20 s of chaos: a few minutes
def test_a_short_chaos_run_loses_nothing(model_dirs, tmp_path, capsys):
    out = tmp_path / "chaos.json"
    code = main(
        [
            "--model", str(model_dirs["sdxl"]),
            "--duration", "20",
            "--fault-interval", "4",
            "--hold", "2",
            "--concurrency", "4",
            "--seeds", "3",
            "--steps", "6",
            "--seed", "1",
            "--json", str(out),
            "--log-dir", str(tmp_path / "logs"),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "requests:" in text and "latency:" in text
    assert report["sent"] > 0 and report["completed"] > 0 and report["faults"]
    assert report["lost"] == [] and report["images_differing"] == [], text
    assert code == 0

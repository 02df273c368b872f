"""The demo's summary (hybridiff_launch/demo.py, printed by scripts/demo.sh): a few plain lines with the
image's path and size, both modes' latency side by side, and where to look next."""

import argparse
import io

from PIL import Image

from hybridiff.client import Generation
from hybridiff.v1 import diffusion_pb2 as pb
from hybridiff_launch.demo import summary


def _result(mode: int, workers: int, window: bool) -> Generation:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    stats = pb.GenerateStats(mode_used=mode, workers=[f"w{i}" for i in range(workers)])
    if window:
        stats.tau1, stats.tau2 = 13, 23
    images = [pb.Image(data=buf.getvalue(), mime_type="image/png")]
    return Generation(pb.GenerateResponse(images=images, seed=7, stats=stats))


ARGS = argparse.Namespace(
    prompt="a red circle", steps=30, out="out/demo.png", single_out="out/demo-single.png"
)


def test_the_summary_names_the_image_its_size_and_both_latencies():
    text = summary(ARGS, _result(pb.MODE_HYBRID, 2, True), 0.5, _result(pb.MODE_SINGLE, 1, False), 1.0)
    lines = text.splitlines()
    assert lines[0].startswith("image    out/demo.png (32x32 px")
    assert '"a red circle", 30 steps, seed 7' in lines[1]
    assert lines[2] == "hybrid   0.50 s on 2 workers (pipeline window at steps 13-23)"
    assert lines[3].startswith("single   1.00 s on 1 worker, the same request")
    assert lines[4].startswith("speedup  2.00x")
    assert "README.md" in text and "http://127.0.0.1:8000/v1/images/generations" in text
    assert "MODE_" not in text and len(lines) <= 10


def test_a_pair_that_was_not_faster_is_said_plainly():
    text = summary(ARGS, _result(pb.MODE_HYBRID, 2, True), 1.25, _result(pb.MODE_SINGLE, 1, False), 1.0)
    assert "speedup  0.80x: not faster here" in text

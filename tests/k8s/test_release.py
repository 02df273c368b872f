"""Release hygiene: one version everywhere, OCI labels on the image, a changelog entry, and a
release script that parses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib
import yaml

import hybridiff

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_package_chart_and_module_agree_on_the_version():
    chart = yaml.safe_load((ROOT / "k8s" / "helm" / "hybridiff" / "Chart.yaml").read_text())
    assert str(chart["appVersion"]) == VERSION
    assert str(chart["version"]) == VERSION
    assert hybridiff.__version__ == VERSION


def test_the_image_carries_oci_labels_from_build_arguments():
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.rsplit("\nFROM ", 1)[1]  # the labels belong on the final stage
    for arg, label in (("VERSION", "version"), ("REVISION", "revision"), ("SOURCE", "source")):
        assert re.search(rf"^ARG {arg}\b", runtime, re.M), f"no build argument {arg}"
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in runtime


def test_the_changelog_has_an_entry_for_this_version():
    assert re.search(rf"^## \[{re.escape(VERSION)}\]", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_the_release_script_parses():
    script = ROOT / "scripts" / "release.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0

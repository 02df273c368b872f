"""The wheel carries the trained default model, and an installed package finds it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "proto", "models/shapes-sdxl")
PACKAGES = ("hybridiff", "coordinator", "gpu_worker", "hybridiff_launch", "hybridiff_tools")
MODEL = "hybridiff/models/shapes-sdxl"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_wheel_holds_the_default_model_and_an_install_serves_it(tmp_path):
    # a copy of the sources, so that the build leaves nothing in the working tree
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "v1", "internal")  # generated at build
    for name in (*SOURCES, *PACKAGES):
        target = src / name
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=ignore if name in PACKAGES else None)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    subprocess.run([*build, "."], cwd=src, check=True, timeout=600)
    (wheel,) = dist.glob("hybridiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    repository_model = ROOT / "models" / "shapes-sdxl"
    expected = sorted(
        f"{MODEL}/{p.relative_to(repository_model).as_posix()}"
        for p in repository_model.rglob("*")
        if p.is_file()
    )
    assert sorted(n for n in names if n.startswith(f"{MODEL}/")) == expected
    top_level = {n.split("/")[0] for n in names if "/" in n and not n.split("/")[0].endswith(".dist-info")}
    assert top_level <= set(PACKAGES), top_level  # no top-level models/ (or any other new name)
    assert not top_level & {"launch", "tools"}  # no generic names that collide with other projects

    # installed without the repository: the model comes from the package, byte for byte
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from hybridiff_launch.model_dirs import default_model_dir; print(default_model_dir())"
    )
    found = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert found.returncode == 0, found.stderr
    installed = Path(found.stdout.strip())
    assert installed == site / MODEL, found.stdout
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert _sha(installed / weights) == _sha(repository_model / weights)

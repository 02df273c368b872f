import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random SDXL and SD3 models in diffusers format, built once per session."""
    from hybridiff.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(arch, root / arch) for arch in ("sdxl", "sd3")}


@pytest.fixture(scope="session")
def engines(model_dirs):
    from coordinator.inprocess import InProcessEngine

    made = {arch: InProcessEngine(path) for arch, path in model_dirs.items()}
    yield made
    for e in made.values():
        e.close()

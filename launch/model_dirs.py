"""Where the launch layer finds a model when none is named: the embedded default."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from launch.tiny_model import write_tiny_model

DEFAULT_MODEL_ENV = "HYBRIDIFF_MODEL_DIR"
# The trained default model (hybridiff train-default-model), committed next to the packages.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-sdxl"


def tiny_model_cache() -> Path:
    """Where the benchmark and other helpers keep the models they build."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybridiff"


def default_model_dir() -> Path:
    """``$HYBRIDIFF_MODEL_DIR``, else the trained shapes model committed in the repository
    (``models/shapes-sdxl``), else — in an install without the repository — a tiny random SDXL
    model built once into the user cache (no download)."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    if (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        return EMBEDDED_MODEL_DIR
    cache = tiny_model_cache() / "tiny-sdxl"
    if not (cache / "model_index.json").is_file():
        print(
            f"no embedded model at {EMBEDDED_MODEL_DIR}; building a tiny random SDXL model in {cache}",
            file=sys.stderr,
        )
        write_tiny_model("sdxl", cache)
    return cache

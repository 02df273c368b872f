"""Where the launch layer finds a model: the one ``--model`` names (a folder, a single-file
checkpoint or a Hub id, see ``gpu_worker.weights``), else the embedded default. Light to import:
the command line builds its parser from here before any server dependency is loaded."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import hybridiff

DEFAULT_MODEL_ENV = "HYBRIDIFF_MODEL_DIR"
# The trained default model (hybridiff train-default-model), committed next to the packages;
# an installed package (a wheel, the container image) has it under hybridiff/ (setup.py).
PACKAGE_DIR = Path(hybridiff.__file__).resolve().parent
REPOSITORY_MODEL_DIR = PACKAGE_DIR.parent / "models" / "shapes-sdxl"
INSTALLED_MODEL_DIR = PACKAGE_DIR / "models" / "shapes-sdxl"
EMBEDDED_MODEL_DIR = (
    REPOSITORY_MODEL_DIR
    if (REPOSITORY_MODEL_DIR / "model_index.json").is_file() or not INSTALLED_MODEL_DIR.is_dir()
    else INSTALLED_MODEL_DIR
)


def tiny_model_cache() -> Path:
    """Where the benchmark and other helpers keep the models they build."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybridiff"


def default_model_dir() -> Path:
    """``$HYBRIDIFF_MODEL_DIR``, else the trained shapes model committed in the repository
    (``models/shapes-sdxl``) or installed with the package (``hybridiff/models/shapes-sdxl``),
    else — a package built without it — a tiny random SDXL model built once into the user cache
    (no download)."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    if (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        return EMBEDDED_MODEL_DIR
    cache = tiny_model_cache() / "tiny-sdxl"
    if not (cache / "model_index.json").is_file():
        from hybridiff_launch.tiny_model import (
            write_tiny_model,  # deferred: torch and diffusers, slow to import
        )

        print(
            f"no embedded model at {EMBEDDED_MODEL_DIR}; building a tiny random SDXL model in {cache}",
            file=sys.stderr,
        )
        write_tiny_model("sdxl", cache)
    return cache


def add_model_flags(p: argparse.ArgumentParser, served_name: bool = True, load_options: bool = False) -> None:
    """``--model`` (the weights) and how to fetch them; ``--served-model-name`` when clients call it;
    ``load_options``: ``--config`` (a single-file checkpoint's pipeline) and ``--text-encoder-3``.
    The worker's own flags of those names (``gpu_worker.config``)."""
    # deferred: the flags' types import grpc (via hybridiff.errors); default_model_dir() needs none
    from gpu_worker.config import LOAD_FLAGS, MODEL_FLAGS, WorkerConfig
    from hybridiff import options

    names = [
        *MODEL_FLAGS,
        *(LOAD_FLAGS if load_options else ()),
        *(["served_model_name"] if served_name else []),
    ]
    options.add_flags(p, WorkerConfig, only=names)


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    """(the local folder or file, the served name) of ``args.model`` (fetched when a Hub id), or of
    the embedded default when none is named."""
    # deferred: huggingface_hub, a server dependency (the client commands never need it)
    from gpu_worker import weights

    model = args.model or str(default_model_dir())
    token = weights.read_token(getattr(args, "hf_token_file", None))
    path = weights.resolve(
        model, variant=getattr(args, "variant", None), with_t5=text_encoder_3(args), token=token
    )
    return path, getattr(args, "served_model_name", None) or weights.served_name(model)


def text_encoder_3(args: argparse.Namespace) -> bool:
    """Whether ``--text-encoder-3 on`` was given (SD3's T5 encoder loaded)."""
    return bool(getattr(args, "text_encoder_3", False))


def resolve_config(args: argparse.Namespace) -> Path | None:
    """The local folder of ``--config`` (fetched when a Hub id), None when not given."""
    config = getattr(args, "config", None)
    if not config:
        return None
    from gpu_worker import weights  # deferred: huggingface_hub, as in resolve_model

    token = weights.read_token(getattr(args, "hf_token_file", None))
    return weights.resolve(
        config, variant=getattr(args, "variant", None), with_t5=text_encoder_3(args), token=token
    )

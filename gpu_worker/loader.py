"""Load a diffusers-format model directory (offline) into the matching adapter."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import safe_open

from gpu_worker.adapters.base import ModelAdapter
from gpu_worker.adapters.sd3 import SD3Adapter
from gpu_worker.adapters.sdxl import SDXLAdapter
from hybridiff.calibration import Calibration, CalibrationError, read_calibration
from hybridiff.errors import InvalidArgument, ModelLoadError
from hybridiff.request import MODEL_DEFAULTS_FILE, ModelDefaults, model_defaults

log = logging.getLogger(__name__)

PIPELINE_CLASSES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Components a pipeline directory may hold that the worker does not load (SD3's T5 encoder).
UNLOADED_COMPONENTS = {"sdxl": (), "sd3": ("text_encoder_3", "tokenizer_3")}
# Where a single-file checkpoint (the original SDXL and SAI SD3 layouts) keeps the components
# diffusers' from_single_file reads from it; one it lacks is loaded from the config folder.
SINGLE_FILE_PREFIXES = {
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
        "vae": "first_stage_model.",
    },
    "sd3": {
        "text_encoder": "text_encoders.clip_l.",
        "text_encoder_2": "text_encoders.clip_g.",
        "text_encoder_3": "text_encoders.t5xxl.",
        "vae": "first_stage_model.",
    },
}
# The weights digest hashes a tensor whole up to this size, else DIGEST_BLOCKS evenly spaced
# blocks of DIGEST_BLOCK_BYTES (a full-size model costs a few hundred ms, not a full read).
DIGEST_WHOLE_BYTES = 64 * 1024
DIGEST_BLOCKS = 16
DIGEST_BLOCK_BYTES = 4096


def detect_arch(model_dir: str | Path) -> str:
    """``"sdxl"`` or ``"sd3"`` from ``model_index.json``; ``ModelLoadError`` otherwise."""
    path = Path(model_dir)
    if path.is_file():
        raise InvalidArgument(
            "config",
            f"{str(path)!r} is a single-file checkpoint: name its pipeline's diffusers folder or Hub id "
            "with --config",
        )
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a diffusers model (no model_index.json)")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{index} is not valid JSON: {exc}") from None
    if class_name not in PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{str(path)!r} holds a {class_name!r}; supported: {', '.join(PIPELINE_CLASSES)}"
        )
    return PIPELINE_CLASSES[class_name]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgument("device", f"expected cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("device", "CUDA requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidArgument("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_adapter(
    model_dir: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    text_encoder_3: bool = False,
    config: str | Path | None = None,
) -> ModelAdapter:
    """The adapter of the diffusers folder ``model_dir`` (offline); ``variant`` (e.g. fp16) loads
    the ``*.fp16.safetensors`` files, the only ones a variant-only folder has. ``text_encoder_3``:
    SD3's T5 encoder too (else the pipeline's zeros stand for its embeddings). ``model_dir`` may be
    a single-file checkpoint (``.safetensors``), loaded with the pipeline's ``from_single_file``
    and ``config``, the diffusers folder of its pipeline (components, tokenizers, scheduler; the
    components the file lacks are loaded from there)."""
    single_file = Path(model_dir).is_file()
    if config is not None and not single_file:
        raise InvalidArgument(
            "config", "--config goes with a single-file checkpoint (--model FILE.safetensors)"
        )
    arch = detect_arch(config if single_file and config is not None else model_dir)
    if text_encoder_3 and arch != "sd3":
        raise InvalidArgument("text-encoder-3", f"a {arch} model has no T5 encoder (only SD3 models do)")
    if text_encoder_3 and not _has_component(config or model_dir, "text_encoder_3"):
        raise ModelLoadError(f"--text-encoder-3 on: {str(config or model_dir)!r} has no text_encoder_3 (T5)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe_cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusion3Pipeline
    adapter_cls = SDXLAdapter if arch == "sdxl" else SD3Adapter
    extra = {} if arch == "sdxl" or text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    try:
        if single_file:
            pipe = _from_single_file(pipe_cls, Path(model_dir), Path(config), dt, variant, extra)
        else:
            pipe = pipe_cls.from_pretrained(
                str(model_dir), dtype=dt, local_files_only=True, variant=variant, **extra
            )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as exc:
        held = sorted(saved_variants(config or model_dir) - {variant})
        hint = f"; it holds {', '.join(held)} weights: pass --variant {held[0]}" if held else ""
        what = f"{arch} model" + (f" (variant {variant!r})" if variant else "")
        reason = " ".join(str(exc).split())
        source = str(model_dir) + (f" with the config {str(config)!r}" if single_file else "")
        raise ModelLoadError(f"cannot load {what} from {source!r}: {reason}{hint}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    if dt == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # the VAE overflows in fp16 (the pipelines upcast it too)
    for module in (
        pipe.vae,
        pipe.text_encoder,
        pipe.text_encoder_2,
        getattr(pipe, "text_encoder_3", None),
        getattr(pipe, "unet", None),
        getattr(pipe, "transformer", None),
    ):
        if module is not None:
            module.eval().requires_grad_(False)
    t5 = " with its T5 encoder" if getattr(pipe, "text_encoder_3", None) is not None else ""
    log.info("loaded %s model%s from %s on %s (%s)", arch, t5, model_dir, dev, dt)
    source = config if single_file else model_dir
    adapter = adapter_cls(pipe, dev, dt, read_model_defaults(source, arch))
    adapter.calibration = read_model_calibration(source)
    return adapter


def _has_component(model_dir: str | Path, name: str) -> bool:
    try:
        value = json.loads((Path(model_dir) / "model_index.json").read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(value, list) and bool(value) and value[0] is not None


def _from_single_file(pipe_cls, path: Path, config: Path, dt: torch.dtype, variant: str | None, extra: dict):
    """``pipe_cls.from_single_file(path, config=config)``; a component the checkpoint lacks (SD3.5's
    files hold no text encoders, some files no VAE) is loaded from ``config``."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    index = json.loads((config / "model_index.json").read_text())
    arch = PIPELINE_CLASSES[index["_class_name"]]
    for name, prefix in SINGLE_FILE_PREFIXES[arch].items():
        if name in extra or any(k.startswith(prefix) for k in keys):
            continue
        library, class_name = index[name]
        component_cls = getattr(importlib.import_module(library), class_name)
        extra = {
            **extra,
            name: component_cls.from_pretrained(
                config, subfolder=name, dtype=dt, local_files_only=True, variant=variant
            ),
        }
    return pipe_cls.from_single_file(str(path), config=str(config), dtype=dt, local_files_only=True, **extra)


def saved_variants(model_dir: str | Path) -> set[str]:
    """The variants a folder's components hold weights of: ``unet/diffusion_pytorch_model.fp16.safetensors``
    and ``text_encoder/model.fp16-00001-of-00002.safetensors`` are fp16."""
    found = set()
    for path in Path(model_dir).glob("*/*.safetensors"):
        parts = path.name.split(".")
        if len(parts) == 3:
            found.add(parts[1].split("-")[0])
    return found


def weights_digest(
    model_dir: str | Path,
    skip: Iterable[str] | None = None,
    text_encoder_3: bool = False,
    config: str | Path | None = None,
) -> str:
    """Who the loaded model is, for pairing: ``sha256:<hex>`` over the pipeline index, the model's
    defaults and every file of each loaded component (configs, tokenizers, weights), by relative
    path. A safetensors file contributes its header (names, dtypes, shapes, offsets, metadata) and
    its tensors' bytes: whole for small tensors, sampled for large ones (differently trained
    weights differ everywhere; a checkpoint identity, not an integrity check). Independent of the
    directory's path and of file times, so workers loading copies of one model agree.
    ``skip``: components not loaded (default: by architecture; SD3's T5 is loaded with
    ``text_encoder_3``). A single-file checkpoint ``model_dir``: its config folder's files, then
    the checkpoint's (by name ``single-file``)."""
    root = Path(config if config is not None and Path(model_dir).is_file() else model_dir)
    if skip is None:
        skip = UNLOADED_COMPONENTS[detect_arch(root)]
        skip = () if text_encoder_3 else skip
    digest = hashlib.sha256()
    files = [(path, path.relative_to(root).as_posix()) for path in _digest_files(root, set(skip))]
    if root != Path(model_dir):
        files.append((Path(model_dir), "single-file"))
    for path, name in files:
        digest.update(name.encode() + b"\0")
        with path.open("rb") as f:
            size = path.stat().st_size
            digest.update(struct.pack("<Q", size))
            if size == 0:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if path.suffix == ".safetensors":
                    _digest_safetensors(data, digest)
                else:
                    digest.update(data)
    return f"sha256:{digest.hexdigest()}"


def _digest_files(root: Path, skipped: set[str]) -> list[Path]:
    index = json.loads((root / "model_index.json").read_text())
    components = sorted(
        name
        for name, value in index.items()
        if not name.startswith("_") and name not in skipped and isinstance(value, list) and value[0]
    )
    files = [root / "model_index.json"]
    if (root / MODEL_DEFAULTS_FILE).is_file():
        files.append(root / MODEL_DEFAULTS_FILE)
    for name in components:
        files.extend(sorted(p for p in (root / name).rglob("*") if p.is_file()))
    return files


def _digest_safetensors(data: mmap.mmap, digest) -> None:
    try:
        (header_size,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(bytes(data[8 : 8 + header_size]))
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        digest.update(data)  # not a safetensors file after all: all of it
        return
    digest.update(data[: 8 + header_size])
    base = 8 + header_size
    view = memoryview(data)
    try:
        for begin, end in spans:
            start, length = base + begin, end - begin
            if length <= DIGEST_WHOLE_BYTES:
                digest.update(view[start : start + length])
                continue
            stride = (length - DIGEST_BLOCK_BYTES) // (DIGEST_BLOCKS - 1)
            for k in range(DIGEST_BLOCKS):
                at = start + k * stride
                digest.update(view[at : at + DIGEST_BLOCK_BYTES])
    finally:
        view.release()


def read_model_calibration(model_dir: str | Path | None) -> Calibration | None:
    """The model's calibration from ``hybridiff.json`` (None when it records none)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    try:
        return read_calibration(model_dir)
    except CalibrationError as exc:
        path = Path(model_dir) / MODEL_DEFAULTS_FILE
        raise ModelLoadError(f"{path} has an invalid calibration: {exc}") from None


def read_model_defaults(model_dir: str | Path, arch: str) -> ModelDefaults:
    """The model's own defaults from ``hybridiff.json`` when it records them, else the
    architecture's (a file may record only a calibration)."""
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return model_defaults(arch)
    try:
        document = json.loads(path.read_text())
        if "defaults" not in document:
            return model_defaults(arch)
        return model_defaults(arch, document["defaults"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, InvalidArgument) as exc:
        raise ModelLoadError(f"{path} has invalid defaults: {exc}") from None

"""Where a worker's weights come from (``--model``): a local diffusers folder, a single-file
checkpoint, or a Hugging Face Hub id (``ORG/NAME[@REV]``) fetched into the Hub cache.

A Hub id is fetched with ``huggingface_hub.snapshot_download``: only the files the worker loads
(the pipeline index, the scheduler, tokenizers, text encoders 1 and 2, the VAE, the UNet or the
transformer; the T5 encoder only when asked for), and of those weights only the chosen variant's
safetensors (``--variant fp16``: ``*.fp16.safetensors``). The cache is the Hub's own (``HF_HOME``),
the token ``HF_TOKEN`` or the one given, and the cache is tried first: a second start with the
same request makes no network request and works with ``HF_HUB_OFFLINE=1``. On a terminal the
Hub's progress bars show; elsewhere (logs) a progress line every few seconds.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from tqdm import tqdm

from hybridiff.errors import InvalidArgument, ModelLoadError

log = logging.getLogger(__name__)

# ORG/NAME with an optional @REVISION (a branch, tag or commit), as the Hub spells repository ids.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# The components a worker loads, of every supported architecture (a repository holds the ones of
# its own: SDXL a unet, SD3 a transformer), and SD3's T5 encoder, fetched only when asked for.
LOADED_COMPONENTS = (
    "scheduler",
    "tokenizer",
    "tokenizer_2",
    "text_encoder",
    "text_encoder_2",
    "vae",
    "unet",
    "transformer",
)
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
# Files next to the weights that a component may need: configs, indexes, tokenizer vocabularies.
COMPONENT_FILES = ("*.json", "*.txt", "*.model")
TOP_LEVEL_FILES = ("model_index.json", "hybridiff.json")
PROGRESS_LOG_SECONDS = 5.0


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names: a local path (a folder or a single file), or a Hub repository."""

    text: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None


def served_name(model: str) -> str:
    """The name clients use by default: a Hub id's ``ORG/NAME``, else the folder's (or file's) name."""
    match = HUB_ID.match(model)
    path = Path(model).expanduser()
    if match and not path.exists():
        return match["repo"]
    return path.stem if path.suffix == ".safetensors" else path.name


def parse_model(text: str, revision: str | None = None) -> ModelSource:
    """A path that exists is local (``models/x`` before a Hub id of the same spelling); else
    ``ORG/NAME[@REV]`` is a Hub id (``revision`` overrides ``@REV``)."""
    if not text:
        raise InvalidArgument("model", "expected a folder, a .safetensors file or a Hub id ORG/NAME[@REV]")
    path = Path(text).expanduser()
    if path.exists():
        return ModelSource(text, path=path)
    match = HUB_ID.match(text)
    if match is None:
        raise ModelLoadError(f"{text!r} does not exist, and is not a Hub id ORG/NAME[@REV]")
    return ModelSource(text, repo_id=match["repo"], revision=revision or match["rev"])


def weight_patterns(component: str, variant: str | None) -> list[str]:
    """The safetensors files of ``component`` that diffusers and transformers load for ``variant``:
    ``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` and their shards
    (``-00001-of-00002``); with a variant ``*.fp16.safetensors`` and ``*.fp16-00001-of-00002``."""
    shard = "?????-of-?????"
    if variant:
        return [f"{component}/*.{variant}.safetensors", f"{component}/*.{variant}-{shard}.safetensors"]
    return [
        f"{component}/{stem}{suffix}.safetensors"
        for stem in ("diffusion_pytorch_model", "model")
        for suffix in ("", f"-{shard}")
    ]


def allow_patterns(variant: str | None = None, with_t5: bool = False) -> list[str]:
    """What to fetch from a repository: the loaded components' configs, tokenizers and weights of
    ``variant``, nothing else (no single-file checkpoints, no .bin, ONNX or Flax copies)."""
    components = LOADED_COMPONENTS + (T5_COMPONENTS if with_t5 else ())
    patterns = list(TOP_LEVEL_FILES)
    for component in components:
        patterns += [f"{component}/{name}" for name in COMPONENT_FILES]
        patterns += weight_patterns(component, variant)
    return patterns


def read_token(token_file: str | None) -> str | None:
    """The token in ``token_file`` (None: the Hub's own default, ``HF_TOKEN`` or a stored login)."""
    if not token_file:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise InvalidArgument("hf-token-file", f"cannot read {token_file}: {exc.strerror}") from None
    if not token:
        raise InvalidArgument("hf-token-file", f"{token_file} is empty")
    return token


def resolve(
    model: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    with_t5: bool = False,
    token: str | None = None,
) -> Path:
    """The local path of ``model``: itself when local, else the Hub snapshot folder (fetched)."""
    source = parse_model(model, revision)
    if source.path is not None:
        return source.path
    return fetch(source.repo_id, source.revision, variant=variant, with_t5=with_t5, token=token)


def fetch(
    repo_id: str,
    revision: str | None = None,
    *,
    variant: str | None = None,
    with_t5: bool = False,
    token: str | None = None,
    refresh: bool = False,
) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: main) in the Hub cache, with
    the files ``allow_patterns`` names. The cache first (no request when it has them all), unless
    ``refresh`` (then the Hub says which commit the revision names now). Failures are one-line
    ``ModelLoadError``s naming the id."""
    patterns = allow_patterns(variant, with_t5)
    name = repo_id + (f"@{revision}" if revision else "")
    started = time.perf_counter()
    folder = None if refresh else _cached(repo_id, revision, patterns)
    if folder is None:
        endpoint = hub_constants.ENDPOINT
        log.debug("fetching %s (variant %s) from %s", name, variant or "default", endpoint)
        progress = None if sys.stderr.isatty() else type("Progress", (LogProgress,), {"model": name})
        try:
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=patterns,
                    token=token,
                    tqdm_class=progress,
                )
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the id
            raise ModelLoadError(f"cannot fetch {name}: {_reason(exc)}") from None
        log.info("fetched %s into %s in %.1fs", name, folder, time.perf_counter() - started)
    else:
        log.info("%s: using the cached snapshot %s", name, folder)
    _check_complete(folder, name, variant, with_t5)
    return folder


def _cached(repo_id: str, revision: str | None, patterns: list[str]) -> Path | None:
    """The cached snapshot when it holds every file the patterns name (as far as the cached tree
    listing tells; a snapshot placed by hand is taken as it is), else None. Makes no request."""
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
            )
        )
    except (hub_errors.LocalEntryNotFoundError, OSError, ValueError):
        return None


def _check_complete(folder: Path, name: str, variant: str | None, with_t5: bool) -> None:
    """Every weighted component the pipeline index names has weights of ``variant``."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{name} is not a diffusers pipeline (no model_index.json)")
    try:
        entries = json.loads(index.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{name}: model_index.json is not valid JSON: {exc}") from None
    wanted = [c for c in LOADED_COMPONENTS if c.startswith(("text_encoder", "vae", "unet", "transformer"))]
    if with_t5:
        wanted.append("text_encoder_3")
    for component in wanted:
        value = entries.get(component)
        if not (isinstance(value, list) and value and value[0]):
            continue
        files = [p.relative_to(folder).as_posix() for p in (folder / component).glob("*.safetensors")]
        if not any(fnmatch(f, pattern) for f in files for pattern in weight_patterns(component, variant)):
            kind = f"variant {variant!r}" if variant else "full-precision (no --variant)"
            raise ModelLoadError(
                f"{name} has no {kind} safetensors weights for {component}"
                + ("" if variant else "; its weights may be a variant only (try --variant fp16)")
            )


def _reason(exc: Exception) -> str:
    """Why a fetch failed, in one line."""
    if isinstance(exc, hub_errors.GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and give a token that may read it"
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return "no such revision"
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return "no such repository, or the token (HF_TOKEN, --hf-token-file) may not read it"
    if isinstance(exc, hub_errors.HfHubHTTPError) and exc.response is not None:
        if exc.response.status_code in (401, 403):
            return f"the Hub refused the token (HTTP {exc.response.status_code})"
        return f"HTTP {exc.response.status_code} from the Hub"
    if isinstance(exc, hub_errors.LocalEntryNotFoundError):
        return "not in the cache (HF_HOME) and the Hub is offline (HF_HUB_OFFLINE) or unreachable"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class LogProgress(tqdm):
    """The Hub's progress bars as log lines (a terminal gets the bars themselves): one line per
    bar every ``PROGRESS_LOG_SECONDS`` and one at its end, no carriage returns; a subclass names
    the ``model``."""

    model = ""

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)
        kwargs.update(disable=False, file=_Discard())
        super().__init__(*args, **kwargs)
        self._logged_at = time.monotonic()

    def update(self, n=1):
        shown = super().update(n)
        now = time.monotonic()
        if now - self._logged_at >= PROGRESS_LOG_SECONDS:
            self._logged_at = now
            self._log()
        return shown

    def close(self):
        if not self.disable and self.n:
            self._log()
        super().close()

    def _log(self) -> None:
        unit = self.unit if self.unit == "B" else ""
        done = self.format_sizeof(self.n, unit) if self.unit_scale else f"{self.n:g}"
        total = ""
        if self.total:
            total = "/" + (self.format_sizeof(self.total, unit) if self.unit_scale else f"{self.total:g}")
        log.info("%s: %s: %s%s", self.model, (self.desc or "progress").rstrip(": "), done, total)


class _Discard:
    """A file that takes and drops what tqdm draws."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

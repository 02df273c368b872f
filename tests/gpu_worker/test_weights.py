"""``--model`` sources (gpu_worker.weights): which files a Hub fetch asks for, the cache first, one
line naming the id when a fetch fails, a resumed download; against a loopback stand-in for the
Hub (``HF_ENDPOINT``), with ``hybridiff download`` and the worker's own resolve in subprocesses
(the Hub library reads its environment at import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import COMMIT, HubStandIn

from gpu_worker import weights
from hybridiff.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]
REPO = "org/tiny-sdxl"
TIMEOUT = 60


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    """An SDXL pipeline's files as a Hub repository holds them (small stand-ins for the tensors):
    full-precision and fp16 weights, .bin copies, a top-level single-file checkpoint, a T5
    encoder the worker does not load and a safety checker."""
    repo = tmp_path_factory.mktemp("hub") / "tiny-sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1"}
    for component, weights_name in [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("text_encoder_3", "model"),
        ("safety_checker", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ]:
        index[component] = ["diffusers", "Any"]
        (repo / component).mkdir(parents=True)
        (repo / component / "config.json").write_text(json.dumps({"component": component}))
        for name in (
            f"{weights_name}.safetensors",
            f"{weights_name}.fp16.safetensors",
            f"{weights_name}.bin",
        ):
            (repo / component / name).write_bytes(f"{component}/{name}".encode() * 64)
    for component in ("tokenizer", "tokenizer_2", "scheduler"):
        index[component] = ["transformers", "Any"]
        (repo / component).mkdir()
        (repo / component / "tokenizer_config.json").write_text(json.dumps({"component": component}))
    (repo / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (repo / "model_index.json").write_text(json.dumps(index))
    (repo / "sd_xl_base_1.0.safetensors").write_bytes(b"x" * 4096)
    return repo


def _fp16_files(repo: Path) -> set[str]:
    """What a worker loading --variant fp16 needs: configs, tokenizers and the fp16 weights."""
    needed = {"model_index.json"}
    for component in weights.LOADED_COMPONENTS:
        for f in (repo / component).glob("*") if (repo / component).is_dir() else ():
            if f.suffix in (".json", ".txt") or f.name.endswith(".fp16.safetensors"):
                needed.add(f"{component}/{f.name}")
    return needed


def _env(hub: HubStandIn, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", **extra}


def _download(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridiff_launch.cli", "download", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _worker_resolve(env: dict[str, str], model: str, variant: str | None) -> subprocess.CompletedProcess:
    """What a starting worker does before it loads: ``weights.resolve``."""
    code = f"from gpu_worker import weights; print(weights.resolve({model!r}, variant={variant!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )


def _resolved(hub: HubStandIn) -> set[str]:
    """The files asked about (HEAD) or for (GET)."""
    return {r[1].split(f"/resolve/{COMMIT}/", 1)[1] for r in hub.requests if "/resolve/" in r[1]}


def test_only_the_variant_files_loaded_are_fetched_and_a_second_start_asks_nothing(hub_repo, tmp_path):
    home = tmp_path / "hf"
    with HubStandIn({REPO: hub_repo}) as hub:
        env = _env(hub, home)
        done = _download(env, REPO, "--variant", "fp16")
        assert done.returncode == 0, done.stderr
        folder = Path(done.stdout.strip().splitlines()[-1])
        assert folder == home / "hub" / "models--org--tiny-sdxl" / "snapshots" / COMMIT
        # No fp32, .bin, T5 or single-file weights asked for (equal files are fetched once: by etag).
        asked = _resolved(hub)
        assert asked == _fp16_files(hub_repo) and set(hub.downloaded()) <= asked
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(
            _fp16_files(hub_repo)
        )

        hub.requests.clear()
        started = _worker_resolve(env, REPO, "fp16")
        assert started.returncode == 0, started.stderr
        assert Path(started.stdout.strip()) == folder
        assert hub.requests == []  # the cache first: not one request

        offline = _worker_resolve({**env, "HF_HUB_OFFLINE": "1"}, REPO, "fp16")
        assert offline.returncode == 0 and Path(offline.stdout.strip()) == folder, offline.stderr

        # Another variant is not in the cache: fetched then (only the files it adds).
        full = _worker_resolve(env, REPO, None)
        assert full.returncode == 0, full.stderr
        asked = _resolved(hub)
        assert "unet/diffusion_pytorch_model.safetensors" in asked
        assert not any(f.endswith((".fp16.safetensors", ".bin")) for f in asked)


def test_t5_is_fetched_only_when_asked_for(hub_repo, tmp_path):
    with HubStandIn({REPO: hub_repo}) as hub:
        done = _download(_env(hub, tmp_path / "hf"), REPO, "--with-t5")
        assert done.returncode == 0, done.stderr
        fetched = set(hub.downloaded())
    assert {"text_encoder_3/model.safetensors", "text_encoder_3/config.json"} <= fetched
    assert not any(f.startswith("safety_checker/") or f.endswith(".fp16.safetensors") for f in fetched)


@pytest.mark.parametrize("case", ["unknown id", "refused token", "unknown revision"])
def test_a_failed_fetch_is_one_line_naming_the_id(hub_repo, tmp_path, case):
    token = "hf_right" if case == "refused token" else None
    model = {"unknown id": "org/no-such-model", "refused token": REPO, "unknown revision": REPO + "@v9"}[case]
    with HubStandIn({REPO: hub_repo}, token=token) as hub:
        done = _download(_env(hub, tmp_path / "hf", HF_TOKEN="hf_wrong"), model)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and model in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_token_file_is_sent(hub_repo, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("hf_right\n")
    with HubStandIn({REPO: hub_repo}, token="hf_right") as hub:
        done = _download(
            _env(hub, tmp_path / "hf"), REPO, "--variant", "fp16", "--hf-token-file", str(token_file)
        )
    assert done.returncode == 0, done.stderr


def test_an_interrupted_download_resumes(hub_repo, tmp_path):
    # The Hub library writes what it receives in 10 MiB chunks: a UNet of 12 MiB, cut at 11 MiB.
    repo = shutil.copytree(hub_repo, tmp_path / "repo")
    name = "unet/diffusion_pytorch_model.fp16.safetensors"
    (repo / name).write_bytes(os.urandom(12 << 20))
    with HubStandIn({REPO: repo}) as hub:
        hub.cut_after[name] = 11 << 20  # the first GET of the UNet closes there
        done = _download(_env(hub, tmp_path / "hf"), REPO, "--variant", "fp16")
        assert done.returncode == 0, done.stderr
        gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(name)]
    assert [r[2] for r in gets] == ["", f"bytes={10 << 20}-"]  # then the rest only
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert (folder / name).read_bytes() == (repo / name).read_bytes()


def test_variant_only_weights_without_the_variant_name_the_flag(hub_repo, tmp_path):
    only_fp16 = tmp_path / "fp16-only"
    shutil.copytree(hub_repo, only_fp16, ignore=shutil.ignore_patterns("*model.safetensors", "*.bin"))
    with HubStandIn({"org/fp16-only": only_fp16}) as hub:
        done = _download(_env(hub, tmp_path / "hf"), "org/fp16-only")
    assert done.returncode == 2
    assert "org/fp16-only" in done.stderr and "--variant fp16" in done.stderr


# --- in-process: parsing and patterns ---------------------------------------------------------
def test_model_names_parse_as_folders_first_then_hub_ids(tmp_path):
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    assert weights.parse_model(str(local)).path == local
    hub = weights.parse_model("stabilityai/stable-diffusion-xl-base-1.0@v1.0")
    assert (hub.repo_id, hub.revision) == ("stabilityai/stable-diffusion-xl-base-1.0", "v1.0")
    assert weights.parse_model("org/name@v1", revision="abc").revision == "abc"
    assert weights.served_name("org/name@v1") == "org/name"
    assert weights.served_name(str(local)) == "name"
    assert weights.served_name("/ckpt/sd_xl_base_1.0.safetensors") == "sd_xl_base_1.0"
    with pytest.raises(ModelLoadError, match="does not exist"):
        weights.parse_model("/no/such/folder")


def test_patterns_pick_the_variant_and_its_shards():
    from fnmatch import fnmatch

    def picked(variant, with_t5=False):
        patterns = weights.allow_patterns(variant, with_t5)
        names = [
            "model_index.json",
            "sd_xl_base_1.0.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
            "text_encoder_3/model.fp16-00001-of-00002.safetensors",
            "text_encoder_3/model-00001-of-00002.safetensors",
            "tokenizer_3/spiece.model",
            "vae/diffusion_flax_model.msgpack",
        ]
        return {n for n in names if any(fnmatch(n, p) for p in patterns)}

    assert picked(None) == {
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",  # a small json: harmless
    }
    assert picked("fp16", with_t5=True) == {
        "model_index.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "transformer/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "text_encoder_3/model.fp16-00001-of-00002.safetensors",
        "tokenizer_3/spiece.model",
    }

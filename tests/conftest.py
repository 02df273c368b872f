import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random SDXL and SD3 models in diffusers format, built once per session."""
    from hybridiff_launch.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(arch, root / arch) for arch in ("sdxl", "sd3")}


@pytest.fixture(scope="session")
def engines(model_dirs):
    from hybridiff_launch.inprocess import InProcessEngine

    made = {arch: InProcessEngine(path) for arch, path in model_dirs.items()}
    yield made
    for e in made.values():
        e.close()


# --- clusters shared by the cluster, reliability and trace tests (real processes) --------------
@pytest.fixture(scope="session")
def otlp():
    from cluster_helpers import OtlpReceiver

    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def sdxl_cluster(model_dirs, otlp, tmp_path_factory):
    from hybridiff_launch.local_cluster import LocalCluster

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    with LocalCluster(
        model_dirs["sdxl"],
        workers=4,
        log_dir=tmp_path_factory.mktemp("logs"),
        extra_env=env,
        queue_size=16,
        http_port=0,  # the HTTP edge too (tests/e2e/test_http_api.py, test_playground.py)
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def sd3_cluster(model_dirs, tmp_path_factory):
    from hybridiff_launch.local_cluster import LocalCluster

    with LocalCluster(model_dirs["sd3"], workers=2, log_dir=tmp_path_factory.mktemp("logs")) as cluster:
        yield cluster

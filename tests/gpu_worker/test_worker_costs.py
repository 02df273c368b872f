"""What a worker tells the coordinator's cost-aware AUTO: its step costs at a size (MeasureSplit:
a forward and each stage at batch 1 and 2) and its model's calibration (Info), on a real gRPC
server with a real engine (tiny model)."""

from __future__ import annotations

import json
import shutil

import pytest
from cluster_helpers import Served

from gpu_worker.loader import read_model_calibration
from hybridiff.calibration import Calibration, PolicyCalibration, write_calibration
from hybridiff.calibration_wire import calibration_from_proto
from hybridiff.errors import ModelLoadError
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import WindowGuidance
from hybridiff.request import MODEL_DEFAULTS_FILE

CALIBRATION = Calibration(
    floor_db=45.0,
    num_steps=30,
    guidance_scale=5.0,
    policies={
        WindowGuidance.CONDITIONAL: PolicyCalibration({2: 50.5, 4: 44.0}),
        WindowGuidance.FULL_CFG: PolicyCalibration({2: 60.0, 27: 47.0}),
    },
    prompts=3,
    seeds=2,
)


@pytest.fixture(scope="module")
def calibrated(model_dirs, tmp_path_factory):
    copy = shutil.copytree(model_dirs["sdxl"], tmp_path_factory.mktemp("calibrated") / "sdxl")
    write_calibration(copy, CALIBRATION)
    served = Served(copy)
    yield served
    served.close()


def test_measure_split_reports_the_step_costs_at_both_batches(calibrated):
    answer = calibrated.stub.MeasureSplit(worker_pb2.MeasureSplitRequest(height=64, width=64), timeout=60)
    assert answer.topology == "nested"
    for costs in (answer.batch1, answer.batch2):
        assert costs.forward_seconds > 0 and costs.stage1_seconds > 0 and costs.stage2_seconds > 0
        assert costs.stage1_seconds + costs.stage2_seconds == pytest.approx(costs.forward_seconds)
        assert costs.stage1_pre_seconds > 0 and costs.stage1_post_seconds > 0
        assert costs.stage1_pre_seconds + costs.stage1_post_seconds == pytest.approx(costs.stage1_seconds)
    # Batch 1's stages are the ones the cut was balanced on.
    assert answer.batch1.stage1_seconds == pytest.approx(answer.stage1_seconds)


def test_info_reports_the_models_calibration(calibrated, model_dirs):
    info = calibrated.info()
    assert info.HasField("calibration")
    assert calibration_from_proto(info.calibration) == CALIBRATION
    assert calibration_from_proto(info.calibration).max_window(WindowGuidance.FULL_CFG, 30) == 27


def test_a_model_without_a_calibration_reports_none_and_a_broken_one_fails_the_load(model_dirs, tmp_path):
    assert read_model_calibration(model_dirs["sdxl"]) is None
    (tmp_path / MODEL_DEFAULTS_FILE).write_text(json.dumps({"calibration": {"policies": {}}}))
    with pytest.raises(ModelLoadError, match="invalid calibration"):
        read_model_calibration(tmp_path)


def test_a_file_recording_only_a_calibration_keeps_the_architectures_defaults(model_dirs, tmp_path):
    from gpu_worker.loader import read_model_defaults
    from hybridiff.request import model_defaults

    write_calibration(tmp_path, CALIBRATION)
    assert read_model_defaults(tmp_path, "sdxl") == model_defaults("sdxl")
    assert read_model_calibration(tmp_path) == CALIBRATION

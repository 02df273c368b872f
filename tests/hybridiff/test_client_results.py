"""The Python client's result by name: the enums of the stats as the CLI names them, the proto
message still there as it was."""

from hybridiff.client import Generation
from hybridiff.v1 import diffusion_pb2 as pb


def test_a_generation_names_its_mode_window_and_phases():
    stats = pb.GenerateStats(
        mode_used=pb.MODE_HYBRID,
        window_guidance=pb.WINDOW_GUIDANCE_CONDITIONAL,
        tau1=3,
        tau2=5,
        steps=[
            pb.StepStat(step=0, phase=pb.PHASE_DATA_PARALLEL),
            pb.StepStat(step=1, phase=pb.PHASE_PIPELINE_FILL),
            pb.StepStat(step=2, phase=pb.PHASE_PIPELINE),
        ],
    )
    result = Generation(pb.GenerateResponse(request_id="r", seed=7, stats=stats))
    assert result.mode == "hybrid" and result.window_guidance == "conditional"
    assert result.phases == ["data-parallel", "pipeline-fill", "pipeline"]
    assert (result.tau1, result.tau2) == (3, 5)
    assert result.stats.mode_used == pb.MODE_HYBRID  # the proto access is unchanged


def test_a_run_without_a_window_has_no_taus():
    result = Generation(pb.GenerateResponse(stats=pb.GenerateStats(mode_used=pb.MODE_CFG_PARALLEL)))
    assert result.mode == "cfg-parallel" and result.window_guidance == ""
    assert result.tau1 is None and result.tau2 is None and result.phases == []
    assert Generation(pb.GenerateResponse()).mode == ""  # unset: no name, no error

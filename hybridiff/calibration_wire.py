"""A model's calibration (``hybridiff.calibration``) on the internal wire: the worker reports it in
Info, the coordinator's cost-aware AUTO reads it back (docs/design.md section 10)."""

from __future__ import annotations

from hybridiff.calibration import Calibration, PolicyCalibration
from hybridiff.internal.v1 import worker_pb2
from hybridiff.protocol import WindowGuidance


def calibration_to_proto(calibration: Calibration) -> worker_pb2.Calibration:
    return worker_pb2.Calibration(
        floor_db=calibration.floor_db,
        num_inference_steps=calibration.num_steps,
        guidance_scale=calibration.guidance_scale,
        prompts=calibration.prompts,
        seeds=calibration.seeds,
        policies=[
            worker_pb2.PolicyCalibration(policy=policy, psnr_db=measured.psnr_db)
            for policy, measured in sorted(calibration.policies.items())
        ],
        pipeline_psnr_db=calibration.pipeline_db,
        tau1=calibration.tau1,
        at_other_steps=[calibration_to_proto(other) for other in calibration.at_other_steps],
    )


def calibration_from_proto(message: worker_pb2.Calibration, others: bool = True) -> Calibration | None:
    """The calibration a worker reported; None for one without a step count (none recorded).
    A policy this version does not know is left out, as ``Calibration.from_json`` does; the
    calibrations at other step counts are read one level deep (``others``: a nesting is not followed)."""
    if message.num_inference_steps < 1:
        return None
    policies = {}
    for p in message.policies:
        try:
            policy = WindowGuidance(p.policy)
        except ValueError:
            continue
        policies[policy] = PolicyCalibration({int(n): float(db) for n, db in p.psnr_db.items() if n >= 1})
    return Calibration(
        floor_db=message.floor_db,
        num_steps=message.num_inference_steps,
        guidance_scale=message.guidance_scale,
        policies=policies,
        prompts=message.prompts,
        seeds=message.seeds,
        pipeline_db=message.pipeline_psnr_db if message.HasField("pipeline_psnr_db") else None,
        tau1=message.tau1
        if message.HasField("tau1") and message.tau1 < message.num_inference_steps
        else None,
        at_other_steps=tuple(
            other
            for other in (calibration_from_proto(m, others=False) for m in message.at_other_steps if others)
            if other is not None
        ),
    )

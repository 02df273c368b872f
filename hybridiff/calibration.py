"""A model's calibration: how long a pipeline window each window-guidance policy may run while
the image stays within a quality floor of exact CFG (docs/design.md section 1 and section 10).

``hybridiff calibrate`` measures it on the served model and records it in the model's
``hybridiff.json`` beside its defaults::

    {"defaults": {...},
     "calibration": {"floor_db": 45.0, "num_inference_steps": 30, "guidance_scale": 5.0,
                     "prompts": 3, "seeds": 2,
                     "policies": {"conditional": {"psnr_db": {"2": 51.3, "4": 46.0, "8": 41.2}},
                                  "full-cfg": {"psnr_db": {"2": 60.1, "29": 47.5}}},
                     "pipeline": {"psnr_db": 43.7}, "tau1": 13,
                     "at_other_steps": [{"num_inference_steps": 50, ...}]}}

``psnr_db`` maps a window length (HYBRID's window steps from where the rel-MAE curve opens it, at
the calibration's step count) to the lowest PSNR against the exact-CFG image (cfg-parallel) over
the calibration's prompts and seeds; ``pipeline`` is PIPELINE's (stale from its warm-up to the
end, where the latents still change fast: a window's lengths do not predict it); ``tau1`` where
the slope rule opened the window (the median over the images), where AUTO prices windows;
``at_other_steps`` the same model calibrated at other step counts (``Calibration.judging``). The
coordinator's cost-aware AUTO reads ``max_window`` and ``pipeline_allowed`` to bound what it may
choose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from hybridiff.protocol import WindowGuidance, label, parse
from hybridiff.request import MODEL_DEFAULTS_FILE

QUALITY_FLOOR_DB = 45.0  # PSNR against exact CFG a window must keep to be chosen on its own
CALIBRATION_KEY = "calibration"


class CalibrationError(ValueError):
    """A calibration record that cannot be read."""


@dataclass(frozen=True)
class PolicyCalibration:
    """Measured quality of one window policy per window length."""

    psnr_db: dict[int, float]

    def max_window(self, floor_db: float) -> int:
        """The longest measured length whose quality, and every shorter length's, is above the
        floor (0 when the shortest is not): quality falls with the window's length, so a longer
        length above the floor after a shorter one below it is noise, not a licence."""
        longest = 0
        for length in sorted(self.psnr_db):
            if self.psnr_db[length] < floor_db:
                break
            longest = length
        return longest


@dataclass(frozen=True)
class Calibration:
    """What ``hybridiff calibrate`` measured on one model."""

    floor_db: float
    num_steps: int
    guidance_scale: float
    policies: dict[WindowGuidance, PolicyCalibration]
    prompts: int = 0
    seeds: int = 0
    extra: dict = field(default_factory=dict)  # anything a newer writer recorded, kept as is
    pipeline_db: float | None = None  # PIPELINE's lowest PSNR (None: not measured, not allowed)
    # Where the slope rule opened the window, the median over the calibration's images (at its
    # steps): AUTO prices a window from there (None: not recorded, priced from tau_cap).
    tau1: int | None = None
    # The same model calibrated at other step counts (a window's length measured at one step count
    # is a guess at another): ``judging`` picks the ones a request's steps are judged by.
    at_other_steps: tuple[Calibration, ...] = ()

    def for_steps(self, num_steps: int) -> Calibration:
        """The calibration nearest a request of ``num_steps`` steps: the one measured at the fewest
        steps not below the request's, else the one at the most steps (where its window opens)."""
        return self.judging(num_steps)[0]

    def judging(self, num_steps: int) -> list[Calibration]:
        """The calibrations a request of ``num_steps`` steps is judged by: the nearest at or above
        its steps and the nearest below (one where the request is outside them or on one). A
        length measured at one step count is a guess at another, wrong both ways on the default
        model, so a request between two records takes the stricter of them."""
        members = self._members()
        above = [c for c in members if c.num_steps >= num_steps]
        below = [c for c in members if c.num_steps < num_steps]
        out = [min(above, key=lambda c: c.num_steps)] if above else []
        if below and not any(c.num_steps == num_steps for c in above):
            out.append(max(below, key=lambda c: c.num_steps))
        return out

    def _members(self) -> list[Calibration]:
        return [replace(self, at_other_steps=()), *self.at_other_steps]

    def merged(self, earlier: Calibration | None) -> Calibration:
        """This calibration with ``earlier``'s at other step counts kept beside it (one per step
        count: this one replaces an earlier one at its own steps)."""
        if earlier is None:
            return self
        kept = {c.num_steps: c for c in earlier._members()}
        kept.pop(self.num_steps, None)
        return replace(self, at_other_steps=tuple(kept[n] for n in sorted(kept)))

    def expected_tau1(self, num_steps: int, tau_cap: int, l_slope: int = 0) -> tuple[int, str]:
        """Where a request of ``num_steps`` steps is expected to open its window, and by which rule
        (``slope``: the window opens the step after; ``tau_cap``: the latest it opens, at it): the
        nearest calibration's median tau1 scaled to the request's steps, not before ``l_slope``
        (the slope rule decides nothing earlier) and at most ``tau_cap``."""
        nearest = self.for_steps(num_steps)
        if nearest.tau1 is None:
            return tau_cap, "tau_cap"
        scaled = max(round(nearest.tau1 * num_steps / nearest.num_steps), l_slope)
        return (scaled, "slope") if scaled < tau_cap else (tau_cap, "tau_cap")

    def pipeline_allowed(self, floor_db: float | None = None, num_steps: int | None = None) -> bool:
        """Whether PIPELINE was measured above the floor (its steps as calibrated: PIPELINE's
        stale steps run from its warm-up, so a longer request is not scaled from it); with
        ``num_steps``, by every calibration the request is judged by."""
        floor = self.floor_db if floor_db is None else floor_db
        judges = [self] if num_steps is None else self.judging(num_steps)
        return all(c.pipeline_db is not None and c.pipeline_db >= floor for c in judges)

    def max_window(self, policy: WindowGuidance, num_steps: int, floor_db: float | None = None) -> int:
        """The longest window of ``policy`` above the floor for a request of ``num_steps`` steps
        (0 for a policy never calibrated), by the stricter of the calibrations it is judged by
        (``judging``). Every length above the floor: any window. Otherwise the calibrated length,
        scaled down for fewer steps but never up for more: measured on the default model, 30 steps
        scaled to 50 would allow 13 last-difference steps where 50 steps measured 8."""
        return min(c._max_window(policy, num_steps, floor_db) for c in self.judging(num_steps))

    def _max_window(self, policy: WindowGuidance, num_steps: int, floor_db: float | None) -> int:
        measured = self.policies.get(policy)
        if measured is None:
            return 0
        steps = measured.max_window(self.floor_db if floor_db is None else floor_db)
        if steps >= self.num_steps:
            return num_steps
        return min(steps, math.floor(steps * num_steps / self.num_steps))

    def to_json(self) -> dict:
        record = dict(self.extra)
        record.update(
            floor_db=self.floor_db,
            num_inference_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            prompts=self.prompts,
            seeds=self.seeds,
            policies={
                label(policy): {"psnr_db": {str(n): round(db, 3) for n, db in sorted(p.psnr_db.items())}}
                for policy, p in sorted(self.policies.items())
            },
        )
        if self.pipeline_db is not None:
            record["pipeline"] = {"psnr_db": round(self.pipeline_db, 3)}
        if self.tau1 is not None:
            record["tau1"] = self.tau1
        if self.at_other_steps:
            record["at_other_steps"] = [c.to_json() for c in self.at_other_steps]
        return record

    @classmethod
    def from_json(cls, record: dict) -> Calibration:
        try:
            known = {
                "floor_db",
                "num_inference_steps",
                "guidance_scale",
                "prompts",
                "seeds",
                "policies",
                "pipeline",
                "tau1",
                "at_other_steps",
            }
            policies = {}
            for name, measured in record["policies"].items():
                try:
                    policy = parse(WindowGuidance, name)
                except ValueError:
                    continue  # a policy this version does not know: not usable here
                psnr = {int(n): float(db) for n, db in measured["psnr_db"].items()}
                if any(n < 1 for n in psnr) or any(math.isnan(db) for db in psnr.values()):
                    raise CalibrationError(f"policy {name}: window lengths must be >= 1 and PSNR a number")
                policies[policy] = PolicyCalibration(psnr)
            pipeline = record.get("pipeline")
            pipeline_db = None if pipeline is None else float(pipeline["psnr_db"])
            if pipeline_db is not None and math.isnan(pipeline_db):
                raise CalibrationError("pipeline: PSNR must be a number")
            calibration = cls(
                floor_db=float(record.get("floor_db", QUALITY_FLOOR_DB)),
                num_steps=int(record["num_inference_steps"]),
                guidance_scale=float(record["guidance_scale"]),
                policies=policies,
                prompts=int(record.get("prompts", 0)),
                seeds=int(record.get("seeds", 0)),
                extra={k: v for k, v in record.items() if k not in known},
                pipeline_db=pipeline_db,
                tau1=_step(record.get("tau1")),
                at_other_steps=tuple(
                    # one level: a nested record's own others are not read
                    cls.from_json({k: v for k, v in other.items() if k != "at_other_steps"})
                    for other in record.get("at_other_steps", ())
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CalibrationError(f"invalid calibration: {exc}") from None
        if calibration.num_steps < 1:
            raise CalibrationError("invalid calibration: num_inference_steps must be >= 1")
        if calibration.tau1 is not None and not 0 <= calibration.tau1 < calibration.num_steps:
            raise CalibrationError("invalid calibration: tau1 must be a step of the calibration's steps")
        return calibration


def _step(value: object) -> int | None:
    """A step index as JSON wrote it: an integer (not a bool, a float or a string), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"tau1 must be an integer step, got {value!r}")
    return value


def read_calibration(model_dir: str | Path) -> Calibration | None:
    """The calibration a model directory records, or None when it records none."""
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get(CALIBRATION_KEY)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CalibrationError(f"{path}: {exc}") from None
    return None if record is None else Calibration.from_json(record)


def write_calibration(model_dir: str | Path, calibration: Calibration) -> Path:
    """Record ``calibration`` in the model's ``hybridiff.json``, keeping everything else there."""
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    document = json.loads(path.read_text()) if path.is_file() else {}
    document[CALIBRATION_KEY] = calibration.to_json()
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path

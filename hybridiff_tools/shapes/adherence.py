"""Prompt adherence without learned weights: find the shape in a decoded image, read its
colour, position, size and shape class, and compare them with what the prompt asked for.

- the shape is the largest 4-connected region of saturated pixels (backgrounds are neutral);
- colour: the hue of the region's median pixel, nearest to the palette's hues;
- position: the region's centroid, nearest of the five anchors;
- shape class: the fill ratio of the bounding box of its solid core (square ~1.0, circle ~pi/4,
  triangle ~1/2), and its taper (top rows vs bottom rows) for small triangles;
- size: its area against the midpoint of the two nominal sizes.
"""

from __future__ import annotations

import colorsys
import io
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hybridiff_tools.shapes.grammar import Caption, parse_caption
from hybridiff_tools.shapes.render import ANCHORS, AREA_PER_RADIUS2, PALETTE, RADII

SATURATION_MIN = 0.22  # max(rgb) - min(rgb) above which a pixel belongs to a shape
MIN_AREA_FRACTION = 0.004  # smaller regions are noise, not a shape
SQUARE_FILL, TRIANGLE_FILL = 0.87, 0.64  # fill-ratio boundaries: square > 0.87 > circle > 0.64 > triangle
TAPER_MAX = 0.7  # a triangle's top third is much narrower than its bottom third
CIRCLE_FILL_MIN = 0.70  # a small circle's rows taper too, but it fills more of its box than a triangle
_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in PALETTE.items()}


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one image (``found`` is False when there is no shape)."""

    found: bool
    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    fill: float = 0.0
    area_fraction: float = 0.0

    def attributes(self) -> dict[str, str | None]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position, "size": self.size}


@dataclass(frozen=True)
class Verdict:
    prompt: str
    reading: Reading
    correct: dict[str, bool] = field(default_factory=dict)  # per attribute the prompt named

    @property
    def adheres(self) -> bool:
        return self.reading.found and all(self.correct.values())


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (a boolean image)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _nearest_hue(hue: float) -> str:
    return min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 1 - abs(hue - _HUES[name])))


def _shape_class(box: np.ndarray, fill: float) -> str:
    """Square: it fills its bounding box; triangle: about half of it, or its rows narrow towards
    the top; circle: in between (pi/4)."""
    rows = box.sum(axis=1).astype(np.float32)
    third = max(1, len(rows) // 3)
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1.0)
    if fill < TRIANGLE_FILL or (taper < TAPER_MAX and fill < CIRCLE_FILL_MIN):
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def read_image(image: np.ndarray) -> Reading:
    """Read the shape in ``image`` (H x W x 3, floats in 0..1 or uint8)."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    h, w, _ = img.shape
    saturation = img.max(axis=2) - img.min(axis=2)
    region = _largest_region(saturation > SATURATION_MIN)
    area = int(region.sum())
    if area < MIN_AREA_FRACTION * h * w:
        return Reading(found=False, area_fraction=area / (h * w))
    # The outline for the shape class: pixels at least half as saturated as the shape's median,
    # so anti-aliased edge pixels do not square off a small circle.
    core = region & (saturation >= 0.5 * np.median(saturation[region]))
    ys, xs = np.nonzero(core)
    fill = int(core.sum()) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = _shape_class(core[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], fill)
    r, g, b = np.median(img[region], axis=0)
    colour = _nearest_hue(colorsys.rgb_to_hsv(float(r), float(g), float(b))[0])
    ys, xs = np.nonzero(region)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    radius = np.sqrt(area / AREA_PER_RADIUS2[shape] / (h * w))
    size = "large" if radius > (RADII["small"] + RADII["large"]) / 2 else "small"
    return Reading(True, colour, shape, position, size, fill=float(fill), area_fraction=area / (h * w))


def check(image: np.ndarray | bytes, prompt: str | Caption) -> Verdict:
    """Score ``image`` (array or PNG bytes) against a grammar prompt."""
    if isinstance(image, (bytes, bytearray)):
        image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    caption = prompt if isinstance(prompt, Caption) else parse_caption(prompt)
    reading = read_image(image)
    seen = reading.attributes()
    return Verdict(caption.text, reading, {k: seen[k] == v for k, v in caption.asked().items()})


@dataclass
class AdherenceReport:
    """Accuracy over a set of verdicts: whole prompts, and per attribute."""

    verdicts: list[Verdict]

    @property
    def accuracy(self) -> float:
        return sum(v.adheres for v in self.verdicts) / max(1, len(self.verdicts))

    def attribute_accuracy(self) -> dict[str, float]:
        counts: dict[str, list[int]] = {}
        for v in self.verdicts:
            for k, ok in v.correct.items():
                counts.setdefault(k, []).append(int(ok and v.reading.found))
        return {k: sum(c) / len(c) for k, c in counts.items()}

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": len(self.verdicts), "attributes": self.attribute_accuracy()}

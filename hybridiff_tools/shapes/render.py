"""Draw a :class:`~hybridiff_tools.shapes.grammar.Scene` as an RGB image, deterministically.

Shapes are anti-aliased by 4x supersampling. Placement, size and shade jitter come from the
caller's ``numpy.random.Generator``, so a seed fixes the whole dataset.
"""

from __future__ import annotations

import numpy as np

from hybridiff_tools.shapes.grammar import Scene

# Nominal RGB of each colour word (0..1); rendered with a little jitter.
PALETTE = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.16, 0.32, 0.88),
    "yellow": (0.92, 0.82, 0.16),
}
# Shape centre (x, y) as a fraction of the side, before jitter.
ANCHORS = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}
RADII = {"small": 0.12, "large": 0.19}  # "radius" as a fraction of the side
JITTER = 0.03
# area of each shape in units of radius^2 (the checker reads the size back from it)
AREA_PER_RADIUS2 = {"circle": 3.1416, "square": 1.76**2, "triangle": 1.299 * 1.25**2}
SUPERSAMPLE = 4


def _coverage(scene: Scene, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    n = side * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif scene.shape == "square":
        h = 0.88 * r
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    else:  # an upward equilateral triangle with its centroid at (cx, cy)
        big = 1.25 * r
        top, base = cy - big, cy + big / 2
        half_width = (y - top) / (1.5 * big) * (big * np.sqrt(3) / 2)
        inside = (y >= top) & (y <= base) & (np.abs(x - cx) <= half_width)
    return inside.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator, side: int = 32) -> np.ndarray:
    """``side`` x ``side`` x 3 float32 in 0..1: the shape on a plain neutral background."""
    ax, ay = ANCHORS[scene.position]
    cx, cy = ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER)
    r = RADII[scene.size] * rng.uniform(0.95, 1.05)
    background = np.full(3, rng.uniform(0.1, 0.9), dtype=np.float32)
    colour = np.clip(np.array(PALETTE[scene.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
    alpha = _coverage(scene, cx, cy, r, side)[..., None].astype(np.float32)
    return background * (1 - alpha) + colour * alpha

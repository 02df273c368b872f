"""Image comparison without downloaded metric weights: PSNR and SSIM on 8-bit RGB images."""

from __future__ import annotations

import io

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image


def to_array(image: Image.Image | bytes | np.ndarray) -> np.ndarray:
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float64)


def psnr(a, b, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    x, y = to_array(a), to_array(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def ssim(a, b, peak: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004) over channels with a 7x7 uniform window."""
    x, y = to_array(a), to_array(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    win = min(7, x.shape[0], x.shape[1])
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    scores = []
    for ch in range(x.shape[2]):
        px = sliding_window_view(x[..., ch], (win, win))
        py = sliding_window_view(y[..., ch], (win, win))
        mx, my = px.mean(axis=(-1, -2)), py.mean(axis=(-1, -2))
        vx, vy = px.var(axis=(-1, -2), ddof=1), py.var(axis=(-1, -2), ddof=1)
        cxy = ((px - mx[..., None, None]) * (py - my[..., None, None])).sum(axis=(-1, -2)) / (win * win - 1)
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))

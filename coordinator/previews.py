"""Partial images for the HTTP stream, made in the coordinator from the latents worker U reports
after every step (the recovery checkpoint, docs/design.md section 5) — no VAE, no worker call.

A preview is a linear map from the latent channels to RGB, upscaled to the image's size: the
approach of ComfyUI's Latent2RGB previews. The map of a model is fitted (least squares) to the
final latents and decoded image of each request that finishes, so its colours follow the
model's own VAE; before the first fit, the latents' first three principal components stand in.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from hybridiff.internal.v1 import dataplane_pb2

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def latents_array(tensor: dataplane_pb2.Tensor) -> np.ndarray | None:
    """The first image's latents as a float32 [C, h, w] array; None unless float32 [N, C, h, w]."""
    if tensor.dtype != dataplane_pb2.ELEMENT_TYPE_FLOAT32 or len(tensor.shape) != 4:
        return None
    n, c, h, w = tensor.shape
    if n < 1 or len(tensor.data) < 4 * c * h * w:
        return None
    return np.frombuffer(tensor.data, dtype="<f4", count=c * h * w).reshape(c, h, w)


def _features(latents: np.ndarray) -> np.ndarray:
    """[h*w, C+1]: each latent pixel's channels and a constant."""
    c = latents.shape[0]
    x = latents.reshape(c, -1).T.astype(np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))])


class PreviewDecoder:
    """Latents -> a small encoded image, per model; thread-safe."""

    def __init__(self) -> None:
        self._maps: dict[tuple[str, int], np.ndarray] = {}  # (model, channels) -> [C+1, 3]
        self._lock = threading.Lock()

    def learn(self, model: str, latents: dataplane_pb2.Tensor, image: bytes) -> None:
        """Fit the model's map to one finished request (its final latents and first image)."""
        lat = latents_array(latents)
        if lat is None:
            return
        c, h, w = lat.shape
        with Image.open(io.BytesIO(image)) as im:
            rgb = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BOX), dtype=np.float64)
        solution, *_ = np.linalg.lstsq(_features(lat), rgb.reshape(-1, 3) / 255.0, rcond=None)
        if np.all(np.isfinite(solution)):
            with self._lock:
                self._maps[(model, c)] = solution

    def preview(
        self, model: str, latents: dataplane_pb2.Tensor, width: int, height: int, output_format: str = "png"
    ) -> bytes | None:
        """The preview of the first image, ``width`` x ``height``, encoded; None if the latents
        are not float32 [N, C, h, w]."""
        lat = latents_array(latents)
        if lat is None:
            return None
        c, h, w = lat.shape
        with self._lock:
            mapping = self._maps.get((model, c))
        x = _features(lat)
        if mapping is not None:
            rgb = x @ mapping
        else:  # the first three principal components, each stretched to [0, 1]
            centred = x[:, :c] - x[:, :c].mean(axis=0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            rgb = centred @ vt[: min(3, c)].T
            if rgb.shape[1] < 3:
                rgb = np.repeat(rgb[:, :1], 3, axis=1)
            lo, hi = np.percentile(rgb, 1, axis=0), np.percentile(rgb, 99, axis=0)
            rgb = (rgb - lo) / np.maximum(hi - lo, 1e-6)
        pixels = (np.clip(np.nan_to_num(rgb), 0.0, 1.0) * 255).astype(np.uint8).reshape(h, w, 3)
        image = Image.fromarray(pixels, "RGB").resize((width, height), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format=PIL_FORMATS.get(output_format, "PNG"))
        return out.getvalue()

"""Images as PNG bytes for the app's widgets (the dashboard and its counterfactual panel)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["png_bytes"]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an ``(H, W)`` [0, 1] grey or ``(H, W, 3)`` uint8 RGB image (in memory).

    zlib level 1: the same pixels, ~4x faster to encode than PIL's default 6 for ~15 % more bytes, which only
    travel to the browser on this machine."""
    from PIL import Image as PILImage

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

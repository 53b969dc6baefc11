"""Heat-map overlays on a grey X-ray, as RGB uint8 images (RGB order, never BGR).

* :func:`overlay`: one heat map through a matplotlib colormap, alpha-blended onto the image.
* :func:`overlay_all_findings`: all findings at once as in Chester Fig. 8: red where the strongest
  finding's map is high, transparent where every map is negligible (opacity proportional to value).
* :func:`captioned_strip`: frames side by side with a caption under each (Latent Shift's sweep).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch

from cxrbench._types import to_numpy
from cxrbench.explain.base import minmax_normalize, resize_maps

ArrayLike = np.ndarray | torch.Tensor


def _grey_image(image: ArrayLike) -> np.ndarray:
    image = to_numpy(image, name="image", finite=True)
    if image.ndim != 2:
        raise ValueError(f"image must be a (H, W) grey image, got shape {image.shape}")
    if image.min() < -1e-6 or image.max() > 1 + 1e-6:
        raise ValueError(f"image must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    return np.clip(image, 0.0, 1.0)


def _blend(grey: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(H, W) grey, (H, W, 3) or (3,) colour, (H, W) weight in [0, 1] -> (H, W, 3) uint8."""
    weight = weight[..., None]
    rgb = (1.0 - weight) * grey[..., None] + weight * colour
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def overlay(
    image: ArrayLike,
    heatmap: ArrayLike,
    cmap: str = "jet",
    alpha: float = 0.5,
    threshold: float | None = None,
) -> np.ndarray:
    """Colour a heat map and blend it onto a grey image.

    Parameters
    ----------
    image : array (H, W)
        Grey image, float in [0, 1].
    heatmap : array (h, w)
        Any real-valued map; resized bilinearly to (H, W) and min-max scaled to [0, 1].
    cmap : str
        matplotlib colormap name (default "jet": low blue, high red).
    alpha : float in [0, 1]
        Opacity of the coloured map.
    threshold : float in [0, 1], optional
        Scaled heat below it is not drawn (the image shows through).

    Returns
    -------
    np.ndarray
        (H, W, 3) uint8 RGB.
    """
    grey = _grey_image(image)
    heat = to_numpy(heatmap, name="heatmap", finite=True)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got shape {heat.shape}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as error:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from error
    alpha = _check_unit("alpha", alpha)
    heat = minmax_normalize(resize_maps(heat, grey.shape))
    weight = np.full(grey.shape, alpha, dtype=np.float32)
    if threshold is not None:
        weight[heat < _check_unit("threshold", threshold)] = 0.0
    colours = colormap(heat)[..., :3].astype(np.float32)
    return _blend(grey, colours, weight)


#: per-pixel |x - D(E(x))| at which the reconstruction-error overlay is fully red. A fixed scale, not the
#: image's own maximum, so a well-reconstructed chest X-ray shows little red and an OOD image a lot.
ERROR_SCALE = 0.3


def error_overlay(image: ArrayLike, error: ArrayLike, scale: float = ERROR_SCALE, alpha: float = 0.8) -> np.ndarray:
    """The grey input with its reconstruction error in red (Chester Fig. 4/7): (H, W, 3) uint8 RGB.

    ``error`` (same shape, e.g. the L1 map of :func:`cxrbench.ood.scoring.error_map`) is red at full ``alpha`` from
    ``scale`` up, and fades linearly to none at 0.
    """
    grey = _grey_image(image)
    err = to_numpy(error, name="error", finite=True)
    if err.shape != grey.shape:
        raise ValueError(f"error map shape {err.shape} differs from image shape {grey.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    weight = _check_unit("alpha", alpha) * np.clip(err / scale, 0.0, 1.0)
    return _blend(grey, np.array([1.0, 0.0, 0.0], dtype=np.float32), weight)


def overlay_all_findings(
    image: ArrayLike,
    maps: ArrayLike,
    findings: Sequence[str] | None = None,
    *,
    only: Sequence[str] | None = None,
    colour: tuple[float, float, float] = (1.0, 0.0, 0.0),
    max_alpha: float = 0.8,
    per_finding_normalize: bool = False,
) -> np.ndarray:
    """Show the maps of all findings at once (Chester Fig. 8).

    The per-pixel maximum over findings (negative values clipped to 0) sets the opacity of a
    single colour: ``alpha = max_alpha * value``, so negligible pixels stay transparent and the
    most important region is the most red.

    Parameters
    ----------
    image : array (H, W)
        Grey image, float in [0, 1].
    maps : array (F, h, w)
        One map per finding; resized bilinearly to (H, W).
    findings : sequence of F str, optional
        Names of the maps, in order; needed only with ``only``.
    only : sequence of str, optional
        Show only these findings.
    colour : (r, g, b) floats in [0, 1]
        Overlay colour, default pure red.
    max_alpha : float in [0, 1]
        Opacity of the strongest pixel.
    per_finding_normalize : bool
        False (default): scale all maps by one common maximum, keeping their relative strength.
        True: scale each map to [0, 1] on its own first.

    Returns
    -------
    np.ndarray
        (H, W, 3) uint8 RGB.
    """
    grey = _grey_image(image)
    stack = to_numpy(maps, name="maps", finite=True)
    if stack.ndim != 3:
        raise ValueError(f"maps must be (F, h, w), got shape {stack.shape}")
    if findings is not None and len(findings) != stack.shape[0]:
        raise ValueError(f"got {len(findings)} finding names for {stack.shape[0]} maps")
    if only is not None:
        if findings is None:
            raise ValueError("only= needs findings= (the names of the maps)")
        unknown = sorted(set(only) - set(findings))
        if unknown:
            raise ValueError(f"only= names findings not in findings=: {unknown}")
        stack = stack[[i for i, name in enumerate(findings) if name in set(only)]]
    max_alpha = _check_unit("max_alpha", max_alpha)
    rgb = np.asarray(colour, dtype=np.float32)
    if rgb.shape != (3,) or rgb.min() < 0 or rgb.max() > 1:
        raise ValueError(f"colour must be three floats in [0, 1], got {colour}")
    stack = np.maximum(resize_maps(stack, grey.shape), 0.0)
    if per_finding_normalize:
        stack = minmax_normalize(stack)
    else:
        peak = float(stack.max()) if stack.size else 0.0
        stack = stack / peak if peak > 0 else np.zeros_like(stack)
    combined = stack.max(axis=0) if stack.shape[0] else np.zeros(grey.shape, np.float32)
    return _blend(grey, rgb, max_alpha * combined)


def captioned_strip(frames: ArrayLike, captions: Sequence[str], *, tile: int = 128, gap: int = 4) -> np.ndarray:
    """Grey frames ``(T, H, W)`` in [0, 1] side by side, each scaled to ``tile`` px wide (at least its own width),
    with its caption under it (one line per `` · ``-separated part): an ``(H', W', 3)`` uint8 RGB image on white.
    Latent Shift's frames in ``cxrbench explain --method latent_shift``."""
    from PIL import Image, ImageDraw, ImageFont

    stack = to_numpy(frames, name="frames", finite=True)
    if stack.ndim != 3 or len(captions) != stack.shape[0]:
        raise ValueError(f"expected (T, H, W) frames and T captions, got shape {stack.shape} and {len(captions)}")
    font = ImageFont.load_default(size=11)
    lines = [c.split(" · ") for c in captions]
    width = max(tile, stack.shape[2])
    height = round(stack.shape[1] * width / stack.shape[2])
    band = 4 + 13 * max(len(parts) for parts in lines)
    sheet = Image.new("RGB", (len(stack) * (width + gap) - gap, height + band), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (frame, parts) in enumerate(zip(stack, lines)):
        grey = Image.fromarray(np.round(np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8))
        sheet.paste(grey.resize((width, height), Image.Resampling.BILINEAR).convert("RGB"), (i * (width + gap), 0))
        for j, part in enumerate(parts):
            draw.text((i * (width + gap) + 2, height + 2 + 13 * j), part, fill="black", font=font)
    return np.asarray(sheet)

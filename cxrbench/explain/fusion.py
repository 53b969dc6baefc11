"""Attention fusion of an explanation heat map with a lung mask (report weeks 4-5, Eq. 3).

    F = lam * U + (1 - lam) * G

U is the lung mask (e.g. a U-Net output) and G the heat map (e.g. Grad-CAM), both resized to one
grid (bilinear) and scaled to [0, 1] first. Also :func:`mask_fraction`, the share of a heat map's
mass that falls inside a mask (an explanation metric: how much attention lies on the lungs).
"""

from __future__ import annotations

import numpy as np
import torch

from cxrbench._types import to_numpy
from cxrbench.explain.base import gaussian_smooth, minmax_normalize, resize_maps

ArrayLike = np.ndarray | torch.Tensor


def mask_to_unit(mask: ArrayLike) -> np.ndarray:
    """Scale a lung mask to float32 in [0, 1].

    bool masks map to {0, 1}; integer masks with values above 1 (0/255 PNG masks) are divided by
    255; float masks must already lie in [0, 1] (probabilities or binary).
    """
    mask = to_numpy(mask, name="lung_mask", dtype=None)
    if mask.dtype == bool:
        return mask.astype(np.float32)
    if np.issubdtype(mask.dtype, np.integer):
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError(f"integer lung_mask must lie in [0, 255], got [{mask.min()}, {mask.max()}]")
        return (mask / 255.0 if mask.max() > 1 else mask).astype(np.float32)
    mask = mask.astype(np.float32)
    if not np.isfinite(mask).all():
        raise ValueError("lung_mask contains NaN or Inf")
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"float lung_mask must lie in [0, 1], got [{mask.min():.3g}, {mask.max():.3g}]")
    return mask


def _mask_for(heatmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reshape a (H, W), (B, H, W) or (B, 1, H, W) mask to broadcast against ``heatmap``."""
    if heatmap.ndim == 2:
        if mask.ndim != 2:
            raise ValueError(f"a (H, W) heatmap needs a (H, W) mask, got mask shape {mask.shape}")
        return mask
    if heatmap.ndim != 4:
        raise ValueError(f"heatmap must be (H, W) or (B, F, H, W), got shape {heatmap.shape}")
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, heatmap.shape[0]):
        raise ValueError(
            f"lung_mask must be (H, W), (B, H, W) or (B, 1, H, W) with B = {heatmap.shape[0]}, "
            f"got shape {mask.shape}"
        )
    return mask


def fuse(
    heatmap: ArrayLike,
    lung_mask: ArrayLike,
    lam: float = 0.5,
    sigma: float | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Fuse a heat map with a lung mask: ``lam * mask + (1 - lam) * heatmap``.

    Parameters
    ----------
    heatmap : array (H, W) or (B, F, H, W)
        Any real-valued map (Grad-CAM, saliency, ...); each (H, W) map is min-max scaled to [0, 1]
        (a constant map becomes zeros).
    lung_mask : array (H', W'), (B, H', W') or (B, 1, H', W')
        bool, uint8 0/255 or float in [0, 1] (see :func:`mask_to_unit`).
    lam : float in [0, 1]
        Weight of the mask; 1 returns the mask, 0 the scaled heat map. Default 0.5 (the report's best).
    sigma : float, optional
        Gaussian smoothing of the fused map, standard deviation in output pixels.
    size : (H, W), optional
        Output grid; default the mask's grid. Both inputs are resized bilinearly to it.

    Returns
    -------
    np.ndarray
        float32 in [0, 1], shape (H, W) or (B, F, H, W) on the output grid.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
        raise TypeError(f"lam must be a number in [0, 1], got {lam!r}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    heat = to_numpy(heatmap, name="heatmap")
    if not np.isfinite(heat).all():
        raise ValueError("heatmap contains NaN or Inf")
    mask = _mask_for(heat, mask_to_unit(lung_mask))
    grid = tuple(size) if size is not None else tuple(mask.shape[-2:])
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    heat_unit = minmax_normalize(resize_maps(heat, grid))
    mask_unit = np.clip(resize_maps(mask, grid), 0.0, 1.0)
    fused = float(lam) * mask_unit + (1.0 - float(lam)) * heat_unit
    if sigma is not None:
        fused = gaussian_smooth(fused, sigma)
    return np.clip(fused, 0.0, 1.0).astype(np.float32)


def mask_fraction(heatmap: ArrayLike, mask: ArrayLike) -> float | np.ndarray:
    """Fraction of a heat map's mass inside a mask: ``sum(max(h, 0) * m) / sum(max(h, 0))``.

    Parameters
    ----------
    heatmap : array (H, W) or (B, F, H, W)
        Negative values are clipped to 0; resized bilinearly to the mask's grid.
    mask : array, shapes as ``lung_mask`` of :func:`fuse`
        Binary or soft mask (a soft mask counts partially).

    Returns
    -------
    float or np.ndarray (B, F)
        Fractions in [0, 1]; NaN where the heat map has no positive mass (undefined).
    """
    heat = to_numpy(heatmap, name="heatmap")
    mask = _mask_for(heat, mask_to_unit(mask))
    heat = np.maximum(resize_maps(heat, tuple(mask.shape[-2:])), 0.0).astype(np.float64)
    total = heat.sum(axis=(-2, -1))
    inside = (heat * mask).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)
    return float(fraction) if fraction.ndim == 0 else fraction

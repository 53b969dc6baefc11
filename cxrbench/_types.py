"""Shared type aliases and the input validators every floor uses.

Aliases: :data:`PathLike` (a file or folder name), :data:`ArrayOrTensor` (a numpy array or a torch
tensor). Validators raise one clear error naming what was wrong and, where it helps, the likely mistake:

- :func:`check_unit_range`: an image must be finite floats in [0, 1] (the one normalisation path);
- :func:`to_numpy`: a numpy array or torch tensor as a detached, contiguous CPU numpy array;
- :func:`as_binary_labels`, :func:`as_scores`, :func:`as_labels_and_scores`: 0/1 labels and finite scores
  of matching shapes, for the metrics.

This module imports numpy only (torch is recognised without importing it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from numpy.typing import DTypeLike

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ArrayOrTensor", "PathLike", "PreprocessError", "all_finite", "as_binary_labels", "as_labels_and_scores",
           "as_scores", "check_unit_range", "to_numpy"]

#: a file or folder name
PathLike = str | os.PathLike[str]
#: a numpy array or a torch tensor (any device)
ArrayOrTensor = Union[np.ndarray, "torch.Tensor"]


class PreprocessError(ValueError):
    """An input or a config that preprocessing refuses (out-of-range values, wrong shape, bad option)."""


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value of a float array is finite: a finite sum says so in one pass without a mask (any NaN
    or infinity makes the sum non-finite); only a sum that overflows checks element by element."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum(dtype=np.float64) if arr.dtype.kind == "f" else arr.sum()
    return bool(np.isfinite(total)) or bool(np.all(np.isfinite(arr)))


def check_unit_range(image: Any, what: str = "image", tol: float = 1e-4) -> None:
    """Raise :class:`PreprocessError` unless ``image`` is a non-empty float array, finite and within [0, 1].

    ``tol`` allows rounding just outside the range. The message guesses the likely mistake (0-255 or
    16-bit values, already-normalised input).
    """
    arr = np.asarray(image)
    if arr.size == 0:
        raise PreprocessError(f"{what} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise PreprocessError(
            f"{what} has integer dtype {arr.dtype}; expected floats in [0, 1] "
            "(read images with cxrbench.io.read_image, or divide by the dtype's maximum)"
        )
    if not all_finite(arr):
        raise PreprocessError(f"{what} contains NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -tol or hi > 1 + tol:
        if hi > 255 + tol:
            hint = "looks like 16-bit values; divide by 65535 or use cxrbench.io.read_image"
        elif hi > 1 + tol and lo >= -tol:
            hint = "looks like 0-255 values; divide by 255 or use cxrbench.io.read_image"
        else:
            hint = "looks already normalised; pass the [0, 1] image, Preprocess normalises it"
        raise PreprocessError(f"{what} values span [{lo:.4g}, {hi:.4g}], outside [0, 1]: {hint}")


def to_numpy(x: ArrayOrTensor, *, name: str = "array", dtype: DTypeLike | None = np.float32,
             finite: bool = False) -> np.ndarray:
    """A numpy array or torch tensor (any shape, any device) as a C-contiguous numpy array of ``dtype``.

    Tensors are detached and copied to the CPU (bfloat16, which numpy lacks, as float32); ``dtype=None``
    keeps the dtype. Raises TypeError for anything else, and ValueError naming ``name`` when ``finite`` is
    set and a value is NaN or infinite.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, recognised without importing torch
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    out = np.ascontiguousarray(x, dtype=dtype)
    if finite and not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return out


def as_binary_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    """0/1 labels of any shape as int8; ValueError naming ``name`` for NaN or any other value."""
    y = np.asarray(y_true, dtype=float)
    if np.isnan(y).any():
        raise ValueError(f"{name} contains NaN; labels must be 0 or 1 (drop unlabelled rows first)")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = np.unique(y[~np.isin(y, (0.0, 1.0))])[:5]
        raise ValueError(f"{name} must hold only 0 and 1, found e.g. {bad.tolist()}")
    return y.astype(np.int8)


def as_scores(scores: Any, shape: tuple[int, ...], name: str = "scores") -> np.ndarray:
    """Finite float64 scores of exactly ``shape`` (the labels' shape); ValueError naming ``name`` otherwise."""
    s = np.asarray(scores, dtype=float)
    if s.shape != shape:
        raise ValueError(f"{name} has shape {s.shape}, y_true has shape {shape}; they must match")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or inf")
    return s


def as_labels_and_scores(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated ``(N, F)`` int8 labels, ``(N, F)`` float64 scores, and whether the input was ``(N,)``.

    ``y_true`` is ``(N,)`` or ``(N, F)`` 0/1 with N > 0; ``scores`` has the same shape and is finite.
    """
    y = as_binary_labels(y_true)
    if y.ndim not in (1, 2) or y.shape[0] == 0:
        raise ValueError(f"y_true must be (N,) or (N, F) with N > 0, got shape {y.shape}")
    s = as_scores(scores, y.shape)
    if y.ndim == 1:
        return y[:, None], s[:, None], True
    return y, s, False

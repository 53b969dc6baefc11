"""Cutoffs of the OOD gate: an image is out of distribution when its score exceeds the threshold.

A cutoff is fitted as a percentile of in-distribution validation scores (:func:`fit_cutoff`), or is
Chester's deployed SSIM < 0.60 (:func:`chester_ssim_cutoff`). It travels in the OOD bundle's card
(:meth:`OODCutoff.to_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cxrbench.ood.scoring import SCORER_NAMES

__all__ = ["CHESTER_SSIM_CUTOFF", "OODCutoff", "chester_ssim_cutoff", "fit_cutoff"]

CHESTER_SSIM_CUTOFF = 0.60
"""Chester's deployed gate rejects an image when SSIM(x, recon) < 0.60, i.e. when the
OOD score ``1 - SSIM`` exceeds ``1 - 0.60 = 0.40`` (see :func:`chester_ssim_cutoff`)."""


@dataclass(frozen=True)
class OODCutoff:
    """A threshold on one scorer: an image is OOD when its score > ``threshold``.

    Attributes
    ----------
    scorer : str
        One of :data:`SCORER_NAMES`.
    threshold : float
        In the scorer's units (higher = more OOD; for ``"ssim"`` it is 1 - SSIM).
    method : str
        How it was chosen, e.g. "95th percentile of in-distribution validation scores".
    percentile : float or None
        The percentile used, when fitted by :func:`fit_cutoff`.
    n_reference : int or None
        How many in-distribution scores it was fitted on.
    """

    scorer: str
    threshold: float
    method: str
    percentile: float | None = None
    n_reference: int | None = None

    def __post_init__(self) -> None:
        if self.scorer not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {self.scorer!r}; choose one of {SCORER_NAMES}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")

    def is_ood(self, scores: np.ndarray | Sequence[float]) -> np.ndarray:
        """(N,) scores -> (N,) bool, True where score > threshold."""
        return np.asarray(scores, dtype=float) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for a model card)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OODCutoff:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def fit_cutoff(scores_in: np.ndarray | Sequence[float], percentile: float = 95.0, scorer: str = "ssim") -> OODCutoff:
    """Cutoff at the given percentile of in-distribution (validation) scores.

    With percentile p, about (100 - p) % of in-distribution images are rejected.
    """
    values = np.asarray(scores_in, dtype=float).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("scores_in must be a non-empty array of finite scores")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    return OODCutoff(
        scorer=scorer,
        threshold=float(np.percentile(values, percentile)),
        method=f"{percentile:g}th percentile of {values.size} in-distribution validation scores",
        percentile=float(percentile),
        n_reference=int(values.size),
    )


def chester_ssim_cutoff() -> OODCutoff:
    """Chester's deployed gate: reject when SSIM < 0.60, i.e. 1 - SSIM > 0.40."""
    return OODCutoff(
        scorer="ssim",
        threshold=1.0 - CHESTER_SSIM_CUTOFF,
        method=f"Chester deployed cutoff: reject when SSIM < {CHESTER_SSIM_CUTOFF:.2f} (1 - SSIM > "
        f"{1.0 - CHESTER_SSIM_CUTOFF:.2f})",
    )

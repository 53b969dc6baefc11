"""Cutoffs of the OOD gate: an image is out of distribution when its score exceeds the threshold.

A cutoff is fitted as a percentile of in-distribution validation scores (:func:`fit_cutoff`), or is
Chester's deployed SSIM < 0.60 (:func:`chester_ssim_cutoff`). It travels in the OOD bundle's card
(:meth:`OODCutoff.to_dict`).

A gate has two: the *near* cutoff (``ood["cutoff"]``, e.g. the 95th percentile) past which an image is not
like the training images, and the *far* cutoff (``ood["far_cutoff"]``, :func:`fit_far_cutoff`) past which
it is not a chest radiograph at all. Between the two lie chest X-rays unlike the training data (children,
other scanners): the dashboard tells them apart from shoulders and hands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cxrbench.ood.scoring import SCORER_NAMES

__all__ = ["CHESTER_SSIM_CUTOFF", "FAR_KEEP_PERCENTILE", "OODCutoff", "chester_ssim_cutoff", "fit_cutoff",
           "fit_far_cutoff"]

CHESTER_SSIM_CUTOFF = 0.60
"""Chester's deployed gate rejects an image when SSIM(x, recon) < 0.60, i.e. when the
OOD score ``1 - SSIM`` exceeds ``1 - 0.60 = 0.40`` (see :func:`chester_ssim_cutoff`)."""
FAR_KEEP_PERCENTILE = 99.0
"""The far cutoff never lies below this percentile of in-distribution validation scores: at most ~1 % of
chest X-rays like the training ones are ever called "not a chest radiograph"."""


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


def fit_far_cutoff(scores_in: np.ndarray | Sequence[float], scores_far: np.ndarray | Sequence[float] | None = None,
                   *, near: float | None = None, keep: float = FAR_KEEP_PERCENTILE, scorer: str = "ssim"
                   ) -> tuple[OODCutoff, dict[str, Any]]:
    """The far cutoff: past it an image is "not a chest radiograph", not merely "unlike the training images".

    ``scores_in``: in-distribution *validation* scores; ``scores_far``: scores of a far-OOD set (the
    non-chest radiographs), optional. The cutoff is the midpoint between the ``keep`` percentile of
    ``scores_in`` and the median of ``scores_far``, but never below that percentile (so at most
    ``100 - keep`` % of in-distribution images are called non-chest) nor below ``near``; without a far set
    it is the percentile itself. Returns the cutoff and a record for the card (the shares of each set
    beyond it).
    """
    values = np.asarray(scores_in, dtype=float).ravel()
    far = np.asarray([] if scores_far is None else scores_far, dtype=float).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(np.isfinite(far)):
        raise ValueError("scores_in must be a non-empty array of finite scores (and scores_far finite)")
    if not 50.0 <= keep <= 100.0:
        raise ValueError(f"keep must lie in [50, 100], got {keep}")
    floor = float(np.percentile(values, keep))
    threshold = max(floor, (floor + float(np.median(far))) / 2) if far.size else floor
    threshold = max(threshold, float(near)) if near is not None else threshold
    how = (f"midpoint between the {keep:g}th percentile of {values.size} in-distribution validation scores "
           f"and the median of {far.size} non-chest radiographs' scores, at least that percentile"
           if far.size else f"{keep:g}th percentile of {values.size} in-distribution validation scores "
                            "(no non-chest set to place it)")
    cutoff = OODCutoff(scorer=scorer, threshold=threshold, method=how, percentile=float(keep),
                       n_reference=int(values.size))
    record = {"in_distribution_beyond": float(np.mean(values > threshold)), "n_in_distribution": int(values.size),
              "far_set_beyond": float(np.mean(far > threshold)) if far.size else None, "n_far_set": int(far.size)}
    return cutoff, record

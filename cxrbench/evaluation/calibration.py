"""Operating points (Youden's J on the ROC curve) and the piecewise-linear calibration of Chester Eq. 1.

A finding's operating point ``opt`` is the score threshold that maximises TPR - FPR on the
**validation** split. Chester maps a raw probability ``x`` in [0, 1] to

    f_opt(x) = x / (2 opt)                    if x <= opt
             = 1 - (1 - x) / (2 (1 - opt))    otherwise,

so a calibrated 0.5 means "exactly at this finding's operating point", 0 -> 0 and 1 -> 1.
A finding with no operating point (NaN, e.g. no positives in the validation split) stays NaN
after calibration: it is never silently reported as 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from sklearn.metrics import roc_curve

from cxrbench._types import as_binary_labels, as_scores, to_numpy

__all__ = [
    "OperatingPoints",
    "calibrate",
    "fit_operating_points",
    "uncalibrate",
    "youden_operating_point",
]

ArrayT = TypeVar("ArrayT")  # calibrate returns the type it is given (numpy array or torch tensor)


def _youden(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """(threshold, tpr, fpr) at max TPR - FPR; NaNs when a class is absent."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan, math.nan, math.nan
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # thresholds[0] is +inf (nothing predicted positive, J = 0): never an operating point.
    j = tpr[1:] - fpr[1:]
    best = 1 + int(np.argmax(j))  # first maximum = highest threshold among ties
    return float(thresholds[best]), float(tpr[best]), float(fpr[best])


def youden_operating_point(y_true: Any, scores: Any) -> float:
    """Threshold that maximises Youden's J = TPR - FPR.

    Parameters
    ----------
    y_true
        ``(N,)`` labels, 0 or 1.
    scores
        ``(N,)`` float scores (probabilities in [0, 1] if the threshold will feed :func:`calibrate`).

    Returns
    -------
    float
        A value of ``scores``; a sample is positive when ``score >= threshold`` (scikit-learn's
        ROC convention). Ties in J go to the highest threshold. **NaN** when ``y_true`` has no
        positives or no negatives (J is undefined); no warning is emitted, check with ``math.isnan``.
    """
    y = as_binary_labels(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (N,), got shape {y.shape}")
    s = as_scores(scores, y.shape)
    return _youden(y, s)[0]


@dataclass
class OperatingPoints:
    """Per-finding thresholds fitted on one split.

    ``thresholds[f]`` is the raw-probability operating point of finding ``f`` (NaN if undefined);
    ``tpr``/``fpr`` are the rates there, ``n_pos``/``n_neg`` the class counts it was fitted on.
    """

    thresholds: dict[str, float]
    method: str = "youden"
    fitted_on: str = "validation"
    n_pos: dict[str, int] = field(default_factory=dict)
    n_neg: dict[str, int] = field(default_factory=dict)
    tpr: dict[str, float] = field(default_factory=dict)
    fpr: dict[str, float] = field(default_factory=dict)

    @property
    def findings(self) -> tuple[str, ...]:
        """Finding names in fitting order."""
        return tuple(self.thresholds)

    def as_array(self, findings: Sequence[str] | None = None) -> np.ndarray:
        """``(F,)`` float64 thresholds in the order of ``findings`` (default: fitting order).

        Raises ``KeyError`` naming findings that were not fitted.
        """
        findings = self.findings if findings is None else tuple(findings)
        missing = [f for f in findings if f not in self.thresholds]
        if missing:
            raise KeyError(f"no operating point for {missing}; fitted findings are {list(self.findings)}")
        return np.array([self.thresholds[f] for f in findings], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as None)."""

        def clean(d: Mapping[str, float]) -> dict[str, float | None]:
            return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
                    for k, v in d.items()}

        return {
            "method": self.method,
            "fitted_on": self.fitted_on,
            "thresholds": clean(self.thresholds),
            "tpr": clean(self.tpr),
            "fpr": clean(self.fpr),
            "n_pos": {k: int(v) for k, v in self.n_pos.items()},
            "n_neg": {k: int(v) for k, v in self.n_neg.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingPoints:
        """Inverse of :meth:`to_dict` (None read back as NaN)."""
        if "thresholds" not in data:
            raise KeyError("operating-point dict needs a 'thresholds' entry")

        def unclean(d: Mapping[str, Any] | None) -> dict[str, float]:
            return {k: (math.nan if v is None else float(v)) for k, v in (d or {}).items()}

        return cls(
            thresholds=unclean(data["thresholds"]),
            method=str(data.get("method", "youden")),
            fitted_on=str(data.get("fitted_on", "validation")),
            n_pos={k: int(v) for k, v in (data.get("n_pos") or {}).items()},
            n_neg={k: int(v) for k, v in (data.get("n_neg") or {}).items()},
            tpr=unclean(data.get("tpr")),
            fpr=unclean(data.get("fpr")),
        )


def fit_operating_points(
    y_true: Any, scores: Any, findings: Sequence[str], *, fitted_on: str = "validation"
) -> OperatingPoints:
    """Fit one Youden operating point per finding.

    Parameters
    ----------
    y_true
        ``(N, F)`` labels, 0 or 1.
    scores
        ``(N, F)`` raw probabilities in [0, 1] (sigmoid of the logits), same column order.
    findings
        ``F`` finding names, e.g. :data:`cxrbench.labels.NIH_FINDINGS`.
    fitted_on
        Name of the split (should be the validation split, never the test split).

    Findings without positives or negatives get a NaN threshold (see :func:`youden_operating_point`).
    """
    y = as_binary_labels(y_true)
    findings = tuple(findings)
    if y.ndim != 2 or y.shape[1] != len(findings):
        raise ValueError(f"y_true must be (N, F) with F = len(findings) = {len(findings)}, got {y.shape}")
    s = as_scores(scores, y.shape)
    points = OperatingPoints(thresholds={}, method="youden", fitted_on=fitted_on)
    for j, finding in enumerate(findings):
        thr, tpr, fpr = _youden(y[:, j], s[:, j])
        points.thresholds[finding] = thr
        points.tpr[finding] = tpr
        points.fpr[finding] = fpr
        points.n_pos[finding] = int(y[:, j].sum())
        points.n_neg[finding] = int(y.shape[0] - y[:, j].sum())
    return points


def _opt_array(opt: Any, findings: Sequence[str] | None) -> np.ndarray:
    if isinstance(opt, OperatingPoints):
        return opt.as_array(findings)
    if isinstance(opt, Mapping):
        if findings is None:
            raise ValueError("pass findings=... to say in which order a dict of operating points applies")
        return np.array([float(opt[f]) for f in findings], dtype=float)
    arr = np.asarray(opt, dtype=float)
    finite = arr[np.isfinite(arr)]
    if ((finite < 0) | (finite > 1)).any():
        raise ValueError(f"operating points must lie in [0, 1], got {arr}")
    return arr


def _check_probabilities(x: np.ndarray, name: str) -> None:
    finite = x[np.isfinite(x)]
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must be probabilities in [0, 1] (got range [{finite.min():.3g}, {finite.max():.3g}]); "
            "pass torch.sigmoid(logits), not logits"
        )


def _piecewise(x: Any, opt: Any, inverse: bool, findings: Sequence[str] | None) -> Any:
    opt_np = _opt_array(opt, findings)
    import torch  # a dependency; imported here so that numpy-only users of this module do not pay for it

    if isinstance(x, torch.Tensor):
        o_t = torch.as_tensor(opt_np, dtype=x.dtype if x.is_floating_point() else torch.float64, device=x.device)
        out = _piecewise(to_numpy(x, dtype=np.float64), to_numpy(o_t, dtype=np.float64), inverse, None)
        return torch.as_tensor(out, dtype=o_t.dtype, device=x.device)
    x_np = np.asarray(x, dtype=float)
    _check_probabilities(x_np, "calibrated values" if inverse else "x")
    o = np.broadcast_to(opt_np, np.broadcast_shapes(x_np.shape, opt_np.shape))
    x_np = np.clip(x_np, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if not inverse:
            low = np.where(o > 0, x_np / (2 * o), 0.0)
            high = np.where(o < 1, 1 - (1 - x_np) / (2 * (1 - o)), 1.0)
            out = np.where(x_np <= o, low, high)
        else:
            out = np.where(x_np <= 0.5, 2 * o * x_np, 1 - 2 * (1 - o) * (1 - x_np))
    out = np.clip(out, 0.0, 1.0)
    out[np.isnan(o) | np.isnan(np.broadcast_to(x_np, out.shape))] = np.nan
    return out


def calibrate(p: ArrayT, opt: Any, findings: Sequence[str] | None = None) -> ArrayT:
    """Chester Eq. 1: map raw probabilities so each finding's operating point lands on 0.5.

    Parameters
    ----------
    p
        Raw probabilities in [0, 1], numpy array or torch tensor, shape ``(..., F)`` (or any shape
        broadcastable with ``opt``).
    opt
        Operating points: an :class:`OperatingPoints`, a ``{finding: threshold}`` dict (then give
        ``findings``), an ``(F,)`` array or a scalar, in [0, 1]; NaN allowed.
    findings
        Column order of ``p`` when ``opt`` is an ``OperatingPoints`` or a dict.

    Returns
    -------
    Same type as ``p`` (torch: same device; numpy: float64), values in [0, 1], monotone in ``p``;
    NaN wherever ``opt`` or ``p`` is NaN. Raises ``ValueError`` if ``p`` leaves [0, 1] (logits?).
    No gradient flows through the torch path (it is for reporting, not training).
    """
    return _piecewise(p, opt, inverse=False, findings=findings)


def uncalibrate(q: ArrayT, opt: Any, findings: Sequence[str] | None = None) -> ArrayT:
    """Inverse of :func:`calibrate`: calibrated values ``q`` in [0, 1] -> raw probabilities.

    ``q <= 0.5`` -> ``2 opt q``; otherwise ``1 - 2 (1 - opt)(1 - q)``. Same arguments and types.
    """
    return _piecewise(q, opt, inverse=True, findings=findings)

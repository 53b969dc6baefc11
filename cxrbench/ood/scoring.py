"""Out-of-distribution (OOD) scoring for the Chester gate: scorers, error maps, cutoffs, metrics.

Convention: for every scorer a HIGHER score means MORE out-of-distribution.

- ``"l1"``: mean absolute reconstruction error per image, in [0, 1].
- ``"l2"``: mean squared reconstruction error per image (MSE, not RMSE), in [0, 1].
- ``"ssim"``: ``1 - SSIM(x, recon)``, in [0, 2] (SSIM can be negative); the raw SSIM
  is returned as ``"ssim_raw"``. SSIM is pytorch-msssim's, with ``data_range=1.0``,
  an 11-px Gaussian window (sigma 1.5) and the channel count taken from the (B, 1, H, W)
  tensor. MS-SSIM needs more than 160 px per side and cannot run at Chester's 64 px.
- ``"latent"``: Euclidean norm of the latent mean, ||mu(x)||_2, the distance to the
  centre of the ALI prior N(0, I) (for a plain autoencoder the code is not centred,
  so this score means less).

Models are scored through a small protocol (see :class:`OODModel`): ``latent_mean(x)``,
``reconstruct(x)``, ``latent_dim``, ``image_size``; both :class:`cxrbench.models.ali.ALI`
and :class:`cxrbench.models.autoencoder.ConvAutoencoder` follow it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from pytorch_msssim import ms_ssim, ssim
from skimage.metrics import structural_similarity
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cxrbench.models.autoencoder import check_image_batch

SCORER_NAMES: tuple[str, ...] = ("l1", "l2", "ssim", "latent")
CORRUPTIONS: tuple[str, ...] = ("rot90", "rot180", "invert", "noise")
SSIM_WIN_SIZE = 11
CHESTER_SSIM_CUTOFF = 0.60
"""Chester's deployed gate rejects an image when SSIM(x, recon) < 0.60, i.e. when the
OOD score ``1 - SSIM`` exceeds ``1 - 0.60 = 0.40`` (see :func:`chester_ssim_cutoff`)."""


@runtime_checkable
class OODModel(Protocol):
    """What the scorers need from a reconstruction model."""

    latent_dim: int
    image_size: int

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, Z)."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, 1, S, S) in [0, 1]."""


def structural_similarity_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kind: Literal["ssim", "ms-ssim"] = "ssim",
    win_size: int = SSIM_WIN_SIZE,
) -> torch.Tensor:
    """Per-image SSIM (or MS-SSIM) of two (B, C, H, W) batches in [0, 1] -> (B,).

    Always ``data_range=1.0``; ``win_size`` is passed explicitly. MS-SSIM downsamples
    four times, so it needs ``min(H, W) > (win_size - 1) * 16`` (160 px for an 11-px
    window) and raises a ValueError below that.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if win_size % 2 != 1 or win_size > min(x.shape[-2:]):
        raise ValueError(f"win_size must be odd and at most the image side {min(x.shape[-2:])}, got {win_size}")
    if kind == "ssim":
        return ssim(x, y, data_range=1.0, size_average=False, win_size=win_size)
    if kind == "ms-ssim":
        needed = (win_size - 1) * 2**4
        if min(x.shape[-2:]) <= needed:
            raise ValueError(
                f"MS-SSIM with win_size={win_size} needs images larger than {needed} px per side, got "
                f"{tuple(x.shape[-2:])}; at Chester's 64 px use kind='ssim'"
            )
        return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=win_size)
    raise ValueError(f"unknown similarity {kind!r}; choose 'ssim' or 'ms-ssim'")


def reconstruction_scores(x: torch.Tensor, recon: torch.Tensor) -> dict[str, np.ndarray]:
    """Reconstruction-based scores of (B, 1, H, W) images in [0, 1] against their reconstructions.

    Returns
    -------
    dict of str to np.ndarray
        ``"l1"`` (mean |x - recon|), ``"l2"`` (mean squared error), ``"ssim"`` (1 - SSIM)
        and ``"ssim_raw"`` (SSIM), each (B,) float64.
    """
    check_image_batch(x, x.shape[-1])
    check_image_batch(recon, x.shape[-1])
    with torch.no_grad():
        diff = (x - recon).flatten(1)
        similarity = structural_similarity_batch(x.float(), recon.float())
        return {
            "l1": diff.abs().mean(1).double().cpu().numpy(),
            "l2": diff.pow(2).mean(1).double().cpu().numpy(),
            "ssim": (1.0 - similarity).double().cpu().numpy(),
            "ssim_raw": similarity.double().cpu().numpy(),
        }


def score_batch(model: OODModel, x: torch.Tensor) -> dict[str, np.ndarray]:
    """All OOD scores of one (B, 1, 64, 64) batch in [0, 1]; higher = more OOD.

    The model is put in eval mode. Returns ``"l1"``, ``"l2"``, ``"ssim"`` (1 - SSIM),
    ``"ssim_raw"`` and ``"latent"`` (||mu||_2), each a (B,) float64 array.
    """
    if not isinstance(model, OODModel):
        raise TypeError(f"{type(model).__name__} lacks latent_mean/reconstruct/latent_dim/image_size")
    check_image_batch(x, model.image_size)
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad():
        recon = model.reconstruct(x)
        scores = reconstruction_scores(x, recon)
        scores["latent"] = torch.linalg.vector_norm(model.latent_mean(x), dim=1).double().cpu().numpy()
    return scores


def score_batches(
    model: OODModel, batches: Iterable[torch.Tensor], device: torch.device | str | None = None
) -> dict[str, np.ndarray]:
    """:func:`score_batch` over an iterable of (B, 1, 64, 64) batches, concatenated to (N,) arrays.

    A batch may also be a (images, ...) tuple/list from a DataLoader; its first item is used.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if device is not None:
            images = images.to(device)
        for name, values in score_batch(model, images).items():
            parts.setdefault(name, []).append(values)
    if not parts:
        raise ValueError("no batches to score")
    return {name: np.concatenate(values) for name, values in parts.items()}


def error_map(x: torch.Tensor, recon: torch.Tensor, kind: Literal["l1", "l2", "ssim"] = "l1") -> torch.Tensor:
    """Per-pixel reconstruction error of (B, 1, H, W) batches in [0, 1] -> (B, 1, H, W).

    ``"l1"``: |x - recon|; ``"l2"``: (x - recon)^2; ``"ssim"``: 1 - the local SSIM map
    (scikit-image, Gaussian window sigma 1.5, data_range 1, population covariance, as in
    Wang et al. 2004), in [0, 2].
    """
    check_image_batch(x, x.shape[-1])
    if recon.shape != x.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} differs from image shape {tuple(x.shape)}")
    with torch.no_grad():
        if kind == "l1":
            return (x - recon).abs()
        if kind == "l2":
            return (x - recon).pow(2)
        if kind == "ssim":
            maps = []
            for a, b in zip(x[:, 0].double().cpu().numpy(), recon[:, 0].double().cpu().numpy()):
                _, local = structural_similarity(
                    a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
                )
                maps.append(1.0 - local)
            return torch.as_tensor(np.stack(maps)[:, None], dtype=x.dtype, device=x.device)
    raise ValueError(f"unknown error map kind {kind!r}; choose 'l1', 'l2' or 'ssim'")


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


def ood_metrics(scores_in: np.ndarray | Sequence[float], scores_out: np.ndarray | Sequence[float]) -> dict[str, float]:
    """Separation of in-distribution and OOD scores (positive class = OOD; higher = more OOD).

    Returns
    -------
    dict of str to float
        ``auroc``; ``aupr_out`` (average precision with OOD positive); ``fpr_at_95_tpr``
        (fraction of in-distribution images rejected at the loosest cutoff that still
        rejects >= 95 % of OOD images); ``n_in``, ``n_out``.
    """
    s_in, s_out = np.asarray(scores_in, dtype=float).ravel(), np.asarray(scores_out, dtype=float).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"need scores of both groups, got {s_in.size} in-distribution and {s_out.size} OOD")
    if not (np.all(np.isfinite(s_in)) and np.all(np.isfinite(s_out))):
        raise ValueError("scores must be finite")
    y = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
    s = np.concatenate([s_in, s_out])
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_out": float(average_precision_score(y, s)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        "n_in": float(s_in.size),
        "n_out": float(s_out.size),
    }


def _per_finding_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """(N, F) labels and scores -> (F,) ROC AUC, NaN where a finding lacks a class."""
    aucs = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        if 0 < y_true[:, j].sum() < y_true.shape[0]:
            aucs[j] = roc_auc_score(y_true[:, j], y_score[:, j])
    return aucs


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if np.any(np.isfinite(values)) else float("nan")


def cutoff_tradeoff(
    ood_scores: np.ndarray | Sequence[float],
    y_true: np.ndarray,
    y_score: np.ndarray,
    cutoffs: np.ndarray | Sequence[float],
    *,
    finding_names: Sequence[str] | None = None,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Classifier AUC on the images an OOD gate keeps, for each cutoff (Chester Fig. 6).

    Parameters
    ----------
    ood_scores : (N,) float
        OOD scores (higher = more OOD); an image is kept when its score <= cutoff.
    y_true : (N, F) or (N,) {0, 1}
        Finding labels.
    y_score : (N, F) or (N,) float
        Classifier scores.
    cutoffs : (K,) float
        Cutoffs in the score's units; rows follow this order.
    finding_names : sequence of str, optional
        Column suffixes (default ``f0``, ``f1``, ...).
    n_bootstrap : int
        If > 0, adds a percentile bootstrap CI of the macro AUC over retained images.
    ci : float
        Coverage of that interval.
    seed : int
        Bootstrap seed.

    Returns
    -------
    pandas.DataFrame
        One row per cutoff: ``cutoff``, ``n_retained``, ``retained_fraction``, ``auc_macro``
        (mean over findings with both classes), ``auc_<finding>`` (NaN when a class is
        missing among retained images), and ``auc_macro_ci_low`` / ``auc_macro_ci_high``.
    """
    scores = np.asarray(ood_scores, dtype=float).ravel()
    labels, preds = np.asarray(y_true), np.asarray(y_score, dtype=float)
    labels = labels[:, None] if labels.ndim == 1 else labels
    preds = preds[:, None] if preds.ndim == 1 else preds
    if labels.shape != preds.shape or labels.shape[0] != scores.size:
        raise ValueError(f"shape mismatch: ood_scores {scores.shape}, y_true {labels.shape}, y_score {preds.shape}")
    names = list(finding_names) if finding_names is not None else [f"f{j}" for j in range(labels.shape[1])]
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} finding names for {labels.shape[1]} label columns")
    rng = np.random.default_rng(seed)
    rows = []
    for cutoff in np.asarray(cutoffs, dtype=float).ravel():
        keep = scores <= cutoff
        y_k, s_k = labels[keep], preds[keep]
        aucs = _per_finding_auc(y_k, s_k) if keep.any() else np.full(len(names), np.nan)
        row: dict[str, float] = {
            "cutoff": float(cutoff),
            "n_retained": int(keep.sum()),
            "retained_fraction": float(keep.mean()) if scores.size else float("nan"),
            "auc_macro": _nanmean(aucs),
        }
        row.update({f"auc_{name}": float(a) for name, a in zip(names, aucs)})
        if n_bootstrap > 0:
            boot = []
            for _ in range(n_bootstrap if keep.any() else 0):
                idx = rng.integers(0, y_k.shape[0], y_k.shape[0])
                boot.append(_nanmean(_per_finding_auc(y_k[idx], s_k[idx])))
            boot_arr = np.asarray(boot, dtype=float)
            boot_arr = boot_arr[np.isfinite(boot_arr)]
            alpha = (1.0 - ci) / 2.0
            row["auc_macro_ci_low"] = float(np.quantile(boot_arr, alpha)) if boot_arr.size else float("nan")
            row["auc_macro_ci_high"] = float(np.quantile(boot_arr, 1 - alpha)) if boot_arr.size else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def corrupt(
    x: torch.Tensor,
    kind: Literal["rot90", "rot180", "invert", "noise"],
    *,
    noise_sigma: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupted copy of a (B, C, H, W) batch in [0, 1] for OOD evaluation.

    ``"rot90"`` / ``"rot180"``: rotation in the image plane (rot90 needs H == W to keep the
    shape); ``"invert"``: 1 - x; ``"noise"``: x + N(0, noise_sigma^2), clipped to [0, 1].
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if kind == "rot90":
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"rot90 needs square images, got {tuple(x.shape[-2:])}")
        return torch.rot90(x, 1, dims=(-2, -1))
    if kind == "rot180":
        return torch.rot90(x, 2, dims=(-2, -1))
    if kind == "invert":
        return 1.0 - x
    if kind == "noise":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + noise_sigma * noise).clamp(0.0, 1.0)
    raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")

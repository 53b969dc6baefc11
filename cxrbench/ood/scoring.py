"""Out-of-distribution (OOD) scoring for the Chester gate: scorers, error maps, scores of sets and files.

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
and :class:`cxrbench.models.autoencoder.ConvAutoencoder` follow it. Image files are read and
preprocessed for scoring in one place (:func:`score_files`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from pytorch_msssim import ms_ssim, ssim
from skimage.metrics import structural_similarity

from cxrbench._types import PathLike, to_numpy
from cxrbench.io import ImageReadError, read_image
from cxrbench.models.autoencoder import check_image_batch
from cxrbench.ood.guard import ImageGuard
from cxrbench.preprocess import Preprocess

if TYPE_CHECKING:  # pragma: no cover
    from cxrbench.models.bundle import Bundle

__all__ = ["OOD_PREPROCESS", "SCORER_NAMES", "SSIM_WIN_SIZE", "OODModel", "as_ood_model", "error_map",
           "reconstruction_scores", "score_batch", "score_batches", "score_files", "score_images", "score_sets",
           "score_with_reconstruction",
           "structural_similarity_batch"]

SCORER_NAMES: tuple[str, ...] = ("l1", "l2", "ssim", "latent")
SSIM_WIN_SIZE = 11
#: the OOD models' input: 64 px, values in [0, 1]
OOD_PREPROCESS = Preprocess(size=64, normalize="zero_one")


@runtime_checkable
class OODModel(Protocol):
    """What the scorers need from a reconstruction model."""

    latent_dim: int
    image_size: int

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, Z)."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, 1, S, S) in [0, 1]."""


def as_ood_model(model: Any) -> OODModel:
    """``model`` (an OOD bundle's ALI or autoencoder) as an :class:`OODModel`; TypeError for anything else."""
    if not isinstance(model, OODModel):
        raise TypeError(f"{type(model).__name__} lacks latent_mean/reconstruct/latent_dim/image_size")
    return model


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
            "l1": to_numpy(diff.abs().mean(1), dtype=np.float64),
            "l2": to_numpy(diff.pow(2).mean(1), dtype=np.float64),
            "ssim": to_numpy(1.0 - similarity, dtype=np.float64),
            "ssim_raw": to_numpy(similarity, dtype=np.float64),
        }


def score_batch(model: OODModel, x: torch.Tensor) -> dict[str, np.ndarray]:
    """All OOD scores of one (B, 1, 64, 64) batch in [0, 1]; higher = more OOD.

    The model is put in eval mode. Returns ``"l1"``, ``"l2"``, ``"ssim"`` (1 - SSIM),
    ``"ssim_raw"`` and ``"latent"`` (||mu||_2), each a (B,) float64 array.
    """
    return score_with_reconstruction(model, x)[0]


def score_with_reconstruction(model: OODModel, x: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """:func:`score_batch`'s scores and the (B, 1, 64, 64) reconstruction they were computed from.

    A model with ``reconstruct_with_latent(x) -> (reconstruction, latent mean)`` (ALI, the autoencoder) is
    encoded once; any other :class:`OODModel` by ``reconstruct`` and ``latent_mean``.
    """
    model = as_ood_model(model)
    check_image_batch(x, model.image_size)
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad():
        both = getattr(model, "reconstruct_with_latent", None)
        recon, mu = both(x) if callable(both) else (model.reconstruct(x), model.latent_mean(x))
        scores = reconstruction_scores(x, recon)
        scores["latent"] = to_numpy(torch.linalg.vector_norm(mu, dim=1), dtype=np.float64)
    return scores, recon


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
            for a, b in zip(to_numpy(x[:, 0], dtype=np.float64), to_numpy(recon[:, 0], dtype=np.float64)):
                _, local = structural_similarity(
                    a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
                )
                maps.append(1.0 - local)
            return torch.as_tensor(np.stack(maps)[:, None], dtype=x.dtype, device=x.device)
    raise ValueError(f"unknown error map kind {kind!r}; choose 'l1', 'l2' or 'ssim'")


def score_sets(model: OODModel, sets: dict[str, torch.Tensor], *,
               batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Every scorer on every set of ``(N, 1, 64, 64)`` images: ``set -> scorer -> (N,) float64``."""
    out = {}
    for name, x in sets.items():
        parts = [score_batch(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        out[name] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return out


def score_images(model: OODModel, images: Sequence[np.ndarray], *, preprocess: Preprocess = OOD_PREPROCESS,
                 batch_size: int = 64) -> dict[str, np.ndarray]:
    """OOD scores of ``(H, W)`` grey images in [0, 1] (any size; cropped and resized by ``preprocess``)."""
    x = torch.as_tensor(np.stack([preprocess(img) for img in images]))
    return score_sets(model, {"x": x}, batch_size=batch_size)["x"]


def score_files(bundle: Bundle, files: Sequence[PathLike], *, batch_size: int = 64,
                min_side: int | None = None) -> pd.DataFrame:
    """The ``ood-score`` table of image files under an OOD bundle.

    Columns: ``file``, ``l1``, ``l2``, ``ssim`` (1 - SSIM), ``latent``, ``score`` (the bundle's scorer),
    ``is_ood``, ``check`` and ``reason`` (why it is OOD: ``"size"`` / ``"information"`` from the blank-image
    guard of the card, :mod:`cxrbench.ood.guard`, whose images are not scored; ``"reconstruction"`` when the
    score exceeds the cutoff), ``error`` (why a file could not be read; its scores are NaN). ``min_side``
    replaces the guard's minimum short side.
    """
    cutoff = bundle.card.ood.get("cutoff", {})
    scorer, threshold = cutoff.get("scorer", "ssim"), float(cutoff.get("threshold", np.inf))
    guard = ImageGuard.from_dict(bundle.card.ood.get("guard"))
    guard = guard if min_side is None else replace(guard, min_side=int(min_side))
    rows: list[dict[str, Any]] = [{"file": str(f), "check": "", "reason": "", "error": ""} for f in files]
    good: list[int] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if good:
            scores = score_batch(as_ood_model(bundle.model), torch.as_tensor(np.stack(pixels)))
            for k, pos in enumerate(good):
                rows[pos].update({name: float(scores[name][k]) for name in SCORER_NAMES})
                if scores[scorer][k] > threshold:
                    rows[pos].update(check="reconstruction", reason=f"reconstruction error ({scorer} score "
                                     f"{scores[scorer][k]:.3f} > cutoff {threshold:.3f})")
            good.clear()
            pixels.clear()

    for pos, f in enumerate(files):
        try:
            image = read_image(f).pixels
            verdict = guard.check(image)
            if verdict.passed:
                pixels.append(bundle.preprocess(image))
                good.append(pos)
            else:
                rows[pos].update(check=verdict.check, reason=verdict.reason)
        except (ImageReadError, ValueError) as exc:
            rows[pos]["error"] = exc.reason if isinstance(exc, ImageReadError) else f"{Path(f).name}: {exc}"
        if len(good) >= batch_size:
            flush()
    flush()
    table = pd.DataFrame(rows, columns=["file", *SCORER_NAMES, "check", "reason", "error"])
    table["score"] = table[scorer]
    table["is_ood"] = [True if c else (bool(v > threshold) if np.isfinite(v) else None)
                       for c, v in zip(table["check"], table["score"])]
    return table[["file", "l1", "l2", "ssim", "latent", "score", "is_ood", "check", "reason", "error"]]

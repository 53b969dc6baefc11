"""Evaluating the OOD gate: evaluation sets, the AUROC table, and the cutoff-vs-AUC trade-off (Chester Fig. 6).

Every evaluation set is a ``(N, 1, 64, 64)`` float32 tensor in [0, 1], the OOD models' input:

- ``non-chest``: the 70 non-chest radiographs of the dev data (shoulders, wrists, limbs);
- ``digits``: scikit-learn's 8x8 handwritten digits, upsampled (bilinear), white ink on black as given;
- ``photographs``: random square crops of scikit-image's sample photographs, in grey;
- ``paediatric``: the 450 paediatric CXRs (near-distribution: chests, but children's, other devices);
- ``rot90``, ``rot180``, ``invert``, ``noise``: held-out in-distribution CXRs, corrupted
  (:func:`cxrbench.ood.scoring.corrupt`).

Scores follow :mod:`cxrbench.ood.scoring`: higher = more OOD; ``ssim`` is 1 - SSIM.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxrbench.data import CXRDataset, load_manifest, load_split
from cxrbench.evaluation.metrics import weighted_auc
from cxrbench.io import ImageReadError, read_image
from cxrbench.models.bundle import Bundle, ModelCard
from cxrbench.ood.scoring import (
    CORRUPTIONS,
    SCORER_NAMES,
    OODModel,
    corrupt,
    cutoff_tradeoff,
    error_map,
    ood_metrics,
    score_batch,
)
from cxrbench.preprocess import Preprocess

__all__ = ["OOD_PREPROCESS", "PHOTOGRAPHS", "corrupted_sets", "classifier_probabilities", "dev_data_folders",
           "digits_set", "evaluation_sets", "images_of", "load_images", "ood_auroc_table", "photo_set",
           "plot_reconstructions", "plot_rotation", "plot_score_distributions", "plot_tradeoff", "plot_training_curves",
           "rotate_images", "rotation_tradeoff", "score_files", "score_images", "score_sets", "shifted_set_tradeoff",
           "skill_warning", "split_rows", "tradeoff_sweep", "unseen_rows"]

OOD_PREPROCESS = Preprocess(size=64, normalize="zero_one")
#: scikit-image sample photographs shipped with the package (no download).
PHOTOGRAPHS: tuple[str, ...] = ("astronaut", "camera", "cat", "coffee", "coins", "moon", "rocket", "grass", "gravel",
                                "brick", "page", "text", "immunohistochemistry", "cell", "clock", "hubble_deep_field")


# ----------------------------------------------------------------------------------------- data
def dev_data_folders(root: str | os.PathLike) -> dict[str, Path | None]:
    """Folders of a data root: ``nih`` (in-distribution), ``nonchest``, ``pediatric`` (None where absent).

    For the shared dev data (a folder holding ``cxr/``) these are ``cxr/nih`` etc.; any other root is
    taken as the in-distribution set itself, without the OOD folders.
    """
    root = Path(root)
    if (root / "cxr" / "nih").is_dir():
        cxr = root / "cxr"
        return {name: (cxr / name if (cxr / name).is_dir() else None) for name in ("nih", "nonchest", "pediatric")}
    return {"nih": root, "nonchest": None, "pediatric": None}


def split_rows(manifest: pd.DataFrame, split_file: str | os.PathLike, name: str = "test") -> pd.DataFrame:
    """The rows of ``manifest`` in split ``name`` of a saved split CSV (e.g. an OOD run's held-out ``test``)."""
    s = load_split(split_file, manifest)
    rows = manifest[(s == name).to_numpy()].reset_index(drop=True)
    rows.attrs = dict(manifest.attrs)
    return rows


def load_images(source: str | os.PathLike | pd.DataFrame, *, preprocess: Preprocess = OOD_PREPROCESS,
                cache_dir: str | os.PathLike | None = "auto") -> tuple[torch.Tensor, pd.DataFrame]:
    """Images of a data folder or manifest as ``(N, C, S, S)`` float32 (``(N, 1, 64, 64)`` in [0, 1] by default).

    Files are read with :func:`cxrbench.io.read_image` through the uint8 cache; unreadable ones are
    dropped with a warning. Returns the tensor and the manifest rows it holds, in order.
    """
    manifest = source if isinstance(source, pd.DataFrame) else load_manifest(source, on_missing="drop")
    ds = CXRDataset(manifest, preprocess, label_columns=[], cache_dir=cache_dir)
    report = ds.build_cache()
    if report.n_failed:
        warnings.warn(report.summary(), stacklevel=2)
    ds = ds.readable()
    if len(ds) == 0:
        return torch.zeros(0, preprocess.channels, preprocess.size, preprocess.size), ds.manifest
    return torch.stack([ds[i][0] for i in range(len(ds))]), ds.manifest


def digits_set(n: int | None = None, *, size: int = 64, seed: int = 0) -> torch.Tensor:
    """scikit-learn's handwritten digits (8x8, 0-16) as ``(n, 1, size, size)`` in [0, 1]; all 1,797 if n is None."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    if n is not None:
        images = images[torch.as_tensor(np.random.default_rng(seed).permutation(len(images))[:n])]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def photo_set(crops_per_image: int = 8, *, size: int = 64, seed: int = 0,
              names: Sequence[str] = PHOTOGRAPHS) -> torch.Tensor:
    """Random square crops (side 40-100 % of the short side) of scikit-image photographs, grey, resized.

    Returns ``(len(names) * crops_per_image, 1, size, size)`` float32 in [0, 1].
    """
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.transform import resize
    from skimage.util import img_as_float

    rng = np.random.default_rng(seed)
    crops = []
    for name in names:
        img = img_as_float(getattr(skimage.data, name)())
        if img.ndim == 3:
            img = rgb2gray(rgba2rgb(img) if img.shape[-1] == 4 else img)
        h, w = img.shape
        for _ in range(crops_per_image):
            side = int(rng.uniform(0.4, 1.0) * min(h, w))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = resize(img[top:top + side, left:left + side], (size, size), anti_aliasing=True)
            crops.append(np.clip(crop, 0.0, 1.0))
    return torch.as_tensor(np.stack(crops)[:, None], dtype=torch.float32)


def corrupted_sets(x: torch.Tensor, kinds: Sequence[str] = CORRUPTIONS, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Corrupted copies of in-distribution images ``(N, 1, S, S)`` in [0, 1]: kind -> tensor of the same shape."""
    g = torch.Generator().manual_seed(seed)
    return {kind: corrupt(x, kind, generator=g) for kind in kinds}  # type: ignore[arg-type]


def evaluation_sets(data_root: str | os.PathLike | None, held_out: torch.Tensor, *, n_digits: int | None = 500,
                    crops_per_photo: int = 8, seed: int = 0,
                    cache_dir: str | os.PathLike | None = "auto") -> dict[str, torch.Tensor]:
    """All OOD evaluation sets (see module doc), ``name -> (N, 1, 64, 64)`` in [0, 1].

    ``held_out`` are in-distribution images not used in training (they are corrupted). Sets whose
    folders are absent from ``data_root`` are left out with a warning.
    """
    folders = dev_data_folders(data_root) if data_root else {"nonchest": None, "pediatric": None}

    def folder_set(key: str, name: str) -> dict[str, torch.Tensor]:
        if folders.get(key) is None:
            warnings.warn(f"no {key} folder under {data_root}; the '{name}' set is left out", stacklevel=3)
            return {}
        return {name: load_images(folders[key], cache_dir=cache_dir)[0]}

    return {**folder_set("nonchest", "non-chest"), "digits": digits_set(n_digits, seed=seed),
            "photographs": photo_set(crops_per_photo, seed=seed), **folder_set("pediatric", "paediatric"),
            **corrupted_sets(held_out, seed=seed)}


# ----------------------------------------------------------------------------------------- scores
def score_sets(model: OODModel, sets: dict[str, torch.Tensor], *,
               batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Every scorer on every set: ``set -> scorer -> (N,) float64`` (higher = more OOD)."""
    out = {}
    for name, x in sets.items():
        parts = [score_batch(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        out[name] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return out


def ood_auroc_table(model: OODModel | None, in_dist_x: torch.Tensor | dict[str, np.ndarray],
                    sets: dict[str, torch.Tensor] | dict[str, dict[str, np.ndarray]],
                    scorers: Sequence[str] = SCORER_NAMES, *, batch_size: int = 64) -> pd.DataFrame:
    """AUROC, FPR at 95 % TPR and AUPR (OOD positive) per OOD set and scorer.

    ``in_dist_x`` and ``sets`` are images (scored with ``model``) or already-computed scores from
    :func:`score_sets` (then ``model`` may be None). Returns one row per set x scorer: ``set``,
    ``scorer``, ``auroc``, ``fpr_at_95_tpr``, ``aupr_out``, ``n_in``, ``n_out``.
    """
    def scored(x: Any, name: str) -> dict[str, np.ndarray]:
        if isinstance(x, dict):
            return x
        if model is None:
            raise TypeError(f"'{name}' holds images but no model was given to score them")
        return score_sets(model, {name: x}, batch_size=batch_size)[name]

    s_in = scored(in_dist_x, "in-distribution")
    rows = []
    for name, x in sets.items():
        s_out = scored(x, name)
        for scorer in scorers:
            m = ood_metrics(s_in[scorer], s_out[scorer])
            rows.append({"set": name, "scorer": scorer, "auroc": m["auroc"], "fpr_at_95_tpr": m["fpr_at_95_tpr"],
                         "aupr_out": m["aupr_out"], "n_in": int(m["n_in"]), "n_out": int(m["n_out"])})
    return pd.DataFrame(rows)


def score_images(model: OODModel, images: Sequence[np.ndarray], *, preprocess: Preprocess = OOD_PREPROCESS,
                 batch_size: int = 64) -> dict[str, np.ndarray]:
    """OOD scores of ``(H, W)`` grey images in [0, 1] (any size; cropped and resized by ``preprocess``)."""
    x = torch.as_tensor(np.stack([preprocess(img) for img in images]))
    return score_sets(model, {"x": x}, batch_size=batch_size)["x"]


def score_files(bundle: Bundle, files: Sequence[str | os.PathLike], *, batch_size: int = 64) -> pd.DataFrame:
    """The ``ood-score`` table of image files under an OOD bundle.

    Columns: ``file``, ``l1``, ``l2``, ``ssim`` (1 - SSIM), ``latent``, ``score`` (the bundle's scorer),
    ``is_ood`` (score > the bundle's cutoff), ``error`` (why a file could not be scored; its scores are NaN).
    """
    cutoff = bundle.card.ood.get("cutoff", {})
    scorer, threshold = cutoff.get("scorer", "ssim"), float(cutoff.get("threshold", np.inf))
    rows: list[dict[str, Any]] = [{"file": str(f), "error": ""} for f in files]
    good: list[int] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if good:
            scores = score_batch(bundle.model, torch.as_tensor(np.stack(pixels)))
            for k, pos in enumerate(good):
                rows[pos].update({name: float(scores[name][k]) for name in SCORER_NAMES})
            good.clear()
            pixels.clear()

    for pos, f in enumerate(files):
        try:
            pixels.append(bundle.preprocess(read_image(f).pixels))
            good.append(pos)
        except (ImageReadError, ValueError) as exc:
            rows[pos]["error"] = exc.reason if isinstance(exc, ImageReadError) else f"{Path(f).name}: {exc}"
        if len(good) >= batch_size:
            flush()
    flush()
    table = pd.DataFrame(rows, columns=["file", *SCORER_NAMES, "error"])
    table["score"] = table[scorer]
    table["is_ood"] = [bool(v > threshold) if np.isfinite(v) else None for v in table["score"]]
    return table[["file", "l1", "l2", "ssim", "latent", "score", "is_ood", "error"]]


# ----------------------------------------------------------------------------------------- trade-off
def images_of(manifest: pd.DataFrame) -> list[np.ndarray]:
    """The ``(H, W)`` float32 [0, 1] pixels of every manifest row (read with :func:`cxrbench.io.read_image`)."""
    return [read_image(p).pixels for p in manifest["path"]]


def rotate_images(images: Sequence[np.ndarray], angle: float) -> list[np.ndarray]:
    """Images rotated anticlockwise by ``angle`` degrees about their centre, same size, black corners."""
    from skimage.transform import rotate

    if angle % 360 == 0:
        return [np.asarray(img, dtype=np.float32) for img in images]
    return [np.clip(rotate(img, angle, resize=False, mode="constant", cval=0.0, order=1), 0, 1)
            .astype(np.float32) for img in images]


@torch.no_grad()
def classifier_probabilities(bundle: Bundle, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
    """Raw sigmoid outputs ``(N, F)`` float64 of a classifier bundle on ``(H, W)`` [0, 1] images."""
    bundle.model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(np.stack([bundle.preprocess(img) for img in images[i:i + batch_size]]))
        out.append(torch.sigmoid(bundle.model(x).float()).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(bundle.labels)))


def tradeoff_sweep(ood_scores: np.ndarray, y_true: np.ndarray, y_score: np.ndarray, *,
                   bundle_cutoff: float | None = None, finding_names: Sequence[str] | None = None,
                   n_points: int = 19, min_retained: float = 0.1, n_bootstrap: int = 200,
                   seed: int = 0) -> pd.DataFrame:
    """AUC of the retained images as the cutoff tightens (:func:`cxrbench.ood.scoring.cutoff_tradeoff`).

    Cutoffs are the score quantiles that retain ``min_retained`` .. 100 % of the images in
    ``n_points`` steps, plus ``bundle_cutoff``; a boolean column ``bundle_cutoff`` marks its row.
    ``auc_macro_ci_low`` / ``_high``: 95 % percentile bootstrap of the macro AUC over the retained
    images (the same resampling as ``cutoff_tradeoff``, vectorised with :func:`cxrbench.evaluation.metrics.weighted_auc`).
    """
    scores = np.asarray(ood_scores, dtype=float)
    cuts = list(np.quantile(scores, np.linspace(min_retained, 1.0, n_points)))
    if bundle_cutoff is not None:
        cuts.append(float(bundle_cutoff))
    table = cutoff_tradeoff(scores, y_true, y_score, np.unique(cuts), finding_names=finding_names)
    if n_bootstrap > 0:
        y, p = (np.asarray(a, dtype=float).reshape(len(scores), -1) for a in (y_true, y_score))
        rng = np.random.default_rng(seed)
        ci = [_macro_auc_ci(y[scores <= c], p[scores <= c], n_bootstrap, rng) for c in table["cutoff"]]
        table["auc_macro_ci_low"], table["auc_macro_ci_high"] = zip(*ci)
    table["bundle_cutoff"] = np.isclose(table["cutoff"], bundle_cutoff) if bundle_cutoff is not None else False
    return table


def skill_warning(table: pd.DataFrame) -> str | None:
    """A warning when the classifier has no skill on the swept images, else None.

    Chester's Fig. 6 reads the AUC of what the gate keeps; if the AUC on *all* images is at or below
    chance (or its bootstrap CI reaches 0.5), the curve shows noise or the classifier's failure on
    this data, not what the gate buys. ``table`` is a :func:`tradeoff_sweep` result.
    """
    full = table.loc[table["retained_fraction"].idxmax()]
    auc = float(full["auc_macro"])
    if not np.isfinite(auc):
        return None
    low = float(full.get("auc_macro_ci_low", np.nan))
    if auc > 0.5 and not (np.isfinite(low) and low <= 0.5):
        return None
    ci = f" [{low:.3f}, {float(full['auc_macro_ci_high']):.3f}]" if np.isfinite(low) else ""
    return (f"the classifier has no skill on these images (macro AUC {auc:.3f}{ci} on all of them), so this "
            "curve says nothing about the gate; use a classifier trained for this data (see the README)")


def _macro_auc_ci(y: np.ndarray, p: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of the macro AUC (findings with both classes) over bootstrap resamples."""
    n = len(y)
    if n == 0:
        return np.nan, np.nan
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # (B, N) resample counts
    aucs = np.stack([weighted_auc(y[:, j], p[:, j], counts) for j in range(y.shape[1])], axis=1)
    defined = ~np.isnan(aucs).all(axis=1)
    if not defined.any():
        return np.nan, np.nan
    macro = np.nanmean(aucs[defined], axis=1)
    low, high = np.quantile(macro, [0.025, 0.975])
    return float(low), float(high)


def unseen_rows(classifier: Bundle | ModelCard, manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows the model (a bundle, or only its card) neither trained nor calibrated on: where its split file
    lists an image, only images of its ``test`` split are kept; images it never listed (another data set) all stay."""
    card = classifier.card if isinstance(classifier, Bundle) else classifier
    split_file = Path(str(card.training.get("split_file", "")))
    if not split_file.is_file():
        return manifest
    split = pd.read_csv(split_file, dtype=str)
    seen = set(split.loc[split["split"] != "test", "image_id"])
    rows = manifest[~manifest["image_id"].astype(str).isin(seen)].reset_index(drop=True)
    rows.attrs = dict(manifest.attrs)
    return rows


def _findings_for(classifier: Bundle, label_columns: Sequence[str]) -> list[str]:
    found = [f for f in classifier.labels if f in label_columns]
    if not found:
        raise ValueError(f"the classifier's labels {classifier.labels} share none with the data's columns "
                         f"{list(label_columns)}")
    return found


def rotation_tradeoff(classifier: Bundle, ood: Bundle, manifest: pd.DataFrame,
                      angles: Sequence[float] = (0, 15, 30, 45, 60, 75, 90), *, n_points: int = 19,
                      n_bootstrap: int = 200, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Classifier AUC and OOD gate under growing rotation of labelled images.

    The findings are the classifier's labels present as columns of ``manifest``. Returns
    ``(per_angle, sweep)``: per angle the median OOD score, the fraction the bundle's cutoff rejects,
    the macro AUC over all images and over the retained ones; and :func:`tradeoff_sweep` over the
    pool of all angles (column ``mean_angle_retained``: how rotated the kept images are).
    """
    findings = _findings_for(classifier, manifest.columns)
    cols = [classifier.labels.index(f) for f in findings]
    y = manifest[findings].to_numpy(dtype=int)
    cutoff = ood.card.ood["cutoff"]
    base = images_of(manifest)
    rows, pooled = [], {"score": [], "y": [], "p": [], "angle": []}
    for angle in angles:
        imgs = rotate_images(base, angle)
        score = score_images(ood.model, imgs, preprocess=ood.preprocess)[cutoff["scorer"]]
        prob = classifier_probabilities(classifier, imgs)[:, cols]
        keep = score <= cutoff["threshold"]
        full = cutoff_tradeoff(score, y, prob, [np.inf, cutoff["threshold"]], finding_names=findings)
        rows.append({"angle": angle, "n": len(imgs), "ood_score_median": float(np.median(score)),
                     "rejected_fraction": float(1 - keep.mean()), "auc_all": full["auc_macro"].iloc[0],
                     "auc_retained": full["auc_macro"].iloc[1]})
        for k, v in zip(("score", "y", "p", "angle"), (score, y, prob, np.full(len(imgs), angle, float))):
            pooled[k].append(v)
    score, y_all, p_all, ang = (np.concatenate(pooled[k]) for k in ("score", "y", "p", "angle"))
    sweep = tradeoff_sweep(score, y_all, p_all, bundle_cutoff=cutoff["threshold"], finding_names=findings,
                           n_points=n_points, n_bootstrap=n_bootstrap, seed=seed)
    sweep["mean_angle_retained"] = [float(ang[score <= c].mean()) if (score <= c).any() else np.nan
                                    for c in sweep["cutoff"]]
    return pd.DataFrame(rows), sweep


def shifted_set_tradeoff(classifier: Bundle, ood: Bundle, manifest: pd.DataFrame, *, n_points: int = 19,
                         n_bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """:func:`tradeoff_sweep` of a classifier on a labelled shifted set (e.g. paediatric CXRs, Pneumonia)."""
    findings = _findings_for(classifier, manifest.columns)
    imgs = images_of(manifest)
    cutoff = ood.card.ood["cutoff"]
    score = score_images(ood.model, imgs, preprocess=ood.preprocess)[cutoff["scorer"]]
    prob = classifier_probabilities(classifier, imgs)[:, [classifier.labels.index(f) for f in findings]]
    return tradeoff_sweep(score, manifest[findings].to_numpy(dtype=int), prob, bundle_cutoff=cutoff["threshold"],
                          finding_names=findings, n_points=n_points, n_bootstrap=n_bootstrap, seed=seed)


# ----------------------------------------------------------------------------------------- figures
def plot_training_curves(history: pd.DataFrame):
    """Training losses and validation median SSIM / L1 per epoch (a run's ``metrics.csv``)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for col in ("train_loss", "d_loss", "g_adv_loss"):
        if col in history:
            a.plot(history["epoch"], history[col], ".-", label=col)
    a.plot(history["epoch"], history["val_l1"], ".-", label="val_l1")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend(fontsize=8)
    b.plot(history["epoch"], history["val_ssim_median"], ".-", color="C2")
    b.set_xlabel("epoch")
    b.set_ylabel("validation median SSIM(x, D(E(x)))")
    fig.tight_layout()
    return fig


def plot_reconstructions(model: OODModel, x: torch.Tensor, titles: Sequence[str] | None = None, *,
                         error_scale: float | None = None):
    """Input, reconstruction and the input with the per-pixel L1 error in red (Chester Fig. 4/7).

    ``x``: ``(N, 1, 64, 64)`` in [0, 1]; error saturates red at ``error_scale`` (default
    :data:`cxrbench.explain.overlay.ERROR_SCALE`, the dashboard's). Titles get the SSIM.
    """
    import matplotlib.pyplot as plt

    from cxrbench.explain.overlay import ERROR_SCALE, error_overlay

    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad():
        recon = model.reconstruct(x)
    err = error_map(x, recon, "l1")[:, 0].numpy()
    ssim = score_batch(model, x)["ssim_raw"]
    fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5.0), squeeze=False)
    for k in range(len(x)):
        grey = x[k, 0].numpy()
        red = error_overlay(grey, err[k], scale=error_scale or ERROR_SCALE, alpha=1.0)
        for row, img in enumerate((grey, recon[k, 0].numpy(), red)):
            axes[row, k].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[row, k].axis("off")
        name = titles[k] if titles is not None else ""
        axes[0, k].set_title(f"{name}\nSSIM {ssim[k]:.2f}", fontsize=7)
    for row, label in enumerate(("input", "D(E(x))", "error (red)")):
        axes[row, 0].text(-6, 32, label, rotation=90, va="center", ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_score_distributions(in_scores: dict[str, np.ndarray], set_scores: dict[str, dict[str, np.ndarray]],
                             scorers: Sequence[str] = SCORER_NAMES, *, cutoff: dict[str, Any] | None = None,
                             in_name: str = "in-distribution (held out)"):
    """Box plots of each scorer's values per set, one panel per scorer (Chester Fig. 5); cutoff dashed."""
    import matplotlib
    import matplotlib.pyplot as plt

    new_api = tuple(int(v) for v in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    horizontal = {"orientation": "horizontal"} if new_api else {"vert": False}
    names = [in_name, *set_scores]
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.4 * len(scorers), 0.35 * len(names) + 1.5), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        data = [in_scores[scorer], *(set_scores[n][scorer] for n in set_scores)]
        ax.boxplot(data, widths=0.6, flierprops={"markersize": 2}, **horizontal)
        ax.set_yticks(range(1, len(names) + 1), names if ax is axes[0, 0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title({"ssim": "1 - SSIM"}.get(scorer, scorer), fontsize=9)
        if cutoff and cutoff.get("scorer") == scorer:
            ax.axvline(cutoff["threshold"], color="red", ls="--", lw=1, label="bundle cutoff")
            ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].figure.supxlabel("score (higher = more out-of-distribution)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_rotation(per_angle: pd.DataFrame):
    """Per rotation angle: fraction the gate rejects, and the classifier's AUC on all / retained images."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(per_angle["angle"], per_angle["rejected_fraction"], "o-", color="C3")
    a.set_ylabel("rejected by the OOD gate")
    b.plot(per_angle["angle"], per_angle["auc_all"], "o-", label="all images")
    b.plot(per_angle["angle"], per_angle["auc_retained"], "s--", label="retained images")
    b.set_ylabel("macro AUC")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xlabel("rotation (degrees)")
    fig.tight_layout()
    return fig


def plot_tradeoff(table: pd.DataFrame, *, title: str = "", ax=None):
    """Retained fraction vs macro AUC of the retained images, bootstrap CI band, bundle cutoff starred (Fig. 6)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    t = table.sort_values("retained_fraction")
    ax.plot(t["retained_fraction"], t["auc_macro"], "o-", ms=3, label="AUC of retained images")
    if "auc_macro_ci_low" in t:
        ax.fill_between(t["retained_fraction"], t["auc_macro_ci_low"], t["auc_macro_ci_high"], alpha=0.25,
                        label="95 % bootstrap CI")
    marked = t[t["bundle_cutoff"].astype(bool)] if "bundle_cutoff" in t else t.iloc[:0]
    if len(marked):
        ax.plot(marked["retained_fraction"], marked["auc_macro"], "r*", ms=14, label="bundle cutoff")
    ax.set_xlabel("fraction of images retained by the OOD gate")
    ax.set_ylabel("AUC (retained images)")
    ax.set_xlim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure

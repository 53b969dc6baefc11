"""Measuring explanation maps: localisation, lung focus, faithfulness and speed.

* **Localisation** against expert boxes (NIH ``BBox_List_2017``; ``bbox_256_json`` in the dev
  manifest) or exact lesion masks (synthetic phantoms): :func:`pointing_game` (is the map's
  maximum inside the region?), :func:`topk_iou` (IoU of the top-k % pixels with the region) and
  :func:`mass_fraction` (share of the positive map mass inside the region, or inside the lungs).
* **Faithfulness**: :func:`deletion_insertion` (Petsiuk et al. 2018): remove the most salient pixels
  first (replaced by a blurred, mean or zero image) and watch the target probability fall; or
  insert them into the blurred image and watch it rise. A faithful map gives a low deletion AUC
  and a high insertion AUC. All steps of a curve run as one batch.
* :func:`compare_methods` runs every method on the same images and gives the comparison table
  (one row per method, with the time per image).

Maps are (H, W) or (..., H, W) arrays on the grid of the model input; regions are (H, W) bool.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn

from cxrbench.explain.fusion import mask_fraction

__all__ = ["FaithfulnessCurves", "MethodComparison", "boxes_to_mask", "compare_methods", "deletion_insertion",
           "endpoint_scores", "mass_fraction", "phantom_localisation_set", "pointing_game", "read_bbox_list",
           "topk_iou", "topk_mask", "VARIANTS", "latent_shift_comparison", "localisation_sentence"]

Box = Sequence[Any]  # (x, y, w, h) or (label, x, y, w, h)


def _as_array(name: str, a: Any) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (H, W), got shape {a.shape}")
    return a


def _region(region: Any, shape: tuple[int, ...]) -> np.ndarray:
    region = _as_array("region", region).astype(bool)
    if region.shape[-2:] != tuple(shape[-2:]):
        raise ValueError(f"region {region.shape} and map {shape} differ in their last two axes (H, W)")
    return region


def boxes_to_mask(boxes: Sequence[Box], shape: tuple[int, int], *, box_size: float | None = None) -> np.ndarray:
    """Rasterise boxes into a (H, W) bool mask.

    Parameters
    ----------
    boxes : sequence of ``(x, y, w, h)`` or ``(label, x, y, w, h)`` in pixels (x to the right, y down).
    shape : (H, W) of the mask (the map's grid).
    box_size : side of the square grid the boxes are given in (256 for ``bbox_256_json``, 1024 for the
        NIH ``BBox_List_2017``); they are scaled to ``shape``. Default: already in ``shape``'s pixels.

    A pixel belongs to a box when its centre lies inside it.
    """
    h, w = int(shape[0]), int(shape[1])
    sy, sx = (1.0, 1.0) if box_size is None else (h / float(box_size), w / float(box_size))
    rows, cols = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    mask = np.zeros((h, w), dtype=bool)
    for box in boxes:
        if len(box) not in (4, 5):
            raise ValueError(f"a box must be (x, y, w, h) or (label, x, y, w, h), got {box!r}")
        x, y, bw, bh = (float(v) for v in (box[1:] if len(box) == 5 else box))
        if bw < 0 or bh < 0:
            raise ValueError(f"a box must be (x, y, w, h) or (label, x, y, w, h) with w, h >= 0, got {box!r}")
        mask |= (cols >= x * sx) & (cols < (x + bw) * sx) & (rows >= y * sy) & (rows < (y + bh) * sy)
    return mask


def read_bbox_list(path: str) -> pd.DataFrame:
    """NIH ``BBox_List_2017.csv`` (optionally .gz) as ``image_id, finding, x, y, w, h`` (1024 px coordinates).

    Finding names are canonical (``Infiltrate`` -> ``Infiltration``); use ``box_size=1024`` with
    :func:`boxes_to_mask` for the full-size images.
    """
    from cxrbench.labels import canonical_finding

    raw = pd.read_csv(path)
    if raw.shape[1] < 6 or "Image Index" not in raw.columns:
        raise ValueError(f"{path}: not a BBox_List_2017 table (expected 'Image Index', 'Finding Label', x, y, w, h)")
    table = raw.iloc[:, :6].copy()
    table.columns = ["image_id", "finding", "x", "y", "w", "h"]
    table["finding"] = [canonical_finding(f) for f in table["finding"]]
    return table


def pointing_game(heatmap: Any, region: Any, *, tolerance: float = 0) -> bool | np.ndarray:
    """Whether the map's maximum falls inside the region (Zhang et al. 2018).

    Parameters
    ----------
    heatmap : (H, W) or (..., H, W) real-valued map.
    region : (H, W) or (..., H, W) bool (a box mask or a lesion mask).
    tolerance : pixels within this Euclidean distance (in pixels) of the region count as inside (the
        original game uses 15 px at 224 px).

    Returns
    -------
    bool (or bool array over the leading axes): True when a pixel holding the global maximum lies in
    the region. A constant map points nowhere and counts as a miss; an empty region is a miss.
    """
    heat = _as_array("heatmap", heatmap).astype(np.float64)
    region = _region(region, heat.shape)
    if tolerance > 0:
        flat = region.reshape(-1, *region.shape[-2:])
        grown = [ndimage.distance_transform_edt(~r) <= tolerance if r.any() else r for r in flat]
        region = np.stack(grown).reshape(region.shape)
    region = np.broadcast_to(region, heat.shape)
    peak = heat.max(axis=(-2, -1))
    inside = np.where(region, heat, -np.inf).max(axis=(-2, -1))
    hit = (inside >= peak) & (peak > heat.min(axis=(-2, -1)))
    return bool(hit) if hit.ndim == 0 else hit


def topk_mask(heatmap: Any, fraction: float) -> np.ndarray:
    """The ``round(fraction * H * W)`` highest pixels of each (H, W) map (at least 1), as bool.

    Ties are broken by position (row-major), so exactly k pixels are selected.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    heat = _as_array("heatmap", heatmap).astype(np.float64)
    flat = heat.reshape(-1, heat.shape[-2] * heat.shape[-1])
    k = max(1, int(round(float(fraction) * flat.shape[1])))
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    out = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=1)
    return out.reshape(heat.shape)


def topk_iou(heatmap: Any, region: Any, fraction: float = 0.05) -> float | np.ndarray:
    """IoU of the top-``fraction`` pixels of the map with the region: (H, W) -> float, (..., H, W) -> array."""
    selected = topk_mask(heatmap, fraction)
    region = np.broadcast_to(_region(region, selected.shape), selected.shape)
    inter = (selected & region).sum(axis=(-2, -1))
    union = (selected | region).sum(axis=(-2, -1))
    iou = inter / np.maximum(union, 1)
    return float(iou) if iou.ndim == 0 else iou


def mass_fraction(heatmap: Any, region: Any) -> float | np.ndarray:
    """Share of the positive map mass inside ``region`` (:func:`cxrbench.explain.fusion.mask_fraction`).

    heatmap (H, W) or (B, F, H, W); region (H, W), (B, H, W) or (B, 1, H, W) bool or [0, 1].
    NaN where the map has no positive mass.
    """
    return mask_fraction(heatmap, region)


# --------------------------------------------------------------------------------------------------
# faithfulness


@dataclass
class FaithfulnessCurves:
    """Deletion and insertion curves of N (image, target) pairs.

    ``fractions`` (S,) share of pixels removed/inserted (0 .. 1); ``deletion`` / ``insertion`` (N, S)
    target score (sigmoid probability, or logit with ``score="logit"``); ``*_auc`` (N,) areas
    under them (trapezoid over the fraction axis).
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    score: str = "probability"


class MethodComparison(NamedTuple):
    """:func:`compare_methods` with ``return_details=True``: the per-method table, the per-image table,
    each method's deletion/insertion curves (empty when ``curve_steps=0``) and its ``(N, H, W)`` maps (what the
    scores were computed on, so a figure of the same maps need not compute them again)."""

    table: pd.DataFrame
    detail: pd.DataFrame
    curves: dict[str, FaithfulnessCurves]
    maps: dict[str, np.ndarray]


def _baseline(x: torch.Tensor, kind: str, sigma: float | None) -> torch.Tensor:
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        sigma = float(sigma) if sigma is not None else max(1.0, x.shape[-1] / 16.0)
        sigmas = (0.0,) * (x.ndim - 2) + (sigma, sigma)
        blurred = ndimage.gaussian_filter(x.detach().cpu().float().numpy(), sigma=sigmas, mode="reflect")
        return torch.from_numpy(blurred).to(x.device, x.dtype)
    raise ValueError(f"baseline must be 'blur', 'mean' or 'zero', got {kind!r}")


def _scores(logits: torch.Tensor, score: str) -> np.ndarray:
    values = logits.float()
    return (torch.sigmoid(values) if score == "probability" else values).cpu().numpy().astype(np.float64)


@torch.no_grad()
def endpoint_scores(model: nn.Module, x: torch.Tensor, targets: Sequence[int], *, baseline: str = "blur",
                    sigma: float | None = None, score: str = "probability") -> np.ndarray:
    """``(N, 2)``: the target's score of each image and of its baseline (what :func:`deletion_insertion`'s curves
    start and end on, whatever the map), in eval mode."""
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    was_training = model.training
    model.eval()
    try:
        base = _baseline(x, baseline, sigma)
        rows = np.arange(x.shape[0])
        pair = [_scores(model(v)[rows, torch.as_tensor([int(t) for t in targets])], score) for v in (x, base)]
    finally:
        model.train(was_training)
    return np.stack(pair, axis=1)


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: Any,
    targets: Sequence[int],
    *,
    steps: int = 20,
    baseline: str = "blur",
    sigma: float | None = None,
    score: str = "probability",
    batch_size: int = 64,
    endpoints: np.ndarray | None = None,
) -> FaithfulnessCurves:
    """Deletion and insertion curves (Petsiuk et al. 2018, RISE).

    Parameters
    ----------
    model : classifier returning (B, N) logits; run in eval mode.
    x : (N, C, H, W) float model inputs.
    maps : (N, H, W) or (N, 1, H, W) maps on the input grid; higher = more important.
    targets : N output indices, the finding tracked for each image.
    steps : the curve has ``steps + 1`` points, fractions 0, 1/steps, ..., 1 of the pixels.
    baseline : what removed pixels become: ``"blur"`` (Gaussian blur of the image, sigma default
        H/16 pixels), ``"mean"`` (the image's mean) or ``"zero"``.
    score : ``"probability"`` (sigmoid of the logit) or ``"logit"``.
    batch_size : images per forward pass (the 2 (steps + 1) variants of all images are batched together).
    endpoints : ``(N, 2)`` scores of each image and of its baseline (:func:`endpoint_scores`), which every map of
        the image shares: the curves' ends (nothing or everything replaced) are then not computed again.
    """
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    heat = _as_array("maps", maps).astype(np.float32)
    if heat.ndim == 4:
        if heat.shape[1] != 1:
            raise ValueError(f"maps must be (N, H, W) or (N, 1, H, W), got {heat.shape}")
        heat = heat[:, 0]
    if x.ndim != 4 or heat.shape != (x.shape[0], *x.shape[-2:]) or len(targets) != x.shape[0]:
        raise ValueError(f"need x (N, C, H, W), maps (N, H, W) and N targets; got {tuple(x.shape)}, "
                         f"{heat.shape}, {len(targets)} targets")
    was_training = model.training
    model.eval()
    fractions = np.linspace(0.0, 1.0, steps + 1)
    n_pixels = heat.shape[1] * heat.shape[2]
    counts = torch.as_tensor(np.round(fractions * n_pixels).astype(np.int64))
    base = _baseline(x, baseline, sigma)
    if endpoints is not None and np.shape(endpoints) != (x.shape[0], 2):
        raise ValueError(f"endpoints must be (N, 2) scores of the images and their baselines, got "
                         f"{np.shape(endpoints)} for {x.shape[0]} images")
    endpoints = None if endpoints is None else np.asarray(endpoints, dtype=np.float64)
    inner = slice(1, steps) if endpoints is not None else slice(0, steps + 1)  # the fractions computed here
    curves = np.zeros((2, x.shape[0], steps + 1), dtype=np.float64)
    n_inner = len(range(steps + 1)[inner])
    try:
        variants = []
        for n in range(x.shape[0]):
            order = np.argsort(-heat[n].ravel(), kind="stable")
            rank = torch.empty(n_pixels, dtype=torch.int64)
            rank[torch.as_tensor(order)] = torch.arange(n_pixels)
            salient = (rank.view(1, 1, *heat.shape[1:]) < counts[inner].view(-1, 1, 1, 1))  # (S, 1, H, W)
            variants += [torch.where(salient, base[n : n + 1], x[n : n + 1]),  # deleted
                         torch.where(salient, x[n : n + 1], base[n : n + 1])]  # inserted
        if n_inner:  # every image's variants in shared batches: fuller batches run faster per image
            stacked = torch.cat(variants)
            logits = torch.cat([model(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)])
            for n in range(x.shape[0]):
                rows = logits[2 * n_inner * n : 2 * n_inner * (n + 1), int(targets[n])]
                curves[:, n, inner] = _scores(rows, score).reshape(2, n_inner)
        if endpoints is not None:  # deletion runs from the image to its baseline, insertion the other way
            curves[0, :, 0], curves[0, :, steps] = endpoints[:, 0], endpoints[:, 1]
            curves[1, :, 0], curves[1, :, steps] = endpoints[:, 1], endpoints[:, 0]
    finally:
        model.train(was_training)
    aucs = [np.asarray(np.trapezoid(part, fractions, axis=-1)) for part in curves]
    return FaithfulnessCurves(fractions, curves[0], curves[1], aucs[0], aucs[1], score)


# --------------------------------------------------------------------------------------------------
# the comparison table


def phantom_localisation_set(n: int, *, size: int = 96, finding: str = "Mass",
                             seed: int = 10_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` phantoms that all show ``finding``, with its exact mask (the known lesion).

    Returns ``(images, lesion_masks, lung_masks)``: (n, size, size) float32 in [0, 1], bool, bool.
    Seeds ``seed .. seed + n - 1`` (keep them apart from a training set's seeds).
    """
    from cxrbench.data.synthetic import make_phantom

    phantoms = [make_phantom(size, findings=[finding], seed=seed + i) for i in range(n)]
    return (np.stack([p.image for p in phantoms]), np.stack([p.lesion_masks[p.findings[0]] for p in phantoms]),
            np.stack([p.lung_mask for p in phantoms]))


def _region_list(regions: Any, n: int, shape: tuple[int, int]) -> list[np.ndarray | None]:
    if regions is None:
        return [None] * n
    if len(regions) != n:
        raise ValueError(f"got {len(regions)} regions for {n} images")
    out: list[np.ndarray | None] = []
    for r in regions:
        if r is None:
            out.append(None)
        elif isinstance(r, (np.ndarray, torch.Tensor)) and np.asarray(r).ndim == 2:
            out.append(_region(r, shape))
        else:
            out.append(boxes_to_mask(r, shape))
    return out


def _method_maps(explainer: Any, method: str, images: torch.Tensor, targets: Sequence[int],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps of one method, one image at a time, and the seconds each took (random: noise maps)."""
    n, shape = images.shape[0], (images.shape[-2], images.shape[-1])
    maps = np.zeros((n, *shape), np.float32)
    seconds = np.zeros(n)
    for i in range(n):
        t0 = time.perf_counter()
        if explainer is None:
            maps[i] = rng.random(shape, dtype=np.float32)
        else:
            chosen = None if method == "saliency" else [int(targets[i])]
            maps[i] = explainer(images[i : i + 1], targets=chosen)[0, 0]
        seconds[i] = time.perf_counter() - t0
    return maps, seconds


def _method_table(detail: pd.DataFrame, top_fraction: float) -> pd.DataFrame:
    """The per-image rows of :func:`compare_methods` summarised per method (``random`` has no time)."""
    pct = f"iou_top{100 * top_fraction:g}%"
    agg = {"n_images": ("image", "size"), "seconds_per_image": ("seconds", "median")}
    for col, name in (("pointing_hit", "pointing_game"), ("iou_topk", pct), ("mass_in_region", "mass_in_region"),
                      ("mass_in_lungs", "mass_in_lungs"), ("deletion_auc", "deletion_auc"),
                      ("insertion_auc", "insertion_auc")):
        if col in detail.columns:
            agg[name] = (col, "mean")
    table = detail.groupby("method", sort=False).agg(**agg).reset_index()
    if "random" in table["method"].values:
        table.loc[table["method"] == "random", "seconds_per_image"] = np.nan
    return table


def compare_methods(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int],
    regions: Sequence[Any] | None = None,
    *,
    methods: Sequence[str] = ("saliency", "saliency_per_finding", "cam", "gradcam", "integrated_gradients",
                              "smoothgrad"),
    lung_masks: Any = None,
    top_fraction: float = 0.05,
    tolerance: float = 0,
    curve_steps: int = 10,
    baseline: str = "blur",
    explainer_options: dict[str, dict[str, Any]] | None = None,
    include_random: bool = True,
    seed: int = 0,
    return_details: bool = False,
) -> pd.DataFrame | MethodComparison:
    """Run each explanation method on the same images and measure it.

    Parameters
    ----------
    model : classifier returning (B, N) logits.
    images : (N, C, H, W) model inputs (preprocessed).
    targets : N output indices: the finding whose region is given (and whose score the curves track).
    regions : N entries, each a (H, W) bool mask (lesion mask, rasterised boxes), a list of boxes
        ``(x, y, w, h)`` / ``(label, x, y, w, h)`` in input pixels, or None (no localisation scores).
    methods : names from :data:`cxrbench.explain.EXPLAINERS` or ``"latent_shift"`` (give its autoencoder in
        ``explainer_options={"latent_shift": {"autoencoder": ae}}``). ``"saliency"`` is Chester's map of all
        findings summed (one general explanation); the others explain the target finding.
    lung_masks : (N, H, W) bool, optional; gives ``mass_in_lungs``.
    top_fraction : the k of :func:`topk_iou` (0.05 = the top 5 % pixels).
    tolerance : pixels of tolerance for the pointing game.
    curve_steps : steps of the deletion/insertion curves (0: skip them).
    explainer_options : per method keyword arguments (e.g. ``{"integrated_gradients": {"n_steps": 16}}``).
    include_random : add a ``random`` row (uniform noise maps): the chance level of every score.

    Returns
    -------
    DataFrame, one row per method: ``n_images, seconds_per_image`` (median, batch of 1, explanation only),
    ``pointing_game`` (hit rate), ``iou_top{k}%``, ``mass_in_region``, ``mass_in_lungs``,
    ``deletion_auc`` (lower is better), ``insertion_auc`` (higher is better). With
    ``return_details=True`` a :class:`MethodComparison`: that table, the per-image table and the curves.
    """
    from cxrbench.explain import COUNTERFACTUAL_EXPLAINERS, EXPLAINERS, get_explainer

    if images.ndim != 4 or len(targets) != images.shape[0]:
        raise ValueError(f"need images (N, C, H, W) and N targets, got {tuple(images.shape)} and {len(targets)}")
    unknown = [m for m in methods if m not in EXPLAINERS + COUNTERFACTUAL_EXPLAINERS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {EXPLAINERS + COUNTERFACTUAL_EXPLAINERS}")
    n, shape = images.shape[0], (images.shape[-2], images.shape[-1])
    region_masks = _region_list(regions, n, shape)
    lungs = None if lung_masks is None else _as_array("lung_masks", lung_masks).astype(bool)
    options = explainer_options or {}
    rng = np.random.default_rng(seed)
    details: list[dict[str, Any]] = []
    all_curves: dict[str, FaithfulnessCurves] = {}
    all_maps: dict[str, np.ndarray] = {}
    # every method's curves start and end on the same two images (nothing / everything replaced): scored once
    ends = endpoint_scores(model, images, targets, baseline=baseline) if curve_steps > 0 else None
    for method in [*methods, *(["random"] if include_random else [])]:
        explainer = None if method == "random" else get_explainer(method, model, **options.get(method, {}))
        maps, seconds = _method_maps(explainer, method, images, targets, rng)
        all_maps[method] = maps
        curves = (deletion_insertion(model, images, maps, targets, steps=curve_steps, baseline=baseline,
                                     endpoints=ends) if curve_steps > 0 else None)
        if curves is not None:
            all_curves[method] = curves
        for i in range(n):
            row: dict[str, Any] = {"method": method, "image": i, "target": int(targets[i]), "seconds": seconds[i]}
            region = region_masks[i]
            if region is not None and region.any():
                row.update(pointing_hit=float(pointing_game(maps[i], region, tolerance=tolerance)),
                           iou_topk=topk_iou(maps[i], region, top_fraction),
                           mass_in_region=mass_fraction(maps[i], region))
            if lungs is not None:
                row["mass_in_lungs"] = mass_fraction(maps[i], lungs[i])
            if curves is not None:
                row.update(deletion_auc=curves.deletion_auc[i], insertion_auc=curves.insertion_auc[i])
            details.append(row)
    detail = pd.DataFrame(details)
    table = _method_table(detail, top_fraction)
    return MethodComparison(table, detail, all_curves, all_maps) if return_details else table


# --------------------------------------------------------------------------------------------------
# Latent Shift on known lesions
#: the rows :func:`latent_shift_comparison` adds: captum's frames, and the frames with the residual kept
VARIANTS: dict[str, bool] = {"latent_shift": False, "latent_shift_residual": True}


def latent_shift_comparison(model: nn.Module, images: torch.Tensor, targets: Any, regions: Any, *,
                            autoencoder: nn.Module, preprocess: Any = None, autoencoder_preprocess: Any = None,
                            variants: dict[str, bool] | None = None, **compare: Any) -> Any:
    """:func:`~cxrbench.explain.metrics.compare_methods` rows for Latent Shift (one per entry of ``variants``,
    default :data:`VARIANTS`: name -> ``keep_residual``), on the same images, targets and regions, with the same
    scores (``compare``: ``lung_masks``, ``top_fraction``, ``curve_steps``, ...); ``preprocess`` and
    ``autoencoder_preprocess`` the two models' (:class:`~cxrbench.explain.LatentShift`). No ``random`` row: the other
    methods' table has it."""
    rows = []
    for name, residual in (variants or VARIANTS).items():
        options = {"autoencoder": autoencoder, "preprocess": preprocess,
                   "autoencoder_preprocess": autoencoder_preprocess, "keep_residual": residual}
        table = compare_methods(model, images, targets, regions, methods=["latent_shift"], include_random=False,
                                explainer_options={"latent_shift": options}, **compare)
        rows.append(pd.DataFrame(table).assign(method=name))
    return pd.concat(rows, ignore_index=True)


def localisation_sentence(table: Any, subject: str, method: str = "latent_shift") -> str:
    """One plain sentence on whether ``method``'s difference maps put more of their mass inside the lesion than
    the ``random`` row of ``table`` (a :func:`~cxrbench.explain.metrics.compare_methods` table with both rows)."""
    rows = table.set_index("method")
    if method not in rows.index or "random" not in rows.index:
        raise ValueError(f"the table needs a {method!r} and a 'random' row, has {list(rows.index)}")
    mine, chance = rows.loc[method], rows.loc["random"]
    inside, base = (float(v) if v is not None else float("nan")
                    for v in (mine["mass_in_region"], chance["mass_in_region"]))
    if not np.isfinite(inside):
        return (f"{subject}: {method} changed no pixel (the autoencoder's reconstruction already lacks the "
                "finding, so there was nothing to remove).")
    verdict = ("clearly more than" if inside > 2 * base else "slightly more than" if inside > 1.25 * base
               else "about as much as" if inside > 0.8 * base else "less than")
    return (f"{subject}: {method} puts {inside:.1%} of its change inside the lesion, {verdict} random maps "
            f"({base:.1%}); pointing game {float(mine['pointing_game']):.2f} vs random "
            f"{float(chance['pointing_game']):.2f}.")

"""The localisation sets of notebook 04: NIH images with expert boxes, and phantoms with known lesions.

:func:`box_localisation_set` runs the :class:`~cxrbench.inference.pipeline.Pipeline` on the first ``n`` images
of a manifest that carry a box and returns what a method comparison needs (inputs, targets, box masks, lung
masks, probabilities); :func:`phantom_localisation_tables` compares explanation methods on phantoms of each
finding (the lesion known pixel by pixel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from cxrbench.data import bounding_boxes
from cxrbench.explain.latent_shift import check_scales
from cxrbench.explain.metrics import (
    MethodComparison,
    boxes_to_mask,
    compare_methods,
    latent_shift_comparison,
    phantom_localisation_set,
)
from cxrbench.inference.pipeline import Pipeline, Report
from cxrbench.labels import canonical_finding
from cxrbench.models.bundle import Bundle

__all__ = ["BoxSet", "box_localisation_set", "phantom_latent_shift_tables", "phantom_localisation_tables"]


@dataclass
class BoxSet:
    """Boxed images analysed by one pipeline. ``x``: (N, C, S, S) model inputs; ``targets``: the boxed finding's
    output index per image; ``regions``: (S, S) bool box masks; ``lungs``: (N, S, S) bool U-Net masks (or
    ``None`` without a U-Net); ``probs``: (N, K) raw probabilities."""

    rows: pd.DataFrame
    reports: list[Report]
    x: torch.Tensor
    boxes: list[list[tuple[str, float, float, float, float]]]
    targets: list[int]
    regions: list[np.ndarray]
    lungs: np.ndarray | None
    probs: np.ndarray

    def table(self, labels: Sequence[str]) -> pd.DataFrame:
        """One row per image: its id, the boxed finding, the model's probability of it, and all its labels."""
        return pd.DataFrame({"image": self.rows["image_id"], "box": [labels[t] for t in self.targets],
                             "p(box finding)": [self.probs[i, t] for i, t in enumerate(self.targets)],
                             "labels": self.rows["finding_labels"]})


def box_localisation_set(pipeline: Pipeline, manifest: pd.DataFrame, n_images: int, *,
                         box_size: int = 256) -> BoxSet:
    """The first ``n_images`` rows of ``manifest`` with a box (``bbox_256_json``) whose finding the classifier was
    trained on, analysed without explanation.

    The target of each image is its first box's finding. Boxes of findings the classifier has no output for, or
    whose output its weights never trained (an imported bundle's ``untrained``), are left out and listed in the
    ``ValueError`` raised when no boxed image is left (or the manifest has none).
    """
    has_box = manifest.get("bbox_256_json", pd.Series("", index=manifest.index)).fillna("").str.len() > 2
    boxed = manifest[has_box].reset_index(drop=True)
    if boxed.empty:
        raise ValueError("no image of the manifest has an expert box (bbox_256_json): the NIH dev set has 11")
    labels = list(pipeline.findings)
    usable = [f for f in labels if f not in pipeline.untrained]
    all_boxes = [bounding_boxes(r) for _, r in boxed.iterrows()]
    findings = [canonical_finding(b[0][0]) for b in all_boxes]
    keep = [i for i, f in enumerate(findings) if f in usable][:n_images]
    if not keep:
        raise ValueError(f"none of the {len(boxed)} boxed images names a finding this classifier was trained on "
                         f"(boxes: {sorted(set(findings))}; trained: {usable})")
    rows = boxed.iloc[keep].reset_index(drop=True)
    boxes = [all_boxes[i] for i in keep]
    targets = [labels.index(findings[i]) for i in keep]
    reports = [pipeline.analyze(p, explain=None) for p in rows["path"]]  # probabilities and the U-Net lung mask
    size = pipeline.classifier.preprocess.size
    masks = [r.lung_mask for r in reports if r.lung_mask is not None]
    lungs = np.stack(masks) if len(masks) == len(reports) else None
    return BoxSet(rows=rows, reports=reports, x=pipeline.model_inputs([r.image for r in reports]), boxes=boxes,
                  targets=targets, regions=[boxes_to_mask(b, (size, size), box_size=box_size) for b in boxes],
                  lungs=lungs, probs=np.stack([np.asarray(r.raw, dtype=float) for r in reports]))


def _phantom_batches(bundle: Bundle, findings: Sequence[str], n_images: int):
    """``(finding, model inputs, lesion masks, lung masks, targets)`` of ``n_images`` phantoms per finding, at the
    bundle's input size (the same seeded phantoms for every caller)."""
    missing = [f for f in findings if f not in bundle.labels]
    if missing:
        raise ValueError(f"the phantom classifier has no output for {missing}; it has {list(bundle.labels)}")
    for finding in findings:
        images, lesions, lungs = phantom_localisation_set(n_images, size=bundle.preprocess.size, finding=finding)
        xs = torch.from_numpy(np.stack([bundle.preprocess(im) for im in images]))
        yield finding, xs, list(lesions), lungs, [bundle.labels.index(finding)] * len(xs)


def phantom_localisation_tables(bundle: Bundle, findings: Sequence[str], n_images: int, *,
                                methods: Sequence[str], top_fraction: float = 0.05, curve_steps: int = 10,
                                explainer_options: Mapping[str, Any] | None = None,
                                return_details: bool = False) -> pd.DataFrame | tuple[pd.DataFrame,
                                                                                     dict[str, MethodComparison]]:
    """:func:`~cxrbench.explain.metrics.compare_methods` on ``n_images`` phantoms showing each finding, at the
    bundle's input size; one table, with a ``finding`` column. Findings must be outputs of the bundle.

    ``return_details``: also ``{finding: MethodComparison}`` (its per-image rows, curves and maps, on the phantoms of
    :func:`~cxrbench.explain.metrics.phantom_localisation_set` in their order), so a figure of the same phantoms
    shows these maps instead of computing them again."""
    tables, details = [], {}
    for finding, xs, lesions, lungs, target in _phantom_batches(bundle, findings, n_images):
        comparison = cast(MethodComparison, compare_methods(
            bundle.model, xs, target, lesions, methods=methods, lung_masks=lungs, top_fraction=top_fraction,
            curve_steps=curve_steps, explainer_options=dict(explainer_options or {}), return_details=True))
        tables.append(comparison.table.assign(finding=finding))
        details[finding] = comparison
    table = pd.concat(tables, ignore_index=True)
    return (table, details) if return_details else table


def phantom_latent_shift_tables(bundle: Bundle, autoencoder: Bundle, findings: Sequence[str], n_images: int, *,
                                top_fraction: float = 0.05, curve_steps: int = 10) -> pd.DataFrame:
    """The Latent Shift rows (:func:`~cxrbench.explain.metrics.latent_shift_comparison`, plain and with the
    residual) on the same phantoms as :func:`phantom_localisation_tables`; one table, with a ``finding`` column.
    An autoencoder whose input does not convert to the classifier's is refused as by the pipeline."""
    check_scales(bundle.preprocess, autoencoder.preprocess, classifier_name=str(bundle.path or "the classifier"),
                 autoencoder_name=str(autoencoder.path or "the autoencoder"))
    tables = []
    for finding, xs, lesions, lungs, target in _phantom_batches(bundle, findings, n_images):
        t = latent_shift_comparison(bundle.model, xs, target, lesions, autoencoder=autoencoder.model,
                                    preprocess=bundle.preprocess, autoencoder_preprocess=autoencoder.preprocess,
                                    lung_masks=lungs, top_fraction=top_fraction,
                                    curve_steps=curve_steps)
        tables.append(pd.DataFrame(t).assign(finding=finding))
    return pd.concat(tables, ignore_index=True)

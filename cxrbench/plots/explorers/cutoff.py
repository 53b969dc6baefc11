"""Notebook 03's explorer: move the OOD gate's cutoff and watch what it keeps (the retained fraction), the AUC of
what it keeps with its bootstrap CI (Chester Fig. 6), and the images that fall just on each side."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, cast

import ipywidgets as w
import numpy as np
import pandas as pd

from cxrbench.models.bundle import Bundle
from cxrbench.ood.scoring import OODModel, score_images
from cxrbench.ood.sets import images_of, rotate_images
from cxrbench.ood.tradeoff import classifier_probabilities, skill_warning, tradeoff_sweep
from cxrbench.plots.explorers.base import Explorer
from cxrbench.plots.ood import tradeoff_figure

__all__ = ["CutoffExplorer", "cutoff_explorer", "rotation_cutoff_explorer"]


class CutoffExplorer(Explorer):
    """An OOD-cutoff slider over one pool of scored, labelled images (see :func:`cutoff_explorer`).

    ``slider`` (SelectionSlider) picks a row of ``table`` (the :func:`~cxrbench.ood.tradeoff.tradeoff_sweep`
    of the pool, sorted by cutoff); ``values`` holds that row's cutoff, n_retained, retained_fraction, auc_macro,
    auc_macro_ci_low/high, plus n_rejected and the indices of the example images shown (``kept_examples``,
    ``rejected_examples``)."""

    def __init__(self, scores: np.ndarray, thumbnails: Sequence[np.ndarray], table: pd.DataFrame, *,
                 notes: Sequence[str] | None, n_examples: int, scorer: str) -> None:
        self._scores, self._thumbs, self._notes = scores, thumbnails, notes
        self._n_ex, self._scorer = n_examples, scorer
        self.table = table.sort_values("cutoff").reset_index(drop=True)
        marked = np.flatnonzero(self.table["bundle_cutoff"].astype(bool).to_numpy())
        start = int(marked[0]) if marked.size else len(self.table) - 1
        options = [(f"{c:.4g}", i) for i, c in enumerate(self.table["cutoff"])]
        self.slider = w.SelectionSlider(options=options, value=start, description="cutoff",
                                        continuous_update=True, layout=w.Layout(width="520px"))
        super().__init__("Cutoff explorer: what the OOD gate keeps", [self.slider], figsize=(9.6, 3.6),
                         numbers_width="320px")
        self._marks: dict[str, Any] = {}
        self.slider.observe(lambda _: self._update(), names="value")
        self._update()

    def _update(self) -> None:
        row = self.table.iloc[int(self.slider.value)]
        cutoff = float(row["cutoff"])
        kept = np.flatnonzero(self._scores <= cutoff)
        rejected = np.flatnonzero(self._scores > cutoff)
        # the examples nearest the cutoff on each side: the hardest calls the gate makes there
        kept_ex = kept[np.argsort(self._scores[kept])[::-1][:self._n_ex]]
        rejected_ex = rejected[np.argsort(self._scores[rejected])[:self._n_ex]]
        self.values = {k: float(row[k]) for k in ("cutoff", "retained_fraction", "auc_macro", "auc_macro_ci_low",
                                                  "auc_macro_ci_high") if k in row.index}
        self.values.update(n_retained=int(row["n_retained"]), n_rejected=int(rejected.size),
                           kept_examples=kept_ex.tolist(), rejected_examples=rejected_ex.tolist())
        if not self._marks:
            self._draw_fixed()
        self._move(row)
        self._show(self._numbers_html())

    def _draw_fixed(self) -> None:
        """The trade-off curve and the empty example panels (kept on top, rejected below), drawn once."""
        self._new_layout()
        fig = self.figure
        grid = fig.add_gridspec(2, 2 + self._n_ex)
        curve = fig.add_subplot(grid[:, :2])
        tradeoff_figure(self.table, ax=curve, title="AUC of the images the gate keeps")
        self._marks["line"] = curve.axvline(1.0, color="black", lw=0.8, ls="--")
        self._marks["point"] = curve.plot([], [], "o", ms=9, mfc="none", mec="black", mew=2, label="this cutoff")[0]
        curve.legend(fontsize=6.5, loc="lower left")
        blank = np.zeros_like(self._thumbs[0]) if len(self._thumbs) else np.zeros((2, 2))
        self._marks["tiles"] = []
        for r, name in enumerate(("kept", "rejected")):
            row = []
            for k in range(self._n_ex):
                ax = fig.add_subplot(grid[r, 2 + k])
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_ylabel(f"{name}\n(score {'<=' if r == 0 else '>'} cutoff)", fontsize=8)
                ax.set_title(" \n ", fontsize=7)  # room for two lines, so no later title needs a new layout
                row.append((ax, ax.imshow(blank, cmap="gray", vmin=0, vmax=1),
                            ax.text(0.5, 0.5, "", ha="center", va="center", fontsize=8, transform=ax.transAxes)))
            self._marks["tiles"].append(row)

    def _move(self, row: pd.Series) -> None:
        self._marks["line"].set_xdata([row["retained_fraction"]] * 2)
        self._marks["point"].set_data([row["retained_fraction"]], [row["auc_macro"]])
        for r, (name, shown) in enumerate((("kept", self.values["kept_examples"]),
                                           ("rejected", self.values["rejected_examples"]))):
            for k, (ax, image, text) in enumerate(self._marks["tiles"][r]):
                if k >= len(shown):
                    image.set_visible(False)
                    ax.set_title(" \n ", fontsize=7)
                    text.set_text(f"none {name}" if k == 0 else "")
                    continue
                i = shown[k]
                image.set_data(self._thumbs[i])
                image.set_extent((-0.5, self._thumbs[i].shape[1] - 0.5, self._thumbs[i].shape[0] - 0.5, -0.5))
                image.set_visible(True)
                text.set_text("")
                note = self._notes[i] if self._notes is not None else ""
                ax.set_title(f"{_score_name(self._scorer).removesuffix(' score')} {self._scores[i]:.3f}\n{note}",
                             fontsize=7)

    def _numbers_html(self) -> str:
        v, n = self.values, len(self._scores)
        full = self.table.iloc[int(np.argmax(self.table["retained_fraction"].to_numpy()))]
        what = _score_name(self._scorer)
        rows = [f"cutoff <b>{v['cutoff']:.4g}</b>: an image whose {html.escape(what)} is above it is rejected "
                "as out of distribution",
                f"kept <b>{v['n_retained']}</b> of {n} images (<b>{v['retained_fraction']:.1%}</b>), "
                f"rejected {v['n_rejected']}",
                f"macro AUC of the kept images <b>{_auc(v.get('auc_macro'), v)}</b>",
                f"on all {n} images: {_auc(float(full['auc_macro']), full)}"]
        bundle = self.table[self.table["bundle_cutoff"].astype(bool)]
        if len(bundle):
            rows.append(f"the bundle's cutoff (red star): {float(bundle['cutoff'].iloc[0]):.4g}, keeps "
                        f"{float(bundle['retained_fraction'].iloc[0]):.1%}")
        if warning := skill_warning(self.table):
            rows.append(f"<span style='color:#a33'>{html.escape(warning)}</span>")
        return "<div style='font-size:12px;line-height:1.45'>" + "<br>".join(rows) + "</div>"

    def state_line(self) -> str:
        """The cutoff shown, for the static snapshot."""
        what = _score_name(self._scorer)
        return f"cutoff {self.values['cutoff']:.4g} ({what}; above it an image is rejected)"


def _score_name(scorer: str) -> str:
    """``"1 - SSIM score"`` for the ``ssim`` scorer, ``"l1 score"`` ..., a name with "score" in it as it is."""
    if "score" in scorer:
        return scorer
    return ("1 - SSIM" if scorer == "ssim" else scorer) + " score"


def _auc(auc: Any, row: Any) -> str:
    """``0.712 [0.651, 0.770] (95 % bootstrap CI)`` or why there is none."""
    if auc is None or not np.isfinite(auc):
        return "undefined (a class is missing among these images)"
    low, high = row.get("auc_macro_ci_low"), row.get("auc_macro_ci_high")
    if low is None or not np.isfinite(low):
        return f"{auc:.3f}"
    return f"{auc:.3f} [{float(low):.3f}, {float(high):.3f}] (95 % bootstrap CI)"


def _thumbnail(image: np.ndarray, side: int = 96) -> np.ndarray:
    """A small ``(side, side)`` float32 copy of an ``(H, W)`` [0, 1] image (antialiased), for the example panels."""
    from skimage.transform import resize

    image = np.asarray(image, dtype=np.float32)
    if max(image.shape) <= side:
        return image
    return resize(image, (side, side), anti_aliasing=True, preserve_range=True).astype(np.float32)


def _check_table(table: pd.DataFrame, scores: np.ndarray) -> None:
    """ValueError unless ``table`` is a trade-off sweep whose every row keeps what its cutoff keeps of ``scores``."""
    missing = {"cutoff", "n_retained", "retained_fraction", "auc_macro", "bundle_cutoff"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks the columns {sorted(missing)} of a tradeoff_sweep table")
    kept = np.array([(scores <= c).sum() for c in table["cutoff"]])
    wrong = np.flatnonzero(kept != table["n_retained"].to_numpy())
    if wrong.size:
        k = int(wrong[0])
        raise ValueError(f"table does not belong to these scores: its cutoff {table['cutoff'].iloc[k]:.4g} keeps "
                         f"{int(table['n_retained'].iloc[k])} images, of these scores it keeps {int(kept[k])}")


def cutoff_explorer(ood_scores: Any, y_true: Any | None, y_score: Any | None, images: Sequence[np.ndarray], *,
                    bundle_cutoff: float | None = None, finding_names: Sequence[str] | None = None,
                    image_notes: Sequence[str] | None = None, scorer: str = "OOD score", n_points: int = 19,
                    min_retained: float = 0.1, n_bootstrap: int = 200, n_examples: int = 4,
                    seed: int = 0, table: pd.DataFrame | None = None) -> CutoffExplorer:
    """An OOD-cutoff slider (notebook 03): the retained fraction, the macro AUC of the kept images with its
    bootstrap CI, and the ``n_examples`` images nearest the cutoff on each side.

    Parameters
    ----------
    ood_scores
        ``(N,)`` OOD scores, higher = more out of distribution; an image is kept when its score <= cutoff.
    y_true, y_score
        ``(N, F)`` (or ``(N,)``) 0/1 labels and the classifier's scores of the same images (None with ``table``).
    images
        ``N`` ``(H, W)`` [0, 1] images (kept as small thumbnails).
    bundle_cutoff
        The OOD bundle's own cutoff: the slider starts there and the curve stars it.
    image_notes
        One short line per image under its thumbnail (e.g. ``"rotated 45°"``).
    n_points, min_retained, n_bootstrap, seed
        The slider's stops and the CI, as :func:`cxrbench.ood.tradeoff.tradeoff_sweep` (whose table the numbers
        are): cutoffs at the score quantiles that keep ``min_retained`` .. 100 % of the images.
    table
        That sweep, already computed for these same scores (e.g. the ``sweep`` of
        :func:`~cxrbench.ood.tradeoff.rotation_tradeoff`), instead of computing it again; ValueError when a row's
        ``n_retained`` is not what its cutoff keeps of ``ood_scores``.
    """
    scores = np.asarray(ood_scores, dtype=float).ravel()
    if len(images) != scores.size:
        raise ValueError(f"{len(images)} images for {scores.size} OOD scores; give one image per score")
    if image_notes is not None and len(image_notes) != scores.size:
        raise ValueError(f"{len(image_notes)} image notes for {scores.size} images")
    if not np.isfinite(scores).all():
        raise ValueError("ood_scores contains NaN or inf; score every image first (or drop the unreadable ones)")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    if table is None:
        if y_true is None or y_score is None:
            raise ValueError("give the labels and the classifier's scores (y_true, y_score), or a precomputed table")
        table = tradeoff_sweep(scores, np.asarray(y_true), np.asarray(y_score), bundle_cutoff=bundle_cutoff,
                               finding_names=finding_names, n_points=n_points, min_retained=min_retained,
                               n_bootstrap=n_bootstrap, seed=seed)
    else:
        _check_table(table, scores)
    return CutoffExplorer(scores, [_thumbnail(im) for im in images], table, notes=image_notes,
                          n_examples=n_examples, scorer=scorer)


def rotation_cutoff_explorer(classifier: Bundle, ood: Bundle, manifest: pd.DataFrame,
                             angles: Sequence[float] = (0, 15, 30, 45, 60, 75, 90), **options: Any) -> CutoffExplorer:
    """:func:`cutoff_explorer` over the pool of ``manifest``'s labelled images rotated by each of ``angles`` (the
    pool of :func:`cxrbench.ood.tradeoff.rotation_tradeoff`): the OOD bundle's scores, the classifier's raw
    probabilities of its labels that are columns of ``manifest``, each thumbnail noted with its rotation.
    ``options`` go to :func:`cutoff_explorer` (``n_bootstrap``, ``n_points``, ``n_examples`` ...); with
    ``table=`` (the ``sweep`` of :func:`~cxrbench.ood.tradeoff.rotation_tradeoff` on the same images and angles)
    the classifier does not run again: only the gate scores the pool, to place the example images."""
    findings = [f for f in classifier.labels if f in manifest.columns]
    if not findings:
        raise ValueError(f"the classifier's labels {classifier.labels} share none with the manifest's columns "
                         f"{list(manifest.columns)}")
    scorer = ood.card.ood["cutoff"]["scorer"]
    columns = [classifier.labels.index(f) for f in findings]
    base = images_of(manifest)
    y = manifest[findings].to_numpy(dtype=int)
    pooled: dict[str, list[Any]] = {"score": [], "y": [], "p": [], "thumb": [], "note": []}
    for angle in angles:
        rotated = rotate_images(base, angle)
        pooled["score"].append(score_images(cast(OODModel, ood.model), rotated, preprocess=ood.preprocess)[scorer])
        if options.get("table") is None:  # a given sweep already holds what the classifier's outputs give
            pooled["p"].append(classifier_probabilities(classifier, rotated)[:, columns])
            pooled["y"].append(y)
        pooled["thumb"] += [_thumbnail(im) for im in rotated]
        pooled["note"] += [f"rotated {angle:g}°"] * len(rotated)
    options.setdefault("bundle_cutoff", ood.card.ood["cutoff"]["threshold"])
    options.setdefault("scorer", scorer)
    labels, probabilities = (np.concatenate(pooled[k]) if pooled[k] else None for k in ("y", "p"))
    return cutoff_explorer(np.concatenate(pooled["score"]), labels, probabilities, pooled["thumb"],
                           finding_names=findings, image_notes=pooled["note"], **options)

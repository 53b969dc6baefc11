"""Notebook 02's explorer: move a finding's threshold and watch its point on the ROC curve, TPR / FPR, the
confusion matrix, F1 and the calibrated value that threshold maps to (Chester Eq. 1)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from cxrbench._types import as_labels_and_scores
from cxrbench.evaluation.calibration import calibrate, youden_operating_point
from cxrbench.evaluation.metrics import threshold_array, threshold_comparison
from cxrbench.plots.explorers.base import Explorer
from cxrbench.plots.style import MPL_CHANCE_LINE, MPL_OPERATING_POINT

__all__ = ["ThresholdExplorer", "threshold_explorer"]


def rates_at(y: np.ndarray, s: np.ndarray, threshold: float, finding: str = "finding") -> dict[str, float]:
    """Counts and rates of ``(N,)`` 0/1 labels ``y`` when ``s >= threshold`` is called positive.

    tp, fp, fn, tn from scikit-learn's confusion matrix; f1, tpr (sensitivity), specificity from
    :func:`cxrbench.evaluation.metrics.threshold_comparison`; fpr = 1 - specificity.
    """
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel())
    row = threshold_comparison(y[:, None], s[:, None], [finding], {finding: threshold}).iloc[0]
    spec = float(row["spec@opt"])
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "f1": float(row["f1@opt"]),
            "tpr": float(row["sens@opt"]), "specificity": spec, "fpr": 1.0 - spec}


class ThresholdExplorer(Explorer):
    """A finding picker and a threshold slider over one split's labels and raw scores (see
    :func:`threshold_explorer`). ``finding`` (Dropdown) and ``slider`` (FloatSlider, raw probability) drive it;
    ``values`` holds what is shown: threshold, calibrated, tp, fp, fn, tn, tpr, fpr, specificity, f1,
    youden_threshold, operating_point."""

    def __init__(self, y: np.ndarray, s: np.ndarray, findings: Sequence[str], operating_points: np.ndarray,
                 *, finding: str | None, split: str) -> None:
        self._y, self._s, self._names, self._ops, self._split = y, s, list(findings), operating_points, split
        usable = [f for j, f in enumerate(self._names) if 0 < y[:, j].sum() < len(y)]
        if not usable:
            raise ValueError("no finding has both positives and negatives in these labels: there is no ROC curve "
                             "to explore")
        if finding is not None and finding not in usable:
            raise ValueError(f"finding {finding!r} is not one of the findings with both classes here: {usable}")
        self.excluded = [f for f in self._names if f not in usable]
        self.finding = w.Dropdown(options=usable, value=finding or usable[0], description="finding")
        self.slider = w.FloatSlider(min=0.0, max=1.0, step=0.001, readout_format=".3f", continuous_update=True,
                                    description="threshold", layout=w.Layout(width="420px"))
        self.to_youden = w.Button(description="Youden point", tooltip="the threshold with the highest TPR - FPR here")
        self.to_operating_point = w.Button(description="operating point",
                                           tooltip="the threshold fitted on the validation split (calibrated 0.5)")
        super().__init__("Threshold explorer: one finding, one threshold",
                         [self.finding, self.slider, self.to_youden, self.to_operating_point], figsize=(9.6, 3.2))
        self._busy = False
        self._fixed: dict[str, Any] = {}
        self._marks: dict[str, Any] = {}
        self.finding.observe(lambda _: self._on_finding(), names="value")
        self.slider.observe(lambda _: self._update(), names="value")
        self.to_youden.on_click(lambda _: setattr(self.slider, "value", self._fixed["youden_threshold"]))
        self.to_operating_point.on_click(lambda _: self._jump_to_operating_point())
        self._on_finding()

    @property
    def _column(self) -> tuple[int, np.ndarray, np.ndarray]:
        j = self._names.index(self.finding.value)
        return j, self._y[:, j], self._s[:, j]

    def _jump_to_operating_point(self) -> None:
        op = self._ops[self._column[0]]
        if np.isfinite(op):
            self.slider.value = float(np.clip(op, self.slider.min, self.slider.max))

    def _on_finding(self) -> None:
        """New finding: the slider spans its scores and starts at its operating point (else its Youden point);
        the curves are drawn once here, the slider then moves only the markers."""
        j, y, s = self._column
        low, high = math.floor(float(s.min()) * 100) / 100, math.ceil(float(s.max()) * 100) / 100
        high = max(high, low + 0.01)
        op, youden = float(self._ops[j]), youden_operating_point(y, s)
        start = op if np.isfinite(op) and low <= op <= high else youden
        self._busy = True
        try:
            self.slider.min, self.slider.max = 0.0, 1.0  # widen first, so no bound ever crosses the other
            self.slider.step = max(min(0.001, (high - low) / 200), 1e-5)
            self.slider.readout_format = ".3f" if self.slider.step >= 0.001 else ".4f"
            self.slider.min, self.slider.max = low, high
            self.slider.value = float(start)
        finally:
            self._busy = False
        self.to_operating_point.disabled = not np.isfinite(op)
        self._fixed = {"operating_point": op, "youden_threshold": youden,
                       "youden": rates_at(y, s, youden, self.finding.value),
                       "op_rates": rates_at(y, s, op, self.finding.value) if np.isfinite(op) else None}
        self._draw_curves(y, s)
        self._update()

    def _update(self) -> None:
        if self._busy:
            return
        j, y, s = self._column
        t = self._snapped(float(self.slider.value))
        op = self._fixed["operating_point"]
        values: dict[str, Any] = rates_at(y, s, t, self.finding.value)
        values["calibrated"] = float(calibrate(np.array([t]), [op])[0]) if np.isfinite(op) else math.nan
        self.values = {**values, **self._fixed}
        self._move_markers()
        self._show(self._numbers_html(y))

    def _snapped(self, t: float) -> float:
        """``t``, or the operating point / Youden threshold when ``t`` is within half a slider step of it.

        A browser's slider snaps every value to its grid of steps and sends the snapped value back, so a
        threshold set exactly (the start, the buttons) would come back a hair off; a hair above the Youden
        threshold (a score) already drops that image from the positives."""
        for key in (self._fixed["operating_point"], self._fixed["youden_threshold"]):
            if np.isfinite(key) and abs(t - key) <= 0.51 * float(self.slider.step):
                return float(key)
        return t

    def _draw_curves(self, y: np.ndarray, s: np.ndarray) -> None:
        """The three panels' fixed parts: ROC with its Youden and operating points, the confusion matrix, f_opt."""
        fixed = self._fixed
        self._new_layout()
        roc, cm, cal = self.figure.subplots(1, 3, width_ratios=[1.15, 0.85, 1.0])
        fpr, tpr, _ = roc_curve(y, s)
        roc.plot([0, 1], [0, 1], **MPL_CHANCE_LINE, label="chance")
        roc.plot(fpr, tpr, color="#3b6ea8", lw=1.4, label="ROC of these images")
        yd = fixed["youden"]
        roc.plot([yd["fpr"]], [yd["tpr"]], "D", color="#2a9d3a", ms=7, label="Youden point (max TPR - FPR)")
        if fixed["op_rates"] is not None:
            roc.plot([fixed["op_rates"]["fpr"]], [fixed["op_rates"]["tpr"]], **MPL_OPERATING_POINT,
                     label="validation operating point")
        self._marks = {"roc": roc.plot([], [], "o", ms=9, mfc="none", mec="black", mew=2, label="this threshold")[0]}
        roc.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate",
                title=f"ROC, {self.finding.value}")
        roc.legend(fontsize=6.5, loc="lower right")
        self._marks["cm"] = _confusion_panel(cm)
        cal.set(xlim=(0, 1), ylim=(0, 1), xlabel="raw probability (threshold)", ylabel="calibrated probability",
                title="f_opt: the threshold, calibrated")
        op = fixed["operating_point"]
        if np.isfinite(op):
            x = np.linspace(0, 1, 201)
            cal.plot(x, calibrate(x, [op]), color="#3b6ea8", lw=1.2)
            cal.plot([op], [0.5], **MPL_OPERATING_POINT)
            self._marks["cal_lines"] = cal.plot([], [], color="black", lw=0.8, ls="--")[0]
            self._marks["cal"] = cal.plot([], [], "o", ms=8, mfc="none", mec="black", mew=2)[0]
        else:
            cal.text(0.5, 0.5, "no operating point:\nno calibration", ha="center", va="center", fontsize=9)

    def _move_markers(self) -> None:
        v, m = self.values, self._marks
        m["roc"].set_data([v["fpr"]], [v["tpr"]])
        image, texts = m["cm"]
        counts = np.array([[v["tn"], v["fp"]], [v["fn"], v["tp"]]])
        image.set_data(counts)
        image.set_clim(0, max(1, int(counts.max())) * 1.3)
        for (r, c), n in np.ndenumerate(counts):
            texts[r][c].set_text(f"{[['TN', 'FP'], ['FN', 'TP']][r][c]}\n{n}")
        if "cal" in m:
            t, c = v["threshold"], v["calibrated"]
            m["cal_lines"].set_data([t, t, 0], [0, c, c])
            m["cal"].set_data([t], [c])

    def _numbers_html(self, y: np.ndarray) -> str:
        v, f = self.values, html.escape(self.finding.value)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        if np.isfinite(v["operating_point"]):
            side = "above" if v["threshold"] > v["operating_point"] else "at or below"
            cal = (f"calibrated <b>{v['calibrated']:.3f}</b> ({side} the validation operating point "
                   f"{v['operating_point']:.3f}, which maps to 0.5)")
        else:
            cal = "no calibrated value: this finding has no operating point (no validation positives)"
        yd = v["youden"]
        rows = [f"<b>{f}</b>: {n_pos} positive and {n_neg} negative images ({html.escape(self._split)})",
                f"threshold (raw probability) <b>{v['threshold']:.3f}</b> &rarr; {cal}",
                f"TPR (sensitivity) <b>{v['tpr']:.3f}</b> = {v['tp']} / {n_pos} positives called positive",
                f"FPR <b>{v['fpr']:.3f}</b> = {v['fp']} / {n_neg} negatives called positive "
                f"(specificity {v['specificity']:.3f})",
                f"F1 <b>{_fmt(v['f1'])}</b> (2 TP / (2 TP + FP + FN), TP {v['tp']}, FP {v['fp']}, FN {v['fn']})",
                f"Youden point here: threshold {yd['threshold']:.3f} (TPR {yd['tpr']:.3f}, FPR {yd['fpr']:.3f}, "
                f"J {yd['tpr'] - yd['fpr']:.3f})"]
        if self.excluded:
            rows.append(f"<small>not offered (one class only): {html.escape(', '.join(self.excluded))}</small>")
        return "<div style='font-size:12px;line-height:1.45'>" + "<br>".join(rows) + "</div>"

    def state_line(self) -> str:
        """The finding and threshold shown, for the static snapshot."""
        return f"finding {self.finding.value}, threshold {self.values['threshold']:.3f} (raw probability)"


def _fmt(x: float) -> str:
    return "undefined (no positives and none called)" if math.isnan(x) else f"{x:.3f}"


def _confusion_panel(ax: Any) -> tuple[Any, list[list[Any]]]:
    """An empty 2 x 2 confusion matrix (rows: actual, columns: predicted): its image and its count texts."""
    image = ax.imshow(np.zeros((2, 2)), cmap="Blues", vmin=0, vmax=1)
    texts = [[ax.text(c, r, "", ha="center", va="center", fontsize=10) for c in range(2)] for r in range(2)]
    ax.set_xticks([0, 1], ["negative", "positive"])
    ax.set_yticks([0, 1], ["negative", "positive"])
    ax.set(xlabel="predicted (score >= threshold)", ylabel="actual label", title="confusion matrix")
    return image, texts


def threshold_explorer(y_true: Any, y_score: Any, findings: Sequence[str], calibration: Any = None, *,
                       finding: str | None = None, split: str = "test split") -> ThresholdExplorer:
    """A finding picker and a threshold slider (notebook 02): the point on the ROC curve, TPR / FPR, the
    confusion matrix, F1 and the calibrated value of the threshold, with the Youden point of these images marked.

    Parameters
    ----------
    y_true, y_score
        ``(N, F)`` 0/1 labels and raw probabilities in [0, 1] (sigmoid outputs) of one split.
    findings
        The ``F`` column names. Findings with only one class here are left out of the picker (and listed).
    calibration
        The operating points of Chester's f_opt (fitted on the *validation* split): an
        :class:`~cxrbench.evaluation.calibration.OperatingPoints`, a ``{finding: threshold}`` dict or ``(F,)``
        thresholds; None: no calibrated value. The slider starts at the finding's operating point.
    finding
        The finding shown first (default: the first with both classes).
    split
        What the images are, for the text ("test split").

    A threshold ``t`` calls ``score >= t`` positive (scikit-learn's and the package's convention).
    """
    y, s, _ = as_labels_and_scores(y_true, y_score)
    findings = list(findings)
    if y.shape[1] != len(findings):
        raise ValueError(f"{len(findings)} findings named for {y.shape[1]} label columns")
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"y_score must be raw probabilities in [0, 1], got [{s.min():.3g}, {s.max():.3g}]; "
                         "pass the sigmoid of the logits")
    ops = threshold_array(calibration, findings)
    return ThresholdExplorer(y, s, findings, ops, finding=finding, split=split)

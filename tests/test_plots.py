"""Every figure lives in cxrbench.plots, is called ``*_figure`` and draws what it is given."""

from __future__ import annotations

import ast
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import cxrbench.plots as plots  # noqa: E402
from cxrbench.evaluation.calibration import OperatingPoints  # noqa: E402
from cxrbench.models.autoencoder import ConvAutoencoder  # noqa: E402
from cxrbench.ood import SCORER_NAMES, score_sets  # noqa: E402

PACKAGE = Path(plots.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def _siblings(ax, which: str) -> list:
    group = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    return [a for a in group.get_siblings(ax) if a is not ax]


def _axis_is_readable(ax, which: str) -> str | None:
    """Why this axis of a drawn figure is unreadable (no title, no tick labels), or None."""
    fig = ax.figure
    label = ax.get_xlabel() if which == "x" else ax.get_ylabel()
    sup = getattr(fig, "_supxlabel" if which == "x" else "_supylabel", None)
    shared = _siblings(ax, which)
    named = [label] + [a.get_xlabel() if which == "x" else a.get_ylabel() for a in shared]
    if not any(n.strip() for n in named) and not (sup is not None and sup.get_text().strip()):
        return f"{which} axis has no title"
    ticks = [ax] + shared
    labels = [t for a in ticks for t in (a.get_xticklabels() if which == "x" else a.get_yticklabels())]
    if not any(t.get_visible() and t.get_text().strip() for t in labels):
        return f"{which} axis shows no tick labels"
    return None


def assert_readable(fig) -> None:
    """Every data panel (not an image panel or a switched-off one) has both axes titled and tick labels shown."""
    fig.canvas.draw()  # tick labels get their text when drawn
    problems = []
    for k, ax in enumerate(fig.axes):
        if not ax.axison or ax.images:
            continue
        for which in ("x", "y") if not hasattr(ax, "_colorbar") else ("y",):
            if why := _axis_is_readable(ax, which):
                problems.append(f"panel {k} ({ax.get_title()!r}): {why}")
    assert not problems, problems


def assert_plotly_readable(fig) -> None:
    """Every axis of a plotly figure has a title and shows its tick labels."""
    layout = fig.to_dict()["layout"]
    axes = {k: v for k, v in layout.items() if k.startswith(("xaxis", "yaxis"))}
    assert axes
    for name, axis in axes.items():
        assert (axis.get("title") or {}).get("text"), f"{name} has no title"
        assert axis.get("showticklabels", True) is not False, f"{name} hides its tick labels"
        assert axis.get("tickvals") is None or len(axis["tickvals"]) >= 2, f"{name} has fewer than 2 ticks"


def test_one_naming_scheme_and_no_figure_outside_plots():
    assert plots.__all__ and all(name.endswith(("_figure", "_table")) for name in plots.__all__)
    drawing = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "plots" and path.parent.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith(("matplotlib.pyplot", "plotly")) for n in names):
                drawing.append(str(path.relative_to(PACKAGE)))
    assert not drawing, f"figures drawn outside cxrbench/plots: {sorted(set(drawing))}"


def test_image_grid_and_data_figures():
    rng = np.random.default_rng(0)
    images = [rng.random((16, 16)) for _ in range(5)]
    mask = np.zeros((16, 16))
    mask[4:12, 4:12] = 1
    fig = plots.image_grid_figure(images, [f"t{k}" for k in range(5)], ncols=3, contours=[mask, None, None, None, None])
    assert_readable(fig)  # image panels are exempt; nothing else is drawn
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "t0" and fig.axes[5].get_title() == ""
    assert len(fig.axes[0].collections) > 0 and len(fig.axes[1].collections) == 0  # only the first is outlined

    counts = pd.Series({"Effusion": 30, "Hernia": 2, "Mass": 12})
    bar_fig = plots.bar_figure(counts, title="per finding", log=True)
    assert_readable(bar_fig)
    bars = bar_fig.axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["Hernia", "Mass", "Effusion"]  # largest on top
    assert bars.get_xscale() == "log" and [p.get_width() for p in bars.patches] == [2, 12, 30]

    table = pd.DataFrame([[1.0, 0.25], [0.25, 1.0]], index=["a", "b"], columns=["a", "b"])
    heat_fig = plots.heatmap_figure(table, fmt="{:.2f}", value_label="P(column | row)")
    assert_readable(heat_fig)
    heat = heat_fig.axes[0]
    assert heat_fig.axes[1].get_ylabel() == "P(column | row)"
    assert sorted(t.get_text() for t in heat.texts) == ["0.25", "0.25", "1.00", "1.00"]

    eq = plots.equalisation_figure(images[0], {"hist": images[1], "clahe": images[2]})
    assert_readable(eq)
    assert eq.axes[3].get_xlabel() == "grey level" and eq.axes[3].get_ylabel() == "pixels"
    assert [ax.get_title() for ax in eq.axes[:3]] == ["original", "hist", "clahe"] and len(eq.axes) == 6


def test_evaluation_figures():
    rng = np.random.default_rng(1)
    y = (rng.random((60, 3)) < 0.4).astype(int)
    y[:, 2] = 0  # a finding without positives
    scores = np.clip(0.5 * y + 0.6 * rng.random(y.shape), 0, 1)
    ops = OperatingPoints({"A": 0.5, "B": 0.4, "C": float("nan")}, fitted_on="validation")
    roc = plots.roc_figure(y, scores, ["A", "B", "C"], ops, ncols=3)
    assert_plotly_readable(roc)
    assert roc.layout.xaxis.title.text == "false positive rate" and roc.layout.yaxis3.title.text == "true positive rate"
    titles = [a.text for a in roc.layout.annotations]
    assert titles[0].startswith("A (AUC ") and titles[2] == "C (no positives)"
    stars = [t for t in roc.data if t.mode == "markers"]
    assert len(stars) == 2  # A and B have an operating point and both classes
    pred = scores[:, 0] >= 0.5
    assert stars[0].x[0] == pytest.approx(pred[y[:, 0] == 0].mean())
    assert stars[0].y[0] == pytest.approx(pred[y[:, 0] == 1].mean())

    calib_fig = plots.calibration_figure({"A": 0.2, "B": 0.7, "C": float("nan")})
    assert_readable(calib_fig)
    calib = calib_fig.axes[0]
    assert len(calib.get_lines()) == 2 * 2 + 1  # a curve and a star per finding with a point, the 0.5 line
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.5], "val_loss": [0.8, 0.6], "val_auc": [0.55, 0.6]})
    training = plots.training_figure(history)
    assert_readable(training)
    assert [len(ax.get_lines()) for ax in training.axes] == [2, 2]


def test_ood_figures():
    torch.manual_seed(0)
    model = ConvAutoencoder(latent_dim=8, base_channels=4).eval()
    x = 0.45 + 0.1 * torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    fig = plots.reconstruction_figure(model, x, ["a", "b", "c"])
    assert len(fig.axes) == 9 and "SSIM" in fig.axes[0].get_title()
    scores = score_sets(model, {"in": x, "far": torch.rand(4, 1, 64, 64)})
    fig2 = plots.score_distribution_figure(scores.pop("in"), scores, cutoff={"scorer": "ssim", "threshold": 0.5})
    assert len(fig2.axes) == len(SCORER_NAMES)
    assert_readable(fig2)
    assert [t.get_text() for t in fig2.axes[0].get_yticklabels()] == ["in-distribution (held out)", "far"]
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.2, 0.1], "val_l1": [0.2, 0.15],
                            "val_ssim_median": [0.3, 0.5]})
    ood_training = plots.ood_training_figure(history)
    assert len(ood_training.axes) == 2
    assert_readable(ood_training)
    table = pd.DataFrame({"retained_fraction": [0.5, 1.0], "auc_macro": [0.8, 0.7], "bundle_cutoff": [True, False]})
    per_angle = pd.DataFrame({"angle": [0, 90], "rejected_fraction": [0.1, 0.9], "auc_all": [0.7, 0.5],
                              "auc_retained": [0.72, 0.6]})
    rotation = plots.rotation_figure(per_angle)
    assert len(rotation.axes[1].get_lines()) == 2
    assert_readable(rotation)
    tradeoff = plots.tradeoff_figure(table, title="t")
    assert_readable(tradeoff)
    ax = tradeoff.axes[0]
    assert any(line.get_marker() == "*" for line in ax.get_lines())


class _Report:
    """What probability_figure reads from a Report: its table."""

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"finding": ["Effusion", "Mass"], "calibrated": [0.8, 0.2], "raw": [0.3, 0.05],
                             "operating_point": [0.2, 0.1]})


def test_probability_and_browser_study_figures():
    from cxrbench.evaluation.reliability import finding_reliability

    reliability = finding_reliability({"Effusion": {"auc": 0.81, "auc_ci_low": 0.7, "auc_ci_high": 0.9, "n_pos": 9},
                                       "Mass": {"auc": 0.7, "auc_ci_low": 0.4, "auc_ci_high": 0.9, "n_pos": 9}},
                                      ["Effusion", "Mass"])
    fig = plots.probability_figure(_Report(), reliability)
    assert fig.layout.template.layout.paper_bgcolor == "white"  # the one plotly style (plotly_white)
    bar = fig.data[0]
    assert list(bar.y) == ["Mass", "Effusion"] and list(bar.x) == [0.2, 0.8]  # highest on top
    assert list(bar.marker.color) == ["#bccde0", "#c0392b"] and "test %{customdata[2]}" in bar.hovertemplate
    assert bar.customdata[0][2].endswith("not reliable") and bar.customdata[1][2] == "AUC 0.81 [0.70, 0.90], 9 pos."
    assert list(plots.probability_figure(_Report()).data[0].marker.color) == ["#2e6da4", "#c0392b"]

    python = {"calibrated": np.array([[0.5, 0.2], [0.6, 0.1]])}
    browser = {"pillow": {"calibrated": python["calibrated"] + 0.01},
               "canvas-low": {"calibrated": python["calibrated"] - 0.05}}
    study = plots.browser_study_figure(python, browser, ["A", "B"])
    assert [ax.get_title() for ax in study.axes] == ["A", "B"] and len(study.axes[0].patches) > 0
    assert_readable(study)


def test_faithfulness_and_comparison_figures_are_readable():
    from cxrbench.explain.metrics import FaithfulnessCurves

    fr = np.linspace(0, 1, 4)
    curve = FaithfulnessCurves(fractions=fr, deletion=np.ones((2, 4)) - fr, insertion=np.ones((2, 4)) * fr,
                               deletion_auc=np.array([0.5, 0.5]), insertion_auc=np.array([0.5, 0.5]),
                               score="probability")
    assert_readable(plots.faithfulness_figure({"saliency": curve, "random": curve}))
    table = pd.DataFrame({"Model": ["Predict nothing", "MLP"], "Features": ["-", "LBP"], "Micro-F1": [0.0, 0.4],
                          "Macro-F1": [0.0, 0.3], "Macro AUC": [0.5, 0.7], "Degenerate": [True, False]})
    assert_readable(plots.comparison_figure(table))


def test_readable_table_keeps_narrow_tables_transposes_short_ones_and_wraps_long_ones():
    narrow = pd.DataFrame(np.arange(6.0).reshape(3, 2), columns=["a", "b"])
    assert len(plots.readable_table(narrow).parts) == 1 and plots.readable_table(narrow).parts[0] is narrow

    short = pd.DataFrame(np.random.default_rng(0).random((2, 12)), columns=[f"auc_column_{k}" for k in range(12)])
    t = plots.readable_table(short, max_columns=8)
    assert t.transposed and t.parts[0].shape == (12, 2) and "transposed" in t._repr_html_()

    wide = pd.DataFrame(np.random.default_rng(1).random((14, 9)), columns=[f"c{k}" for k in range(9)],
                        index=[f"finding{k}" for k in range(14)])
    w = plots.readable_table(wide, max_columns=8, precision=2, caption="AUC beside Chester Table 1")
    assert [p.shape[1] for p in w.parts] == [5, 4]  # balanced blocks, every column kept once, in order
    assert [c for p in w.parts for c in p.columns] == list(wide.columns)
    page = w._repr_html_()
    assert page.count("<table") == 2 and page.count("finding13") == 2  # the index repeats in each block
    assert f"{wide.iloc[0, 0]:.2f}" in page and "AUC beside Chester Table 1" in page
    assert "overflow-wrap:anywhere" in page  # long headers break instead of widening the table
    assert "auc_\u200bstd_\u200bhalf" in plots.readable_table(short.rename(columns={"auc_column_0": "auc_std_half"}),
                                                            max_columns=20)._repr_html_()  # ... at underscores
    with pytest.raises(ValueError, match="max_columns"):
        plots.readable_table(wide, max_columns=0)

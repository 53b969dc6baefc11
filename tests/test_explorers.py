"""The explorers of notebooks 02-04 (cxrbench.plots.explorers), driven from Python as a student drives them: move the
control, read what is shown, and check it against the package's own computation done independently."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrbench.evaluation import calibrate, evaluate_predictions, fit_operating_points, youden_operating_point
from cxrbench.plots.explorers import cutoff_explorer, method_picker, threshold_explorer

FINDINGS = ["Effusion", "Mass", "Hernia"]


def _scores(seed: int = 0, n: int = 160):
    """Labels with some signal in the scores; Hernia has no positives (one class only)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.2, 0.0]).astype(int)
    s = np.clip(0.25 * y + 0.7 * rng.random((n, 3)), 0, 1)
    return y, s


def _png(widget_value: bytes) -> bool:
    return widget_value[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- threshold (02)
def test_threshold_explorer_shows_the_package_numbers_at_every_threshold_it_is_moved_to():
    y_val, s_val = _scores(1)
    ops = fit_operating_points(y_val, s_val, FINDINGS)
    y, s = _scores(2)
    ex = threshold_explorer(y, s, FINDINGS, ops)
    # it starts at the finding's validation operating point, which calibrates to exactly 0.5
    assert ex.finding.value == "Effusion" and ex.slider.value == pytest.approx(ops.thresholds["Effusion"])
    assert ex.values["calibrated"] == pytest.approx(0.5)
    assert "Hernia" not in ex.finding.options and "not offered (one class only): Hernia" in ex.numbers.value
    seen_f1 = set()
    for t in (0.2, 0.45, 0.7):
        before = ex.picture.value
        ex.slider.value = t
        table, _ = evaluate_predictions(y, s, FINDINGS, {"Effusion": t, "Mass": t, "Hernia": t}, n_boot=1, n_splits=1)
        row = table.set_index("finding").loc["Effusion"]
        v = ex.values
        assert v["tpr"] == pytest.approx(row["sensitivity"]) and v["f1"] == pytest.approx(row["f1"])
        assert v["fpr"] == pytest.approx(1 - row["specificity"])
        pos, called = y[:, 0] == 1, s[:, 0] >= t
        assert (v["tp"], v["fp"], v["fn"], v["tn"]) == ((pos & called).sum(), (~pos & called).sum(),
                                                       (pos & ~called).sum(), (~pos & ~called).sum())
        assert v["calibrated"] == pytest.approx(calibrate(np.array([t]), [ops.thresholds["Effusion"]])[0])
        shown = ex.numbers.value
        assert f"<b>{t:.3f}</b>" in shown and f"<b>{v['tpr']:.3f}</b>" in shown and f"<b>{v['f1']:.3f}</b>" in shown
        assert f"calibrated <b>{v['calibrated']:.3f}</b>" in shown
        assert _png(ex.picture.value) and ex.picture.value != before  # the point moved in the picture
        seen_f1.add(round(v["f1"], 6))
    assert len(seen_f1) == 3
    # a browser sends back the slider's value snapped to its steps: near the operating point it is the point
    ex.slider.value = ops.thresholds["Effusion"] + 0.4 * ex.slider.step
    assert ex.values["threshold"] == ops.thresholds["Effusion"] and ex.values["calibrated"] == pytest.approx(0.5)


def test_threshold_explorer_youden_button_and_finding_switch():
    y, s = _scores(3)
    ex = threshold_explorer(y, s, FINDINGS)  # no calibration: no operating point, no calibrated value
    assert ex.to_operating_point.disabled and np.isnan(ex.values["calibrated"])
    assert "no calibrated value" in ex.numbers.value
    ex.finding.value = "Mass"
    youden = youden_operating_point(y[:, 1], s[:, 1])
    assert ex.slider.value == pytest.approx(youden)  # without an operating point it starts at the Youden point
    assert ex.slider.min <= s[:, 1].min() and ex.slider.max >= s[:, 1].max()
    ex.slider.value = ex.slider.min
    assert ex.values["tpr"] == 1.0 and ex.values["fpr"] == 1.0  # everything called positive
    ex.to_youden.click()
    j = ex.values["tpr"] - ex.values["fpr"]
    assert ex.slider.value == pytest.approx(youden) and j == pytest.approx(ex.values["youden"]["tpr"]
                                                                           - ex.values["youden"]["fpr"])
    assert f"J {j:.3f}" in ex.numbers.value


def test_threshold_explorer_refuses_logits_and_shapes_with_the_reason():
    y, s = _scores(0)
    with pytest.raises(ValueError, match="raw probabilities in \\[0, 1\\].*sigmoid"):
        threshold_explorer(y, s * 8 - 4, FINDINGS)
    with pytest.raises(ValueError, match="2 findings named for 3 label columns"):
        threshold_explorer(y, s, FINDINGS[:2])
    with pytest.raises(ValueError, match="no finding has both positives and negatives"):
        threshold_explorer(y[:, 2:], s[:, 2:], ["Hernia"])


def test_an_explorer_offers_a_static_snapshot_beside_the_live_widget():
    y, s = _scores(0)
    ex = threshold_explorer(y, s, FINDINGS)
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # Jupyter and Voila draw the live widget
    page = bundle["text/html"]  # nbconvert without widget state shows this
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    assert png == ex.picture.value and ex.numbers.value in page and "finding Effusion, threshold" in page


# ------------------------------------------------------------------------------------------------ cutoff (03)
def test_cutoff_explorer_keeps_what_the_cutoff_says_and_shows_the_auc_of_it():
    rng = np.random.default_rng(0)
    n = 240
    score = rng.random(n)
    y = (rng.random((n, 2)) < 0.35).astype(int)
    p = np.clip(y * 0.4 * (1 - score[:, None]) + 0.6 * rng.random((n, 2)), 0, 1)  # less skill on high scores
    images = [np.full((32, 32), v, np.float32) for v in score]
    ex = cutoff_explorer(score, y, p, images, bundle_cutoff=0.8, finding_names=["Effusion", "Mass"],
                         image_notes=[f"#{i}" for i in range(n)], n_points=9, n_bootstrap=40, n_examples=3)
    assert ex.values["cutoff"] == pytest.approx(0.8)  # it starts at the bundle's cutoff
    fractions = []
    for position in reversed(range(len(ex.slider.options))):  # tighten the cutoff step by step
        ex.slider.value = position
        v, cut = ex.values, ex.values["cutoff"]
        keep = score <= cut
        assert v["retained_fraction"] == pytest.approx(keep.mean()) and v["n_retained"] == keep.sum()
        expected = np.mean([roc_auc_score(y[keep, j], p[keep, j]) for j in range(2)])
        assert v["auc_macro"] == pytest.approx(expected)
        assert v["auc_macro_ci_low"] <= v["auc_macro"] + 0.05 and v["auc_macro_ci_high"] >= v["auc_macro"] - 0.05
        assert all(score[i] <= cut for i in v["kept_examples"]) and all(score[i] > cut for i in v["rejected_examples"])
        assert len(v["kept_examples"]) == 3 and (len(v["rejected_examples"]) == 3 or v["n_rejected"] < 3)
        assert f"kept <b>{v['n_retained']}</b> of {n} images (<b>{v['retained_fraction']:.1%}</b>)" in ex.numbers.value
        assert f"<b>{v['auc_macro']:.3f} [{v['auc_macro_ci_low']:.3f}, " in ex.numbers.value
        fractions.append(v["retained_fraction"])
    assert fractions == sorted(fractions, reverse=True) and fractions[0] == 1.0 and fractions[-1] < 0.2
    assert "none rejected" not in ex.numbers.value and _png(ex.picture.value)


def test_cutoff_explorer_reuses_a_sweep_of_the_same_scores_and_refuses_another():
    from cxrbench.ood.tradeoff import tradeoff_sweep

    rng = np.random.default_rng(1)
    score, y = rng.random(60), (rng.random(60) < 0.4).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    sweep = tradeoff_sweep(score, y, p, bundle_cutoff=0.5, n_points=5, n_bootstrap=10)
    ex = cutoff_explorer(score, y, p, [np.zeros((8, 8))] * 60, table=sweep, n_examples=1)
    marked = sweep.loc[sweep["bundle_cutoff"], "auc_macro"].item()
    assert ex.values["cutoff"] == 0.5 and ex.values["auc_macro"] == marked
    with pytest.raises(ValueError, match="table does not belong to these scores"):
        cutoff_explorer(score[::-1] * 0.5, None, None, [np.zeros((8, 8))] * 60, table=sweep)
    with pytest.raises(ValueError, match=r"give the labels and the classifier's scores \(y_true, y_score\)"):
        cutoff_explorer(score, None, None, [np.zeros((8, 8))] * 60)


def test_rotation_explorer_over_bundles_shows_the_numbers_of_rotation_tradeoff(tmp_path, pipeline):
    from cxrbench.data import load_manifest
    from cxrbench.data.synthetic import make_phantom, write_phantom_set
    from cxrbench.ood.tradeoff import rotation_tradeoff
    from cxrbench.ood.untrained import untrained_ood_bundle
    from cxrbench.plots.explorers import rotation_cutoff_explorer

    manifest = load_manifest(write_phantom_set(tmp_path / "ph", 12, size=64, seed=2,
                                               prevalence={"Mass": 0.5, "Effusion": 0.5}))
    images = [make_phantom(64, seed=s).image for s in range(6)]
    ood = _load_ood(untrained_ood_bundle(tmp_path / "ood", latent_dim=8, base_channels=4, images=images))
    clf = pipeline.classifier
    _, sweep = rotation_tradeoff(clf, ood, manifest, [0, 90], n_points=5, n_bootstrap=10)
    fresh = rotation_cutoff_explorer(clf, ood, manifest, [0, 90], n_points=5, n_bootstrap=10)
    reused = rotation_cutoff_explorer(clf, ood, manifest, [0, 90], table=sweep)  # no classifier pass again
    assert reused.table[fresh.table.columns].equals(fresh.table) and len(fresh._scores) == 24
    for ex in (fresh, reused):
        ex.slider.value = 0
        assert ex.values["n_retained"] == int(sweep["n_retained"].min())
        assert "1 - SSIM score" in ex.numbers.value and set(ex._notes) == {"rotated 0°", "rotated 90°"}


def _load_ood(path):
    from cxrbench.models.bundle import load_bundle

    return load_bundle(path, kind="ood")


def test_cutoff_explorer_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 images for 3 OOD scores"):
        cutoff_explorer([0.1, 0.2, 0.3], [0, 1, 0], [0.2, 0.8, 0.1], [np.zeros((4, 4))] * 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        cutoff_explorer([0.1, np.nan], [0, 1], [0.2, 0.8], [np.zeros((4, 4))] * 2)


# ------------------------------------------------------------------------------------------------ methods (04)
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from cxrbench.inference import Pipeline
    from cxrbench.labels import NIH_FINDINGS
    from cxrbench.models.bundle import untrained_classifier_bundle
    from cxrbench.preprocess import Preprocess

    root = tmp_path_factory.mktemp("explorer_bundles")
    untrained_classifier_bundle(root / "clf", preprocess=Preprocess(size=64),
                                thresholds={f: 0.3 + 0.02 * i for i, f in enumerate(NIH_FINDINGS)})
    return Pipeline.from_paths(root / "clf")


def test_method_picker_computes_each_map_once_and_shows_the_pipelines_map(pipeline):
    from cxrbench.data.synthetic import make_phantom

    phantom = make_phantom(96, findings=["Mass"], seed=3)
    report = pipeline.analyze(phantom.image, explain=None)
    region = np.zeros((64, 64))
    region[20:30, 10:25] = 1
    ex = method_picker(pipeline, report, ["saliency", "gradcam", "cam"], finding="Mass", region=region)
    assert list(ex.maps) == [("saliency", "all findings")] and ex.finding.disabled  # lazily: only what is shown
    assert "saliency · all findings · 64 px model input" in ex.numbers.value
    ex.method.value = "gradcam"
    assert not ex.finding.disabled and not ex.values["cached"] and len(ex.maps) == 2
    expected = pipeline.explain(report, "gradcam", "Mass", options={"normalize": "minmax"}).maps[0]
    np.testing.assert_allclose(ex.maps[("gradcam", "Mass")], expected, atol=1e-6)
    j = report.findings.index("Mass")
    assert ex.values["raw"] == pytest.approx(report.raw[j]) and ex.values["calibrated"] == pytest.approx(
        report.calibrated[j])
    assert "gradcam · Mass" in ex.numbers.value and f"raw {report.raw[j]:.3f}" in ex.numbers.value
    assert "red outline: the expert box" in ex.numbers.value
    shown = ex.picture.value
    ex.finding.value = "Effusion"
    assert ("gradcam", "Effusion") in ex.maps and ex.picture.value != shown
    ex.method.value = "saliency"
    ex.method.value = "gradcam"
    ex.finding.value = "Mass"
    assert ex.values["cached"] and len(ex.maps) == 3 and ex.picture.value == shown  # from the cache, same picture


def test_method_picker_refuses_unknown_choices(pipeline):
    image = np.random.default_rng(0).random((80, 80)).astype(np.float32)
    with pytest.raises(ValueError, match="unknown explanation method.*'lime'"):
        method_picker(pipeline, image, ["lime"])
    with pytest.raises(ValueError, match=r"findings \['Cough'\] are not outputs"):
        method_picker(pipeline, image, ["cam"], ["Cough"])


@pytest.mark.slow  # nbconvert's lab template: about 5 s idle, 10 s on a busy 2-core machine
def test_exported_html_shows_the_snapshot_not_a_dead_widget(tmp_path):
    import nbformat

    from cxrbench.cli.notebooks import export_html, outside_scripts

    y, s = _scores(0)
    data = threshold_explorer(y, s, FINDINGS)._repr_mimebundle_()
    cell = nbformat.v4.new_code_cell("threshold_explorer(y, s, FINDINGS)")
    cell.outputs = [nbformat.v4.new_output("display_data", data=data)]
    nb = nbformat.v4.new_notebook(cells=[cell])
    model = data["application/vnd.jupyter.widget-view+json"]["model_id"]  # state as papermill saves it
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
        "state": {model: {"model_name": "VBoxModel", "state": {}}}, "version_major": 2, "version_minor": 0}}
    src = tmp_path / "explorer.ipynb"
    nbformat.write(nb, src)
    mathjax = tmp_path / "tex.js"
    mathjax.write_text("// a stand-in MathJax")
    page = export_html(src, tmp_path / "html", mathjax=mathjax).read_text()
    assert "cxr-explorer-static" in page and "data:image/png;base64," in page and not outside_scripts(page)

"""End to end with an imported published bundle: a seeded ``weights=None`` torchxrayvision DenseNet-121, saved as
a state dict and imported through the command line as the CheXpert weight set (7 of the 14 findings trained), then
used by every face a user would point at it: ``cxrbench predict``, the dashboard, notebooks 02 and 04 under
papermill, and ``cxrbench export`` with its parity check. The untrained outputs must be masked in each.

One module-scoped bundle; small subsets everywhere (the notebooks' parameters below) to keep it short.
"""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest
from seeded_xrv import CHEX, CHEX_UNTRAINED, seeded_densenet

from cxrbench.cli.main import main
from cxrbench.cli.notebooks import read_results
from cxrbench.evaluation import evaluate_predictions
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import load_bundle

pytest.importorskip("torchxrayvision", reason="torchxrayvision (the dev extra) is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.notebook, pytest.mark.realdata]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TRAINED = [f for f in NIH_FINDINGS if f not in CHEX_UNTRAINED]
#: labelled NIH dev images notebook 02 predicts (and `cxrbench predict` is compared on)
N_IMAGES = 24


@pytest.fixture(scope="module")
def imported(nih_dir, tmp_path_factory) -> Path:
    """The seeded DenseNet as `torch.save(model.state_dict(), ...)` writes it, imported by `cxrbench import xrv`."""
    import torch

    root = tmp_path_factory.mktemp("imported")
    torch.save(seeded_densenet(sorted(nih_dir.glob("*.png"))[:3]).state_dict(), root / "state.pt")
    assert main(["import", "xrv", CHEX, "--weights", str(root / "state.pt"), "--out", str(root / "chex")]) == 0
    return root / "chex"


@pytest.fixture(scope="module")
def labelled(nih_dir) -> pd.DataFrame:
    """The first N_IMAGES rows of the NIH dev manifest (what notebook 02's ``max_images`` takes)."""
    manifest = pd.read_csv(nih_dir / "manifest.csv").head(N_IMAGES)
    return manifest.assign(path=[str(nih_dir / f) for f in manifest["file"]])


def _run(name: str, out: Path, parameters: dict) -> nbformat.NotebookNode:
    pm.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, cwd=str(NOTEBOOKS.parent),
                        kernel_name="python3", progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    """Everything the executed notebook shows as text (streams, markdown, plain text, HTML)."""
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append("".join(o.get("text", "")))
            parts += ["".join(v) if isinstance(v, list) else str(v) for k, v in o.get("data", {}).items()
                      if k.startswith("text/")]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def predicted(imported, labelled, tmp_path_factory) -> pd.DataFrame:
    """`cxrbench predict` of the labelled images with the imported bundle (PyTorch)."""
    out = tmp_path_factory.mktemp("predict") / "p.csv"
    assert main(["predict", "--bundle", str(imported), "--backend", "torch", *labelled["path"], "--out", str(out),
                 "-q"]) == 0
    return pd.read_csv(out)


def test_predict_masks_untrained_and_calibrates_trained_on_real_images(predicted, labelled) -> None:
    table = predicted
    assert table["file"].tolist() == labelled["path"].tolist() and table["error"].isna().all()
    for f in CHEX_UNTRAINED:  # xrv's constant 0.5 is never shown
        assert table[f].isna().all() and table[f"{f}_raw"].isna().all(), f
    for f in TRAINED:  # the published operating points calibrate every trained finding of this weight set
        assert table[f].between(0, 1).all() and table[f"{f}_raw"].between(0, 1).all(), f
        assert table[f"{f}_raw"].nunique() > 1 and not np.allclose(table[f], table[f"{f}_raw"]), f
    assert table["note"].str.contains("not trained by this model").all()


def test_dashboard_shows_bars_only_for_trained_findings(imported, labelled, tmp_path) -> None:
    from cxrbench.app.dashboard import Dashboard, dashboard_from_environment

    dash = dashboard_from_environment(str(imported), demo_info=str(tmp_path / "absent.json"))  # as notebook 05 does
    assert isinstance(dash, Dashboard), getattr(dash, "value", dash)
    report = dash.analyze_path(labelled["path"].iloc[0])
    assert report is not None and report.raw is not None and report.untrained == CHEX_UNTRAINED
    bars = dict(zip(dash.figure.data[0].y, dash.figure.data[0].x))
    assert all(math.isnan(bars[f]) for f in CHEX_UNTRAINED)
    assert all(0 <= bars[f] <= 1 for f in TRAINED)
    said = {a.y for a in dash.figure.layout.annotations if "not trained" in (a.text or "")}
    assert said == set(CHEX_UNTRAINED)
    assert list(dash.finding.options) == [f for f in report.findings if f in TRAINED]


def test_notebook_02_evaluates_the_imported_bundle_on_labelled_images(imported, labelled, predicted,
                                                                     tmp_path) -> None:
    from test_notebooks import _check_02

    nb = _run("02_roc_operating_points.ipynb", tmp_path / "02.ipynb",
              {"bundle": str(imported), "max_images": N_IMAGES})
    r = read_results(nb)["02_roc"]
    _check_02({"02_roc": r}, nb)  # its numbers are evaluate_predictions of the package's predictions
    assert r["image_ids"] == labelled["file"].tolist() and r["n_test"] == N_IMAGES
    assert r["untrained"] == CHEX_UNTRAINED and sorted(r["operating_points"]) == sorted(TRAINED)
    assert r["operating_points"]["Effusion"] == pytest.approx(
        load_bundle(imported).card.operating_points["thresholds"]["Effusion"])  # the published ones
    text = _text(nb)
    assert "Not trained by this model" in text and ", ".join(CHEX_UNTRAINED) in text
    # ... and equal evaluate_predictions of what `cxrbench predict` gives for the same images
    raw = predicted[[f"{f}_raw" for f in TRAINED]].to_numpy()
    _, summary = evaluate_predictions(labelled[TRAINED].to_numpy(), raw, TRAINED, n_boot=10)
    assert r["macro_auc"] == pytest.approx(summary["macro_auc"], abs=1e-9)


@pytest.mark.timeout(1200)  # the small phantom and lung bundles are trained the first time a session asks
def test_notebook_04_explains_only_trained_findings_of_the_imported_bundle(imported, small_bundles,
                                                                          tmp_path) -> None:
    nb = _run("04_saliency_comparison.ipynb", tmp_path / "04.ipynb", {
        "classifier_bundle": str(imported), "unet_bundle": str(small_bundles["lung-unet"]),
        "phantom_bundle": str(small_bundles["phantom-classifier"]),
        "autoencoder_bundle": str(small_bundles["phantom-autoencoder"]), "n_images": 3,
        "methods": ["saliency", "saliency_per_finding", "gradcam"], "curve_steps": 0, "phantom_test_images": 4,
        "phantom_findings": ["Effusion"]})
    r = read_results(nb)["04_localisation"]
    assert r["classifier"] == f"torchxrayvision {CHEX}" and r["untrained"] == CHEX_UNTRAINED
    assert r["nih_findings"] and not set(r["nih_findings"]) & set(CHEX_UNTRAINED), r["nih_findings"]
    assert r["explorer_findings"] == [f for f in load_bundle(imported).labels if f in TRAINED]
    assert pd.DataFrame(r["nih"])["n_images"].eq(len(r["nih_findings"])).all()
    text = _text(nb)  # its card has no test metrics: unmeasured, not "no finding has positives in the test split"
    assert f"Skill not measured.</b> the classifier torchxrayvision {CHEX}: its card records no test metrics" in text
    assert "the classifier torchxrayvision" not in text.split("Skill not measured")[0]


def test_export_keeps_parity_and_the_mask(imported, labelled, tmp_path, capsys) -> None:
    out = tmp_path / "onnx"
    files = labelled["path"].head(3).tolist()
    assert main(["export", "--bundle", str(imported), "--out", str(out), "--no-saliency", "--images", *files]) == 0
    printed = capsys.readouterr().out
    assert "parity on 3 images (given images)" in printed
    parity = pd.read_csv(out / "parity.csv")
    assert parity["passed"].all() and (parity["max_abs_diff"] <= 1e-4).all(), parity
    # the export folder predicts what PyTorch does, with the same mask
    assert main(["predict", "--bundle", str(out), *files, "--out", str(tmp_path / "onnx.csv"), "-q"]) == 0
    assert main(["predict", "--bundle", str(imported), "--backend", "torch", *files,
                 "--out", str(tmp_path / "torch.csv"), "-q"]) == 0
    onnx, torch_ = pd.read_csv(tmp_path / "onnx.csv"), pd.read_csv(tmp_path / "torch.csv")
    assert (onnx["backend"] == "onnxruntime").all() and (torch_["backend"] == "torch").all()
    for f in CHEX_UNTRAINED:
        assert onnx[f].isna().all() and onnx[f"{f}_raw"].isna().all()
    cols = [c for f in TRAINED for c in (f, f"{f}_raw")]
    np.testing.assert_allclose(onnx[cols].to_numpy(), torch_[cols].to_numpy(), atol=1e-5)


def test_what_an_imported_bundle_cannot_do_is_refused_naming_it(imported, tmp_path) -> None:
    """No training run behind it: notebook 02's ``run_dir`` refuses it and says where it goes; without operating
    points (a CheXNet before ``cxrbench calibrate``) there is nothing to place on the ROC curves."""
    from cxrbench.inference.labelled import bundle_predictions
    from cxrbench.models.bundle import save_bundle
    from cxrbench.train import ClassifierConfig, RunFolderError, run_or_shared

    with pytest.raises(RunFolderError, match=r"chex: is a bundle folder.*has no training run.*notebook 02: bundle"):
        run_or_shared(imported, "nih-classifier", ClassifierConfig())
    bundle = load_bundle(imported)
    bundle.card.operating_points = {}
    save_bundle(tmp_path / "uncalibrated", bundle.model, bundle.card)
    with pytest.raises(ValueError, match=r"uncalibrated: this bundle has no operating points.*cxrbench calibrate"):
        bundle_predictions(tmp_path / "uncalibrated", max_images=2)

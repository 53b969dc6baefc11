"""Every notebook runs top to bottom under papermill with small parameters, and is committed clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

#: Small parameters per notebook, so the whole set runs in CI in a few minutes ("{tmp}": the test's tmp folder).
SMALL_PARAMETERS: dict[str, dict] = {
    "00_data_tour.ipynb": {"image_size": 96, "images_per_finding": 2, "findings_to_show": 3, "n_phantoms": 4},
    "01_train_classifier.ipynb": {"image_size": 48, "epochs": 2, "max_steps_per_epoch": 3, "bootstrap": 50,
                                  "out_dir": "{tmp}/run01"},
    "02_roc_operating_points.ipynb": {"run_dir": "@run:nih-classifier"},
    "07_export_and_parity.ipynb": {"out_dir": "{tmp}/nb07", "image_size": 64, "n_parity_images": 3, "latency_repeat": 1,
                                   "latency_batches": [1, 4], "write_web_app": False},
    # the Voila app with the shared bundles: under papermill it must build the Dashboard and show its widget
    # (test_notebook_05_builds_a_real_dashboard reads its values; test_dashboard_browser.py drives it in a browser)
    "05_dashboard.ipynb": {"classifier_bundle": "@bundle:nih-classifier", "ood_bundle": "@bundle:ood-autoencoder",
                           "unet_bundle": "@bundle:lung-unet", "demo_info": "{tmp}/absent.json",
                           "snapshot_image": "@nih-image"},
    "06_hybrid_features.ipynb": {"max_images": 60, "image_size": 64, "finetune_epochs": 1, "n_permutations": 100,
                                 "mlp_max_epochs": 20},
    # the shared bundles (small settings, below); enough phantoms that the phantom model detects effusion
    "04_saliency_comparison.ipynb": {"classifier_bundle": "@bundle:nih-classifier", "unet_bundle": "@bundle:lung-unet",
                                     "phantom_bundle": "@bundle:phantom-classifier",
                                     "autoencoder_bundle": "@bundle:phantom-autoencoder", "n_images": 3, "ig_steps": 4,
                                     "smoothgrad_samples": 3, "curve_steps": 3, "phantom_test_images": 12},
    "03_ood_cutoff_tradeoff.ipynb": {"run_dir": "@run:ood-autoencoder", "classifier_bundle": "@bundle:nih-classifier",
                                     "n_digits": 100, "angles": [0, 45, 90], "n_bootstrap": 20},
}


def _nih_images() -> list[Path]:
    import pandas as pd

    from cxrbench.data import shared_data_root

    root = shared_data_root()
    assert root is not None, "the real dev data (../shared/data) is needed"
    nih = root / "cxr" / "nih"
    return [nih / f for f in pd.read_csv(nih / "manifest.csv")["file"]]


def _parameters(name: str, tmp_path: Path, bundles) -> dict:
    """The small parameters of ``name`` with "{tmp}", "@bundle:NAME" and "@run:NAME" filled in."""
    def fill(v):
        if not isinstance(v, str):
            return v
        if v.startswith("@bundle:"):
            return str(bundles[v.removeprefix("@bundle:")])
        if v.startswith("@run:"):
            return str(bundles[v.removeprefix("@run:")].parent)
        if v == "@nih-image":  # the last image of the real NIH dev set
            return str(_nih_images()[-1])
        return v.format(tmp=tmp_path)

    return {k: fill(v) for k, v in SMALL_PARAMETERS[name].items()}


#: Notebooks run (with the parameters above and more checks) by their own test module.
DEDICATED = {"06_hybrid_features.ipynb": "tests/test_hybrid.py"}

#: Seconds for notebooks whose fixtures train enough to check a number (04: its phantom model must detect a finding)
LONGER = {"04_saliency_comparison.ipynb": 1200}

#: Notebooks whose output is an app (widgets), not figures.
WIDGET_NOTEBOOKS = {"05_dashboard.ipynb"}


def _scored_02(r: dict):
    """(labels, raw probabilities, findings, operating points) that notebook 02 read, computed here: a run's saved
    test predictions, or a bundle's on the labelled images it names (untrained outputs left out)."""
    import pandas as pd

    from cxrbench.evaluation import OperatingPoints
    from cxrbench.inference.labelled import labelled_folder
    from cxrbench.inference.recalibrate import labelled_outputs
    from cxrbench.models.bundle import load_bundle

    if r["bundle"]:
        bundle = load_bundle(r["bundle"])
        out = labelled_outputs(bundle, labelled_folder(r["data_root"]), max_images=r["max_images"])
        assert r["image_ids"] == out.image_ids and r["untrained"] == bundle.card.untrained == out.skipped
        y, raw, findings = out.labels, out.probabilities, out.findings
    else:
        run = Path(r["run_dir"])
        bundle = load_bundle(run / "bundle")
        test = pd.read_csv(run / "predictions_test.csv")
        findings = bundle.labels
        y = test[[f"{f}_label" for f in findings]].to_numpy()
        raw = test[[f"{f}_raw" for f in findings]].to_numpy()
    return y, raw, findings, OperatingPoints.from_dict(bundle.card.operating_points)


def _check_02(results: dict, nb) -> None:
    """Macro AUC and operating points equal the package's own evaluation of the predictions the notebook read
    (a run's saved test predictions, or an imported bundle's on labelled images); an untrained output has no
    operating point; the skill box is shown exactly when that evaluation says the model is weak."""
    import numpy as np

    from cxrbench.evaluation import evaluate_predictions, skill_box_for

    r = results["02_roc"]
    y, raw, findings, ops = _scored_02(r)
    _, summary = evaluate_predictions(y, raw, findings, ops, n_boot=r["n_boot"])
    assert r["n_test"] == len(y)
    assert r["macro_auc"] == pytest.approx(summary["macro_auc"], abs=1e-12)
    assert set(r["operating_points"]) == set(findings) and not set(findings) & set(r.get("untrained", []))
    for f in findings:
        thr, shown = ops.thresholds[f], r["operating_points"][f]
        assert (shown is None) if not np.isfinite(thr) else shown == pytest.approx(thr)
    weak = skill_box_for(y, raw, n_boot=500).weak
    assert r["weak"] == weak
    boxes = [o for c in nb.cells for o in c.get("outputs", []) if "cxr-skill-weak" in str(o.get("data", {}))]
    assert bool(boxes) == weak, "the 'not a usable model' box must show exactly when the model is weak"


def _check_03(results: dict, nb) -> None:
    """The retained fraction falls monotonically as the cutoff tightens, equals n_retained / n, and at the
    bundle's cutoff equals 1 - the mean of the per-angle rejected fractions (equal images per angle)."""
    import numpy as np

    r = results["03_tradeoff"]
    sweep = sorted(r["sweep"], key=lambda row: -row["cutoff"])  # loosest first
    fractions = [row["retained_fraction"] for row in sweep]
    assert len(fractions) >= 3 and all(a >= b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[0] == pytest.approx(1.0) and fractions[-1] < 1.0
    for row in sweep:
        assert row["retained_fraction"] == pytest.approx(row["n_retained"] / r["n_images"])
    at_bundle = [row for row in sweep if row["bundle_cutoff"]]
    assert len(at_bundle) == 1
    rejected = np.mean([a["rejected_fraction"] for a in r["per_angle"]])
    assert at_bundle[0]["retained_fraction"] == pytest.approx(1 - rejected)


def _check_04(results: dict, nb) -> None:
    """On the phantoms, integrated gradients beats ``random`` on the pointing game (exact binomial test) for a
    finding the model detects (test AUC >= 0.7), and the published verdicts equal the package's reading of the
    published table."""
    import pandas as pd

    from cxrbench.explain.reading import pointing_game_vs_random

    r = results["04_localisation"]
    phantom = pd.DataFrame(r["phantom"])
    detected = [f for f in r["phantom_verdicts"] if (r["phantom_test_auc"].get(f) or 0) >= 0.7]
    assert detected, f"the phantom model detects no finding: {r['phantom_test_auc']}"
    wins = []
    for finding, verdicts in r["phantom_verdicts"].items():
        mine = pointing_game_vs_random(phantom[phantom["finding"] == finding]).set_index("method")["verdict"]
        assert pd.DataFrame(verdicts).set_index("method")["verdict"].to_dict() == mine.to_dict()
        rows = phantom[phantom["finding"] == finding].set_index("method")
        if finding in detected:
            beats = mine["integrated_gradients"] == "beats random"
            assert not beats or rows.loc["integrated_gradients", "pointing_game"] > rows.loc["random", "pointing_game"]
            wins.append(beats)
    assert wins and any(wins), f"IG does not beat random on any detected phantom finding: {phantom}"
    _check_04_latent_shift(results["04_latent_shift"], phantom)


def _check_04_latent_shift(r: dict, phantom) -> None:
    """The Latent Shift table has both variants for every phantom finding on the same images as the other methods
    (the same random row), and its published sentences are the package's reading of the published table."""
    import pandas as pd

    from cxrbench.explain.metrics import VARIANTS, localisation_sentence

    table = pd.DataFrame(r["phantom"])
    expected = []
    for finding, rows in table.groupby("finding", sort=False):
        assert set(VARIANTS) | {"random"} <= set(rows["method"]), rows
        assert (rows["n_images"] == r["phantom_test_images"]).all()
        others = phantom[(phantom["finding"] == finding) & (phantom["method"] == "random")]
        assert rows[rows["method"] == "random"]["pointing_game"].tolist() == others["pointing_game"].tolist()
        expected += [localisation_sentence(rows, f"Phantoms with {finding}", m) for m in VARIANTS]
    assert r["sentences"] == expected


#: per notebook, what its published results must satisfy (read from the executed notebook)
CHECKS = {"02_roc_operating_points.ipynb": _check_02, "03_ood_cutoff_tradeoff.ipynb": _check_03,
          "04_saliency_comparison.ipynb": _check_04}


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_has_small_parameters_and_a_parameters_cell():
    names = {p.name for p in _notebooks()}
    assert names, "no notebooks found"
    assert names <= set(SMALL_PARAMETERS), f"add small test parameters for {sorted(names - set(SMALL_PARAMETERS))}"
    for path in _notebooks():
        nb = json.loads(path.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        for name in SMALL_PARAMETERS[path.name]:
            assert f"{name} =" in "".join(tagged[0]["source"]), f"{path.name}: no parameter {name}"


def test_notebooks_are_committed_without_outputs():
    for path in _notebooks():
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.timeout(LONGER[n])) if n in LONGER else n
                                  for n in sorted(set(SMALL_PARAMETERS) - set(DEDICATED))])
def test_notebook_runs_under_papermill(name, tmp_path, small_bundles):
    import nbformat
    import papermill as pm

    out = tmp_path / name
    params = _parameters(name, tmp_path, small_bundles)
    pm.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params, cwd=str(NOTEBOOKS.parent),
                        kernel_name="python3", progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    kinds = {"image/png", "application/vnd.plotly.v1+json"}
    if name in WIDGET_NOTEBOOKS:
        kinds = {"application/vnd.jupyter.widget-view+json"}
    shown = [o for c in nb.cells for o in c.get("outputs", []) if kinds & set(o.get("data", {}))]
    assert shown, f"{name} showed no {' or '.join(sorted(kinds))}"
    if name in CHECKS:
        from cxrbench.cli.notebooks import read_results

        CHECKS[name](read_results(nb), nb)


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_02_with_a_mistyped_run_dir_stops_in_its_first_cell_and_creates_nothing(tmp_path):
    """At its defaults (train_if_missing False) a run_dir that holds no run is an error, never a new training run."""
    import nbformat
    import papermill as pm

    typo = tmp_path / "runs" / "01_clasifier"
    out = tmp_path / "02.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as raised:
        pm.execute_notebook(str(NOTEBOOKS / "02_roc_operating_points.ipynb"), str(out),
                            parameters={"run_dir": str(typo)}, cwd=str(NOTEBOOKS.parent), kernel_name="python3",
                            progress_bar=False)
    assert raised.value.ename == "RunFolderError"
    assert f"{typo}: no such folder, no finished classifier run" in raised.value.evalue
    assert not typo.exists() and not typo.parent.exists()
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
            and "injected-parameters" not in c.metadata.get("tags", [])]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed == [0]  # the first code cell after the parameters


def _widget_state_text(nb) -> str:
    """Every widget's saved state in an executed notebook (papermill stores it in the notebook's metadata)."""
    return json.dumps(nb.metadata.get("widgets", {}))


def _check_05(results: dict, nb) -> None:
    """The dashboard was built from the bundles given (its upload button is there), not the no-bundles message,
    and its output also carries the static snapshot of the image analysed for it: its verdict, one bar per finding,
    the map image (what the exported HTML shows, where widgets cannot render)."""
    state = _widget_state_text(nb)
    assert "No model bundles yet" not in state and "Upload X-ray" in state, state[:500]
    shown = [o["data"] for c in nb.cells for o in c.get("outputs", []) if "cxr-dashboard-static" in
             str(o.get("data", {}).get("text/html", ""))]
    assert len(shown) == 1 and "application/vnd.jupyter.widget-view+json" in shown[0], shown
    snapshot = shown[0]["text/html"]
    assert _nih_images()[-1].name in snapshot and "cxr-static-verdict" in snapshot
    assert "data:image/png;base64," in snapshot, snapshot[:2000]
    # a briefly trained gate may withhold the prediction (its verdict says so): then no bars, else all 14
    assert snapshot.count("<tr class='cxr-bar'>") == (0 if "cxr-rejected" in snapshot else 14), snapshot[:2000]


CHECKS["05_dashboard.ipynb"] = _check_05


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_05_builds_a_real_dashboard_that_shows_the_pipelines_values(small_bundles, nih_dir):
    """What notebook 05 runs (``dashboard_from_environment`` with the shared bundles) analyses a real NIH image:
    the verdict, 14 bars and each bar's value equal what an independent Pipeline reports for that image."""
    import numpy as np
    import pandas as pd

    from cxrbench.app.dashboard import Dashboard, dashboard_from_environment
    from cxrbench.app.verdict import gate_verdict
    from cxrbench.inference import Pipeline
    from cxrbench.labels import NIH_FINDINGS

    bundles = {k: str(small_bundles[name]) for k, name in (("classifier", "nih-classifier"),
                                                           ("ood", "ood-autoencoder"), ("unet", "lung-unet"))}
    widget = dashboard_from_environment(bundles["classifier"], bundles["ood"], bundles["unet"], "absent.json")
    assert isinstance(widget, Dashboard), f"no dashboard was built: {getattr(widget, 'value', widget)}"
    image = str(pd.read_csv(nih_dir / "manifest.csv")["file"].map(lambda f: nih_dir / f).iloc[-1])
    widget.override.value = True  # a briefly trained gate may turn the image away: show the bars anyway
    report = widget.analyze_path(image)
    expected = Pipeline.from_paths(bundles["classifier"], ood=bundles["ood"], unet=bundles["unet"]).analyze(
        image, explain=None, allow_ood=True)
    assert report is not None and report.raw is not None
    ood_card = widget.pipeline.ood.card.ood
    assert widget.verdict.value == gate_verdict(expected, ood_card).html()
    bars = widget.figure.data[0]
    assert sorted(bars.y) == sorted(NIH_FINDINGS) and len(bars.x) == 14
    shown = dict(zip(bars.y, bars.x))
    for finding, value in zip(expected.findings, expected.calibrated):
        assert shown[finding] == pytest.approx(float(value), abs=1e-5)
    assert np.all((np.asarray(bars.x) >= 0) & (np.asarray(bars.x) <= 1))
    assert Path(image).name in widget.timing.value and widget.bars.outputs

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
    "02_roc_operating_points.ipynb": {"run_dir": "{tmp}/run02", "train_if_missing": True, "image_size": 48,
                                      "epochs": 1, "max_steps_per_epoch": 3},
    "07_export_and_parity.ipynb": {"out_dir": "{tmp}/nb07", "image_size": 64, "n_parity_images": 3, "latency_repeat": 1,
                                   "latency_batches": [1, 4], "write_web_app": False},
    # the Voila app: under papermill it must run and show a widget (driven in a browser by test_dashboard_browser.py)
    "05_dashboard.ipynb": {"demo_info": "{tmp}/absent.json"},
    "06_hybrid_features.ipynb": {"max_images": 60, "image_size": 64, "finetune_epochs": 1, "n_permutations": 100,
                                 "mlp_max_epochs": 20},
    "04_saliency_comparison.ipynb": {"work_dir": "{tmp}/run04", "image_size": 48, "epochs": 1, "max_steps_per_epoch": 2,
                                     "unet_size": 32, "unet_epochs": 1, "n_images": 3, "ig_steps": 4,
                                     "smoothgrad_samples": 3, "curve_steps": 3, "phantom_size": 48, "phantom_count": 24,
                                     "phantom_epochs": 1, "phantom_test_images": 2},
    "03_ood_cutoff_tradeoff.ipynb": {"epochs": 2, "max_steps": 2, "out_dir": "{tmp}/run03", "n_digits": 100,
                                     "angles": [0, 45, 90], "n_bootstrap": 20},
}

#: Notebooks run (with the parameters above and more checks) by their own test module.
DEDICATED = {"06_hybrid_features.ipynb": "tests/test_hybrid.py"}

#: Notebooks whose output is an app (widgets), not figures.
WIDGET_NOTEBOOKS = {"05_dashboard.ipynb"}


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
@pytest.mark.parametrize("name", sorted(set(SMALL_PARAMETERS) - set(DEDICATED)))
def test_notebook_runs_under_papermill(name, tmp_path):
    import nbformat
    import papermill as pm

    out = tmp_path / name
    params = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in SMALL_PARAMETERS[name].items()}
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

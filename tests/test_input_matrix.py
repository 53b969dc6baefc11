"""The trust matrix: every input case of tests/input_cases.py through every command that reads images.

Each command (``predict``, ``ood-score``, ``analyze``, ``segment``, ``explain``) runs once, as a user runs it (a
subprocess of ``python -m cxrbench.cli``), on all cases at once: the batch must go on past every bad file, print no
traceback, and give each case exactly its outcome: a named error row, a gate rejection with its reason, or a
result equal to the reference radiograph's within the case's tolerance. ``Dashboard.analyze_bytes`` gets each
file's bytes as an upload. Outputs (masks, maps, overlays) are one per input, never overwritten, never longer
than the file system allows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from input_cases import ERROR, GUARD, RESULT, Case, build_cases

from cxrbench.labels import NIH_FINDINGS

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: the commands that read images, and the CSV each writes (relative to its --out)
COMMANDS = ("predict", "ood-score", "analyze", "segment", "explain")
GATED = {"ood-score", "analyze"}
NAME_MAX = 255


def _cases_root(tmp_path_factory, nih_dir) -> tuple[Path, list[Case], Path]:
    root = tmp_path_factory.mktemp("matrix")
    reference = sorted(nih_dir.glob("*.png"))[3]
    cases, special = build_cases(root, reference)
    return root, cases, special


@pytest.fixture(scope="module")
def setup(tmp_path_factory, nih_dir):
    """The bundles (small untrained models: the matrix checks the plumbing, not the models' skill) and cases."""
    import torch

    from cxrbench.models.bundle import ModelCard, save_bundle, untrained_classifier_bundle
    from cxrbench.models.unet import UNet
    from cxrbench.ood.untrained import untrained_ood_bundle
    from cxrbench.preprocess import Preprocess

    root, cases, special = _cases_root(tmp_path_factory, nih_dir)
    bundles = root / "bundles"
    torch.manual_seed(0)
    untrained_classifier_bundle(bundles / "clf", preprocess=Preprocess(size=64),
                                thresholds={f: 0.2 + 0.04 * i for i, f in enumerate(NIH_FINDINGS)})
    # an open reconstruction cutoff: only the blank-image guard decides which images are rejected here
    untrained_ood_bundle(bundles / "ood", latent_dim=16, base_channels=8, threshold=10.0)
    kwargs = {"in_channels": 1, "base_channels": 4, "depth": 2}
    save_bundle(bundles / "unet", UNet(**kwargs), ModelCard(kind="segmentation", builder="unet", builder_kwargs=kwargs,
                                                           labels=["lung"], preprocess=Preprocess(size=32).to_dict()))
    return root, bundles, cases, special


def _argv(command: str, bundles: Path, out: Path) -> list[str]:
    return {
        "predict": ["predict", "--bundle", str(bundles / "clf"), "--out", str(out / "predictions.csv")],
        "ood-score": ["ood-score", "--bundle", str(bundles / "ood"), "--out", str(out / "scores.csv")],
        "analyze": ["analyze", "--classifier", str(bundles / "clf"), "--ood", str(bundles / "ood"),
                    "--out", str(out), "--explain", "gradcam"],
        "segment": ["segment", "--bundle", str(bundles / "unet"), "--out", str(out)],
        "explain": ["explain", "--bundle", str(bundles / "clf"), "--method", "gradcam", "--top", "1",
                    "--out", str(out)],
    }[command]


_CSV = {"predict": "predictions.csv", "ood-score": "scores.csv", "analyze": "analysis.csv",
        "segment": "segment_summary.csv", "explain": "explain_summary.csv"}


@pytest.fixture(scope="module")
def runs(setup):
    """Each command once over every case: ``{command: (table, stderr, returncode, out)}``."""
    root, bundles, cases, special = setup
    inputs = [str(c.path) for c in cases if c.direct] + [str(special)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    results = {}
    for command in COMMANDS:
        out = root / f"out_{command}"
        quiet = [] if command == "ood-score" else ["-q"]
        proc = subprocess.run([sys.executable, "-m", "cxrbench.cli", *_argv(command, bundles, out), *inputs, *quiet],
                              capture_output=True, text=True, env=env, timeout=600, cwd=root)
        csv = out / _CSV[command]
        table = pd.read_csv(csv, keep_default_na=False) if csv.exists() else None
        results[command] = (table, proc.stderr, proc.returncode, out)
    return results


def _row(table: pd.DataFrame, case: Case) -> pd.Series:
    rows = table[table["file"] == str(case.path)]
    assert len(rows) == 1, f"{case.name}: expected one row for {case.path}, found {len(rows)}"
    return rows.iloc[0]


def _raw(row: pd.Series) -> np.ndarray:
    return np.array([float(row[f"{f}_raw"]) if row[f"{f}_raw"] != "" else np.nan for f in NIH_FINDINGS])


def _kept(row: pd.Series) -> bool:
    """The gate's verdict in a row: ``in_distribution`` (analyze) or ``is_ood`` (ood-score)."""
    if "in_distribution" in row:
        return str(row["in_distribution"]).lower() == "true"
    return str(row["is_ood"]).lower() == "false"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_finishes_the_batch_without_a_traceback(runs, command):
    table, stderr, rc, _ = runs[command]
    assert "Traceback" not in stderr, f"{command} printed a traceback:\n{stderr[-3000:]}"
    assert rc == 0, f"{command} exited {rc}:\n{stderr[-2000:]}"
    assert table is not None, f"{command} wrote no CSV"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_case_gets_its_outcome(runs, setup, command):
    """Each case's row: the error with its reason, the gate's rejection with its reason, or the reference's result."""
    table, stderr, _, _ = runs[command]
    _, _, cases, _ = setup
    reference = _row(table, next(c for c in cases if c.name == "reference.png"))
    failures, lines = [], []
    for case in cases:
        lines.append(f"{case.name}\t{case.outcome}\t{_describe(table, case, reference)}")
        try:
            _check(command, table, stderr, case, reference)
        except AssertionError as exc:
            failures.append(f"{case.name}: {exc}")
    record = REPO / "build" / "input_matrix" / f"{command}.tsv"  # the outcome of every case, for the closing note
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("case\texpected\tgot\n" + "\n".join(lines) + "\n")
    assert not failures, f"{command}: {len(failures)} of {len(cases)} cases wrong:\n" + "\n".join(failures)


def _describe(table: pd.DataFrame, case: Case, reference: pd.Series) -> str:
    rows = table[table["file"] == str(case.path)]
    if len(rows) != 1:
        return f"{len(rows)} rows"
    row = rows.iloc[0]
    if row["error"]:
        return f"error: {row['error']}"
    if ("in_distribution" in row or "is_ood" in row) and not _kept(row):
        return f"rejected: {row.get('reason', '?')}"
    got = "result"
    if f"{NIH_FINDINGS[0]}_raw" in row:
        got += f", max |dp| vs reference {np.abs(_raw(row) - _raw(reference)).max():.2g}"
    if row.get("warning"):
        got += f"; warning: {row['warning']}"
    return got


def _check(command: str, table: pd.DataFrame, stderr: str, case: Case, reference: pd.Series) -> None:
    row = _row(table, case)
    error = str(row["error"])
    if case.outcome == ERROR:
        assert re.search(case.reason, error, re.I), f"error {error!r} does not say {case.reason!r}"
        assert f"{case.path}" in stderr, "stderr does not name the file"
        return
    rejected = case.outcome == GUARD and command in GATED
    gate_error = f"{Path(str(row['file'])).name}: no prediction: "
    assert (error.startswith(gate_error) if rejected and command == "analyze" else error == ""), f"error {error!r}"
    if rejected:
        assert not _kept(row), "the gate kept it"
        assert re.search(case.reason, str(row["reason"]), re.I), f"reason {row['reason']!r} is not {case.reason!r}"
        if command == "analyze":
            assert np.isnan(_raw(row)).all(), "a rejected image got probabilities"
        return
    if case.outcome == RESULT and command in GATED:
        assert _kept(row), f"a radiograph was rejected: {row.get('reason')}"
    if command in ("predict", "analyze") and case.outcome == RESULT:
        diff = np.abs(_raw(row) - _raw(reference)).max()
        assert diff <= case.atol, f"raw probabilities differ from the reference's by {diff:.4f} > {case.atol}"
    if command in ("predict", "explain"):  # no gate: probabilities, and a warning saying what the gate would say
        warning = re.search(rf"^warning: {re.escape(str(case.path))}: (.*)$", stderr, re.M)
        if case.outcome == GUARD:
            assert warning and re.search(case.reason, warning.group(1), re.I), f"no {case.reason!r} warning"
        else:
            assert warning is None, f"a radiograph got a warning: {warning.group(1) if warning else ''}"


_OUTPUT_COLUMNS = {"segment": ["mask"], "explain": ["maps", "overlays"], "analyze": ["overlay"]}


@pytest.mark.parametrize("command", ["segment", "explain", "analyze"])
def test_outputs_are_one_per_input_and_fit_the_file_system(runs, command):
    table, _, _, out = runs[command]
    ok = table[table["error"] == ""]
    for column in _OUTPUT_COLUMNS[command]:
        assert column in table.columns, f"{command}: no {column!r} column naming each input's output"
        names = [n for cell in ok[column] for n in str(cell).split("|") if n]
        assert len(names) == len(set(names)), f"{command}: two inputs share an output file"
        for name in names:
            path = Path(name) if Path(name).is_absolute() else out / name
            assert path.is_file(), f"{command}: {name} was not written"
            assert len(path.name.encode()) <= NAME_MAX


def test_the_dashboard_gives_each_upload_its_outcome(setup):
    from cxrbench.app.dashboard import Dashboard
    from cxrbench.inference.pipeline import Pipeline

    _, bundles, cases, _ = setup
    dash = Dashboard(Pipeline.from_paths(bundles / "clf", ood=bundles / "ood"))
    ref_case = next(c for c in cases if c.name == "reference.png")
    reference = dash.analyze_bytes("reference.png", ref_case.path.read_bytes())
    assert reference is not None and reference.raw is not None
    failures = []
    for case in cases:
        if not case.path.is_file() or case.path.is_symlink():
            continue  # an upload is bytes: FIFOs, folders and links cannot be uploaded
        report = dash.analyze_bytes(case.path.name, case.path.read_bytes())
        text = f"{dash.message.value} {dash.verdict.value}"
        try:
            if case.outcome == ERROR:
                assert report is None and case.path.name in text, "no error message naming the file"
                assert re.search(case.reason, text, re.I), f"message does not say {case.reason!r}"
                assert dash.report is None and not dash.bars.outputs, "the previous image's result is still shown"
            elif case.outcome == GUARD:
                assert report is not None and report.rejected and report.raw is None, "not rejected"
                assert re.search(case.reason, text, re.I), f"verdict does not say {case.reason!r}"
            else:
                assert report is not None and not report.rejected, f"rejected: {text[:200]}"
                diff = np.abs(report.raw - reference.raw).max()
                assert diff <= case.atol, f"probabilities differ by {diff:.4f}"
        except AssertionError as exc:
            failures.append(f"{case.name}: {exc}")
    assert not failures, f"dashboard: {len(failures)} cases wrong:\n" + "\n".join(failures)

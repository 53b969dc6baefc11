"""The OOD gate with its blank-image guard, end to end: blank, tiny, synthetic and single-colour images are
rejected with their reason by the Pipeline, ``ood-score``, ``analyze`` and the dashboard; real chest X-rays
pass; the guard a training run fits travels in the OOD card; ``predict`` and ``explain`` (no gate) warn on
low-dynamic-range inputs, and 8-bit, 12-bit-in-16 and 16-bit PNGs of one radiograph agree."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cxrbench.cli.main import main
from cxrbench.inference.pipeline import Pipeline
from cxrbench.io import read_image
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.preprocess import Preprocess

_yy, _xx = np.mgrid[0:512, 0:512] / 511.0
_rng = np.random.default_rng(0)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


#: name -> (8-bit pixels, grey or RGB, the check that must reject them)
CASES: dict[str, tuple[np.ndarray, str]] = {
    **{f"grey {v}": (np.full((512, 512), v, np.uint8), "information") for v in (100, 128, 160, 200)},
    "1x1": (np.full((1, 1), 128, np.uint8), "size"),
    "7x3": (_u8(_rng.random((3, 7))), "size"),
    "horizontal gradient": (_u8(_xx), "information"),
    "diagonal gradient": (_u8((_xx + _yy) / 2), "information"),
    "radial gradient": (_u8(np.hypot(_xx - 0.5, _yy - 0.5) * 1.4), "information"),
    "checkerboard 8": (_u8((np.floor(_xx * 8) + np.floor(_yy * 8)) % 2), "information"),
    "checkerboard 32": (_u8((np.floor(_xx * 32) + np.floor(_yy * 32)) % 2), "information"),
    "uniform noise": (_u8(_rng.random((512, 512))), "information"),
    "gaussian noise": (_u8(0.5 + _rng.normal(0, 0.15, (512, 512))), "information"),
    "single colour RGB": (np.broadcast_to(np.array([180, 40, 40], np.uint8), (512, 512, 3)).copy(), "information"),
}
REASONS = {"size": "too small", "information": "almost no image content", "reconstruction": "reconstruction error"}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory, nih_dir):
    """A real OOD run on the NIH images (a few steps: the guard does not depend on the model's skill)."""
    from cxrbench.data import load_manifest
    from cxrbench.train import OODConfig, train_ood

    out = tmp_path_factory.mktemp("ood_run")
    cfg = OODConfig(latent_dim=16, width=8, epochs=1, batch_size=16, max_steps_per_epoch=2, device="cpu")
    result = train_ood(load_manifest(nih_dir, on_missing="drop"), out, cfg, progress=False)
    return result


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, nih_dir):
    """An untrained classifier whose operating points are the median raw outputs on real NIH images."""
    images = [read_image(f).pixels for f in sorted(nih_dir.glob("*.png"))[:24]]
    return untrained_classifier_bundle(tmp_path_factory.mktemp("clf") / "clf", preprocess=Preprocess(size=64),
                                       images=images)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    for name, (pixels, _) in CASES.items():
        (folder / f"{name.replace(' ', '_')}.png").write_bytes(_png(pixels))
    return folder


def _expected(path: str | Path) -> str:
    return next(check for name, (_, check) in CASES.items() if Path(path).stem == name.replace(" ", "_"))


# ------------------------------------------------------------------------------------------------
# the card


@pytest.mark.realdata
def test_training_fits_the_guard_into_the_card_and_it_keeps_real_validation_images(gate_run):
    card = load_bundle(gate_run.bundle).card
    guard = card.ood["guard"]
    assert guard["min_side"] == 64 and guard["n_validation"] == int((gate_run.scores["split"] == "val").sum())
    assert guard["kept_fraction_validation"] >= 0.95
    assert 2.0 < guard["min_bits_per_pixel"] < 3.5 and 0.05 < guard["min_spread"] < 0.3
    assert "validation images" in guard["method"]


@pytest.mark.realdata
def test_the_fitted_guard_keeps_held_out_chest_radiographs(gate_run, classifier, nih_dir, shared_data):
    pipe = Pipeline.from_paths(classifier, ood=gate_run.bundle)
    test_ids = set(gate_run.scores.loc[gate_run.scores["split"] == "test", "image_id"].astype(str))
    nih = sorted(nih_dir.glob("*.png"))
    held_out = {"nih test split": [f for f in nih if f.stem in test_ids or f.name in test_ids],
                "pediatric": sorted((shared_data / "cxr" / "pediatric").rglob("*.png")) +
                             sorted((shared_data / "cxr" / "pediatric").rglob("*.jp*g")),
                "lung-mask images": sorted((shared_data / "cxr" / "masks").rglob("images/*.png"))}
    for name, files in held_out.items():
        assert len(files) >= 20, name
        kept = np.mean([pipe.guard.check(read_image(f).pixels).passed for f in files])
        assert kept >= 0.95, f"{name}: the fitted guard keeps only {kept:.1%} of {len(files)} chest radiographs"


@pytest.mark.realdata
def test_info_says_which_guard_a_bundle_has(gate_run, tmp_path, capsys):
    older = untrained_ood_bundle(tmp_path / "older", latent_dim=16, base_channels=8, threshold=0.5)
    assert main(["info", str(gate_run.bundle), str(older)]) == 0
    out = capsys.readouterr().out
    fitted, old = out.split(str(older))
    assert "blank-image guard: short side >= 64 px" in fitted and "keeps 100.0%" in fitted
    assert "blank-image guard: none in this card (an older bundle); the cxrbench defaults apply" in old


def test_a_card_with_a_broken_guard_is_refused_with_the_key(tmp_path):
    path = untrained_ood_bundle(tmp_path / "ood", latent_dim=16, base_channels=8, threshold=0.5)
    card = json.loads((path / "card.json").read_text())
    card["ood"]["guard"] = {"min_side": 64, "min_bits_per_pixel": 2.5, "min_spread": 1.5}
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"ood\.guard\.min_spread must be a number in \[0, 1\), got 1\.5"):
        load_bundle(path)
    card["ood"]["guard"] = {"min_side": 64}
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="ood.guard needs min_bits_per_pixel"):
        load_bundle(path)


# ------------------------------------------------------------------------------------------------
# the Pipeline and the dashboard


@pytest.mark.realdata
@pytest.mark.parametrize("with_ood", [True, False], ids=["fitted guard", "no OOD bundle"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_pipeline_rejects_blank_tiny_and_synthetic_images_with_the_reason(gate_run, classifier, name, with_ood):
    pixels, check = CASES[name]
    pipe = Pipeline.from_paths(classifier, ood=gate_run.bundle if with_ood else None)
    r = pipe.analyze(_png(pixels), name=f"{name}.png", explain="saliency")
    assert r.rejected and r.raw is None and r.calibrated is None and r.maps is None
    assert r.ood.check == check and r.ood.reason.startswith(REASONS[check]) and not r.ood.in_distribution
    assert np.isnan(r.ood.score)  # no score is read for an image the guard rejects
    row = r.to_row()
    assert row["check"] == check and row["reason"] == r.ood.reason and np.isnan(row["Effusion"])
    forced = pipe.analyze(_png(pixels), name=f"{name}.png", explain=None, allow_ood=True)
    if check == "size":  # the model would see nothing: no override
        assert forced.rejected and forced.raw is None and not forced.ood.overridable
    else:
        assert forced.overridden and not forced.rejected and forced.calibrated is not None


@pytest.mark.realdata
def test_real_radiographs_pass_and_a_reconstruction_rejection_says_so(gate_run, classifier, nih_dir, tmp_path):
    f = sorted(nih_dir.glob("*.png"))[0]
    r = Pipeline.from_paths(classifier).analyze(f, explain=None)
    assert not r.rejected and r.ood.check == "" and r.ood.reason == "" and r.calibrated is not None
    closed = untrained_ood_bundle(tmp_path / "closed", latent_dim=16, base_channels=8, threshold=-1.0)
    r = Pipeline.from_paths(classifier, ood=closed).analyze(f, explain=None)
    assert r.rejected and r.ood.check == "reconstruction" and r.ood.overridable
    assert r.ood.reason.startswith(f"reconstruction error (ssim score {r.ood.score:.3f} > cutoff -1.000")


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["grey 128", "1x1", "checkerboard 8", "single colour RGB"])
def test_the_dashboard_shows_the_reason_and_no_probabilities(gate_run, classifier, name):
    from cxrbench.app.dashboard import Dashboard

    pixels, check = CASES[name]
    dash = Dashboard(Pipeline.from_paths(classifier, ood=gate_run.bundle))
    report = dash.analyze_bytes(f"{name}.png", _png(pixels))
    assert report is not None and report.rejected and report.raw is None
    assert "Not a frontal chest radiograph" in dash.verdict.value and REASONS[check] in dash.verdict.value
    assert dash.bars.outputs == () and dash.message.value == ""
    dash.override.value = True
    report = dash.analyze_bytes(f"{name}.png", _png(pixels))
    assert report.rejected == (check == "size") and (dash.bars.outputs == ()) == (check == "size")
    assert REASONS[check] in dash.verdict.value


# ------------------------------------------------------------------------------------------------
# the commands


@pytest.mark.realdata
def test_ood_score_rejects_every_case_with_its_reason(gate_run, case_dir, nih_dir, tmp_path, capsys):
    real = sorted(nih_dir.glob("*.png"))[:3]
    out = tmp_path / "scores.csv"
    assert main(["ood-score", "--bundle", str(gate_run.bundle), str(case_dir), *map(str, real),
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and f"{len(CASES)} rejected by the blank-image guard" in captured.out
    table = pd.read_csv(out, keep_default_na=False)
    cases, radiographs = table.iloc[:len(CASES)], table.iloc[len(CASES):]
    for _, row in cases.iterrows():
        check = _expected(row["file"])
        assert row["check"] == check and row["reason"].startswith(REASONS[check]) and row["is_ood"] in (True, "True")
        assert row["score"] == "" and row["error"] == ""
    assert set(radiographs["check"]) <= {"", "reconstruction"} and (radiographs["score"] != "").all()


@pytest.mark.realdata
def test_analyze_gives_no_probabilities_to_any_case_and_says_why(gate_run, classifier, case_dir, nih_dir, tmp_path,
                                                                 capsys):
    real = sorted(nih_dir.glob("*.png"))[0]
    out = tmp_path / "an"
    assert main(["analyze", "--classifier", str(classifier), str(case_dir), str(real), "--out", str(out),
                 "--explain", "none", "-q"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "rejected by the OOD gate (" in captured.out
    table = pd.read_csv(out / "analysis.csv", keep_default_na=False)
    assert {"check", "reason"} <= set(table.columns)
    for _, row in table.iloc[:len(CASES)].iterrows():
        check = _expected(row["file"])
        assert row["check"] == check and row["reason"].startswith(REASONS[check])
        assert row["Effusion"] == "" and row["error"].startswith(f"{Path(row['file']).name}: no prediction: ")
    last = table.iloc[-1]
    assert last["check"] == "" and last["reason"] == "" and last["Effusion"] != ""
    # --min-side is the guard's minimum short side: 1x1 and 7x3 are still too small at 8 px
    assert main(["analyze", "--classifier", str(classifier), str(case_dir), "--out", str(out), "--explain", "none",
                 "--min-side", "8", "-q"]) == 0
    table = pd.read_csv(out / "analysis.csv", keep_default_na=False)
    assert "needs at least 8 px" in table.loc[table["file"].str.endswith("1x1.png"), "reason"].iloc[0]


@pytest.mark.realdata
def test_analyze_error_column_names_each_bad_file_and_says_why_in_words(classifier, case_dir, nih_dir, shared_data,
                                                                       tmp_path, capsys):
    """What a user reads in analysis.csv's error column: the file's name, then why it got no probabilities."""
    real = sorted(nih_dir.glob("*.png"))[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("my notes, saved with the wrong name\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "half.png").write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    hand = sorted((shared_data / "cxr" / "nonchest").glob("*.png"))[0]
    closed = untrained_ood_bundle(tmp_path / "closed", latent_dim=16, base_channels=8, threshold=-1.0)
    files = [bad / "notes.png", bad / "empty.png", bad / "half.png", case_dir / "grey_128.png", case_dir / "1x1.png",
             hand]
    out = tmp_path / "an"
    assert main(["analyze", "--classifier", str(classifier), "--ood", str(closed), *map(str, files), "--out", str(out),
                 "--explain", "none", "-q"]) == 0  # a rejection is an answer; only all unreadable exits 1
    captured = capsys.readouterr()
    errors = pd.read_csv(out / "analysis.csv", keep_default_na=False)["error"].tolist()
    expected = ["notes.png: cannot read it: not a recognised image format (PNG, JPEG, TIFF, BMP or DICOM expected)",
                "empty.png: cannot read it: the file is empty (0 bytes)",
                "half.png: cannot read it: truncated or corrupt PNG data",
                "grey_128.png: no prediction: almost no image content (blank, flat or a simple pattern",
                "1x1.png: no prediction: too small (1x1 px; a chest radiograph needs at least 64 px on the short side)",
                f"{hand.name}: no prediction: it does not look like the frontal chest X-rays the OOD gate was trained "
                "on (ssim score "]
    for error, start in zip(errors, expected):
        assert error.startswith(start), (error, start)
    assert errors[3].endswith("; --allow-ood analyses it anyway") and errors[5].endswith("; --allow-ood analyses it "
                                                                                           "anyway")
    assert "allow-ood" not in errors[4]  # too small: not even --allow-ood analyses it
    for f in files[:3]:
        assert f"warning: {f}: " in captured.err  # the full path on stderr
    assert "1 unlike the chest X-rays it was trained on" in captured.out


def _bit_depth_versions(source: Path, folder: Path) -> dict[str, Path]:
    """8-bit, 12-bit-in-16 and 16-bit PNGs of one radiograph (made here; nothing derived is committed)."""
    v8 = np.asarray(PILImage.open(source).convert("L"), dtype=np.uint16)
    versions = {"8-bit": v8.astype(np.uint8), "12-bit in 16": np.round(v8 * (4095 / 255)).astype(np.uint16),
                "16-bit": v8 * 257}
    paths = {}
    for name, arr in versions.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.png"
        PILImage.fromarray(arr).save(paths[name])
    return paths


@pytest.mark.realdata
def test_predict_agrees_on_8_12_in_16_and_16_bit_pngs_and_warns_on_low_dynamic_range(classifier, nih_dir, tmp_path,
                                                                                      capsys):
    paths = _bit_depth_versions(sorted(nih_dir.glob("*.png"))[5], tmp_path)
    assert read_image(paths["12-bit in 16"]).meta.effective_bits == 12
    dark = tmp_path / "dark.png"  # a nearly black radiograph: 12-bit data read as 16-bit would look like this
    PILImage.fromarray((np.asarray(PILImage.open(paths["8-bit"])) // 16).astype(np.uint8)).save(dark)
    out = tmp_path / "pred.csv"
    assert main(["predict", "--bundle", str(classifier), *map(str, paths.values()), str(dark), "--out", str(out),
                 "-q"]) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(out, keep_default_na=False)
    calibrated = table[list(NIH_FINDINGS)].to_numpy(float)
    assert np.abs(calibrated[:3] - calibrated[0]).max() < 0.02
    assert list(table["warning"][:3]) == ["", "", ""] and table["warning"][3].startswith("low dynamic range")
    assert f"warning: {dark}: low dynamic range" in captured.err and "Traceback" not in captured.err


@pytest.mark.realdata
def test_explain_has_no_gate_but_warns_per_file(classifier, case_dir, nih_dir, tmp_path, capsys):
    files = [case_dir / "grey_128.png", case_dir / "checkerboard_8.png", sorted(nih_dir.glob("*.png"))[0]]
    assert main(["explain", "--bundle", str(classifier), "--method", "saliency", *map(str, files),
                 "--out", str(tmp_path / "ex"), "-q"]) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(tmp_path / "ex" / "explain_summary.csv", keep_default_na=False)
    assert (table["error"] == "").all() and (table["maps"] != "").all()
    assert table["warning"][0].startswith("low dynamic range") and "almost no image content" in table["warning"][0]
    assert table["warning"][1].startswith("almost no image content") and table["warning"][2] == ""
    assert f"warning: {files[0]}: low dynamic range" in captured.err and "Traceback" not in captured.err

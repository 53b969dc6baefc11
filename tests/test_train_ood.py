"""OOD training: outputs and bundle with a percentile cutoff, the gate in the Pipeline, ood-score, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image as PILImage
from resume_check import assert_same_run, kill_after_rows

from cxrbench.cli.main import main
from cxrbench.data import load_manifest
from cxrbench.data.synthetic import write_phantom_set
from cxrbench.inference.pipeline import Pipeline
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import ModelCard, load_bundle, save_bundle
from cxrbench.models.classifier import build_classifier
from cxrbench.preprocess import Preprocess
from cxrbench.train import CheckpointError, OODConfig, train_ood

TINY = dict(latent_dim=16, width=8, batch_size=8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", 40, size=64, seed=1)


@pytest.fixture(scope="module")
def ae_run(phantoms, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ae") / "run"
    result = train_ood(load_manifest(phantoms), out, OODConfig(epochs=3, **TINY), progress=False,
                       cache_dir=out.parent / "cache")
    return result


def test_training_writes_metrics_scores_and_a_bundle_with_the_percentile_cutoff(ae_run):
    out = ae_run.out_dir
    for f in ("config.json", "split.csv", "metrics.csv", "checkpoint.pt", "best.safetensors", "scores_val.csv",
              "scores_test.csv", "bundle/card.json", "bundle/model.safetensors"):
        assert (out / f).is_file(), f
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert {"train_loss", "val_ssim_median", "val_l1", "val_l2", "images_per_s"} <= set(metrics.columns)
    assert np.isfinite(metrics[["train_loss", "val_ssim_median", "val_l1"]].to_numpy()).all()
    best_row = metrics.loc[metrics["val_ssim_median"].idxmax()]
    assert metrics["best"].sum() >= 1 and ae_run.best_epoch == int(best_row["epoch"])
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1 and set(split["split"]) == {"train", "val", "test"}

    val = pd.read_csv(out / "scores_val.csv")
    assert len(val) == (split["split"] == "val").sum()
    np.testing.assert_allclose(val["ssim"], 1 - val["ssim_raw"], atol=1e-6)
    card = load_bundle(ae_run.bundle, kind="ood").card
    cutoff = card.ood["cutoff"]
    assert cutoff["scorer"] == "ssim" and cutoff["percentile"] == 95.0 and cutoff["n_reference"] == len(val)
    assert cutoff["threshold"] == pytest.approx(np.percentile(val["ssim"], 95))
    assert "95th percentile" in cutoff["method"] and "validation" in card.ood["how_chosen"]
    assert (val["is_ood"] == (val["ssim"] > cutoff["threshold"])).all()
    summary = card.ood["validation_scores"]["ssim"]
    assert summary["n"] == len(val) and summary["median"] == pytest.approx(np.median(val["ssim"]))
    assert card.builder == "autoencoder" and card.builder_kwargs == {"latent_dim": 16, "base_channels": 8}
    assert card.preprocess == Preprocess(size=64, normalize="zero_one").to_dict()
    assert card.training["epochs_run"] == 3 and card.training["split_counts"]["val"] == len(val)
    assert {"torch", "cxrbench"} <= set(card.versions)


def test_the_runs_recorded_scores_and_verdicts_are_what_ood_score_gives(tmp_path):
    """scores_val.csv / scores_test.csv (and so the cutoff fitted on val) come from the files read as
    ``cxrbench ood-score`` reads them, not from the training's 8-bit cache (96 px phantoms resized to 64: the
    cache's rounding moved them by up to 2e-5 before): the same scores to 1e-6."""
    phantoms = write_phantom_set(tmp_path / "set96", 40, size=96, seed=2)
    torch.manual_seed(0)
    run = train_ood(load_manifest(phantoms), tmp_path / "run", OODConfig(epochs=1, **TINY), progress=False,
                    cache_dir=tmp_path / "cache")
    manifest = load_manifest(phantoms).set_index("image_id")
    for name in ("val", "test"):
        recorded = pd.read_csv(run.out_dir / f"scores_{name}.csv", dtype={"image_id": str})
        files = [str(manifest.loc[i, "path"]) for i in recorded["image_id"]]
        csv = tmp_path / f"{name}.csv"
        assert main(["ood-score", "--bundle", str(run.bundle), *files, "--out", str(csv), "--backend", "torch"]) == 0
        scored = pd.read_csv(csv, keep_default_na=False, na_values=[""])
        assert len(scored) == len(recorded) and scored["error"].isna().all()
        passed = scored["check"].isna() | (scored["check"] == "reconstruction")  # not stopped by the blank guard
        for col in ("l1", "l2", "ssim", "latent"):
            np.testing.assert_allclose(scored.loc[passed, col], recorded.loc[passed.to_numpy(), col],
                                       rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(scored.loc[passed, "is_ood"], recorded.loc[passed.to_numpy(), "is_ood"])


def _classifier_bundle(root: Path) -> Path:
    torch.manual_seed(0)
    clf = build_classifier("resnet18", 14, 1).eval()
    card = ModelCard(kind="classifier", builder="classifier",
                     builder_kwargs={"arch": "resnet18", "num_outputs": 14, "in_channels": 1},
                     labels=list(NIH_FINDINGS), preprocess=Preprocess(size=32).to_dict())
    return save_bundle(root / "clf", clf, card)


def test_bundle_gates_the_pipeline_consistently_with_ood_score(ae_run, phantoms, tmp_path, capsys):
    digit = tmp_path / "digit.png"  # a clearly non-chest image next to phantom chests
    from sklearn.datasets import load_digits

    PILImage.fromarray((np.kron(load_digits().images[0], np.ones((8, 8))) * 255 / 16).astype(np.uint8)).save(digit)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = [str(p) for p in sorted((phantoms / "images").glob("*.png"))[:6]] + [str(digit), str(bad)]
    csv = tmp_path / "scores.csv"
    assert main(["ood-score", "--bundle", str(ae_run.bundle), *files, "--out", str(csv)]) == 0
    table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["file", "l1", "l2", "ssim", "latent", "score", "is_ood", "check", "reason", "error",
                                   "backend"]
    assert set(table["backend"]) == {"onnxruntime"}  # --backend auto scores on ONNX Runtime
    assert len(table) == len(files) and table["error"].isna().sum() == len(files) - 1
    assert "broken.png" in table.loc[len(files) - 1, "file"] and np.isnan(table.loc[len(files) - 1, "score"])
    assert "warning" in capsys.readouterr().err

    ood = load_bundle(ae_run.bundle, kind="ood")
    threshold = ood.card.ood["cutoff"]["threshold"]
    pipe = Pipeline(load_bundle(_classifier_bundle(tmp_path), kind="classifier"), ood)
    read = table.iloc[:-1]
    guarded = read[read["check"].isin(["size", "information"])]  # the card's guard: not scored
    for row in guarded.itertuples():
        report = pipe.analyze(row.file, explain=None)
        assert report.rejected and report.ood.check == row.check and report.ood.reason == row.reason
        assert np.isnan(row.score) and np.isnan(report.ood.score) and row.is_ood
    scored = read[~read["check"].isin(["size", "information"])]
    assert len(scored) >= 6  # the phantom chests all pass the guard fitted on phantoms
    for row in scored.itertuples():
        np.testing.assert_allclose(row.score, row.ssim)
        assert bool(row.is_ood) == (row.score > threshold)
        report = pipe.analyze(row.file, explain=None)
        assert report.ood.score == pytest.approx(row.score, abs=1e-5)
        assert report.rejected == (report.ood.score > threshold) == bool(row.is_ood)
        assert (report.raw is None) == report.rejected
    # the same weights with the cutoff at the median score: the gate splits the files at it
    ordered = np.sort(scored["score"].to_numpy())
    mid = float(ordered[2] + ordered[3]) / 2  # between two scores, so float noise cannot flip a verdict
    card = ood.card
    card.ood = {**card.ood, "cutoff": {**card.ood["cutoff"], "threshold": mid}}
    card.ood.pop("far_cutoff", None)  # one cutoff: the test moves it, and a far cutoff may not lie below it
    pipe = Pipeline(pipe.classifier, load_bundle(save_bundle(tmp_path / "mid", ood.model, card), kind="ood"))
    rejected = [pipe.analyze(f, explain=None).rejected for f in scored["file"]]
    assert rejected == list(scored["score"] > mid) and 0 < sum(rejected) < len(rejected)
    # every file unreadable -> exit code 1
    assert main(["ood-score", "--bundle", str(ae_run.bundle), str(bad), "--out", str(tmp_path / "none.csv")]) == 1


def test_ali_trains_and_its_bundle_scores(phantoms, tmp_path):
    torch.manual_seed(0)
    r = train_ood(load_manifest(phantoms), tmp_path / "ali", OODConfig(model="ali", epochs=2, **TINY),
                  progress=False, cache_dir=tmp_path / "cache")
    metrics = pd.read_csv(tmp_path / "ali" / "metrics.csv")
    assert {"d_loss", "g_adv_loss", "recon_l1", "g_steps_fraction"} <= set(metrics.columns)
    np.testing.assert_allclose(metrics["train_loss"], metrics["recon_l1"])
    assert metrics["d_loss"].notna().all() and metrics["g_steps_fraction"].between(0, 1).all()
    bundle = load_bundle(r.bundle, kind="ood")
    assert bundle.card.builder == "ali" and bundle.card.training["config"]["lr"] == 5e-4
    from cxrbench.ood.scoring import score_batch

    x = torch.rand(3, 1, 64, 64)
    assert np.isfinite(score_batch(bundle.model, x)["ssim"]).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_gate_trained_on_nih_rejects_95_percent_of_digits_and_keeps_85_percent_of_held_out_cxrs(nih_dir, tmp_path):
    """An autoencoder (Z 32, width 8, 10 epochs) trained on the NIH dev CXRs; its cutoff is the 95th
    percentile of its val scores (1 - SSIM). At that cutoff the bundle rejects >= 95 % of 500 digits
    (measured 100 %) and keeps >= 85 % of its held-out test CXRs, read from their files (measured 93 %)."""
    from cxrbench.ood.scoring import score_batch, score_files
    from cxrbench.ood.sets import digits_set

    df = load_manifest(nih_dir)
    r = train_ood(df, tmp_path / "run", OODConfig(latent_dim=32, width=8, epochs=10, fractions=(0.6, 0.2, 0.2)),
                  progress=False)
    gate = load_bundle(r.bundle, kind="ood")
    cutoff = gate.card.ood["cutoff"]["threshold"]
    digits = score_batch(gate.model.eval(), digits_set(500))["ssim"]
    assert (digits > cutoff).mean() >= 0.95, (cutoff, np.percentile(digits, [0, 5, 50]))
    held_out = df[(pd.read_csv(tmp_path / "run" / "split.csv")["split"] == "test").to_numpy()]
    assert len(held_out) >= 80
    table = score_files(gate, held_out["path"].tolist())
    assert (table["error"] == "").all() and table["is_ood"].eq(False).mean() >= 0.85, table["score"].describe()
    ssim = [h["val_ssim_median"] for h in r.history]
    assert max(ssim) > ssim[0] + 0.15  # it learned to reconstruct chests (measured 0.28 -> 0.61)


@pytest.mark.slow
@pytest.mark.realdata
def test_ali_reconstruction_error_falls_by_at_least_a_fifth_in_4_epochs(nih_dir, tmp_path):
    """ALI (Z 32, width 8, batch 16) on the NIH dev CXRs: the mean L1 reconstruction error of the val
    images after epoch 4 is <= 0.8x that after epoch 1 (measured 0.224 -> 0.145), and so is the
    training batches' (0.231 -> 0.148)."""
    r = train_ood(load_manifest(nih_dir), tmp_path / "ali", OODConfig(model="ali", latent_dim=32, width=8, epochs=4,
                                                                      batch_size=16), progress=False)
    val_l1, train_l1 = [h["val_l1"] for h in r.history], [h["recon_l1"] for h in r.history]
    assert val_l1[-1] <= 0.8 * val_l1[0], val_l1
    assert train_l1[-1] <= 0.8 * train_l1[0], train_l1


@pytest.mark.slow
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(phantoms, tmp_path):
    """Kill a real training process after >= 1 logged epoch, resume it: every epoch logged once, the
    epochs logged before the kill kept (not run again), and the same metrics and bit-identical weights
    as the same run uninterrupted."""
    out, epochs = tmp_path / "run", 12
    args = ["train", "ood", "--data", str(phantoms), "--latent", "16", "--width", "8", "--batch-size", "8",
            "--epochs", str(epochs), "-q"]
    cmd = [sys.executable, "-m", "cxrbench.cli", *args, "--out", str(out)]
    env = {**os.environ, "CXRBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    before = kill_after_rows(cmd, out, env, rows=1, timeout=120)
    assert 1 <= len(before) < epochs and not (out / "bundle").exists()
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bundle:" in res.stdout
    metrics = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(metrics.iloc[:len(before)][before.columns], before)  # timings unchanged
    assert json.loads((out / "bundle" / "card.json").read_text())["training"]["epochs_run"] == epochs
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert_same_run(tmp_path / "ref", out, epochs)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "scores_test.csv"),
                                  pd.read_csv(out / "scores_test.csv"))


def test_resume_refuses_other_settings_and_continues_with_more_epochs(phantoms, tmp_path):
    df = load_manifest(phantoms)
    kw = dict(progress=False, cache_dir=tmp_path / "c")
    train_ood(df, tmp_path / "run", OODConfig(epochs=1, max_steps_per_epoch=1, **TINY), **kw)
    with pytest.raises(CheckpointError, match="other settings"):
        train_ood(df, tmp_path / "run", OODConfig(epochs=2, lr=0.1, max_steps_per_epoch=1, **TINY), resume=True, **kw)
    with pytest.raises(CheckpointError, match="other settings"):
        train_ood(df, tmp_path / "run", OODConfig(model="ali", epochs=2, max_steps_per_epoch=1, **TINY), resume=True,
                  **kw)
    # more epochs and another cutoff percentile are fine: it continues at epoch 2
    r = train_ood(df, tmp_path / "run", OODConfig(epochs=2, percentile=90, max_steps_per_epoch=1, **TINY),
                  resume=True, **kw)
    assert [h["epoch"] for h in r.history] == [2] and r.cutoff.percentile == 90.0
    assert list(pd.read_csv(tmp_path / "run" / "metrics.csv")["epoch"]) == [1, 2]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown OOD model"):
        OODConfig(model="vae")
    with pytest.raises(ValueError, match="unknown scorer"):
        OODConfig(scorer="psnr")
    with pytest.raises(ValueError, match="unknown autoencoder loss 'l2'.*mse"):
        OODConfig(ae_loss="l2")  # refused before any folder is made or epoch is spent
    with pytest.raises(ValueError, match="percentile"):
        OODConfig(percentile=0)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        OODConfig(batch_size=1)
    assert OODConfig().lr == 1e-3 and OODConfig(model="ali").lr == 5e-4
    assert "epochs" not in OODConfig().resume_key() and "lr" in OODConfig().resume_key()

"""Classifier training: outputs, resume after a kill, DDP with 2 gloo ranks, evaluate/predict CLIs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from resume_check import assert_same_run, kill_after_rows

from cxrbench.cli.main import main
from cxrbench.data import load_manifest
from cxrbench.data.synthetic import write_phantom_set
from cxrbench.models.bundle import load_bundle
from cxrbench.train import CheckpointError, ClassifierConfig, train_classifier

TINY = dict(arch="resnet18", image_size=32, batch_size=8, eval_bootstrap=50, early_stopping_patience=0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", 40, size=64, seed=1)


def test_training_writes_everything_and_a_usable_bundle(phantoms, tmp_path):
    df = load_manifest(phantoms)
    r = train_classifier(df, tmp_path / "run", ClassifierConfig(epochs=2, **TINY), progress=False,
                         cache_dir=tmp_path / "cache")
    out = tmp_path / "run"
    for f in ("config.json", "split.csv", "metrics.csv", "checkpoint.pt", "best.safetensors",
              "predictions_val.csv", "predictions_test.csv", "evaluation.csv", "bundle/card.json"):
        assert (out / f).is_file(), f
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and np.isfinite(metrics["train_loss"]).all()
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    bundle = load_bundle(r.bundle, kind="classifier")
    card = bundle.card
    assert card.operating_points["fitted_on"] == "validation"
    assert card.metrics["test"]["split"] == "test" and card.training["epochs_run"] == 2
    # findings absent from the test split are reported as such, not as 0 or 0.5
    ev = pd.read_csv(out / "evaluation.csv")
    no_pos = ev[ev["n_pos"] == 0]
    assert len(no_pos) and no_pos["auc"].isna().all() and no_pos["note"].str.contains("no positive").all()
    preds = pd.read_csv(out / "predictions_test.csv")
    assert {"Effusion", "Effusion_raw", "Effusion_label"} <= set(preds.columns)


def test_the_precision_choice_is_recorded_in_the_card(phantoms, tmp_path):
    from cxrbench.train.runtime import cpu_has_fast_bf16

    df = load_manifest(phantoms)
    off = train_classifier(df, tmp_path / "fp32", ClassifierConfig(epochs=1, max_steps_per_epoch=1, precision="fp32",
                                                                   **TINY), progress=False, cache_dir=tmp_path / "c")
    card = load_bundle(off.bundle).card
    assert card.training["precision"] == "fp32" and card.training["precision_choice"] == "fp32 asked for"
    assert card.training["config"]["precision"] == "fp32"
    auto = train_classifier(df, tmp_path / "auto", ClassifierConfig(epochs=1, max_steps_per_epoch=1, **TINY),
                            progress=False, cache_dir=tmp_path / "c")
    training = load_bundle(auto.bundle).card.training
    fast = cpu_has_fast_bf16() or torch.cuda.is_available()
    assert training["precision"] == ("bf16 autocast, channels_last" if fast else "fp32")
    assert training["precision_choice"].startswith("auto: ") and training["config"]["precision"] == "auto"
    with pytest.raises(ValueError, match="precision must be"):
        ClassifierConfig(precision="half")


def test_the_loader_workers_reach_the_dataloader_and_the_card(phantoms, tmp_path, monkeypatch):
    """auto: no workers on the CPU (the card says why); a number asked for is the DataLoader's, in worker
    processes that really load the batches."""
    import cxrbench.train.loop as loop

    made: list[int] = []

    class Spy(loop.DataLoader):  # type: ignore[misc,name-defined]
        def __init__(self, *args, **kwargs):
            made.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop, "DataLoader", Spy)
    df = load_manifest(phantoms)
    auto = train_classifier(df, tmp_path / "auto", ClassifierConfig(epochs=1, max_steps_per_epoch=1, **TINY),
                            progress=False, cache_dir=tmp_path / "c")
    training = load_bundle(auto.bundle).card.training
    assert made == [0] and auto.loader_workers == 0 and training["config"]["num_workers"] is None
    assert training["loader_workers"] == 0 and training["loader_workers_choice"] == "auto: none on the CPU"
    two = train_classifier(df, tmp_path / "two", ClassifierConfig(epochs=1, max_steps_per_epoch=2, num_workers=2,
                                                                  **TINY), progress=False, cache_dir=tmp_path / "c")
    training = load_bundle(two.bundle).card.training
    assert made == [0, 2] and training["loader_workers"] == 2 and training["loader_workers_choice"] == "2 asked for"
    assert two.history[-1]["train_images"] == 16 and math.isfinite(two.history[-1]["train_loss"])
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        ClassifierConfig(num_workers=-1)


def test_the_training_estimate_times_the_runs_own_step_within_2x_of_a_measured_run(nih_dir, tmp_path):
    """estimate_training_seconds times the step the run takes (its precision and memory format, after warm-up):
    its seconds per step lie within 2x of the steady steps (second epoch) of a short real run on the NIH images."""
    from cxrbench.train import estimate_training_seconds

    df = load_manifest(nih_dir)
    config = ClassifierConfig(arch="resnet18", image_size=96, batch_size=16, epochs=2, max_steps_per_epoch=6,
                              eval_bootstrap=20, early_stopping_patience=0)
    estimate = estimate_training_seconds(config, len(df), len(df.attrs["label_columns"]))
    result = train_classifier(df, tmp_path / "run", config, progress=False, cache_dir=tmp_path / "cache")
    assert estimate["precision"] == result.precision  # the timed step is the run's own
    assert estimate["steps_per_epoch"] == 6
    steady = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[-1]  # the first epoch's steps also warm up
    measured = config.batch_size / steady["images_per_s"]
    ratio = estimate["seconds_per_step"] / measured
    assert 0.5 <= ratio <= 2.0, f"estimate {estimate['seconds_per_step']:.3f} s/step, measured {measured:.3f} s/step"


def test_learns_two_clear_phantom_findings_to_test_macro_auc_at_least_0_75(tmp_path):
    """Chance is 0.5: on 96 phantoms where half show Cardiomegaly and half Effusion (independently), a
    ResNet18 at 32 px trained for 4 epochs reaches a test macro AUC >= 0.75 and every finding > 0.6
    (measured 0.82-0.89 over phantom seeds 3-5)."""
    root = write_phantom_set(tmp_path / "set", 96, size=64, seed=3, prevalence={"Cardiomegaly": 0.5, "Effusion": 0.5})
    cfg = ClassifierConfig(arch="resnet18", image_size=32, batch_size=16, epochs=4, labels=["Cardiomegaly", "Effusion"],
                           augment=False, early_stopping_patience=0, fractions=(0.6, 0.1, 0.3), eval_bootstrap=50,
                           seed=3)
    r = train_classifier(load_manifest(root), tmp_path / "run", cfg, progress=False, cache_dir=tmp_path / "cache")
    assert r.evaluation is not None and (r.evaluation["n_pos"] >= 6).all()  # enough positives to mean something
    assert r.summary["macro_auc"] >= 0.75, r.evaluation[["finding", "auc", "n_pos"]]
    assert (r.evaluation["auc"] > 0.6).all(), r.evaluation[["finding", "auc", "n_pos"]]
    first, last = r.history[0], r.history[-1]
    assert last["train_loss"] < 0.7 * first["train_loss"]


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(phantoms, tmp_path):
    """Kill a real training process after >= 2 logged epochs, resume it: every epoch logged once, and the
    same metrics and bit-identical weights as the same run uninterrupted."""
    out, args = tmp_path / "run", ["train", "classifier", "--data", str(phantoms), "--arch", "resnet18", "--size", "32",
                                   "--epochs", "6", "--batch-size", "8", "--bootstrap", "20", "--patience", "0", "-q"]
    cmd = [sys.executable, "-m", "cxrbench.cli", *args, "--out", str(out)]
    env = {**os.environ, "CXRBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    before = kill_after_rows(cmd, out, env, rows=2)
    assert 2 <= len(before) < 6 and not (out / "bundle").exists()
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((out / "bundle" / "card.json").read_text())["training"]["epochs_run"] == 6
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").iloc[:len(before)], before)  # kept, not rerun
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert_same_run(tmp_path / "ref", out, 6)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "predictions_test.csv"),
                                  pd.read_csv(out / "predictions_test.csv"))


def test_resume_refuses_other_settings(phantoms, tmp_path):
    df = load_manifest(phantoms)
    train_classifier(df, tmp_path / "run", ClassifierConfig(epochs=1, **TINY), progress=False, cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="other settings"):
        train_classifier(df, tmp_path / "run", ClassifierConfig(epochs=2, lr=0.1, **TINY), progress=False,
                         resume=True, cache_dir=tmp_path / "c")
    # more epochs with the same settings is fine and continues at epoch 2
    r = train_classifier(df, tmp_path / "run", ClassifierConfig(epochs=2, **TINY), progress=False, resume=True,
                         cache_dir=tmp_path / "c")
    assert [h["epoch"] for h in r.history] == [2]


def test_early_stopping_and_plateau_decay(phantoms, tmp_path, monkeypatch):
    import cxrbench.train.classifier as tc

    losses = iter([1.0, 0.9, 0.95, 0.97, 0.99, 1.2, 1.3, 1.4])  # improves twice, then never
    monkeypatch.setattr(tc, "_validate",
                        lambda *a, **k: {"val_loss": next(losses), "val_auc": 0.5, "val_auc_defined": 1})
    cfg = ClassifierConfig(epochs=8, max_steps_per_epoch=1,
                           **{**TINY, "early_stopping_patience": 3, "plateau_patience": 1})
    r = train_classifier(load_manifest(phantoms), tmp_path / "run", cfg, progress=False, cache_dir=tmp_path / "c")
    assert r.stopped_early and r.epochs_run == 5 and r.best_epoch == 2
    lrs = [h["lr"] for h in r.history]
    assert lrs[:3] == [1e-3, 1e-3, 1e-3] and lrs[4] == pytest.approx(1e-4)  # x0.1 after a 2-epoch plateau


@pytest.mark.slow
def test_ddp_two_gloo_ranks_on_cpu(phantoms, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "cxrbench.cli", "train", "classifier", "--data", str(phantoms), "--out", str(out),
           "--arch", "resnet18", "--size", "32", "--epochs", "1", "--batch-size", "4", "--bootstrap", "20",
           "--device", "cpu", "-q"]
    env = {**os.environ, "CXRBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    row = pd.read_csv(out / "metrics.csv").iloc[0]
    split = pd.read_csv(out / "split.csv")
    n_train = int((split["split"] == "train").sum())
    assert row["world_size"] == 2
    assert row["train_images"] <= (n_train + 1) // 2 + 1  # each rank saw half of the training images
    assert load_bundle(out / "bundle").card.training["epochs_run"] == 1


def test_evaluate_and_predict_commands(phantoms, tmp_path, capsys):
    df = load_manifest(phantoms)
    r = train_classifier(df, tmp_path / "run", ClassifierConfig(epochs=1, **TINY), progress=False,
                         cache_dir=tmp_path / "c")
    assert main(["evaluate", "--bundle", str(r.bundle), "--data", str(phantoms), "--split",
                 str(tmp_path / "run" / "split.csv"), "--out", str(tmp_path / "ev"), "--bootstrap", "20",
                 "-q"]) in (0, 1)
    out = capsys.readouterr().out
    assert "macro AUC" in out and (tmp_path / "ev" / "evaluation.csv").is_file()
    ev = pd.read_csv(tmp_path / "ev" / "evaluation.csv")
    assert len(ev) == 14 and {"auc_std_half_splits", "auc_ci_low", "auc_ci_high", "f1"} <= set(ev.columns)

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = [str(p) for p in sorted((phantoms / "images").glob("*.png"))[:3]] + [str(bad)]
    assert main(["predict", "--bundle", str(r.bundle), *files, "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds.columns[:3]) == ["file", "Atelectasis", "Atelectasis_raw"] and len(preds) == 4
    assert preds["error"].isna().sum() == 3 and "broken.png" in preds.loc[3, "file"]
    assert isinstance(preds.loc[3, "error"], str) and np.isnan(preds.loc[3, "Effusion"])
    raw, cal = preds.loc[:2, "Effusion_raw"], preds.loc[:2, "Effusion"]
    thr = load_bundle(r.bundle).card.operating_points["thresholds"]["Effusion"]
    if thr is not None:  # calibrated >= 0.5 exactly when raw >= operating point
        assert ((cal >= 0.5) == (raw >= thr)).all()
    with torch.no_grad():
        assert np.isfinite(preds.loc[:2, "Effusion_raw"]).all()


def test_the_runs_recorded_test_results_are_what_predict_and_evaluate_give(tmp_path, capsys):
    """A run's predictions_test.csv and its card's test metrics reproduce: ``cxrbench predict`` on the test files gives
    the same raw and calibrated probabilities (1e-6; PyTorch, and the default ONNX Runtime's raw ones too), and
    ``cxrbench evaluate`` on the run's test split
    gives the card's per-finding AUCs, CIs and F1s and its macro AUC exactly. When the run predicted its val and test
    splits from the training's uint8 cache, these 80 phantoms (64 px, trained at 32 px) moved raw probabilities by
    up to 4e-4 and one finding's AUC, the macro AUC from 0.390 to 0.387."""
    phantoms = write_phantom_set(tmp_path / "set", 80, size=64, seed=1)
    df = load_manifest(phantoms)
    run = tmp_path / "run"
    r = train_classifier(df, run, ClassifierConfig(epochs=1, **TINY), progress=False, cache_dir=tmp_path / "c")
    card = load_bundle(r.bundle).card
    test = card.metrics["test"]

    recorded = pd.read_csv(run / "predictions_test.csv")
    split = pd.read_csv(run / "split.csv")
    paths = df.set_index("image_id").loc[split.loc[split["split"] == "test", "image_id"], "path"]
    assert list(paths.index) == recorded["file"].astype(str).tolist() and len(paths) == test["n_images"]
    assert main(["predict", "--bundle", str(r.bundle), *map(str, paths), "--backend", "torch",
                 "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    again = pd.read_csv(tmp_path / "p.csv")
    assert (again["backend"] == "torch").all() and again["error"].isna().all()
    for f in card.labels:
        for col in (f"{f}_raw", f):
            np.testing.assert_allclose(again[col], recorded[col], rtol=0, atol=1e-6, err_msg=col)
    assert main(["predict", "--bundle", str(r.bundle), *map(str, paths), "--out", str(tmp_path / "auto.csv"),
                 "-q"]) == 0
    auto = pd.read_csv(tmp_path / "auto.csv")  # the default: ONNX Runtime, exported on first use
    assert (auto["backend"] == "onnxruntime").all()
    cols = [f"{f}_raw" for f in card.labels]
    np.testing.assert_allclose(auto[cols], recorded[cols], rtol=0, atol=1e-6)

    assert main(["evaluate", "--bundle", str(r.bundle), "--data", str(phantoms), "--split", str(run / "split.csv"),
                 "--subset", "test", "--bootstrap", str(TINY["eval_bootstrap"]), "--out", str(tmp_path / "ev"),
                 "-q"]) == 0
    printed = capsys.readouterr().out
    ev = pd.read_csv(tmp_path / "ev" / "evaluation.csv").set_index("finding")
    macro = test["summary"]["macro_auc"]
    assert np.isfinite(macro) and f"macro AUC {macro:.3f} over" in printed
    for f, row in test["per_finding"].items():
        for k in ("auc", "auc_ci_low", "auc_ci_high", "f1"):
            got, want = ev.loc[f, k], row[k]
            assert (want is None and np.isnan(got)) or got == want, (f, k, got, want)
    assert pd.read_csv(run / "evaluation.csv").set_index("finding")["auc"].equals(ev["auc"])
    assert test["source"].startswith("float path (as cxrbench predict)")
    assert card.operating_points["fitted_on"] == "validation"
    assert main(["info", str(r.bundle)]) == 0
    assert "  predicted by: float path (as cxrbench predict)" in capsys.readouterr().out

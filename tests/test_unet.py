"""Lung U-Net: shapes, ignored (127) pixels, aligned augmentation, training with resume, segment CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrbench.models.unet import (
    IGNORE_VALUE,
    UNet,
    dice_iou,
    mask_to_target,
    masked_bce_loss,
    predict_lung_mask,
    read_mask_pair,
    soft_dice_loss,
)
from cxrbench.train.common import CheckpointError
from cxrbench.train.unet import PairAugmentation, UNetConfig, load_mask_pairs, train_unet

TINY = dict(image_size=32, base_channels=4, depth=2, batch_size=4)


def _lung_pair(rng: np.random.Generator, h: int = 40, w: int = 40,
               ignore: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A dark 'lung' ellipse pair on a bright body (uint8 image) and its 0/255 (and 127) mask."""
    rows, cols = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint8)
    for cx in (0.3 * w, 0.7 * w):
        mask[((cols - cx) / (0.15 * w)) ** 2 + ((rows - 0.5 * h) / (0.3 * h)) ** 2 <= 1] = 255
    image = np.where(mask > 0, 60, 190) + rng.integers(-20, 20, (h, w))
    if ignore:
        mask[int(0.4 * h) : int(0.5 * h), int(0.25 * w) : int(0.35 * w)] = IGNORE_VALUE
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        image, mask = _lung_pair(rng, ignore=i % 3 == 0)
        Image.fromarray(image).save(root / "images" / f"p{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"p{i:02d}.png")
    return root


def test_unet_shapes_any_size_and_argument_checks():
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=4, depth=3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    assert model(torch.randn(1, 1, 37, 45)).shape == (1, 1, 37, 45)  # padded to a multiple of 8 and cropped
    assert UNet(in_channels=3, base_channels=4, depth=1)(torch.randn(1, 3, 16, 16)).shape == (1, 1, 16, 16)
    assert sum(p.numel() for p in UNet().parameters()) < 2_500_000  # the default trains on a CPU
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=0)


def test_mask_values_split_into_target_and_valid():
    target, valid = mask_to_target(np.array([[0, 127, 255]], np.uint8))
    np.testing.assert_array_equal(target, [[False, False, True]])
    np.testing.assert_array_equal(valid, [[True, False, True]])


def test_a_prediction_wrong_only_on_ignored_pixels_scores_dice_one():
    target = np.zeros((2, 1, 16, 16), bool)
    target[:, :, 4:12, 4:12] = True
    valid = np.ones_like(target)
    valid[:, :, 6:8, :] = False  # a device over the lung: ignore these rows
    pred = target.copy()
    pred[:, :, 6:8, :] = ~pred[:, :, 6:8, :]  # wrong everywhere on the ignored rows only
    dice, iou = dice_iou(pred, target, valid)
    np.testing.assert_allclose(dice, 1.0)
    np.testing.assert_allclose(iou, 1.0)
    dice_all, iou_all = dice_iou(pred, target)
    assert np.all(dice_all < 0.9) and np.all(iou_all < dice_all)
    # exact value: 48 of 64 lung pixels predicted (the 16 ignored are flipped off) and 16 false positives
    one_d, one_i = dice_iou(pred[0, 0], target[0, 0])
    assert one_d == pytest.approx(2 * 48 / (64 + 64)) and one_i == pytest.approx(48 / 80)
    assert dice_iou(np.zeros((4, 4)), np.zeros((4, 4)))[0] == 1.0  # both empty


def test_losses_ignore_the_ignored_pixels():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    valid = torch.ones_like(target)
    valid[..., :4, :] = 0
    logits = torch.randn(2, 1, 16, 16)
    wild = logits.clone()
    wild[..., :4, :] = 50.0 * torch.randn(2, 1, 4, 16)
    assert masked_bce_loss(wild, target, valid) == pytest.approx(float(masked_bce_loss(logits, target, valid)))
    assert soft_dice_loss(wild, target, valid) == pytest.approx(float(soft_dice_loss(logits, target, valid)))
    assert masked_bce_loss(wild, target) > masked_bce_loss(logits, target) + 1.0
    perfect = (target * 2 - 1) * 30.0
    assert float(masked_bce_loss(perfect, target, valid)) < 1e-6 and float(soft_dice_loss(perfect, target)) < 1e-3
    # gradients never reach ignored pixels
    wild.requires_grad_(True)
    (masked_bce_loss(wild, target, valid) + soft_dice_loss(wild, target, valid)).backward()
    assert torch.all(wild.grad[..., :4, :] == 0) and wild.grad[..., 4:, :].abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        masked_bce_loss(logits, target[..., :8])


def test_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(1)
    image, mask = _lung_pair(rng, 64, 64, ignore=True)
    codes = np.where(mask == IGNORE_VALUE, 2, mask // 255).astype(np.uint8)
    # an image that *is* its label map, so any misalignment shows as disagreement
    picture = torch.from_numpy(codes.astype(np.float32) / 2.0)[None]
    augment = PairAugmentation(hflip=True, max_rotation=25.0, max_translation=0.1, scale_range=(0.8, 1.2))
    torch.manual_seed(3)
    moved = 0
    for _ in range(6):
        out_image, out_codes = augment(picture, torch.from_numpy(codes)[None])
        assert out_image.shape == (1, 64, 64) and out_codes.dtype == torch.uint8
        assert set(torch.unique(out_codes).tolist()) <= {0, 1, 2}  # nearest-neighbour: no new label values
        recovered = torch.round(out_image * 2.0).to(torch.uint8)
        agreement = (recovered == out_codes).float().mean().item()
        assert agreement > 0.97, agreement  # only edge pixels may differ (bilinear vs nearest)
        moved += int((out_codes != torch.from_numpy(codes)[None]).float().mean().item() > 0.02)
    assert moved >= 4  # the transform really moves things


def test_pairs_load_on_one_grid_with_ignore_codes(pairs):
    from cxrbench.data import load_manifest
    from cxrbench.preprocess import Preprocess

    df = load_manifest(pairs)
    images, codes, errors = load_mask_pairs(df, Preprocess(size=20))
    assert images.shape == codes.shape == (14, 20, 20) and not errors
    assert (codes == 2).any(axis=(1, 2)).sum() == 5 and set(np.unique(codes)) == {0, 1, 2}
    # the lungs are the dark pixels of the image
    assert images[codes == 1].mean() < 0.35 < images[codes == 0].mean()
    native, native_codes = read_mask_pair(df["path"][0], df["mask_path"][0])
    assert native.shape == native_codes.shape == (40, 40)


def test_training_writes_a_bundle_resumes_and_checks_settings(pairs, tmp_path):
    from cxrbench.data import load_manifest
    from cxrbench.models.bundle import load_bundle

    df = load_manifest(pairs)
    out = tmp_path / "run"
    first = train_unet(df, out, UNetConfig(epochs=2, **TINY), progress=False)
    for f in ("config.json", "split.csv", "metrics.csv", "checkpoint.pt", "best.safetensors", "evaluation_test.csv",
              "bundle/card.json"):
        assert (out / f).is_file(), f
    assert first.epochs_run == 2
    resumed = train_unet(df, out, UNetConfig(epochs=3, **TINY), resume=True, progress=False)
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2, 3] and resumed.history[0]["epoch"] == 3
    bundle = load_bundle(resumed.bundle, kind="segmentation")
    card = bundle.card
    assert card.builder == "unet" and card.builder_kwargs == {"in_channels": 1, "base_channels": 4, "depth": 2}
    test = card.metrics["test"]
    assert test["n_images"] == len(pd.read_csv(out / "evaluation_test.csv")) and 0 <= test["dice_mean"] <= 1
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    mask, prob = predict_lung_mask(bundle.model, bundle.preprocess, np.full((50, 50), 0.5, np.float32))
    assert mask.shape == prob.shape == (50, 50) and mask.dtype == bool
    with pytest.raises(CheckpointError, match="other settings"):
        train_unet(df, out, UNetConfig(epochs=4, **{**TINY, "lr": 0.5}), resume=True, progress=False)


def test_training_learns_the_toy_lungs_to_a_test_dice_above_0_8(pairs, tmp_path):
    """Chance-level masks (all lung or none) score a Dice of about 0.4 or 0 here; 6 epochs reach > 0.8."""
    from cxrbench.data import load_manifest

    torch.manual_seed(0)
    result = train_unet(load_manifest(pairs), tmp_path / "run", UNetConfig(epochs=6, lr=3e-3, **TINY),
                        progress=False)
    assert result.summary["dice_mean"] > 0.8, result.summary


@pytest.mark.slow
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(pairs, tmp_path):
    """Kill a real ``cxrbench train unet`` after >= 3 logged epochs, resume it: every epoch logged once and
    the same metrics, per-image test Dice and bit-identical weights as the same run uninterrupted."""
    import os
    import subprocess
    import sys

    from resume_check import assert_same_run, kill_after_rows

    from cxrbench.cli.main import main

    out, epochs = tmp_path / "run", 30
    args = ["train", "unet", "--data", str(pairs), "--size", "32", "--base-channels", "4", "--depth", "2",
            "--epochs", str(epochs), "-q"]
    cmd = [sys.executable, "-m", "cxrbench.cli", *args, "--out", str(out)]
    before = kill_after_rows(cmd, out, {**os.environ, "OMP_NUM_THREADS": "1"}, rows=3, timeout=120)
    assert 3 <= len(before) < epochs and not (out / "bundle").exists()
    res = subprocess.run(cmd + ["--resume"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").iloc[:len(before)], before)  # kept, not rerun
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert_same_run(tmp_path / "ref", out, epochs)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "evaluation_test.csv"),
                                  pd.read_csv(out / "evaluation_test.csv"))


@pytest.mark.slow
def test_ddp_two_gloo_ranks_on_cpu(pairs, tmp_path):
    """Under torchrun the U-Net trains data-parallel through the same loop: each rank sees half the pairs."""
    import os
    import subprocess
    import sys

    from cxrbench.models.bundle import load_bundle

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           "-m", "cxrbench.cli", "train", "unet", "--data", str(pairs), "--out", str(out), "--size", "32",
           "--base-channels", "4", "--depth", "2", "--epochs", "2", "--batch-size", "2", "--device", "cpu", "-q"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    metrics = pd.read_csv(out / "metrics.csv")
    n_train = int((pd.read_csv(out / "split.csv")["split"] == "train").sum())
    assert list(metrics["epoch"]) == [1, 2] and (metrics["world_size"] == 2).all()
    assert (metrics["train_images"] <= (n_train + 1) // 2).all()  # each rank saw half of the training pairs
    assert load_bundle(out / "bundle", kind="segmentation").card.training["epochs_run"] == 2


def test_train_and_segment_cli(pairs, tmp_path, capsys):
    from cxrbench.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "unet", "--data", str(pairs), "--out", str(run), "--size", "32", "--base-channels", "4",
                 "--depth", "2", "--epochs", "1", "-q"]) == 0
    assert "test Dice" in capsys.readouterr().out
    wide = tmp_path / "wide.png"
    Image.fromarray(_lung_pair(np.random.default_rng(2), 30, 44)[0]).save(wide)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "masks"
    assert main(["segment", "--bundle", str(run / "bundle"), str(wide), str(broken), str(pairs / "images" / "p01.png"),
                 "--out", str(out), "-q"]) == 0
    summary = pd.read_csv(out / "segment_summary.csv", keep_default_na=False)
    assert len(summary) == 3 and list(summary["error"] == "") == [True, False, True]
    written = np.asarray(Image.open(out / "wide_lung.png"))
    assert written.shape == (30, 30) and set(np.unique(written)) <= {0, 255}  # the 30 x 30 displayed crop
    assert np.asarray(Image.open(out / "p01_lung.png")).shape == (40, 40)
    assert "broken.png" in capsys.readouterr().err
    assert main(["segment", "--bundle", str(run / "bundle"), str(broken), "--out", str(tmp_path / "e"), "-q"]) == 1
    card = json.loads((run / "bundle" / "card.json").read_text())
    assert card["kind"] == "segmentation" and card["labels"] == ["lung"]


@pytest.mark.realdata
def test_real_mask_pairs_load_with_ignore_pixels(shared_data):
    from cxrbench.data import load_manifest
    from cxrbench.preprocess import Preprocess

    df = load_manifest(shared_data / "cxr" / "masks")
    assert len(df) == 79 and df["patient_id"].nunique() == 42
    with_ignore = [p for p in df["mask_path"] if (np.asarray(Image.open(p)) == IGNORE_VALUE).any()]
    assert len(with_ignore) == 3
    rows = df[df["mask_path"].isin(with_ignore)].reset_index(drop=True)
    images, codes, errors = load_mask_pairs(rows, Preprocess(size=128))
    assert not errors and images.shape == (3, 128, 128)
    assert all((c == 2).any() for c in codes) and all(((c == 1).mean() > 0.1) for c in codes)

"""Tests of the OOD scorers, error maps, cutoffs, metrics, the cutoff sweep and corruptions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_msssim import ssim
from sklearn.metrics import roc_auc_score

from cxrbench.models.autoencoder import ConvAutoencoder
from cxrbench.ood import (
    CHESTER_SSIM_CUTOFF,
    CORRUPTIONS,
    OODCutoff,
    chester_ssim_cutoff,
    corrupt,
    cutoff_tradeoff,
    error_map,
    fit_cutoff,
    ood_metrics,
    reconstruction_scores,
    score_batch,
    score_batches,
    structural_similarity_batch,
)


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) float32 in [0.1, 0.9]: random low-frequency patterns."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 6, 6, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (0.1 + 0.8 * (up - up.amin()) / (up.amax() - up.amin())).float()


class IdentityModel:
    """OOD-protocol stub: perfect reconstruction, latent = a constant vector (3, 4) -> norm 5."""

    latent_dim = 2
    image_size = 64

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[3.0, 4.0]]).expand(x.shape[0], 2)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def test_identical_reconstruction_scores_zero() -> None:
    x = smooth_images(3)
    scores = reconstruction_scores(x, x)
    np.testing.assert_allclose(scores["l1"], 0.0, atol=1e-12)
    np.testing.assert_allclose(scores["l2"], 0.0, atol=1e-12)
    np.testing.assert_allclose(scores["ssim_raw"], 1.0, atol=1e-5)
    np.testing.assert_allclose(scores["ssim"], 0.0, atol=1e-5)
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in scores.values())


def test_worse_reconstructions_score_higher_on_every_scorer() -> None:
    x = smooth_images(2)
    g = torch.Generator().manual_seed(0)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    heavily = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    shifted = torch.roll(x, shifts=8, dims=-1)
    s0, s1, s2, s_shift = (reconstruction_scores(x, r) for r in (x, slightly, heavily, shifted))
    for name in ("l1", "l2", "ssim"):
        assert np.all(s0[name] < s1[name]) and np.all(s1[name] < s2[name]), name
        assert np.all(s_shift[name] > s0[name]), name
    np.testing.assert_allclose(s1["ssim"], 1 - s1["ssim_raw"])
    expected_mse = ((x - heavily) ** 2).flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(s2["l2"], expected_mse, rtol=1e-6)


def test_ssim_uses_data_range_one_and_an_explicit_window() -> None:
    x, y = smooth_images(2, seed=1), smooth_images(2, seed=2)
    ours = reconstruction_scores(x, y)["ssim_raw"]
    explicit = ssim(x, y, data_range=1.0, size_average=False, win_size=11).double().numpy()
    np.testing.assert_allclose(ours, explicit, rtol=1e-6)
    # pytorch-msssim's default data_range is 255: on [0, 1] images that is a different number,
    # and it equals ours only once the images are scaled to 0-255.
    default_range = ssim(x, y, size_average=False).double().numpy()
    assert np.all(np.abs(default_range - ours) > 0.01)
    scaled = ssim(x * 255, y * 255, size_average=False).double().numpy()
    np.testing.assert_allclose(scaled, ours, rtol=1e-4)


def test_ms_ssim_is_refused_at_64_px_and_works_when_large_enough() -> None:
    x = smooth_images(1)
    with pytest.raises(ValueError, match="MS-SSIM.*160 px"):
        structural_similarity_batch(x, x, kind="ms-ssim")
    big = smooth_images(1, size=176)
    assert float(structural_similarity_batch(big, big, kind="ms-ssim")[0]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="unknown similarity"):
        structural_similarity_batch(x, x, kind="psnr")
    with pytest.raises(ValueError, match="win_size"):
        structural_similarity_batch(x, x, win_size=10)


def test_score_batch_with_stub_and_real_model() -> None:
    x = smooth_images(4)
    scores = score_batch(IdentityModel(), x)
    assert set(scores) == {"l1", "l2", "ssim", "ssim_raw", "latent"}
    np.testing.assert_allclose(scores["latent"], 5.0)
    np.testing.assert_allclose(scores["ssim"], 0.0, atol=1e-5)

    torch.manual_seed(0)
    model = ConvAutoencoder(latent_dim=8, base_channels=4)
    model.train()
    real = score_batch(model, x)
    assert not model.training
    assert all(v.shape == (4,) and np.all(np.isfinite(v)) for v in real.values())
    z = model.latent_mean(x).detach()
    np.testing.assert_allclose(real["latent"], torch.linalg.vector_norm(z, dim=1).double().numpy(), rtol=1e-5)


def test_score_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_batch(IdentityModel(), smooth_images(2) * 255)
    with pytest.raises(ValueError, match="shape"):
        score_batch(IdentityModel(), smooth_images(2, size=32))
    with pytest.raises(TypeError, match="latent_mean"):
        score_batch(object(), smooth_images(2))


def test_score_batches_concatenates_and_accepts_loader_tuples() -> None:
    x = smooth_images(5)
    whole = score_batch(IdentityModel(), x)
    parts = score_batches(IdentityModel(), [(x[:2], torch.zeros(2)), (x[2:], torch.zeros(3))])
    for name in whole:
        np.testing.assert_allclose(parts[name], whole[name], atol=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        score_batches(IdentityModel(), [])


def test_error_maps() -> None:
    x = smooth_images(2)
    recon = x.clone()
    recon[:, :, 10:20, 10:20] = 0.0
    l1, l2 = error_map(x, recon, "l1"), error_map(x, recon, "l2")
    assert l1.shape == l2.shape == (2, 1, 64, 64)
    torch.testing.assert_close(l2, l1**2)
    assert float(l1[:, :, 10:20, 10:20].min()) > 0 and float(l1[:, :, 30:, 30:].max()) == 0.0
    structural = error_map(x, recon, "ssim")
    assert structural.shape == (2, 1, 64, 64)
    assert float(structural[:, :, 14, 14].min()) > 0.1 and float(structural[:, :, 45:, 45:].abs().max()) < 1e-6
    with pytest.raises(ValueError, match="unknown error map"):
        error_map(x, recon, "l3")


def test_ood_metrics_separable_and_hand_computed() -> None:
    perfect = ood_metrics(np.linspace(0, 1, 50), np.linspace(2, 3, 30))
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0 and perfect["aupr_out"] == pytest.approx(1.0)
    assert ood_metrics(np.linspace(2, 3, 30), np.linspace(0, 1, 50))["auroc"] == 0.0
    # in = [0, 1, 2, 3], out = [2.5, 10]: 7 of 8 pairs ordered; catching both OOD needs
    # cutoff 2.5, which also rejects the in-distribution 3 -> FPR 1/4.
    hand = ood_metrics([0, 1, 2, 3], [2.5, 10])
    assert hand["auroc"] == pytest.approx(0.875) and hand["fpr_at_95_tpr"] == pytest.approx(0.25)
    assert hand["n_in"] == 4 and hand["n_out"] == 2
    with pytest.raises(ValueError, match="both groups"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        ood_metrics([np.nan, 1.0], [2.0])


def test_fit_cutoff_percentile_and_serialisation() -> None:
    scores = np.arange(100, dtype=float)
    cutoff = fit_cutoff(scores, percentile=95, scorer="l1")
    assert cutoff.threshold == pytest.approx(94.05)
    assert cutoff.is_ood(scores).mean() == pytest.approx(0.05)
    assert "95th percentile" in cutoff.method and cutoff.n_reference == 100
    assert OODCutoff.from_dict(cutoff.to_dict()) == cutoff
    with pytest.raises(ValueError, match="percentile"):
        fit_cutoff(scores, percentile=0)
    with pytest.raises(ValueError, match="non-empty"):
        fit_cutoff([])
    with pytest.raises(ValueError, match="unknown scorer"):
        OODCutoff(scorer="psnr", threshold=1.0, method="x")


def test_chester_cutoff_maps_ssim_below_060_to_ood() -> None:
    cutoff = chester_ssim_cutoff()
    assert CHESTER_SSIM_CUTOFF == 0.60 and cutoff.scorer == "ssim"
    assert cutoff.threshold == pytest.approx(0.40)
    raw_ssim = np.array([0.59, 0.61, 0.95, -0.1])
    np.testing.assert_array_equal(cutoff.is_ood(1 - raw_ssim), [True, False, False, True])


def test_cutoff_tradeoff_retention_and_missing_classes() -> None:
    rng = np.random.default_rng(0)
    n = 60
    ood_scores = np.arange(n, dtype=float)
    y_true = np.zeros((n, 2), dtype=int)
    y_true[40:50, 0] = 1  # finding a: positives only among high OOD scores
    y_true[::3, 1] = 1  # finding b: positives everywhere
    y_score = rng.random((n, 2)) + 0.5 * y_true
    cutoffs = [9.5, 29.5, 44.5, 59.5]
    table = cutoff_tradeoff(ood_scores, y_true, y_score, cutoffs, finding_names=["a", "b"], n_bootstrap=50)
    assert isinstance(table, pd.DataFrame) and list(table["cutoff"]) == cutoffs
    np.testing.assert_allclose(table["retained_fraction"], [10 / 60, 30 / 60, 45 / 60, 1.0])
    assert np.all(np.diff(table["retained_fraction"]) >= 0)
    assert table["auc_a"].isna().tolist() == [True, True, False, False]
    row = table.iloc[1]
    assert row["auc_macro"] == pytest.approx(roc_auc_score(y_true[:30, 1], y_score[:30, 1]))
    last = table.iloc[-1]
    full = [roc_auc_score(y_true[:, j], y_score[:, j]) for j in range(2)]
    assert last["auc_macro"] == pytest.approx(np.mean(full))
    assert last["auc_macro_ci_low"] <= last["auc_macro"] <= last["auc_macro_ci_high"]
    empty = cutoff_tradeoff(ood_scores, y_true, y_score, [-1.0])
    assert empty["n_retained"].iloc[0] == 0 and math.isnan(empty["auc_macro"].iloc[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        cutoff_tradeoff(ood_scores[:10], y_true, y_score, cutoffs)


def test_corruptions() -> None:
    x = smooth_images(3)
    x[:, :, 0, 0] = 1.0  # mark the top-left corner
    rot90, rot180 = corrupt(x, "rot90"), corrupt(x, "rot180")
    assert rot90.shape == x.shape and float(rot90[0, 0, -1, 0]) == 1.0  # corner moves anticlockwise
    assert float(rot180[0, 0, -1, -1]) == 1.0
    torch.testing.assert_close(corrupt(rot180, "rot180"), x)
    torch.testing.assert_close(corrupt(x, "invert"), 1 - x)
    noisy = corrupt(x, "noise", generator=torch.Generator().manual_seed(0))
    assert 0.0 <= float(noisy.min()) and float(noisy.max()) <= 1.0
    assert 0.25 < float((noisy - x).abs().mean()) < 0.45  # sigma 0.5, clipped
    torch.testing.assert_close(noisy, corrupt(x, "noise", generator=torch.Generator().manual_seed(0)))
    assert set(CORRUPTIONS) == {"rot90", "rot180", "invert", "noise"}
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "blur")
    with pytest.raises(ValueError, match="square"):
        corrupt(torch.rand(1, 1, 8, 6), "rot90")

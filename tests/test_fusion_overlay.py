"""Tests of cxrbench.explain.fusion (heat map + lung mask) and cxrbench.explain.overlay (RGB)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrbench.explain import error_overlay, fuse, mask_fraction, overlay, overlay_all_findings
from cxrbench.explain.fusion import mask_to_unit
from cxrbench.explain.overlay import ERROR_SCALE


def blob(size: int = 16, centre: tuple[int, int] = (4, 4), width: float = 2.0) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * width**2)).astype(np.float32)


def lung_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:28, 3:14] = 255
    mask[4:28, 18:29] = 255
    return mask


def test_fuse_extremes_give_mask_and_heatmap() -> None:
    heat = 5.0 * blob() - 1.0  # arbitrary range, resized 16 -> 32
    mask = lung_mask()
    only_mask = fuse(heat, mask, lam=1.0)
    np.testing.assert_array_equal(only_mask, mask / 255.0)
    only_heat = fuse(heat, mask, lam=0.0)
    assert only_heat.shape == (32, 32) and only_heat.dtype == np.float32
    assert only_heat.min() == 0.0 and only_heat.max() == pytest.approx(1.0)
    assert np.unravel_index(only_heat.argmax(), only_heat.shape) in {(8, 8), (8, 9), (9, 8), (9, 9)}
    half = fuse(heat, mask, lam=0.5)
    np.testing.assert_allclose(half, 0.5 * only_mask + 0.5 * only_heat, atol=1e-6)
    quarter = fuse(heat, mask, lam=0.25)
    np.testing.assert_allclose(quarter, 0.25 * only_mask + 0.75 * only_heat, atol=1e-6)


def test_fuse_batches_grids_and_smoothing() -> None:
    heat = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = np.stack([lung_mask(), np.zeros((32, 32), np.uint8)])  # (B, H, W)
    fused = fuse(heat, mask, lam=0.5)
    assert fused.shape == (2, 3, 32, 32)
    assert fused[1].max() <= 0.5 + 1e-6  # empty mask contributes nothing
    assert fused[0].max() > 0.5
    on_grid = fuse(heat, lung_mask().astype(bool), lam=0.5, size=(16, 16))
    assert on_grid.shape == (2, 3, 16, 16)
    smoothed = fuse(heat, mask, lam=0.5, sigma=2.0)
    assert 0.0 <= smoothed.min() and smoothed.max() <= 1.0
    assert np.abs(np.diff(smoothed, axis=-1)).mean() < np.abs(np.diff(fused, axis=-1)).mean()
    constant = fuse(np.ones((8, 8), np.float32), lung_mask(), lam=0.0)
    assert np.all(constant == 0)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_fuse_rejects_bad_lambda(lam: float) -> None:
    with pytest.raises(ValueError, match="lam"):
        fuse(blob(), lung_mask(), lam=lam)


def test_fuse_and_mask_validation() -> None:
    with pytest.raises(TypeError, match="lam"):
        fuse(blob(), lung_mask(), lam=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fuse(blob(), np.full((8, 8), 2.0), lam=0.5)
    with pytest.raises(ValueError, match="NaN"):
        fuse(np.full((8, 8), np.nan), lung_mask(), lam=0.5)
    with pytest.raises(ValueError, match="shape"):
        fuse(np.zeros((2, 1, 8, 8)), np.zeros((3, 8, 8)), lam=0.5)
    np.testing.assert_array_equal(mask_to_unit(np.array([[0, 1]], np.int64)), [[0.0, 1.0]])
    np.testing.assert_array_equal(mask_to_unit(np.array([[0, 255]], np.uint8)), [[0.0, 1.0]])


def test_mask_fraction() -> None:
    mask = np.zeros((32, 32), np.float32)
    mask[:16] = 1.0
    heat = np.zeros((32, 32), np.float32)
    heat[2:6, 2:6] = 1.0
    assert mask_fraction(heat, mask) == pytest.approx(1.0)
    heat[20:24, 2:6] = 1.0
    assert mask_fraction(heat, mask) == pytest.approx(0.5)
    heat[20:24, 2:6] = -7.0  # negative evidence carries no mass
    assert mask_fraction(heat, mask) == pytest.approx(1.0)
    assert np.isnan(mask_fraction(np.zeros((32, 32)), mask))
    maps = np.zeros((2, 3, 16, 16), np.float32)
    maps[..., :8, :] = 1.0
    maps[1, 2] = 1.0
    fractions = mask_fraction(maps, mask)  # maps resized 16 -> 32
    assert fractions.shape == (2, 3)
    assert np.all(fractions[0] > 0.98)  # bilinear upsampling blurs the edge by one pixel
    assert fractions[1, 2] == pytest.approx(0.5)


def test_overlay_colours_in_rgb_order() -> None:
    image = np.full((32, 32), 0.5, dtype=np.float32)
    heat = blob(16, centre=(4, 4), width=2.0)  # hot top-left, cold elsewhere; resized to 32
    rgb = overlay(image, heat, cmap="jet", alpha=0.8)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[9, 9].astype(int), rgb[30, 30].astype(int)
    # jet runs from dark blue (0, 0, 0.5) to dark red (0.5, 0, 0)
    assert hot[0] > hot[1] + 80 and hot[0] > hot[2] + 80, hot  # red in channel 0
    assert cold[2] > cold[0] + 80 and cold[2] > cold[1] + 80, cold  # blue in channel 2
    thresholded = overlay(image, heat, alpha=0.8, threshold=0.5)
    np.testing.assert_array_equal(thresholded[30, 30], [128, 128, 128])  # image shows through
    np.testing.assert_array_equal(thresholded[9, 9], rgb[9, 9])
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0)[..., 1], np.full((32, 32), 128))


def test_overlay_validation() -> None:
    image = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        overlay(image + 2.0, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="colormap"):
        overlay(image, np.zeros((8, 8)), cmap="not-a-cmap")
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, np.zeros((8, 8)), alpha=1.5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        overlay(np.zeros((8, 8, 3)), np.zeros((8, 8)))


def test_overlay_all_findings_like_chester_fig8() -> None:
    image = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    grey = np.round(image * 255).astype(np.uint8)
    maps = np.zeros((14, 16, 16), np.float32)
    blank = overlay_all_findings(image, maps)
    np.testing.assert_array_equal(blank, np.stack([grey] * 3, axis=-1))  # all transparent

    maps[3] = blob(16, centre=(4, 4))
    maps[9] = 0.5 * blob(16, centre=(12, 12))
    findings = [f"finding{i}" for i in range(14)]
    rgb = overlay_all_findings(image, maps, findings, max_alpha=0.8)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    hot = rgb[9, 9].astype(int)
    assert hot[0] > hot[1] + 100 and hot[0] > hot[2] + 100  # strongly red
    weaker = rgb[25, 25].astype(int)  # half-strength finding: redder than grey, less than hot spot
    assert 0 < weaker[0] - weaker[1] < hot[0] - hot[1]
    np.testing.assert_array_equal(rgb[0, 31], blank[0, 31])  # negligible -> image unchanged

    own_scale = overlay_all_findings(image, maps, findings, per_finding_normalize=True)
    assert own_scale[25, 25, 0] - own_scale[25, 25, 1] > weaker[0] - weaker[1]
    only = overlay_all_findings(image, maps, findings, only=["finding9"])
    np.testing.assert_array_equal(only[9, 9], blank[9, 9])
    with pytest.raises(ValueError, match="names"):
        overlay_all_findings(image, maps, findings[:3])
    with pytest.raises(ValueError, match="not in findings"):
        overlay_all_findings(image, maps, findings, only=["Hernia"])


def test_error_overlay_uses_a_fixed_scale_so_small_errors_stay_grey() -> None:
    grey = np.full((8, 8), 0.5, dtype=np.float32)
    small = np.full((8, 8), 0.02, dtype=np.float32)  # a well-reconstructed chest X-ray
    rgb = error_overlay(grey, small)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3)
    assert np.abs(rgb.astype(int) - 128).max() <= 8  # nearly grey: not stretched to the image's own max
    large = np.zeros((8, 8), dtype=np.float32)
    large[:, 4:] = 2 * ERROR_SCALE  # saturates: red at full alpha, in RGB order
    rgb = error_overlay(grey, large, alpha=1.0)
    assert tuple(rgb[0, 7]) == (255, 0, 0) and tuple(rgb[0, 0]) == (128, 128, 128)
    half = error_overlay(grey, np.full((8, 8), ERROR_SCALE / 2, dtype=np.float32), alpha=1.0)
    assert tuple(half[0, 0]) == (191, 64, 64)
    with pytest.raises(ValueError, match="differs from image shape"):
        error_overlay(grey, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="scale must be > 0"):
        error_overlay(grey, small, scale=0.0)


def test_the_lazy_package_offers_the_overlay_function_whatever_loads_first() -> None:
    import subprocess
    import sys

    code = ("import sys; import cxrbench.explain as e; assert 'torch' not in sys.modules, 'torch on import'; "
            "import cxrbench.explain.overlay; from cxrbench.explain import overlay; "
            "print(overlay.__module__, overlay.__name__, len(e.EXPLAINERS))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["cxrbench.explain.overlay", "overlay", "6"]

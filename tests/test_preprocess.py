"""cxrbench.preprocess: crop never stretches, normalisation modes, range checks, serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrbench._types import check_unit_range
from cxrbench.io import read_image
from cxrbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, PreprocessError


def _circle(h: int, w: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2) <= radius**2).astype(np.float32)


def test_center_crop_keeps_a_circle_round():
    """A circle in a wide image stays a circle: the crop takes the central square, no stretching."""
    img = _circle(200, 400, 80)
    out = Preprocess(size=100, normalize="zero_one").geometry(img)
    assert out.shape == (100, 100)
    mask = out > 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert abs(height - width) <= 1 and abs(height - 80) <= 2  # diameter 160 px of 200 -> 80 of 100


def test_pad_mode_keeps_everything_and_aspect():
    img = np.ones((50, 100), np.float32)
    out = Preprocess(size=64, crop="pad").geometry(img)
    assert out.shape == (64, 64)
    assert out[:10].max() < 0.05 and out[-10:].max() < 0.05  # black bands top and bottom
    assert out[32].min() > 0.95  # the full width is kept


def test_resize_is_antialiased():
    """A one-pixel checkerboard shrinks to mid-grey, not to an aliasing pattern."""
    board = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)
    out = Preprocess(size=64).geometry(board)
    assert abs(float(out.mean()) - 0.5) < 0.01 and float(out.std()) < 0.02


@pytest.mark.parametrize(
    "mode, lo, hi",
    [("zero_one", 0.0, 1.0), ("minus1_1", -1.0, 1.0), ("xrv", -1024.0, 1024.0)],
)
def test_normalisation_modes_map_the_unit_range(mode, lo, hi):
    pp = Preprocess(size=16, normalize=mode)
    img = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    x = pp(img)
    assert x.shape == (1, 16, 16) and x.dtype == np.float32
    assert np.isclose(x.min(), lo, atol=1e-3) and np.isclose(x.max(), hi, atol=1e-3)
    assert pp.input_range() == pytest.approx((lo, hi))
    np.testing.assert_allclose(pp.denormalize(x)[0], img, atol=1e-5)


def test_imagenet_three_channels_uses_per_channel_stats():
    pp = Preprocess(size=8, normalize="imagenet", channels=3)
    x = pp(np.full((8, 8), 0.5, np.float32))
    assert x.shape == (3, 8, 8)
    expected = (0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-5)


def test_histogram_equalisation_and_clahe_change_contrast_only_within_unit_range():
    rng = np.random.default_rng(0)
    low_contrast = (0.4 + 0.1 * rng.random((64, 64))).astype(np.float32)
    for eq in ("hist", "clahe"):
        out = Preprocess(size=64, equalize=eq, normalize="zero_one")(low_contrast)[0]
        assert 0 <= out.min() and out.max() <= 1
        assert out.std() > 2 * low_contrast.std(), eq
    flat = np.full((32, 32), 0.3, np.float32)  # nothing to equalise: no NaN, unchanged
    np.testing.assert_allclose(Preprocess(size=32, equalize="hist", normalize="zero_one")(flat)[0], 0.3)


@pytest.mark.parametrize(
    "bad, hint",
    [
        (np.full((8, 8), 255.0, np.float32), "0-255"),
        (np.full((8, 8), 4095.0, np.float32), "16-bit"),
        (np.full((8, 8), -0.8, np.float32), "normalised"),
        (np.full((8, 8), 200, np.uint8), "integer dtype"),
        (np.array([[np.nan, 0.5]], np.float32), "NaN"),
    ],
)
def test_out_of_range_inputs_raise_with_a_hint(bad, hint):
    with pytest.raises(PreprocessError, match=hint):
        Preprocess(size=8)(bad)


def test_wrong_shapes_and_bad_config_raise():
    with pytest.raises(PreprocessError, match="2-D grey"):
        Preprocess(size=8)(np.zeros((8, 8, 3), np.float32))
    for bad in ({"size": 4}, {"normalize": "zscore"}, {"channels": 2}, {"crop": "stretch"}, {"equalize": "yes"}):
        with pytest.raises(PreprocessError):
            Preprocess(**bad)
    with pytest.raises(PreprocessError, match="unknown Preprocess fields"):
        Preprocess.from_dict({"size": 8, "colour": 1})
    check_unit_range(np.zeros((2, 2), np.float32))


def test_round_trip_through_json():
    pp = Preprocess(size=128, equalize="clahe", normalize="xrv", channels=3, resample="area")
    assert Preprocess.from_dict(json.loads(pp.to_json())) == pp
    assert pp.replace(size=64).size == 64 and pp.replace(size=64).normalize == "xrv"


@pytest.mark.realdata
def test_real_image_to_model_input(nih_dir):
    img = read_image(sorted(nih_dir.glob("*.png"))[0]).pixels
    x = Preprocess(size=224)(img)
    assert x.shape == (1, 224, 224) and -1 <= x.min() < x.max() <= 1 and np.isfinite(x).all()

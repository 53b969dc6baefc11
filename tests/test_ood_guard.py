"""The blank-image guard: real chest radiographs pass it, blank, tiny and synthetic images do not, with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from cxrbench.io import read_image
from cxrbench.ood.guard import ImageGuard, fit_guard, image_information

_yy, _xx = np.mgrid[0:512, 0:512] / 511.0
_rng = np.random.default_rng(0)
NOT_RADIOGRAPHS = {
    **{f"grey {v}": np.full((512, 512), v / 255, np.float32) for v in (0, 100, 128, 160, 200, 255)},
    "near-flat grey": np.clip(0.5 + _rng.normal(0, 0.004, (512, 512)), 0, 1),
    "horizontal gradient": _xx, "diagonal gradient": (_xx + _yy) / 2,
    "radial gradient": np.clip(np.hypot(_xx - 0.5, _yy - 0.5) * 1.4, 0, 1),
    "checkerboard 8": (np.floor(_xx * 8) + np.floor(_yy * 8)) % 2,
    "checkerboard 32": (np.floor(_xx * 32) + np.floor(_yy * 32)) % 2,
    "stripes": 0.5 + 0.5 * np.sin(_xx * 20),
    "uniform noise": _rng.random((512, 512)), "gaussian noise": np.clip(0.5 + _rng.normal(0, 0.15, (512, 512)), 0, 1),
}
TINY = {"1x1": np.full((1, 1), 0.5), "7x3": _rng.random((3, 7)), "63x400": _rng.random((63, 400))}


@pytest.fixture(scope="module")
def fitted(nih_dir):
    files = sorted(nih_dir.glob("*.png"))
    guard, record = fit_guard([read_image(f).pixels for f in files[:60]])
    return guard, record, files[60:]


@pytest.mark.realdata
def test_the_fitted_guard_keeps_held_out_chest_radiographs(fitted, shared_data):
    guard, record, held_out = fitted
    assert record["kept_fraction_validation"] == 1.0
    for folder, files in (("nih", held_out), ("pediatric", None), ("masks", None)):
        files = files if files is not None else sorted((shared_data / "cxr" / folder).rglob("*.png"))
        if folder == "masks":
            files = [f for f in files if f.parent.name == "images"]
        kept = np.mean([guard.check(read_image(f).pixels).passed for f in files])
        assert kept >= 0.99, f"{folder}: the guard keeps only {kept:.1%} of real chest radiographs"


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(NOT_RADIOGRAPHS))
def test_blank_flat_patterned_and_noise_images_fail_the_fitted_guard(fitted, name):
    guard, _, _ = fitted
    verdict = guard.check(np.asarray(NOT_RADIOGRAPHS[name], np.float32))
    # (noise fails too: the antialiased resize to 64 px averages it into a near-flat grey)
    assert verdict.passed is False and verdict.check == "information"
    assert "almost no image content" in verdict.reason


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_images_fail_on_size_before_any_measure(name):
    verdict = ImageGuard().check(np.asarray(TINY[name], np.float32))
    assert not verdict.passed and verdict.check == "size" and verdict.reason.startswith("too small")


def test_the_guard_round_trips_through_a_card_and_older_cards_get_the_defaults():
    guard = ImageGuard(min_side=32, min_bits_per_pixel=2.0, min_spread=0.1, method="fitted")
    assert ImageGuard.from_dict(guard.to_dict()) == guard
    assert ImageGuard.from_dict(None) == ImageGuard() == ImageGuard.from_dict({})
    with pytest.raises(ValueError):
        ImageGuard(min_spread=1.5)


def test_information_measures_order_simple_below_structured_images():
    flat = image_information(np.full((128, 128), 0.5, np.float32))
    noise = image_information(np.random.default_rng(1).random((64, 64)).astype(np.float32))
    assert flat["spread"] == 0 and flat["bits_per_pixel"] < 0.5 < 7 < noise["bits_per_pixel"]

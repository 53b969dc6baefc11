"""Tests for cxrbench.evaluation.calibration: Youden operating points and Chester's Eq. 1 map."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from cxrbench.evaluation.calibration import (
    OperatingPoints,
    calibrate,
    fit_operating_points,
    uncalibrate,
    youden_operating_point,
)


@pytest.mark.parametrize("opt", [0.02, 0.2, 0.5, 0.73, 0.99])
def test_calibrate_fixed_points_and_monotone(opt: float) -> None:
    assert calibrate(np.array([opt]), opt)[0] == pytest.approx(0.5)
    assert calibrate(np.array([0.0, 1.0]), opt).tolist() == [0.0, 1.0]
    grid = np.linspace(0, 1, 1001)
    out = calibrate(grid, opt)
    assert np.all(np.diff(out) > 0)  # strictly increasing
    assert out.min() >= 0 and out.max() <= 1


def test_calibrate_known_values_of_eq1() -> None:
    # opt = 0.2: below, x / 0.4; above, 1 - (1 - x) / 1.6
    np.testing.assert_allclose(calibrate(np.array([0.1, 0.2, 0.6, 0.92]), 0.2), [0.25, 0.5, 0.75, 0.95])


def test_calibrate_vectorised_per_finding_columns() -> None:
    opts = np.array([0.1, 0.5, 0.8])
    p = np.array([[0.1, 0.5, 0.8], [0.05, 0.75, 0.4]])
    out = calibrate(p, opts)
    np.testing.assert_allclose(out[0], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out[1], [0.25, 0.75, 0.25])


def test_inverse_round_trip_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    opts = rng.uniform(0.01, 0.99, size=5)
    p = rng.uniform(0, 1, size=(200, 5))
    np.testing.assert_allclose(uncalibrate(calibrate(p, opts), opts), p, atol=1e-12)
    q = rng.uniform(0, 1, size=(200, 5))
    np.testing.assert_allclose(calibrate(uncalibrate(q, opts), opts), q, atol=1e-12)

    p_t = torch.rand(8, 5, dtype=torch.float32)
    out = calibrate(p_t, opts)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (8, 5)
    np.testing.assert_allclose(out.numpy(), calibrate(p_t.double().numpy(), opts), atol=1e-6)
    torch.testing.assert_close(uncalibrate(out, opts), p_t, atol=1e-6, rtol=0)


def test_nan_operating_point_stays_nan_not_half() -> None:
    p = np.array([[0.3, 0.3], [0.9, np.nan]])
    out = calibrate(p, np.array([0.3, np.nan]))
    assert out[0, 0] == pytest.approx(0.5)
    assert np.isnan(out[:, 1]).all()
    assert np.isnan(calibrate(np.array([np.nan]), 0.4)).all()
    assert torch.isnan(calibrate(torch.tensor([[0.3, 0.3]]), np.array([0.3, np.nan]))[0, 1])


def test_calibrate_rejects_logits_and_bad_operating_points() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        calibrate(np.array([-2.0, 3.0]), 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        calibrate(np.array([0.5]), 1.5)
    with pytest.raises(ValueError, match="findings="):
        calibrate(np.array([0.5]), {"Effusion": 0.3})


def test_youden_known_example_by_hand() -> None:
    # Positives 0.9, 0.8, 0.6; negatives 0.7, 0.3, 0.2, 0.1.
    # Threshold 0.9: J = 1/3; 0.8: 2/3; 0.7: 2/3 - 1/4; 0.6: 1 - 1/4 = 0.75 (max); 0.3: 0.5; ...
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.7, 0.3, 0.2, 0.1])
    assert youden_operating_point(y, s) == pytest.approx(0.6)
    points = fit_operating_points(y[:, None], s[:, None], ["Effusion"])
    assert points.thresholds["Effusion"] == pytest.approx(0.6)
    assert (points.tpr["Effusion"], points.fpr["Effusion"]) == pytest.approx((1.0, 0.25))
    assert (points.n_pos["Effusion"], points.n_neg["Effusion"]) == (3, 4)


def test_youden_ties_go_to_highest_threshold_and_never_inf() -> None:
    # scikit-learn's example: J = 0.5 at thresholds 0.8 and 0.35.
    assert youden_operating_point([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    # inverted scorer: every J <= 0; the answer is a real score, not the +inf sentinel
    thr = youden_operating_point([1, 0], [0.2, 0.8])
    assert math.isfinite(thr) and thr == pytest.approx(0.2)


def test_youden_one_class_absent_is_nan_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(youden_operating_point([0, 0, 0], [0.1, 0.5, 0.9]))
        assert math.isnan(youden_operating_point([1, 1], [0.1, 0.5]))


def test_thresholding_at_opt_equals_calibrated_half() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((300, 3)) < 0.3).astype(int)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    points = fit_operating_points(y, s, ["A", "B", "C"])
    calibrated = calibrate(s, points, findings=["A", "B", "C"])
    np.testing.assert_array_equal(calibrated >= 0.5, s >= points.as_array())
    # a different column order is honoured
    swapped = calibrate(s[:, ::-1], points, findings=["C", "B", "A"])
    np.testing.assert_allclose(swapped, calibrated[:, ::-1])


def test_fit_operating_points_nan_for_empty_class_and_json_round_trip() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.2], [0.1, 0.4], [0.7, 0.6], [0.3, 0.8]])
    points = fit_operating_points(y, s, ["Mass", "Hernia"])
    assert points.thresholds["Mass"] == pytest.approx(0.7)
    assert math.isnan(points.thresholds["Hernia"]) and points.n_pos["Hernia"] == 0
    text = json.dumps(points.to_dict(), allow_nan=False)  # strict JSON: NaN written as null
    back = OperatingPoints.from_dict(json.loads(text))
    assert back.findings == ("Mass", "Hernia") and back.fitted_on == "validation" and back.method == "youden"
    np.testing.assert_array_equal(back.as_array(), points.as_array())  # NaN-aware equality
    assert back.n_neg == points.n_neg
    with pytest.raises(KeyError, match="Effusion"):
        points.as_array(["Effusion"])


def test_fit_operating_points_validates_inputs() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        fit_operating_points(np.array([[2], [0]]), np.array([[0.1], [0.2]]), ["A"])
    with pytest.raises(ValueError, match="shape"):
        fit_operating_points(np.array([[1], [0]]), np.array([[0.1, 0.2], [0.2, 0.3]]), ["A"])
    with pytest.raises(ValueError, match="len\\(findings\\)"):
        fit_operating_points(np.array([[1], [0]]), np.array([[0.1], [0.2]]), ["A", "B"])
    with pytest.raises(ValueError, match="NaN"):
        youden_operating_point([1, 0], [0.5, np.nan])

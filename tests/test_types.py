"""The shared validators of cxrbench._types: one range check, one to-numpy, labels and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrbench import preprocess
from cxrbench._types import (
    PreprocessError,
    as_binary_labels,
    as_labels_and_scores,
    as_scores,
    check_unit_range,
    to_numpy,
)


def test_check_unit_range_is_the_one_preprocess_uses_and_names_the_input():
    assert preprocess.check_unit_range is check_unit_range and preprocess.PreprocessError is PreprocessError
    check_unit_range(np.array([0.0, 1.0 + 5e-5], np.float32))  # within the tolerance
    with pytest.raises(PreprocessError, match="^upload.png values span .*0-255"):
        check_unit_range(np.full((4, 4), 200.0), "upload.png")
    with pytest.raises(PreprocessError, match="empty"):
        check_unit_range(np.zeros((0, 3)))
    assert issubclass(PreprocessError, ValueError)


def test_hybrid_features_use_the_shared_range_check():
    from cxrbench.hybrid.features import lbp_features

    with pytest.raises(PreprocessError, match="integer dtype"):
        lbp_features(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        lbp_features(np.zeros((32, 32, 3), np.float32))


def test_to_numpy_of_arrays_and_tensors():
    t = torch.arange(6, dtype=torch.float64, requires_grad=True).reshape(2, 3)
    out = to_numpy(t.T)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"] and out.shape == (3, 2)
    np.testing.assert_array_equal(out, t.detach().numpy().T)
    a = np.arange(4, dtype=np.int64)
    assert to_numpy(a, dtype=np.float64).dtype == np.float64
    assert to_numpy(a, dtype=None).dtype == np.int64  # dtype=None keeps the dtype (lung masks stay integer)
    half = to_numpy(torch.tensor([0.25, 1.0], dtype=torch.bfloat16))  # numpy has no bfloat16
    assert half.dtype == np.float32 and half.tolist() == [0.25, 1.0]
    with pytest.raises(TypeError, match="heatmap must be a numpy array or torch tensor, got list"):
        to_numpy([1.0, 2.0], name="heatmap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heatmap contains NaN"):
        to_numpy(torch.tensor([0.0, float("nan")]), name="heatmap", finite=True)


def test_labels_and_scores():
    y, s, one_d = as_labels_and_scores([0, 1, 1], [0.1, 0.5, 0.9])
    assert one_d and y.shape == s.shape == (3, 1) and y.dtype == np.int8
    y2, _, one_d2 = as_labels_and_scores(np.zeros((3, 2)), np.zeros((3, 2)))
    assert not one_d2 and y2.shape == (3, 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        as_binary_labels([0, 2])
    with pytest.raises(ValueError, match="NaN"):
        as_binary_labels([0, np.nan])
    with pytest.raises(ValueError, match="they must match"):
        as_scores([0.1], (2,))
    with pytest.raises(ValueError, match="NaN or inf"):
        as_scores([np.inf, 0.0], (2,))
    with pytest.raises(ValueError, match="N > 0"):
        as_labels_and_scores(np.zeros((0, 2)), np.zeros((0, 2)))

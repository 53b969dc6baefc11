"""Shared fixtures: the real dev data, an isolated cache, a fixed torch thread count."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cxrbench.data import shared_data_root


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the uint8 cache of every test out of ~/.cache."""
    old = os.environ.get("CXRBENCH_CACHE")
    os.environ["CXRBENCH_CACHE"] = str(tmp_path_factory.mktemp("cxrbench-cache"))
    yield
    if old is None:
        os.environ.pop("CXRBENCH_CACHE", None)
    else:
        os.environ["CXRBENCH_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One intra-op thread for every in-process test: the test inputs are tiny and the CI machine has
    2 shared cores, where a second thread spins more than it helps (several times slower measured)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$CXRBENCH_SHARED_DATA`` or ``../shared/data``; skips with the reason when neither exists."""
    root = shared_data_root()
    if root is None:
        pytest.skip("real dev data not found: set CXRBENCH_SHARED_DATA or place shared/data beside the checkout")
    return root


@pytest.fixture(scope="session")
def nih_dir(shared_data) -> Path:
    return shared_data / "cxr" / "nih"


@pytest.fixture(scope="session")
def nih_table(shared_data) -> Path:
    return shared_data / "nih_metadata" / "Data_Entry_2017_v2020.csv.gz"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

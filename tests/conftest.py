"""Shared fixtures (the real dev data, an isolated cache, a fixed torch thread count) and two CI rules.

Under ``CI=true`` a skipped test is a failure: every skip in this suite means a missing prerequisite
(the real dev data, Debian's Chromium, npm), and CI must have all of them (``.ci/run`` installs them).
There is no allow-list because no test skips for any other reason; add one here, with its reason, if
that changes.

Hung notebooks, kernels and browsers fail instead of hanging: pytest-timeout's default is set in
pyproject.toml, and tests marked ``notebook`` or ``browser`` get :data:`LONG_TIMEOUT_S` unless they set
their own ``@pytest.mark.timeout``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cxrbench.data import DataRootError, shared_data_root

#: Seconds a notebook or browser test may take, its module's fixtures included (kernel start, training).
LONG_TIMEOUT_S = 600
LONG_RUNNING_MARKERS = ("notebook", "browser")


def running_in_ci() -> bool:
    """``$CI`` is true (as CI services set it, and ``.ci/run``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None and any(item.get_closest_marker(m) for m in LONG_RUNNING_MARKERS):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))


def _skip_reason(report) -> str:
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)  # (file, line, reason)
    return reason.removeprefix("Skipped: ")


def _fail_skip_in_ci(report):
    if running_in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.longrepr = f"skipped under CI=true, where every prerequisite must be present: {_skip_reason(report)}"
        report.outcome = "failed"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _fail_skip_in_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _fail_skip_in_ci((yield))


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
    os.environ.setdefault("CXRBENCH_THREADS", "1")  # the dashboard's interactive thread rule (cxrbench/_threads.py)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$CXRBENCH_SHARED_DATA`` or ``../shared/data``; skips with the reason when neither exists (fails under CI)."""
    try:
        root = shared_data_root()
    except DataRootError as exc:
        pytest.skip(f"real dev data not found: {exc}")
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


#: The shared bundles the notebook tests use (``"@bundle:NAME"`` / ``"@run:NAME"`` in test_notebooks.py's
#: parameters, and test_imported_e2e.py): the notebooks' default entries (:data:`cxrbench.train.SHARED_BUNDLES`)
#: with small settings, trained once per test session into its cache.
SMALL_BUNDLES: dict[str, dict] = {
    "nih-classifier": {"image_size": 48, "epochs": 1, "max_steps_per_epoch": 3, "eval_bootstrap": 50},
    "ood-autoencoder": {"epochs": 2, "max_steps_per_epoch": 2},
    "lung-unet": {"image_size": 32, "epochs": 1},
    "phantom-classifier": {"image_size": 48, "n_images": 120, "epochs": 4},
    "phantom-autoencoder": {"n_images": 120, "epochs": 2},
}


@pytest.fixture(scope="session")
def small_bundles():
    """``name -> bundle folder`` of the small shared bundles, each trained the first time it is asked for."""
    from cxrbench.train import shared_bundle

    class Bundles(dict):
        def __missing__(self, name):
            settings = dict(SMALL_BUNDLES[name])
            if name == "phantom-autoencoder":  # made like the small phantom classifier, not the default one
                settings["like"] = str(self["phantom-classifier"])
            self[name] = shared_bundle(name, settings=settings, progress=False)
            return self[name]

    return Bundles()

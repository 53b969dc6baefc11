"""CI cannot pass by skipping, and a hung test fails instead of hanging the run (tests/conftest.py, pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

CHECKOUT = Path(__file__).resolve().parents[1]

#: Every way a test can skip, one per test, plus an xfail, which is not a skip and stays as it is.
SKIPPING_TESTS = '''
import pytest

def test_needs_the_real_data(shared_data):
    pass

@pytest.mark.skipif(True, reason="Debian's chromium is not installed")
def test_marked_skipif():
    pass

def test_calls_skip():
    pytest.skip("npm is needed")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False

def test_passes():
    pass
'''
MODULE_SKIP = ('import pytest\npytest.importorskip("a_module_that_is_not_installed")\n\n'
               'def test_never_runs():\n    pass\n')


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    """Run pytest on ``folder`` with this suite's conftest loaded as a plugin, and without the real data."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CXRBENCH_SHARED_DATA=str(folder / "no-such-data"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(CHECKOUT / "tests"), env.get("PYTHONPATH")])))
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conftest", "-rA", "--rootdir", str(folder),
           "-c", os.devnull, str(folder)]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def skipping_suite(tmp_path) -> Path:
    (tmp_path / "test_skips.py").write_text(SKIPPING_TESTS)
    return tmp_path


@pytest.mark.slow
def test_skips_stay_skips_outside_ci(skipping_suite):
    proc = _pytest(skipping_suite, ci=None)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed, 3 skipped, 1 xfailed" in proc.stdout, proc.stdout[-3000:]
    assert "real dev data not found" in proc.stdout and "no-such-data" in proc.stdout


@pytest.mark.slow
def test_under_ci_every_skip_is_a_failure_that_gives_its_reason(skipping_suite):
    proc = _pytest(skipping_suite, ci="true")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "1 failed, 1 passed, 1 xfailed, 2 errors" in proc.stdout, proc.stdout[-3000:]
    failed = "skipped under CI=true, where every prerequisite must be present: "
    for test, reason in (("test_needs_the_real_data", "real dev data not found: "),
                         ("test_marked_skipif", "Debian's chromium is not installed"),
                         ("test_calls_skip", "npm is needed")):
        assert any(test in line and failed + reason in line for line in proc.stdout.splitlines()), (test, proc.stdout)


@pytest.mark.slow
def test_under_ci_a_module_that_skips_at_import_is_a_collection_error(tmp_path):
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    proc = _pytest(tmp_path, ci="true")
    assert proc.returncode == 2 and "Interrupted: 1 error during collection" in proc.stdout, proc.stdout[-3000:]
    assert "skipped under CI=true, where every prerequisite must be present: could not import " \
           "'a_module_that_is_not_installed'" in proc.stdout


def test_ci_is_recognised_as_ci_services_set_it(monkeypatch):
    for value, expected in (("true", True), ("TRUE", True), ("1", True), ("yes", True), ("false", False), ("", False)):
        monkeypatch.setenv("CI", value)
        assert conftest.running_in_ci() is expected, value
    monkeypatch.delenv("CI")
    assert not conftest.running_in_ci()


def test_every_test_has_a_timeout_and_notebooks_and_browsers_a_longer_one(request):
    """pytest-timeout is active (an unknown ini key would only warn), with a default below the long one."""
    assert request.config.pluginmanager.hasplugin("timeout")
    assert request.config.inipath == CHECKOUT / "pyproject.toml"
    default = float(request.config.getini("timeout"))  # raises for an ini key no plugin declared
    assert 0 < default < conftest.LONG_TIMEOUT_S

    class Item:
        def __init__(self, *markers: pytest.MarkDecorator):
            self.markers = [m.mark for m in markers]

        def get_closest_marker(self, name):
            return next((m for m in reversed(self.markers) if m.name == name), None)

        def add_marker(self, marker):
            self.markers.append(marker.mark)

    notebook, browser, plain, own = (Item(pytest.mark.notebook), Item(pytest.mark.browser), Item(pytest.mark.slow),
                                     Item(pytest.mark.notebook, pytest.mark.timeout(42)))
    conftest.pytest_collection_modifyitems(request.config, [notebook, browser, plain, own])
    assert notebook.get_closest_marker("timeout").args == (conftest.LONG_TIMEOUT_S,)
    assert browser.get_closest_marker("timeout").args == (conftest.LONG_TIMEOUT_S,)
    assert plain.get_closest_marker("timeout") is None and own.get_closest_marker("timeout").args == (42,)


def test_make_test_runs_ruff_and_mypy_before_the_suite(tmp_path):
    """`make test` lints first (ruff on the package, tests and benchmarks, then mypy), and the dev extra has both."""
    dry = subprocess.run(["make", "--dry-run", "test", f"VENV={tmp_path / 'venv'}"], cwd=CHECKOUT,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()

    def first(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    assert first("-m ruff check cxrbench tests benchmarks") < first("-m mypy") < first("-m pytest")
    import tomllib

    dev = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert {"ruff", "mypy"} <= {req.split(">")[0].split("=")[0].strip() for req in dev}

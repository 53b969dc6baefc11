"""The wheel works wherever it is installed, as a new user would try it (issue 13).

The wheel is built from a copy of this checkout (``pip wheel --no-deps``), installed into a fresh virtual
environment, and every command runs from a folder outside the checkout. The new environment reuses the
dependencies of the running one through a ``.pth`` file (written after the install, so pip never sees the
checkout's own editable cxrbench); that folder's editable-install finder is never activated by a plain path
line, and the tests assert the package imported is the wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

CHECKOUT = Path(__file__).resolve().parents[1]
#: What the build reads: a fresh clone has these (and nothing else the build needs).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "cxrbench", "data_manifests", "notebooks")
#: Shipped as package data: top-level folder of the repository -> where the wheel carries it.
SHIPPED = {"data_manifests/*.yaml": "cxrbench/data/data_manifests",
           "notebooks/05_dashboard.ipynb": "cxrbench/app/notebooks",
           "cxrbench/app/voila/config/voila.json": "cxrbench/app/voila/config",
           "cxrbench/app/voila/templates/cxrbench/*": "cxrbench/app/voila/templates/cxrbench"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc


def _project_site_packages() -> list[str]:
    """Where the running interpreter's dependencies are installed (``<checkout>/.venv/lib/python3.X/site-packages``)."""
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (an in-tree build writes build/ and *.egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "node_modules", ".ipynb_checkpoints")
    for name in BUILD_INPUTS:
        if (CHECKOUT / name).is_dir():
            shutil.copytree(CHECKOUT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(CHECKOUT / name, src / name)
    # no build isolation: the build uses this environment's setuptools (a dev dependency), offline and fast
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(src)], cwd=root)
    (whl,) = (root / "dist").glob("cxrbench-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh virtual environment with the wheel installed; ``env`` runs its ``cxrbench`` from elsewhere."""
    root = tmp_path_factory.mktemp("venv").resolve()
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          "--no-compile", str(wheel)], cwd=root)
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=root).stdout.strip()
    (Path(site) / "cxrbench-test-dependencies.pth").write_text("\n".join(_project_site_packages()) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "CXRBENCH_MANIFESTS", "CXRBENCH_DATA", "CXRBENCH_SHARED_DATA")}
    env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", CXRBENCH_CACHE=str(root / "cache"),
               OMP_NUM_THREADS="1")
    work = root / "elsewhere"
    work.mkdir()
    assert CHECKOUT not in work.parents
    return {"python": python, "site": Path(site), "env": env, "cwd": work}


def _cxrbench(venv: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _run([str(venv["python"].parent / "cxrbench"), *args], cwd=venv["cwd"], env=venv["env"], timeout=timeout)


def test_the_wheel_carries_the_catalogue_the_dashboard_and_the_voila_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pattern, folder in SHIPPED.items():
        sources = sorted(CHECKOUT.glob(pattern))
        assert sources, pattern
        for source in sources:
            assert f"{folder}/{source.name}" in names, f"{wheel.name} lacks {folder}/{source.name} (from {pattern})"
    assert not any(n.startswith(("data_manifests/", "notebooks/", "tests/")) for n in names), "top-level folders leaked"
    assert not any("__pycache__" in n for n in names)


def test_the_installed_package_is_the_wheel_not_the_checkout(venv):
    probe = ("import json, cxrbench, importlib.metadata as m; from cxrbench.data.catalog import manifests_dir;"
             "from cxrbench.app.demo import dashboard_notebook; from cxrbench.data.locations import source_checkout;"
             "d = m.distribution('cxrbench'); print(json.dumps({'file': cxrbench.__file__, "
             "'manifests': str(manifests_dir()),"
             "'notebook': str(dashboard_notebook()), 'checkout': str(source_checkout()),"
             "'direct_url': json.loads(d.read_text('direct_url.json') or '{}')}))")
    found = json.loads(_run([str(venv["python"]), "-c", probe], cwd=venv["cwd"], env=venv["env"]).stdout)
    site = venv["site"]
    assert Path(found["file"]) == site / "cxrbench" / "__init__.py"
    assert Path(found["manifests"]) == site / "cxrbench" / "data" / "data_manifests"
    assert Path(found["notebook"]) == site / "cxrbench" / "app" / "notebooks" / "05_dashboard.ipynb"
    assert found["checkout"] == "None"
    assert found["direct_url"]["url"].endswith(".whl") and "dir_info" not in found["direct_url"]
    for source in sorted((CHECKOUT / "data_manifests").glob("*.yaml")):  # mapped, not copied by hand: identical
        assert (site / "cxrbench" / "data" / "data_manifests" / source.name).read_bytes() == source.read_bytes()


def test_data_list_names_every_catalogued_dataset(venv):
    out = _cxrbench(venv, "data", "list").stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    catalogued = {yaml.safe_load(p.read_text())["name"] for p in (CHECKOUT / "data_manifests").glob("*.yaml")}
    assert catalogued and listed == catalogued


def test_data_check_accepts_the_real_local_copy(venv, nih_dir):
    out = _cxrbench(venv, "data", "check", "nih-chestxray14", str(nih_dir)).stdout
    n_images = len(pd.read_csv(nih_dir / "manifest.csv"))
    assert f"images: {n_images} of {n_images} listed are present" in out and "verdict: OK" in out, out


@pytest.fixture(scope="module")
def demo(venv) -> dict:
    """``cxrbench demo prepare`` on 24 small phantoms (the demo's own settings; about 30 s)."""
    _cxrbench(venv, "data", "phantoms", "phantoms", "-n", "24", "--size", "64")
    out = _cxrbench(venv, "demo", "prepare", "--data", "phantoms", "--out", "demo", "-q").stdout
    info = json.loads((venv["cwd"] / "demo" / "demo.json").read_text())
    return {"info": info, "stdout": out}


def test_demo_prepare_trains_both_bundles_where_it_was_asked(venv, demo):
    info, work = demo["info"], venv["cwd"]
    assert info["kind"] == "custom" and Path(info["data"]) == work / "phantoms"
    for key, kind in (("classifier", "classifier"), ("ood", "ood")):
        bundle = Path(info[key])
        assert work / "demo" in bundle.parents, bundle
        card = json.loads((bundle / "card.json").read_text())
        assert card["kind"] == kind and (bundle / "model.safetensors").is_file()
    assert info["examples"] and all((work / "phantoms") in Path(p).parents for p in info["examples"].values())
    assert f"classifier: {info['classifier']}" in demo["stdout"]


def test_predict_one_image_with_the_demo_classifier(venv, demo, nih_dir):
    image = min(nih_dir.glob("*.png"))
    _cxrbench(venv, "predict", "--bundle", demo["info"]["classifier"], "--out", "predictions.csv", "-q", str(image))
    table = pd.read_csv(venv["cwd"] / "predictions.csv")
    labels = json.loads((Path(demo["info"]["classifier"]) / "card.json").read_text())["labels"]
    assert len(table) == 1 and table["file"][0] == str(image) and table["error"].isna().all()
    raw = table[[f"{name}_raw" for name in labels]].to_numpy()
    assert ((raw >= 0) & (raw <= 1)).all() and len(set(raw.ravel().round(6))) > 1

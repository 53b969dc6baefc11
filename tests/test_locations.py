"""The one data-root resolver and the shipped files: each rule, and an error that names the folder and its origin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cxrbench.cli import main
from cxrbench.data import locations
from cxrbench.data.catalog import list_datasets, manifests_dir
from cxrbench.data.locations import DataRootError, locate_data_root, resolve_data_root, shipped_folder

CHECKOUT = Path(__file__).resolve().parents[1]
DATA_ROOT_VARIABLES = {"CXRBENCH_SHARED_DATA", "CXRBENCH_DATA"}


@pytest.fixture
def no_shared_data(tmp_path, monkeypatch):
    """Neither $CXRBENCH_SHARED_DATA, nor a checkout with shared/data beside it, nor ../shared/data."""
    monkeypatch.delenv("CXRBENCH_SHARED_DATA", raising=False)
    monkeypatch.delenv("CXRBENCH_DATA", raising=False)
    monkeypatch.setattr(locations, "source_checkout", lambda: None)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    return tmp_path


def _shared_copy(folder: Path) -> Path:
    (folder / "cxr").mkdir(parents=True)
    return folder


def test_an_explicit_folder_wins_and_a_missing_one_is_named_with_its_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRBENCH_DATA", str(tmp_path))
    (tmp_path / "mine").mkdir()
    found = locate_data_root(tmp_path / "mine", given_origin="--data", env_var="CXRBENCH_DATA")
    assert (found.path, found.kind, found.origin) == (tmp_path / "mine", "custom", "--data")
    with pytest.raises(DataRootError, match=r"nowhere: data folder \(--data\) does not exist or is not a folder"):
        locate_data_root(tmp_path / "nowhere", given_origin="--data", env_var="CXRBENCH_DATA")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"a_file: data folder \(data_root\) does not exist"):
        resolve_data_root(tmp_path / "a_file")


def test_the_named_environment_variable_comes_next(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRBENCH_DATA", str(tmp_path))
    assert locate_data_root(env_var="CXRBENCH_DATA") == locations.DataRoot(tmp_path, "custom", "$CXRBENCH_DATA")
    monkeypatch.setenv("CXRBENCH_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataRootError, match=r"gone: data folder \(\$CXRBENCH_DATA\) does not exist"):
        locate_data_root(env_var="CXRBENCH_DATA")


def test_shared_data_from_the_variable_never_falls_through_when_wrong(no_shared_data, monkeypatch):
    shared = _shared_copy(no_shared_data / "elsewhere")
    monkeypatch.setenv("CXRBENCH_SHARED_DATA", str(shared))
    assert resolve_data_root() == (shared, "shared")
    assert locate_data_root().origin == "$CXRBENCH_SHARED_DATA"
    monkeypatch.setenv("CXRBENCH_SHARED_DATA", str(no_shared_data / "typo"))
    _shared_copy(no_shared_data / "shared" / "data")  # ../shared/data exists, but the variable said otherwise
    with pytest.raises(DataRootError, match=r"typo: \$CXRBENCH_SHARED_DATA names no shared dev data \(no cxr/"):
        locate_data_root()
    with pytest.raises(DataRootError, match="typo"):
        locations.shared_data_root()


def test_shared_data_beside_the_checkout_then_beside_the_current_folder(no_shared_data, monkeypatch):
    beside_cwd = _shared_copy(no_shared_data / "shared" / "data")
    found = locate_data_root()
    assert found.path.resolve() == beside_cwd.resolve() and found.kind == "shared"
    assert "beside the current directory" in found.origin
    checkout = no_shared_data / "clones" / "cxrbench"
    checkout.mkdir(parents=True)
    beside_checkout = _shared_copy(no_shared_data / "clones" / "shared" / "data")
    monkeypatch.setattr(locations, "source_checkout", lambda: checkout)
    found = locate_data_root()
    assert found.path == beside_checkout and found.origin == f"shared/data beside the checkout {checkout}"


def test_phantoms_are_the_offline_default(no_shared_data, monkeypatch):
    monkeypatch.setenv("CXRBENCH_CACHE", str(no_shared_data / "cache"))
    path, kind = resolve_data_root(n_phantoms=4, seed=3)
    assert kind == "phantoms" and path == no_shared_data / "cache" / "phantoms-n4-s3"
    assert (path / "manifest.csv").is_file() and len(list((path / "images").glob("*.png"))) == 4


def test_the_demo_uses_the_same_resolver(no_shared_data, monkeypatch):
    from cxrbench.app.demo import demo_data

    shared = _shared_copy(no_shared_data / "dev")
    monkeypatch.setenv("CXRBENCH_SHARED_DATA", str(shared))
    assert demo_data() == (shared.resolve() / "cxr" / "nih", "shared")
    (no_shared_data / "mine" / "nih").mkdir(parents=True)
    (no_shared_data / "mine" / "nih" / "manifest.csv").write_text("path\n")
    monkeypatch.setenv("CXRBENCH_DATA", str(no_shared_data / "mine"))
    assert demo_data() == ((no_shared_data / "mine" / "nih").resolve(), "shared")
    assert demo_data(no_shared_data / "dev") == ((no_shared_data / "dev").resolve(), "custom")


def _reads_data_root_variable(node: ast.AST) -> bool:
    """``os.environ.get("CXRBENCH_DATA")``, ``os.environ["CXRBENCH_SHARED_DATA"]``, ``os.getenv(...)``."""
    if isinstance(node, ast.Call) and node.args:
        key, func = node.args[0], ast.unparse(node.func)
        return (func in ("os.environ.get", "os.getenv", "environ.get")
                and getattr(key, "value", None) in DATA_ROOT_VARIABLES)
    if isinstance(node, ast.Subscript):
        return (ast.unparse(node.value) in ("os.environ", "environ")
                and getattr(node.slice, "value", None) in DATA_ROOT_VARIABLES)
    return False


def test_there_is_one_resolver():
    """No module but cxrbench/data/locations.py reads the data-root variables or walks up from its own file."""
    offenders = []
    for path in sorted((CHECKOUT / "cxrbench").rglob("*.py")):
        if path == CHECKOUT / "cxrbench" / "data" / "locations.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(CHECKOUT)}:{getattr(node, 'lineno', '?')}"
            if _reads_data_root_variable(node):
                offenders.append(f"{where}: {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr == "parents" and "__file__" in ast.unparse(node):
                offenders.append(f"{where}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_the_catalogue_is_found_in_the_checkout_and_lists_every_yaml():
    assert manifests_dir() == CHECKOUT / "data_manifests"
    names = {yaml.safe_load(p.read_text())["name"] for p in (CHECKOUT / "data_manifests").glob("*.yaml")}
    assert names and set(list_datasets()) == names


def test_data_list_without_a_catalogue_is_an_error_not_silence(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CXRBENCH_MANIFESTS", str(tmp_path / "empty"))
    assert main(["data", "list"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (f"cxrbench: error: {tmp_path / 'empty'}: no dataset manifests (*.yaml) "
                                         "in the catalogue folder")
    monkeypatch.setenv("CXRBENCH_MANIFESTS", str(tmp_path / "absent"))
    assert main(["data", "list"]) == 1
    assert "absent: $CXRBENCH_MANIFESTS is not a folder" in capsys.readouterr().err


def test_a_shipped_folder_missing_everywhere_is_named(monkeypatch):
    monkeypatch.setattr(locations, "source_checkout", lambda: None)
    with pytest.raises(DataRootError, match=r"data_manifests/ is not installed with cxrbench and cxrbench does not "
                                            r"run from a source checkout; reinstall"):
        shipped_folder("cxrbench.data", "data_manifests")


def test_the_shipped_folders_are_mapped_in_setup_py():
    """setup.py maps each top-level folder the package reads onto the package it reads it from."""
    tree = ast.parse((CHECKOUT / "setup.py").read_text())
    (mapping,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "SHIPPED_FOLDERS"]
    assert mapping == {"cxrbench.data.data_manifests": "data_manifests", "cxrbench.app.notebooks": "notebooks"}
    for package, folder in mapping.items():
        parent, name = package.rsplit(".", 1)
        assert name == folder and shipped_folder(parent, folder) == CHECKOUT / folder

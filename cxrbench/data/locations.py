"""Where cxrbench finds things: the ONE data-root resolver, and the files the package ships.

Data folders, first rule that applies (:func:`locate_data_root`):

1. a folder given explicitly (a function argument, ``--data``), else the environment variable the caller
   names (``$CXRBENCH_DATA`` for the demo): kind ``"custom"``; it must be an existing folder;
2. the shared dev data (:func:`find_shared_data`): ``$CXRBENCH_SHARED_DATA``, else ``shared/data`` beside
   the source checkout (only when cxrbench runs from one), else ``shared/data`` beside the current
   directory (``../shared/data``): kind ``"shared"``;
3. synthetic phantoms written once under the cache folder, the offline default: kind ``"phantoms"``.

A folder that was named (argument or variable) but is not there is an error that names the folder and
where it came from; it never falls through to another rule.

Shipped files (:func:`shipped_folder`): ``data_manifests/`` and the dashboard notebook live at the top of
the repository and are mapped into the wheel as package data (``setup.py``); an installed package reads
them with :mod:`importlib.resources`, a source checkout (editable install, ``PYTHONPATH``) from the
top-level folders themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cxrbench.data.manifests import ManifestError

__all__ = ["DataRoot", "DataRootError", "find_shared_data", "locate_data_root", "resolve_data_root",
           "shared_data_root", "shipped_folder", "source_checkout"]

#: Environment variable naming the shared dev data (the folder holding ``cxr/`` and ``nih_metadata/``).
SHARED_DATA_ENV = "CXRBENCH_SHARED_DATA"


class DataRootError(ManifestError, FileNotFoundError):
    """A folder that was named (or that the package ships) is not there; the message says which and why."""


@dataclass(frozen=True)
class DataRoot:
    """A resolved data folder.

    Attributes
    ----------
    path : the folder (as given for ``"custom"``; the one holding ``cxr/`` for ``"shared"``).
    kind : ``"custom"``, ``"shared"`` or ``"phantoms"``.
    origin : where the folder came from, for messages (``"$CXRBENCH_DATA"``, ``"--data"``, ...).
    """

    path: Path
    kind: str
    origin: str


def source_checkout() -> Path | None:
    """The repository root when cxrbench is imported from a source checkout, else None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "cxrbench" / "__init__.py").is_file():
        return root
    return None


def _shared_candidates() -> list[tuple[Path, str]]:
    candidates = []
    checkout = source_checkout()
    if checkout is not None:
        candidates.append((checkout.parent / "shared" / "data", f"shared/data beside the checkout {checkout}"))
    candidates.append((Path.cwd().parent / "shared" / "data", "../shared/data beside the current directory"))
    return candidates


def find_shared_data() -> DataRoot | None:
    """The shared dev data (rule 2 of the module doc), or None when no rule finds it.

    Raises :class:`DataRootError` when ``$CXRBENCH_SHARED_DATA`` is set to a folder without ``cxr/``.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        path = Path(env)
        if not (path / "cxr").is_dir():
            raise DataRootError(f"{path}: ${SHARED_DATA_ENV} names no shared dev data (no cxr/ folder in it)")
        return DataRoot(path, "shared", f"${SHARED_DATA_ENV}")
    for path, origin in _shared_candidates():
        if (path / "cxr").is_dir():
            return DataRoot(path, "shared", origin)
    return None


def shared_data_root() -> Path | None:
    """The folder of the shared dev data (holding ``cxr/`` and ``nih_metadata/``), else None;
    see :func:`find_shared_data`."""
    found = find_shared_data()
    return None if found is None else found.path


def _phantoms(folder: str, n_phantoms: int, seed: int) -> DataRoot:
    from cxrbench.data.dataset import default_cache_dir
    from cxrbench.data.synthetic import write_phantom_set

    root = default_cache_dir() / folder
    if not (root / "manifest.csv").is_file():
        write_phantom_set(root, n_phantoms, size=256, seed=seed)
    return DataRoot(root, "phantoms", f"{n_phantoms} synthetic phantoms (seed {seed}), the offline default")


def locate_data_root(given: str | os.PathLike | None = None, *, given_origin: str = "data_root",
                     env_var: str | None = None, n_phantoms: int = 64, seed: int = 0,
                     phantom_folder: str | None = None) -> DataRoot:
    """Resolve a data folder by the rules of the module doc.

    Parameters
    ----------
    given : an explicit folder; empty or None means "not given".
    given_origin : how ``given`` reached us, for messages (``"--data"``, ``"data_root"``).
    env_var : the environment variable consulted when nothing is given (e.g. ``"CXRBENCH_DATA"``).
    n_phantoms, seed, phantom_folder : the phantom set of rule 3 and its folder under the cache
        (default ``phantoms-n{n_phantoms}-s{seed}``).

    Raises :class:`DataRootError` when a named folder does not exist.
    """
    origin = given_origin
    if not given and env_var and os.environ.get(env_var):
        given, origin = os.environ[env_var], f"${env_var}"
    if given:
        path = Path(given)
        if not path.is_dir():
            raise DataRootError(f"{path}: data folder ({origin}) does not exist or is not a folder")
        return DataRoot(path, "custom", origin)
    shared = find_shared_data()
    if shared is not None:
        return shared
    return _phantoms(phantom_folder or f"phantoms-n{n_phantoms}-s{seed}", n_phantoms, seed)


def resolve_data_root(data_root: str | os.PathLike | None = None, *, n_phantoms: int = 64,
                      seed: int = 0) -> tuple[Path, str]:
    """Where a notebook reads its data, and what kind it is: ``(path, kind)`` of :func:`locate_data_root`.

    ``data_root`` itself (``"custom"``) when given; else the shared dev data (``"shared"``, the folder holding
    ``cxr/`` and ``nih_metadata/``); else a synthetic phantom set written once under the cache folder
    (``"phantoms"``), the offline default.
    """
    found = locate_data_root(data_root, n_phantoms=n_phantoms, seed=seed)
    return found.path, found.kind


def shipped_folder(package: str, folder: str) -> Path:
    """A folder shipped with cxrbench: ``<package>/<folder>/`` of an installed wheel, else ``<checkout>/<folder>/``.

    Parameters
    ----------
    package : the package the folder is mapped into (``"cxrbench.data"``).
    folder : its name, the same as the top-level folder of the repository (``"data_manifests"``).

    Raises :class:`DataRootError` naming both places when neither has it (an incomplete installation).
    """
    installed = resources.files(package) / folder
    if isinstance(installed, Path) and installed.is_dir():  # a zipped package is not supported
        return installed
    checkout = source_checkout()
    if checkout is not None and (checkout / folder).is_dir():
        return checkout / folder
    where = f"nor in the source checkout {checkout}" if checkout else "and cxrbench does not run from a source checkout"
    raise DataRootError(f"{installed}: {folder}/ is not installed with cxrbench {where}; reinstall cxrbench")

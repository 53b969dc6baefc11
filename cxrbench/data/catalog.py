"""The dataset catalogue (``data_manifests/*.yaml``, shipped as package data) and ``cxrbench data check``.

Each YAML describes one public dataset: source, licence, citation, how to obtain it, the label
columns, and one or more *layouts* a local copy may have. A layout names the reader that reads it
(:mod:`cxrbench.data.manifests`), the paths that identify it (``detect``), the paths that must exist
(``required``) and, optionally, how many images a complete copy holds (``expected_images``).

:func:`check_dataset` finds the layout of a local copy, runs its reader without dropping anything,
and reports every missing or (with ``decode=True``) unreadable file at once.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrbench.data import manifests as _m
from cxrbench.data.locations import DataRootError, shipped_folder

__all__ = ["CheckResult", "DatasetSpec", "check_dataset", "list_datasets", "load_spec", "manifests_dir"]

_READERS = {
    "nih": lambda root: _m.read_nih(root, on_missing="keep"),
    "kermany": lambda root: _m.read_kermany(root, on_missing="keep"),
    "mask_pairs": lambda root: _m.read_mask_pairs(root, on_missing="keep"),
    "manifest_csv": lambda root: _m.read_manifest_csv(root, on_missing="keep"),
    "folder": lambda root: _m.read_image_folder(root),
}


def manifests_dir() -> Path:
    """The catalogue folder: ``$CXRBENCH_MANIFESTS``, else ``data_manifests/`` shipped with the package.

    Raises :class:`~cxrbench.data.locations.DataRootError` when ``$CXRBENCH_MANIFESTS`` is not a folder or
    the package was installed without its catalogue.
    """
    env = os.environ.get("CXRBENCH_MANIFESTS")
    if env:
        if not Path(env).is_dir():
            raise DataRootError(f"{env}: $CXRBENCH_MANIFESTS is not a folder")
        return Path(env)
    return shipped_folder("cxrbench.data", "data_manifests")


@dataclass
class DatasetSpec:
    """One ``data_manifests/*.yaml`` file."""

    name: str
    title: str
    source: str
    licence: str
    citation: str
    obtain: str
    label_columns: list[str]
    layouts: list[dict[str, Any]]
    role: str = "train"
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DatasetSpec:
        """Read and check one catalogue YAML; ValueError naming the file and its missing keys or unknown reader."""
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        need = ["name", "title", "source", "licence", "citation", "obtain", "layouts"]
        absent = [k for k in need if k not in data]
        if absent:
            raise ValueError(f"{path}: missing keys {absent}")
        for i, layout in enumerate(data["layouts"]):
            if layout.get("reader") not in (*_READERS, None):
                raise ValueError(f"{path}: layout {i} has unknown reader {layout.get('reader')!r}")
        known = set(need) | {"label_columns", "role"}
        return cls(name=data["name"], title=data["title"], source=data["source"], licence=data["licence"],
                   citation=data["citation"], obtain=data["obtain"],
                   label_columns=list(data.get("label_columns") or []),
                   layouts=list(data["layouts"]), role=data.get("role", "train"), path=path,
                   extra={k: v for k, v in data.items() if k not in known})


def list_datasets() -> dict[str, DatasetSpec]:
    """Every spec in :func:`manifests_dir`, by name; a catalogue without any is an error, never an empty list."""
    folder = manifests_dir()
    specs: dict[str, DatasetSpec] = {}
    for p in sorted(folder.glob("*.yaml")):
        spec = DatasetSpec.from_yaml(p)
        if spec.name in specs:
            raise ValueError(f"{p}: dataset name {spec.name!r} is already used by {specs[spec.name].path}")
        specs[spec.name] = spec
    if not specs:
        raise DataRootError(f"{folder}: no dataset manifests (*.yaml) in the catalogue folder")
    return specs


def load_spec(name_or_path: str | os.PathLike) -> DatasetSpec:
    """A spec by name (``nih-chestxray14``, or a unique prefix such as ``nih``) or by YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return DatasetSpec.from_yaml(p)
    specs = list_datasets()
    name = str(name_or_path)
    if name in specs:
        return specs[name]
    matches = [n for n, spec in specs.items() if n.startswith(name) or name in spec.extra.get("aliases", [])]
    if len(matches) == 1:
        return specs[matches[0]]
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(specs)}")


@dataclass
class CheckResult:
    """Verdict of :func:`check_dataset`: ``ok``, ``incomplete`` or ``unrecognised``."""

    dataset: str
    root: str
    verdict: str
    layout: str | None = None
    n_listed: int = 0
    n_present: int = 0
    expected_images: int | None = None
    missing_paths: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the copy is complete (verdict ``ok``)."""
        return self.verdict == "ok"

    def report(self, show: int = 10) -> str:
        """The check as text: layout, missing or unreadable files (``show`` of each kind) and verdict."""
        lines = [f"{self.dataset} at {self.root}"]
        if self.layout:
            lines.append(f"  layout: {self.layout}")
        for p in self.missing_paths:
            lines.append(f"  missing: {p}")
        if self.layout:
            exp = f" (a complete copy has {self.expected_images})" if self.expected_images else ""
            lines.append(f"  images: {self.n_present} of {self.n_listed} listed are present{exp}")
        if self.missing_files:
            lines.append(f"  {len(self.missing_files)} listed files are missing:")
            lines += [f"    {f}" for f in self.missing_files[:show]]
            if len(self.missing_files) > show:
                lines.append(f"    ... and {len(self.missing_files) - show} more")
        if self.unreadable:
            lines.append(f"  {len(self.unreadable)} files cannot be read:")
            lines += [f"    {Path(f).name}: {r}" for f, r in list(self.unreadable.items())[:show]]
        lines += [f"  {m}" for m in self.messages]
        lines.append(f"  verdict: {self.verdict.upper()}")
        return "\n".join(lines)


def _matches(root: Path, pattern: str) -> bool:
    return bool(glob.glob(str(root / pattern)))


def check_dataset(name_or_path: str | os.PathLike, root: str | os.PathLike, *, decode: bool = False) -> CheckResult:
    """Validate a local copy of a catalogued dataset; see the module doc."""
    spec = load_spec(name_or_path)
    root = Path(root)
    result = CheckResult(spec.name, str(root), "unrecognised")
    if not root.is_dir():
        result.messages.append("the folder does not exist")
        return result
    layout = next((lay for lay in spec.layouts if all(_matches(root, d) for d in lay.get("detect", []))), None)
    if layout is None:
        wanted = " or ".join("+".join(lay.get("detect", [])) for lay in spec.layouts)
        result.messages.append(f"no known layout found (looked for {wanted}); how to obtain it:")
        result.messages += ["  " + line for line in spec.obtain.strip().splitlines()]
        return result
    result.layout = layout.get("name", layout.get("reader"))
    result.expected_images = layout.get("expected_images")
    result.missing_paths = [r for r in layout.get("required", []) if not _matches(root, r)]
    reader = layout.get("reader")
    if reader is not None and not result.missing_paths:
        try:
            df = _READERS[reader](root)
        except _m.ManifestError as exc:
            result.messages.append(str(exc))
            result.verdict = "incomplete"
            return result
        paths = df["path"].tolist() + (df["mask_path"].tolist() if "mask_path" in df.columns else [])
        result.missing_files = _m.find_missing(paths)
        result.n_listed = len(df)
        result.n_present = len(df) - len(_m.find_missing(df["path"].tolist()))
        absent_labels = [c for c in spec.label_columns if c not in df.columns]
        if absent_labels:
            result.messages.append(f"label columns not found: {absent_labels}")
        if decode:
            from cxrbench.io import ImageReadError, read_image

            for p in paths:
                if os.path.isfile(p):
                    try:
                        read_image(p)
                    except ImageReadError as exc:
                        result.unreadable[p] = exc.reason
    complete = not (result.missing_paths or result.missing_files or result.unreadable)
    if result.expected_images and result.n_present < result.expected_images and complete:
        result.messages.append(f"partial copy: {result.n_present} of {result.expected_images} images")
        complete = False
    result.verdict = "ok" if complete else "incomplete"
    return result

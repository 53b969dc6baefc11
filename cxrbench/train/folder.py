"""What a run folder may hold, and the one check every training run makes before it writes there.

A run folder holds only what a training run writes (:data:`RUN_FILES`). A fresh run (no resume) into a folder
that already holds a run's results is refused with one line naming the folder and what is in it, unless
``overwrite`` asks to start clean, which deletes exactly those files (never anything else). A folder that is not
a run folder (a bundle folder, a data folder, a mistyped path to something else) is refused always. A resumed
run keeps its folder; the temporary folders an interrupted bundle save left there are removed.
"""

from __future__ import annotations

import csv
import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path

from cxrbench.models.bundle import remove_stale_temporaries

__all__ = ["RESULT_FILES", "RUN_FILES", "RunFolder", "RunFolderError", "inspect_run_folder", "not_a_run_folder",
           "prepare_run_folder"]

#: what a training run (any family) writes into its folder, as glob patterns; ``--overwrite`` deletes these only
RUN_FILES: tuple[str, ...] = (
    "checkpoint.pt", "metrics.csv", "bundle", "best.safetensors", "split.csv", "config.json", "predictions_val.csv",
    "predictions_test.csv", "evaluation.csv", "evaluation_val.csv", "evaluation_test.csv", "scores_val.csv",
    "scores_test.csv", "best.pending.safetensors", "checkpoint.pt.tmp", "metrics.csv.tmp", "best.safetensors.tmp",
    "best.pending.safetensors.tmp", "split.csv.tmp", "config.json.tmp", ".bundle.tmp-*", ".bundle.old",
)
#: the run files that hold results: a folder without any of them holds a run that never finished an epoch
RESULT_FILES: tuple[str, ...] = ("checkpoint.pt", "metrics.csv", "best.safetensors", "bundle", "predictions_*.csv",
                                 "evaluation*.csv", "scores_*.csv")
#: files of a bundle folder (:mod:`cxrbench.models.bundle`), to name the usual mistake
_BUNDLE_FILES = ("card.json", "model.safetensors")


class RunFolderError(ValueError):
    """A run folder cannot be used as asked: it holds another run, or it is not a run folder."""


@dataclass(frozen=True)
class RunFolder:
    """What a folder holds, sorted into a run's files and others (names relative to the folder)."""

    path: Path
    run_files: tuple[str, ...]
    other_files: tuple[str, ...]

    @property
    def exists(self) -> bool:
        """Whether the folder exists."""
        return self.path.exists()

    @property
    def empty(self) -> bool:
        """Whether it holds nothing (or does not exist)."""
        return not self.run_files and not self.other_files

    @property
    def has_results(self) -> bool:
        """Whether any run file holds results (a checkpoint, a metric log, weights, a bundle, predictions)."""
        return any(fnmatch.fnmatch(n, pat) for n in self.run_files for pat in RESULT_FILES)

    @property
    def is_bundle(self) -> bool:
        """Whether it is a bundle folder (``card.json`` and ``model.safetensors``)."""
        return all(n in self.other_files for n in _BUNDLE_FILES)

    @property
    def is_run(self) -> bool:
        """A run folder: it holds a run's config or checkpoint, or nothing but a run's files."""
        marked = "config.json" in self.run_files or "checkpoint.pt" in self.run_files
        return bool(self.run_files) and (marked or not self.other_files)

    def describe(self, limit: int = 6) -> str:
        """``"checkpoint.pt, metrics.csv (3 epochs), bundle/, ..."``: what is in it, briefly."""
        names = [*self.run_files, *self.other_files]
        shown = [_describe_entry(self.path, n) for n in names[:limit]]
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(shown) + more


def _describe_entry(folder: Path, name: str) -> str:
    path = folder / name
    if path.is_dir():
        return name + "/"
    if name == "metrics.csv":
        try:
            with open(path, newline="") as f:
                n = sum(1 for _ in csv.DictReader(f))
            return f"metrics.csv ({n} epoch{'' if n == 1 else 's'})"
        except (OSError, UnicodeDecodeError, csv.Error):
            return name
    return name


def inspect_run_folder(path: str | Path) -> RunFolder:
    """Sort what ``path`` holds (nothing when it does not exist); raises when it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path}: is a file, not a run folder; give a folder for the run")
    names = sorted(p.name for p in path.iterdir()) if path.exists() else []
    rank = {n: next((i for i, pat in enumerate(RUN_FILES) if fnmatch.fnmatch(n, pat)), -1) for n in names}
    ours = tuple(sorted((n for n in names if rank[n] >= 0), key=rank.__getitem__))  # the informative ones first
    return RunFolder(path, ours, tuple(n for n in names if rank[n] < 0))


def not_a_run_folder(folder: RunFolder, advice: str = "train into a new or empty folder") -> RunFolderError:
    """The error for a folder that holds files but is not a run folder (naming the run folder of a bundle)."""
    what = "a bundle folder, not a run folder" if folder.is_bundle else "not a run folder"
    if folder.is_bundle and inspect_run_folder(folder.path.parent).is_run:
        what += f" (its run folder is {folder.path.parent})"
    elif folder.is_bundle:  # e.g. an imported published model: no split, saved predictions or training history
        what += (" and has no training run (e.g. a bundle of cxrbench import): no split, saved predictions or "
                 "training history to read")
    return RunFolderError(f"{folder.path}: is {what}; it holds {folder.describe()}; {advice}")


def _remove(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prepare_run_folder(path: str | Path, *, resume: bool = False, overwrite: bool = False,
                       progress: bool = False) -> RunFolder:
    """Check ``path`` before a run writes there, and clean it where that is asked for; what it held.

    - a folder that holds files but is not a run folder (:attr:`RunFolder.is_run`): refused, always;
    - ``resume``: the folder is kept as it is (the loop resumes its checkpoint, if any); only the temporary
      folders of an interrupted bundle save are removed;
    - a fresh run into a folder with a run's results: refused, naming the folder and what is in it, unless
      ``overwrite``, which deletes the run's files (:data:`RUN_FILES`) and keeps anything else;
    - a fresh run into a folder whose run never finished an epoch (config and split only): those are removed.

    Raises :class:`RunFolderError` (one line) when refused.
    """
    if resume and overwrite:
        raise RunFolderError(f"{path}: resume continues a run and overwrite deletes it; choose one")
    folder = inspect_run_folder(path)
    if folder.empty:
        return folder
    if not folder.is_run:
        raise not_a_run_folder(folder)
    if resume:
        remove_stale_temporaries(folder.path / "bundle")
        return folder
    if folder.has_results and not overwrite:
        raise RunFolderError(f"{folder.path}: already holds a run ({folder.describe()}); continue it with --resume, "
                             "start it again with --overwrite (deletes these files), or choose another folder")
    held = folder.describe()
    _remove(folder.path, folder.run_files)
    if progress and folder.has_results:
        kept = f"; kept {', '.join(folder.other_files)} (not a run's files)" if folder.other_files else ""
        print(f"overwrite: deleted the earlier run in {folder.path} ({held}){kept}")
    return folder

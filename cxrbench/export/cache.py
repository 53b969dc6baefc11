"""The fingerprinted cache of ONNX exports that ``--backend auto`` / ``onnx`` export into on first use.

One folder per export, ``$CXRBENCH_CACHE/onnx/<key>/`` (default ``~/.cache/cxrbench/onnx``), where ``key`` is a
hash of the cxrbench version, the export's kind (``models``: a classifier, optionally with its gate; ``gate``: an
OOD bundle alone; ``segmentation``: a lung U-Net, :func:`cached_segmenter_export`) and each bundle's card
(:func:`~cxrbench.export.onnx.card_fingerprint`: the weights' SHA-256, preprocessing, operating points, cutoff,
...). New weights, a recalibrated card or a new cxrbench get a new folder; delete the folder (or all of ``onnx/``)
to clear it.

An entry is trusted only when :func:`entry_problem` finds nothing wrong: its ``export.json`` reads, names this
cxrbench version and the same cards, and every graph it needs is there with the size and SHA-256 the manifest
recorded. Anything else (a missing or edited file, an older export) is exported again, not used.

The saliency graph (``saliency.onnx``, forward + input gradient) is exported when a caller needs it
(``saliency=True``: a report with Chester's saliency on ONNX Runtime); an entry without it is then exported again,
with it. When the gradient export or its parity check fails, the entry keeps the forward graphs and records the
reason in ``export.json`` (``failed_graphs``), so the failure is not retried on every use and the caller can say
why saliency runs in PyTorch.

Concurrent first uses (two ``cxrbench predict`` runs, several dashboard kernels) are serialised by a lock file
per entry (``onnx/.locks/<key>.lock``, :mod:`filelock`): the second waits for the first and then uses its export.
The export itself is written to a temporary folder and renamed into place
(:func:`cxrbench.export.onnx.export_models`), so no reader ever sees a half-written entry, also where the lock
is not honoured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cxrbench import __version__
from cxrbench.data import default_cache_dir
from cxrbench.export.onnx import GRAPH_FILES, MANIFEST, card_fingerprint, export_gate, export_models, export_segmenter
from cxrbench.models.bundle import file_sha256, load_bundle, read_card

__all__ = ["NOT_EXPORTED", "cache_key", "cached_export", "cached_segmenter_export", "entry_problem", "onnx_cache_dir"]

#: what :func:`entry_problem` says of an entry that does not exist yet
NOT_EXPORTED = "not exported yet"


def onnx_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` or ``$CXRBENCH_CACHE/onnx`` (default ``~/.cache/cxrbench/onnx``)."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "onnx"


def cache_key(kind: str, cards: Mapping[str, str]) -> str:
    """20 hex digits naming the export of ``kind`` (``"models"``, ``"gate"`` or ``"segmentation"``) of bundles
    whose cards have the fingerprints ``cards`` (role -> :func:`~cxrbench.export.onnx.card_fingerprint`) under
    this cxrbench version."""
    identity = json.dumps([__version__, kind, sorted(cards.items())])
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def entry_problem(path: str | os.PathLike, graphs: Sequence[str], cards: Mapping[str, str]) -> str | None:
    """Why the export folder ``path`` cannot be trusted to hold ``graphs`` (``"classifier"``, ``"cam"``, ``"ood"``,
    ``"saliency"``, ``"unet"``) of bundles whose cards have the fingerprints ``cards`` (role ->
    :func:`~cxrbench.export.onnx.card_fingerprint`); None when it can. :data:`NOT_EXPORTED` for no folder. A graph
    whose export failed (``failed_graphs`` of the manifest, with the reason) counts as there: it is not retried."""
    path = Path(path)
    if not path.exists():
        return NOT_EXPORTED
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    if not isinstance(manifest, dict) or manifest.get("cxrbench") != __version__:
        return f"exported by cxrbench {manifest.get('cxrbench') if isinstance(manifest, dict) else '?'}, " \
               f"this is {__version__}"
    if manifest.get("card_sha256") != dict(cards):
        return "exported from another card or other weights than the bundle's"
    failed = manifest.get("failed_graphs") or {}
    for graph in graphs:
        if graph in failed:
            continue
        info = (manifest.get("graphs") or {}).get(graph) or {}
        name = info.get("file", GRAPH_FILES[graph])
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info.get("bytes") or file_sha256(file) != info.get("sha256"):
            return f"{name} does not match the checksum in {MANIFEST}"
    return None


def cached_export(classifier: str | os.PathLike | None, ood: str | os.PathLike | None = None, *,
                  cache_dir: str | os.PathLike | None = None, announce: Callable[[str], None] | None = None,
                  saliency: bool = False) -> Path:
    """The cache folder holding the parity-checked export of ``classifier`` (+ ``ood``), or of ``ood`` alone when
    ``classifier`` is None; exported now when the entry is missing or untrusted (:func:`entry_problem`).
    ``saliency``: the entry must also hold the classifier's ``saliency.onnx`` or the recorded reason why its export
    failed (see the module doc); an entry exported without it is exported again.

    ``announce`` is called with one line before an export starts (what, where, why). Export failures
    (:class:`~cxrbench.export.onnx.ParityError`, an unsupported model, no onnxruntime) propagate; nothing is
    left in the cache then.
    """
    if classifier is None and ood is None:
        raise ValueError("cached_export needs a classifier or an OOD bundle")
    roles = {"classifier": classifier, "ood": ood}
    cards = {role: card_fingerprint(read_card(path)) for role, path in roles.items() if path is not None}
    kind = "models" if classifier is not None else "gate"
    graphs = (["classifier", "cam"] + (["saliency"] if saliency else []) if classifier is not None else []) + (
        ["ood"] if ood is not None else [])
    what = " and ".join(str(p) for p in roles.values() if p is not None)
    graph = " with the saliency graph" if saliency and classifier is not None else ""

    def export(out: Path) -> None:
        if classifier is not None:
            export_models(load_bundle(classifier, kind="classifier"), out,
                          load_bundle(ood, kind="ood") if ood is not None else None, replace=False,
                          saliency="optional" if saliency else False)
        else:
            export_gate(load_bundle(ood, kind="ood"), out, replace=False)  # type: ignore[arg-type]

    return _entry(onnx_cache_dir(cache_dir), kind, cards, graphs, export, f"{what} to ONNX{graph}", announce)


def cached_segmenter_export(unet: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                            announce: Callable[[str], None] | None = None) -> Path:
    """The cache folder holding the parity-checked ``unet.onnx`` of a lung U-Net bundle
    (:func:`~cxrbench.export.onnx.export_segmenter`), exported now when missing or untrusted; as
    :func:`cached_export` otherwise (the same lock, announcement and failures)."""
    cards = {"unet": card_fingerprint(read_card(unet))}
    return _entry(onnx_cache_dir(cache_dir), "segmentation", cards, ["unet"],
                  lambda out: export_segmenter(load_bundle(unet, kind="segmentation"), out, replace=False),
                  f"{unet} to ONNX", announce)


def _entry(root: Path, kind: str, cards: Mapping[str, str], graphs: Sequence[str], export: Callable[[Path], object],
           what: str, announce: Callable[[str], None] | None) -> Path:
    """The trusted entry of ``kind`` for ``cards`` under ``root``; ``export(folder)`` writes it first when there
    is none (or an untrusted one), one process at a time (the entry's lock)."""
    out = root / cache_key(kind, cards)
    if entry_problem(out, graphs, cards) is None:
        return out
    from filelock import FileLock

    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".locks" / f"{out.name}.lock")):
        problem = entry_problem(out, graphs, cards)
        if problem is None:  # another process exported it while this one waited for the lock
            return out
        if announce is not None:
            why = "first use" if problem == NOT_EXPORTED else f"the cached export is not trusted: {problem}"
            announce(f"exporting {what} in {out} ({why}; parity-checked, once) ...")
        if out.exists():
            shutil.rmtree(out)
        export(out)
    return out

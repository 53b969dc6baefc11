"""The browser-only app: a static folder that runs the exported models inside the user's browser (Chester §5).

``export_web`` writes::

    OUT/
        index.html, app.js          the page (this package's templates)
        config.json                 labels, preprocessing, operating points, OOD cutoff, graph paths
        models/                     a cxrbench ONNX export (cam.onnx, ood.onnx, ...; parity-checked)
        ort.wasm.min.js, ort-wasm-simd-threaded.{mjs,wasm}   onnxruntime-web from npm, pinned (package.json)
        UPNG.js, pako.min.js        upng-js and its zlib port (pako), same lockfile: 16-bit PNG decoding, and the
                                    blank-image guard's PNG-size measure (cxrbench.ood.guard) in the page

Nothing is fetched from elsewhere at run time (the page's Content-Security-Policy allows only its own
origin), and the chosen image never leaves the page. WebAssembly needs the folder served over http, e.g.
``python -m http.server -b 127.0.0.1 -d OUT`` or :func:`serve`.

onnxruntime-web is installed once with npm (``npm ci`` against this package's lockfile) into
``$CXRBENCH_NPM_DIR`` or ``~/.cache/cxrbench/npm`` and copied from there, with upng-js and pako.

``config.json`` carries the blank-image guard's thresholds (the OOD card's fitted ``ood["guard"]``, else the
:class:`~cxrbench.ood.guard.ImageGuard` defaults), so the page rejects blank, flat and tiny images with the
same checks and reason text as the Python gate, and the saliency graph (``models/saliency.onnx``) when the
export has one.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Sequence

from cxrbench.models.bundle import Bundle

__all__ = ["ORT_FILES", "StaticServer", "export_web", "install_onnxruntime_web", "installed_onnxruntime_web",
           "onnxruntime_web_version", "serve"]

WEB_DIR = Path(__file__).resolve().parent
TEMPLATES = ("index.html", "app.js")
#: The files of onnxruntime-web the page needs: the WebAssembly-only bundle, its loader and the binary.
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
#: Other npm files copied next to the page: name in the app -> path under node_modules.
VENDOR_FILES = {"UPNG.js": "upng-js/UPNG.js", "pako.min.js": "pako/dist/pako.min.js"}
BROWSER_RESAMPLE = ("bilinear", "area", "bicubic", "lanczos")


def onnxruntime_web_version() -> str:
    """The pinned onnxruntime-web version (``cxrbench/web/package.json``)."""
    return json.loads((WEB_DIR / "package.json").read_text())["dependencies"]["onnxruntime-web"]


def _npm_dir() -> Path:
    env = os.environ.get("CXRBENCH_NPM_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cxrbench" / "npm"


def installed_onnxruntime_web(npm_dir: str | os.PathLike | None = None) -> Path | None:
    """The ``dist`` folder of the pinned onnxruntime-web if it is already installed, else None."""
    folder = Path(npm_dir) if npm_dir else _npm_dir()
    dist = folder / "node_modules" / "onnxruntime-web" / "dist"
    installed = dist.parent / "package.json"
    if installed.is_file() and json.loads(installed.read_text()).get("version") == onnxruntime_web_version() \
            and all((dist / f).is_file() for f in ORT_FILES) \
            and all((folder / "node_modules" / f).is_file() for f in VENDOR_FILES.values()):
        return dist
    return None


def install_onnxruntime_web(npm_dir: str | os.PathLike | None = None, *, quiet: bool = True) -> Path:
    """Install the pinned onnxruntime-web with npm (once) and return its ``dist`` folder.

    Raises ``RuntimeError`` when npm is missing or the install fails (the message has npm's output).
    """
    found = installed_onnxruntime_web(npm_dir)
    if found is not None:
        return found
    folder = Path(npm_dir) if npm_dir else _npm_dir()
    version = onnxruntime_web_version()
    dist = folder / "node_modules" / "onnxruntime-web" / "dist"
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: it is needed once to fetch onnxruntime-web "
                           f"{version} (install Node.js 18+, or set CXRBENCH_NPM_DIR to a folder that has it)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(WEB_DIR / name, folder / name)
    cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or installed_onnxruntime_web(folder) is None:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"'npm ci' in {folder} failed (exit {proc.returncode}): {tail}")
    if not quiet:
        print(f"installed onnxruntime-web {version} in {folder}")
    return dist


#: why the page cannot reproduce a resampling, for the refusals of :func:`export_web`
_NOT_IN_BROWSER = {
    "skimage": ("torchxrayvision's skimage resize (resample 'skimage': a Gaussian anti-aliasing filter, then bilinear "
                "interpolation with a mid-grey border), the preprocessing its published weights were trained with"),
    "nearest": "nearest-neighbour resampling (resample 'nearest')",
}


def _check_browser_preprocess(pp: dict[str, Any], what: str, where: Any) -> None:
    """Refuse (``ValueError`` naming ``where``, the bundle or export folder) preprocessing that the page's exact
    path (Pillow's resampling, scikit-image's equalize_hist) cannot give: its probabilities would differ from
    Python's without a word."""
    problem = ""
    if pp["resample"] not in BROWSER_RESAMPLE:
        problem = (f"it resizes with {_NOT_IN_BROWSER.get(pp['resample'], repr(pp['resample']))}, which the browser "
                   f"app does not reproduce (it resizes with Pillow's {', '.join(BROWSER_RESAMPLE)} filters, or the "
                   "canvas's own)")
    elif pp["equalize"] not in ("none", "hist"):
        problem = (f"it equalises with equalize '{pp['equalize']}' (CLAHE), which the browser app does not reproduce "
                   "(it has 'none' and 'hist')")
    if problem:
        _refuse(where, what, f"{problem}, so the page's probabilities would differ from Python's")


def _check_browser_outputs(untrained: Sequence[str], where: Any) -> None:
    """Refuse a classifier whose card lists outputs its weights never trained: the page does not mask them."""
    if untrained:
        _refuse(where, "classifier", f"its weights never trained {', '.join(untrained)} (its card's 'untrained'), "
                                     "and the page would show their constant outputs as probabilities")


def _refuse(where: Any, what: str, problem: str) -> None:
    raise ValueError(f"{where}: cannot write a browser app for this {what}: {problem}. Run it with the Python tools "
                     "instead (cxrbench predict, cxrbench demo, or its cxrbench export on ONNX Runtime)")


def export_web(classifier: Bundle | str | os.PathLike, out: str | os.PathLike,
               ood: Bundle | str | os.PathLike | None = None, *, images: Sequence[Any] | None = None,
               tolerance: float = 1e-4, npm_dir: str | os.PathLike | None = None,
               threads: int | None = None, saliency: bool = True) -> Path:
    """Write the static web app for a classifier (and an OOD gate) into ``out``.

    Parameters
    ----------
    classifier : a loaded bundle, a bundle folder, or a folder written by ``cxrbench export`` (then ``ood``
        must be None: the export brings its own).
    ood : OOD bundle (or folder) for the gate; without it the page has no gate.
    images, tolerance, threads : parity check of the ONNX export (see :func:`cxrbench.export.onnx.export_models`).
    saliency : also export the gradient graph, so the page offers Chester's saliency next to CAM.
    npm_dir : where onnxruntime-web is installed (default ``$CXRBENCH_NPM_DIR`` or ``~/.cache/cxrbench/npm``).

    Returns ``out``. Raises ``ValueError``, naming the bundle, for preprocessing the browser cannot reproduce
    exactly: CLAHE, nearest-neighbour resampling, and torchxrayvision's skimage resize (``cxrbench import xrv``
    bundles); and a classifier with outputs its weights never trained (the page would show them as probabilities).
    """
    from cxrbench.export.onnx import MANIFEST, export_models, read_onnx_card
    from cxrbench.models.bundle import load_bundle

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} exists and is not a cxrbench web app; choose an empty or new folder")
    models = out / "models"
    if not isinstance(classifier, Bundle) and (Path(classifier) / MANIFEST).is_file():
        if ood is not None:
            raise ValueError(f"{classifier} is an ONNX export; it brings its own OOD graph (do not pass ood)")
        manifest = json.loads((Path(classifier) / MANIFEST).read_text())
        _check_browser_preprocess(manifest["preprocess"], "classifier", classifier)
        graph = manifest["graphs"].get("cam") or manifest["graphs"]["classifier"]
        _check_browser_outputs(read_onnx_card(Path(classifier) / graph["file"])[0].untrained, classifier)
        if manifest.get("ood_preprocess"):
            _check_browser_preprocess(manifest["ood_preprocess"], "OOD model", classifier)
        dist = install_onnxruntime_web(npm_dir)
        if Path(classifier).resolve() != models.resolve():
            shutil.rmtree(models, ignore_errors=True)
            shutil.copytree(classifier, models)
    else:
        clf = classifier if isinstance(classifier, Bundle) else load_bundle(classifier, kind="classifier")
        gate = ood if isinstance(ood, Bundle) or ood is None else load_bundle(ood, kind="ood")
        _check_browser_preprocess(clf.card.preprocess, "classifier", clf.path or "(a bundle in memory)")
        _check_browser_outputs(clf.card.untrained, clf.path or "(a bundle in memory)")
        if gate is not None:
            _check_browser_preprocess(gate.card.preprocess, "OOD model", gate.path or "(a bundle in memory)")
        dist = install_onnxruntime_web(npm_dir)
        out.mkdir(parents=True, exist_ok=True)
        manifest = export_models(clf, models, gate, images=images, tolerance=tolerance, threads=threads,
                                 saliency=saliency).manifest
    for name in TEMPLATES:
        shutil.copyfile(WEB_DIR / name, out / name)
    for name in ORT_FILES:
        shutil.copyfile(dist / name, out / name)
    for name, source in VENDOR_FILES.items():
        shutil.copyfile(dist.parent.parent / source, out / name)
    graphs = {k: f"models/{v['file']}" for k, v in manifest["graphs"].items()}
    config = {key: manifest.get(key) for key in ("labels", "preprocess", "normalize_mean", "normalize_std",
                                                 "thresholds", "ood_preprocess", "ood_cutoff", "cxrbench", "opset")}
    config.update(graphs=graphs, onnxruntime_web=onnxruntime_web_version(), parity=manifest.get("parity"))
    if "ood" not in graphs:
        config.update(ood_preprocess=None, ood_cutoff=None)
    config["guard"] = _guard_config(models)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def _guard_config(models: Path) -> dict[str, Any]:
    """The blank-image guard's thresholds for the page: the OOD card's fitted ones (in ``ood.onnx``), else defaults."""
    from cxrbench.export.onnx import read_onnx_card
    from cxrbench.ood.guard import ImageGuard

    fitted = read_onnx_card(models / "ood.onnx")[0].ood.get("guard") if (models / "ood.onnx").is_file() else None
    return ImageGuard.from_dict(fitted).to_dict()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; cross-origin isolation headers (so WebAssembly may use threads); no request log."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        if getattr(self.server, "isolate", False):
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class StaticServer:
    """A folder served on ``127.0.0.1`` from a background thread; ``url`` ends with ``/``. Use as a context manager."""

    def __init__(self, folder: str | os.PathLike, port: int = 0, *, isolate: bool = False) -> None:
        handler = functools.partial(_Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.isolate = isolate  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "StaticServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(folder: str | os.PathLike, port: int = 0, *, isolate: bool = False) -> StaticServer:
    """Serve a web app folder on 127.0.0.1 (``port`` 0: a free one). ``isolate`` sends COOP/COEP headers,
    which lets onnxruntime-web use several WebAssembly threads."""
    if not (Path(folder) / "index.html").is_file():
        raise ValueError(f"{folder}: no index.html (write the app with 'cxrbench export-web' first)")
    return StaticServer(folder, port, isolate=isolate)

"""The demo: bundles trained by the project itself, example images, and a local Voila server.

``cxrbench demo prepare`` trains the demo bundles once (a classifier and an OOD gate) on the data
in ``$CXRBENCH_DATA`` — by default ``../shared/data/cxr`` when it exists, else synthetic phantoms —
and caches them under ``build/demo`` (a fingerprint of the data and the settings decides whether to
retrain). With ``counterfactual=True`` (``cxrbench demo prepare --counterfactual``, ``make demo
COUNTERFACTUAL=1``) it also trains an autoencoder like the classifier, once, so that the dashboard's
"Counterfactual (slow)" panel works; it is opt-in because it adds minutes to the first prepare.
``cxrbench demo serve`` starts Voila on 127.0.0.1 with the dashboard notebook and prints its URL; ``make demo``
does both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cxrbench.data.locations import DataRootError, locate_data_root, shipped_folder, source_checkout

__all__ = ["DemoSettings", "ServeError", "dashboard_notebook", "default_demo_info", "demo_data", "demo_examples",
           "prepare_demo", "run_until_stopped", "serve", "stop_server", "voila_command", "voila_dir", "voila_env",
           "wait_for_voila"]

READY_PATH = "/voila/labextensions/@jupyter-widgets/jupyterlab-manager/package.json"
DASHBOARD_NAME = "05_dashboard.ipynb"


def dashboard_notebook() -> Path:
    """The dashboard notebook Voila serves: ``notebooks/05_dashboard.ipynb``, shipped as package data."""
    path = shipped_folder("cxrbench.app", "notebooks") / DASHBOARD_NAME
    if not path.is_file():
        raise DataRootError(f"{path}: the dashboard notebook is missing; reinstall cxrbench")
    return path


def voila_dir() -> Path:
    """``cxrbench/app/voila/``: our Voila template (``templates/cxrbench``) and config (``config/voila.json``)."""
    folder = resources.files("cxrbench.app") / "voila"
    if not (isinstance(folder, Path) and (folder / "config" / "voila.json").is_file()):
        raise DataRootError(f"{folder}: the Voila template and config are missing; reinstall cxrbench")
    return folder


def default_demo_info() -> Path:
    """Where ``cxrbench demo prepare`` writes ``demo.json`` by default: ``build/demo/`` of the source checkout,
    else of the current directory (an installed package)."""
    return (source_checkout() or Path.cwd()) / "build" / "demo" / "demo.json"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo bundles are trained with (kept small: the first `make demo` must stay under 10 min)."""

    arch: str = "resnet18"
    image_size: int = 128
    epochs: int = 6
    batch_size: int = 16
    ood_model: str = "autoencoder"
    ood_epochs: int = 8
    ood_percentile: float = 95.0
    seed: int = 0
    #: the Latent Shift autoencoder's (``counterfactual=True``); not in the fingerprint of the other bundles
    autoencoder_epochs: int = 8


#: settings of the opt-in autoencoder only: changing them retrains neither the classifier nor the gate
_AUTOENCODER_SETTINGS = ("autoencoder_epochs",)


def demo_data(data: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The demo's data folder and its kind: ``data``, ``$CXRBENCH_DATA``, ``../shared/data/cxr``, else phantoms.

    Returns ``(folder with the training images, kind)`` where kind is ``"shared"``, ``"custom"`` or
    ``"phantoms"``; the folder is absolute. Raises :class:`DataRootError` naming a folder that was given
    (``--data`` or ``$CXRBENCH_DATA``) and does not exist.
    """
    found = locate_data_root(data, given_origin="--data", env_var="CXRBENCH_DATA", n_phantoms=160, seed=0,
                             phantom_folder="demo-phantoms")
    path = found.path.resolve()  # Voila's kernel runs in the notebook's folder: relative paths would point elsewhere
    if found.kind == "shared":
        return path / "cxr" / "nih", "shared"
    if found.kind == "custom" and (path / "nih" / "manifest.csv").is_file():
        return path / "nih", "shared"
    return path, found.kind


def demo_examples(train_dir: Path, kind: str, n_chest: int = 4, bundles: tuple[str | Path, ...] = ()) -> dict[str, str]:
    """A few example images for the picker: chest X-rays with findings, and non-chest ones when available.

    The chest X-rays are held-out test images of ``bundles`` (neither model trained or calibrated on them),
    so what the demo shows on them is what it would show on a new image. Paths are absolute.
    """
    import pandas as pd

    from cxrbench.data import load_manifest
    from cxrbench.models.bundle import read_card
    from cxrbench.ood.sets import unseen_rows

    examples: dict[str, str] = {}
    df = load_manifest(train_dir, on_missing="drop")
    for bundle in bundles:
        df = unseen_rows(read_card(bundle), df)
    labels = [c for c in df.attrs.get("label_columns") or [] if c in df]
    if labels:  # images with findings first, then one without
        positive = df[labels].fillna(0).to_numpy().sum(axis=1) > 0
        df = pd.concat([df[positive].head(n_chest - 1), df[~positive].head(1)])
    for _, row in df.head(n_chest).iterrows():
        found = ", ".join(c for c in labels if row[c] == 1) or ("no finding" if labels else str(row["image_id"]))
        examples[f"held-out chest X-ray: {found[:40]} ({Path(row['path']).name})"] = str(Path(row["path"]).resolve())
    if kind == "shared":
        cxr = train_dir.parent
        for sub, title in (("nonchest", "not a chest X-ray"), ("pediatric", "paediatric chest X-ray")):
            if (cxr / sub / "manifest.csv").is_file():
                other = load_manifest(cxr / sub, on_missing="drop")
                for _, row in other.head(2).iterrows():
                    examples[f"{title}: {row['image_id']}"] = str(Path(row["path"]).resolve())
    return examples


def _fingerprint(train_dir: Path, settings: DemoSettings) -> str:
    shared = {k: v for k, v in asdict(settings).items() if k not in _AUTOENCODER_SETTINGS}
    h = hashlib.sha1(json.dumps(shared, sort_keys=True).encode())
    manifest = train_dir / "manifest.csv"
    h.update(manifest.read_bytes() if manifest.is_file() else str(sorted(os.listdir(train_dir))[:1000]).encode())
    h.update(str(train_dir.resolve()).encode())
    return h.hexdigest()[:16]


def _demo_autoencoder(out: Path, classifier: str, manifest: Any, settings: DemoSettings,
                      progress: bool) -> tuple[str, float]:
    """The autoencoder like the demo classifier (``cxrbench train autoencoder --like``), on the classifier's own
    split (the held-out examples stay unseen); returns its bundle and the seconds it took."""
    from cxrbench.data import load_split
    from cxrbench.train.autoencoder import AutoencoderConfig, classifier_preprocess, train_autoencoder

    t0 = time.perf_counter()
    if progress:
        print(f"training the demo's Latent Shift autoencoder like {classifier} ...")
    cfg = AutoencoderConfig(epochs=settings.autoencoder_epochs, seed=settings.seed,
                            preprocess_like=classifier_preprocess(classifier), like=classifier)
    split = load_split(Path(classifier).parent / "split.csv", manifest)
    result = train_autoencoder(manifest, out / "autoencoder_run", cfg, split=split, progress=progress, resume=True)
    if result.bundle is None:
        raise RuntimeError(f"demo training in {out} wrote no autoencoder bundle (run it as one process)")
    return str(result.bundle), round(time.perf_counter() - t0, 1)


def prepare_demo(out: str | os.PathLike = "build/demo", *, data: str | os.PathLike | None = None,
                 settings: DemoSettings | None = None, force: bool = False, progress: bool = True,
                 counterfactual: bool = False) -> dict[str, Any]:
    """Train (or reuse) the demo bundles; returns ``{"classifier": path, "ood": path, "autoencoder": path or None,
    "examples": {...}}``.

    ``counterfactual``: also train (once, then reuse) the Latent Shift autoencoder like the classifier (its
    training time in ``"autoencoder_seconds"``); added to a cached demo without retraining the others. The result
    is also written to ``out/demo.json``, which the dashboard notebook reads. Bundles that are up to date are reused
    without importing torch (``cxrbench demo serve`` only starts Voila, whose kernels load them).
    """
    settings = settings or DemoSettings()
    out = Path(out).resolve()
    train_dir, kind = demo_data(data)
    fingerprint = _fingerprint(train_dir, settings)
    info_path = out / "demo.json"
    if info_path.is_file() and not force:
        cached: dict[str, Any] = json.loads(info_path.read_text())
        if cached.get("fingerprint") == fingerprint and all(
                Path(cached[k], "card.json").is_file() for k in ("classifier", "ood", "autoencoder") if cached.get(k)):
            if counterfactual and not cached.get("autoencoder"):
                from cxrbench.data import load_manifest

                cached["autoencoder"], cached["autoencoder_seconds"] = _demo_autoencoder(
                    out, cached["classifier"], load_manifest(train_dir, on_missing="drop"), settings, progress)
                info_path.write_text(json.dumps(cached, indent=1) + "\n")
            elif progress:
                print(f"demo bundles up to date in {out} (data: {train_dir}, {kind})")
            return cached
    from cxrbench.data import load_manifest
    from cxrbench.train import ClassifierConfig, OODConfig, train_classifier, train_ood

    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = load_manifest(train_dir, on_missing="drop")
    if progress:
        print(f"training the demo bundles on {len(manifest)} images from {train_dir} ({kind}) ...")
    cfg = ClassifierConfig(arch=settings.arch, image_size=settings.image_size, epochs=settings.epochs,
                           batch_size=settings.batch_size, seed=settings.seed, early_stopping_patience=0,
                           eval_bootstrap=200)
    clf = train_classifier(manifest, out / "classifier_run", cfg, progress=progress, resume=True,
                           data_description=f"{train_dir} ({kind})")
    info: dict[str, Any] = {"fingerprint": fingerprint, "data": str(train_dir), "kind": kind,
                            "classifier": str(clf.bundle), "ood": None, "settings": asdict(settings)}
    nonchest = train_dir.parent / "nonchest"  # the dev data's non-chest radiographs place the far cutoff
    ocfg = OODConfig(model=settings.ood_model, epochs=settings.ood_epochs, percentile=settings.ood_percentile,
                     seed=settings.seed,
                     far_reference=str(nonchest) if kind == "shared" and (nonchest / "manifest.csv").is_file() else "")
    ood = train_ood(manifest, out / "ood_run", ocfg, progress=progress, resume=True)
    if clf.bundle is None or ood.bundle is None:  # only a non-main torchrun rank writes no bundle
        raise RuntimeError(f"demo training in {out} wrote no bundle (run it as one process, not under torchrun)")
    info["ood"] = str(ood.bundle)
    info["examples"] = demo_examples(train_dir, kind, bundles=(clf.bundle, ood.bundle))
    info["autoencoder"] = None
    if counterfactual:
        info["autoencoder"], info["autoencoder_seconds"] = _demo_autoencoder(out, str(clf.bundle), manifest, settings,
                                                                             progress)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    if progress:
        print(f"demo bundles ready in {info['seconds']:.0f} s: {out}")
    return info


# --------------------------------------------------------------------------------------------------
# serving


class ServeError(RuntimeError):
    """Voila could not be started (port taken, server exited); the message says what to do."""


def check_port_free(port: int) -> None:
    """Raise :class:`ServeError` when 127.0.0.1:``port`` is already taken (Voila would exit with a log line)."""
    with socket.socket() as s:
        # as tornado does: a port left in TIME_WAIT by a demo just stopped is free to Voila, so to us too
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ServeError(f"127.0.0.1:{port} is already in use (another cxrbench demo?); choose another port "
                             f"with --port N, or `make demo PORT=N`") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_voila(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Block until Voila answers on 127.0.0.1:port (the widget manager's package.json; starts no kernel)."""
    deadline = time.time() + timeout
    url = f"http://127.0.0.1:{port}{READY_PATH}"
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"voila exited with code {proc.returncode} before serving (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise ServeError(f"voila did not answer on port {port} within {timeout:.0f} s")


def voila_command(port: int, notebook: Path | None = None) -> list[str]:
    """The server command line for ``notebook`` (default :func:`dashboard_notebook`): local only, no browser,
    a taken port is an error (no silent move). The server is Voila run by :mod:`cxrbench.app.server` with this
    interpreter (the one that has cxrbench and Voila installed, whatever ``voila`` is on ``PATH``), which adds the
    Host/Origin check, the cookie the kernel-shutdown beacon needs and the loading estimate.

    Uploads up to 64 MB (a large DICOM), kernel culling and ``allow_remote_access=False`` come from
    ``cxrbench/app/voila/config/voila.json``, which :func:`voila_env` puts on ``JUPYTER_CONFIG_PATH``.
    """
    notebook = notebook or dashboard_notebook()
    return [sys.executable, "-m", "cxrbench.app.server", str(notebook), "--no-browser", f"--port={port}",
            "--Voila.ip=127.0.0.1", "--Voila.port_retries=0", "--theme=light", "--template=cxrbench"]


def voila_env(info: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Voila runs in: the demo bundles, our template and our Voila config."""
    env = {**os.environ, **(env or {})}
    env["CXRBENCH_DEMO"] = json.dumps(info)
    voila = voila_dir()
    # our template (the lab template without CDN stylesheets) lives in cxrbench/app/voila/templates
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(voila.parent), env.get("JUPYTER_PATH", "")]))
    # and its config (the websocket message limit for uploads) in cxrbench/app/voila/config
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(filter(None, [str(voila / "config"),
                                                             env.get("JUPYTER_CONFIG_PATH", "")]))
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(info: dict[str, Any], port: int = 8866, *, wait: bool = True,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start Voila on 127.0.0.1 with the dashboard for ``info`` (from :func:`prepare_demo`).

    The server runs in its own session, so Ctrl-C in the terminal reaches only this process, which stops the
    server in order (:func:`run_until_stopped`); on Linux it also ends when this process dies.
    """
    check_port_free(port)
    checkout = source_checkout()  # Voila runs where `make demo` runs; an installed package runs in the current folder
    proc = subprocess.Popen(voila_command(port), env=voila_env(info, env), cwd=str(checkout) if checkout else None,
                            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    if wait:
        try:
            wait_for_voila(port, proc=proc)
        except ServeError:
            stop_server(proc)
            raise
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM to the server, which shuts its kernels down and exits; SIGKILL if it has not within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class _Stop(Exception):
    pass


def run_until_stopped(proc: subprocess.Popen) -> int:
    """Wait for the server; SIGTERM, SIGINT (Ctrl-C) or SIGHUP to this process stops it and its kernels first.

    Returns the server's exit code when it ended by itself, 0 when it was stopped by a signal.
    """
    def _raise(signum, frame):
        raise _Stop(signum)

    signals = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, _raise) for s in signals}
    try:
        return proc.wait()
    except (_Stop, KeyboardInterrupt):
        for s in signals:  # a second signal while the kernels shut down must not leave the server behind
            signal.signal(s, signal.SIG_IGN)
        stop_server(proc)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

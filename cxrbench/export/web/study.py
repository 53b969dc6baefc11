"""The preprocessing study of Chester Fig. 9: browser vs Python predictions on the same images.

Chester resized images with the browser's canvas and saw per-finding prediction differences of up to 20%
(±3% on average) against the PyTorch path. The web app here offers three resize paths
(``window.cxrbenchAnalyze(src, {resize})``):

``pillow``       Pillow's antialiased resampling re-implemented in JavaScript (the default; exact)
``canvas-high``  ``drawImage`` with ``imageSmoothingQuality = "high"`` (the browser's best)
``canvas-low``   ``drawImage`` with the default low-quality smoothing (what a naive port does)

:func:`preprocessing_study` turns the browser's and Python's outputs into the per-finding table,
:func:`cxrbench.plots.export.browser_study_figure` draws the Fig. 9 histograms, :func:`run_browser_study`
collects the browser side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["RESIZE_MODES", "browser_arrays", "input_study", "preprocessing_study", "python_reference",
           "run_browser_study", "staged_images"]

RESIZE_MODES = ("pillow", "canvas-high", "canvas-low")


def python_reference(pipeline: Any, files: Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """The Python pipeline's outputs on ``files`` (gate overridden so every image gets probabilities).

    Returns ``raw`` and ``calibrated`` ``(N, F)`` float64 (NaN without an operating point) and ``ood_score``
    ``(N,)`` (NaN without a gate).
    """
    reports = [pipeline.analyze(f, explain=None, allow_ood=True) for f in files]
    return {"raw": np.stack([r.raw for r in reports]), "calibrated": np.stack([r.calibrated for r in reports]),
            "ood_score": np.array([r.ood.score if r.ood else np.nan for r in reports])}


def browser_arrays(results: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``window.cxrbenchAnalyze`` results as arrays like :func:`python_reference` (null -> NaN)."""
    def col(key: str) -> np.ndarray:
        return np.array([[np.nan if v is None else v for v in r[key]] for r in results], dtype=np.float64)

    return {"raw": col("raw"), "calibrated": col("calibrated"),
            "ood_score": np.array([np.nan if r.get("ood_score") is None else r["ood_score"] for r in results], float)}


def preprocessing_study(python: Mapping[str, np.ndarray], browser: Mapping[str, Mapping[str, np.ndarray]],
                        findings: Sequence[str], *, value: str = "calibrated") -> pd.DataFrame:
    """Per resize path and finding: how far the browser's probabilities are from Python's.

    Parameters
    ----------
    python : :func:`python_reference` output; ``python[value]`` is ``(N, F)``.
    browser : resize path -> :func:`browser_arrays` output on the same N images, same order.
    findings : the F finding names.
    value : ``"calibrated"`` (Chester Eq. 1 outputs, as Chester compared) or ``"raw"``.

    Returns one row per (resize, finding) and one ``"all findings"`` row per resize, with ``n_images``,
    ``mean_diff`` (browser - Python, bias), ``mean_abs_diff``, ``std_diff``, ``p95_abs_diff``, ``max_abs_diff``.
    Findings without an operating point (all NaN) are left out.
    """
    ref = np.asarray(python[value], dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != len(findings):
        raise ValueError(f"python[{value!r}] must be (N, {len(findings)}), got {ref.shape}")
    rows = []
    for mode, arrays in browser.items():
        got = np.asarray(arrays[value], dtype=np.float64)
        if got.shape != ref.shape:
            raise ValueError(f"browser[{mode!r}][{value!r}] has shape {got.shape}, Python's is {ref.shape}")
        diff = got - ref
        columns = [(f, diff[:, j]) for j, f in enumerate(findings)] + [("all findings", diff.ravel())]
        for finding, d in columns:
            d = d[np.isfinite(d)]
            if d.size == 0:
                continue
            a = np.abs(d)
            rows.append({"resize": mode, "finding": finding, "n_images": int(ref.shape[0]), "mean_diff": d.mean(),
                         "mean_abs_diff": a.mean(), "std_diff": d.std(), "p95_abs_diff": np.percentile(a, 95),
                         "max_abs_diff": a.max()})
    return pd.DataFrame(rows)


def input_study(python_inputs: Sequence[np.ndarray], browser_inputs: Mapping[str, Sequence[np.ndarray]],
                std: float) -> pd.DataFrame:
    """How far the browser's model inputs are from Python's, per resize path, in grey levels (0-255).

    ``python_inputs`` and each ``browser_inputs[mode]``: the N model inputs ``(C, S, S)`` (normalised);
    ``std``: the normalisation's standard deviation (first channel), so a difference of ``d`` in the input is
    ``d * std * 255`` grey levels. Columns: ``resize, n_images, mean_abs_grey, p99_abs_grey, max_abs_grey,
    share_pixels_off`` (share of pixels off by more than half a grey level).
    """
    ref = np.stack([np.asarray(x, dtype=np.float64)[0] for x in python_inputs])
    rows = []
    for mode, inputs in browser_inputs.items():
        got = np.stack([np.asarray(x, dtype=np.float64)[0] for x in inputs])
        if got.shape != ref.shape:
            raise ValueError(f"browser inputs for {mode!r} have shape {got.shape}, Python's {ref.shape}")
        grey = np.abs(got - ref) * std * 255.0
        rows.append({"resize": mode, "n_images": len(ref), "mean_abs_grey": grey.mean(),
                     "p99_abs_grey": np.percentile(grey, 99), "max_abs_grey": grey.max(),
                     "share_pixels_off": float((grey > 0.5).mean())})
    return pd.DataFrame(rows)


@contextlib.contextmanager
def staged_images(app_dir: str | os.PathLike, files: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    """Link (or copy) ``files`` into a temporary sub-folder of the served ``app_dir``; yields their relative URLs.

    The sub-folder is removed on exit, so no image stays next to the app.
    """
    folder = Path(tempfile.mkdtemp(prefix="_images_", dir=app_dir))
    try:
        urls = []
        for i, f in enumerate(files):
            target = folder / f"{i:04d}{Path(f).suffix.lower()}"
            try:
                target.symlink_to(Path(f).resolve())
            except OSError:
                shutil.copyfile(f, target)
            urls.append(f"{folder.name}/{target.name}")
        yield urls
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_browser_study(app_dir: str | os.PathLike, files: Sequence[str | os.PathLike],
                      modes: Sequence[str] = RESIZE_MODES, *, inputs: bool = False,
                      isolate: bool = False) -> dict[str, Any]:
    """Serve ``app_dir`` on 127.0.0.1, open it in headless Chromium, analyse ``files`` with each resize path.

    Returns ``{"results": {mode: [result dicts]}, "inputs": {mode: [(C, S, S) arrays]} (with ``inputs=True``),
    "ready": {...}, "page_load_s": s, "outside": [blocked urls], "console": [errors]}``.
    """
    from cxrbench.export.onnx.web import serve
    from cxrbench.export.web.browser import BrowserApp

    out: dict[str, Any] = {"results": {}, "inputs": {}}
    with (serve(app_dir, isolate=isolate) as server, staged_images(app_dir, files) as urls,
          BrowserApp(server.url) as app):
        for mode in modes:
            out["results"][mode] = app.analyze(urls, resize=mode, allowOod=True)
            if inputs:
                out["inputs"][mode] = [app.preprocess(u, resize=mode)["x"] for u in urls]
        out.update(ready=app.ready, page_load_s=app.page_load_s, outside=list(app.outside), console=list(app.console))
    return out

"""The browser-only app (cxrbench export-web) in headless Chromium: the same numbers as Python, nothing leaves
127.0.0.1.

Tolerance, justified. The page reproduces the Python preprocessing exactly (Pillow's antialiased resampling
re-implemented in float64 with float32 intermediates, Pillow's luma, numpy's float32 normalisation), which
``test_browser_preprocessing_equals_python`` checks to 1e-6 (observed: 0). What is left is float32 rounding
inside the kernels (WebAssembly MLAS vs PyTorch), held to the export gate of 1e-4 on the logits. The
sigmoid has slope <= 1/4, so raw probabilities may differ by 2.5e-5; Chester's Eq. 1 has slope
max(1/(2 opt), 1/(2 (1 - opt))), so each calibrated probability may differ by 2.5e-5 times that slope.
Observed differences are ~1e-7.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrbench.export.web import ORT_FILES, export_web, installed_onnxruntime_web, serve
from cxrbench.export.web.browser import BrowserApp, chromium_path
from cxrbench.export.web.study import browser_arrays, preprocessing_study, python_reference, staged_images
from cxrbench.inference.pipeline import Pipeline
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import untrained_classifier_bundle
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.preprocess import Preprocess

N_IMAGES = 20
LOGIT_TOLERANCE = 1e-4

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.realdata,
              pytest.mark.skipif(chromium_path() is None,
                                 reason="Debian's chromium is not installed (.ci/run installs it)"),
              pytest.mark.skipif(shutil.which("npm") is None and installed_onnxruntime_web() is None,
                                 reason="npm is needed once to install onnxruntime-web (install Node.js)")]


@pytest.fixture(scope="module")
def files(nih_dir):
    paths = sorted(str(p) for p in nih_dir.glob("*.png"))
    return paths[::max(1, len(paths) // N_IMAGES)][:N_IMAGES]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, files):
    """ResNet18 at 224 px (operating points at the median raw probability), a gate with its cutoff at the median
    score."""
    root = tmp_path_factory.mktemp("web")
    from cxrbench.io import read_image

    pixels = [read_image(f).pixels for f in files]
    untrained_classifier_bundle(root / "clf", images=pixels, thresholds={"Hernia": None})
    untrained_ood_bundle(root / "ood", latent_dim=16, base_channels=8, images=pixels)
    return root


@pytest.fixture(scope="module")
def app(bundles, files):
    out = export_web(bundles / "clf", bundles / "app", bundles / "ood", images=files[:2], threads=1)
    with serve(out) as server, staged_images(out, files) as urls, BrowserApp(server.url) as browser:
        browser.urls, browser.folder = urls, out
        yield browser


@pytest.fixture(scope="module")
def python(bundles, files):
    return python_reference(Pipeline.from_paths(bundles / "clf", ood=bundles / "ood"), files)


@pytest.fixture(scope="module")
def pillow_results(app):
    return app.analyze(app.urls, resize="pillow", allowOod=True)


def test_the_app_folder_is_self_contained(app):
    folder = app.folder
    for name in ("index.html", "app.js", "config.json", "models/cam.onnx", "models/ood.onnx", *ORT_FILES):
        assert (folder / name).is_file(), name
    for name in ("index.html", "app.js"):
        assert not re.search(r"(src|href)=\"https?:|fetch\(\"https?:|import\(\"https?:", (folder / name).read_text())
    assert app.ready["ort"] == "1.30.0" and app.ready["load_s"] > 0


def test_browser_probabilities_match_python_on_20_nih_images(app, bundles, python, pillow_results):
    assert len(pillow_results) == N_IMAGES
    browser = browser_arrays(pillow_results)
    config = app.page.evaluate("() => fetch('config.json').then(r => r.json())")
    opt = np.array([np.nan if v is None else v for v in config["thresholds"]])
    raw_tol = LOGIT_TOLERANCE / 4
    cal_tol = raw_tol * np.maximum(1 / (2 * opt), 1 / (2 * (1 - opt)))
    raw_diff = np.abs(browser["raw"] - python["raw"])
    cal_diff = np.abs(browser["calibrated"] - python["calibrated"])
    assert raw_diff.max() <= raw_tol, f"raw probabilities differ by up to {raw_diff.max():.3g}"
    assert np.all(cal_diff[:, :-1] <= cal_tol[:-1]), f"calibrated differ by up to {np.nanmax(cal_diff):.3g}"
    # Hernia: no operating point
    assert np.isnan(browser["calibrated"][:, -1]).all() and np.isnan(python["calibrated"][:, -1]).all()
    # the gate: 1 - SSIM computed in the graph, cutoff at the median, so both verdicts occur
    np.testing.assert_allclose(browser["ood_score"], python["ood_score"], atol=1e-4)
    cutoff = pillow_results[0]["ood"]["cutoff"]
    clear = np.abs(python["ood_score"] - cutoff) > 1e-4
    verdicts = np.array([r["in_distribution"] for r in pillow_results])
    np.testing.assert_array_equal(verdicts[clear], (python["ood_score"] <= cutoff)[clear])
    assert verdicts.any() and not verdicts.all()
    assert all(r["timings"]["classify"] > 0 for r in pillow_results)
    assert app.outside == [], f"requests to other hosts were attempted: {app.outside[:5]}"
    assert app.console == []


def test_without_override_a_rejected_image_gets_no_probabilities(app, pillow_results):
    rejected = [u for u, r in zip(app.urls, pillow_results) if not r["in_distribution"]][:1]
    result = app.analyze(rejected)[0]
    assert result["rejected"] and "probabilities" not in result and result["ood_score"] > result["ood"]["cutoff"]


def test_browser_preprocessing_equals_python(app, files):
    from cxrbench.io import read_image

    for url, path in list(zip(app.urls, files))[:2]:
        pixels = read_image(path).pixels
        got = app.preprocess(url)
        assert np.abs(got["x"] - Preprocess(size=224)(pixels)).max() <= 1e-6
        assert np.abs(got["x_ood"] - Preprocess(size=64, normalize="zero_one")(pixels)).max() <= 1e-6
        others = (Preprocess(size=96, equalize="hist"),
                  Preprocess(size=100, resample="area", normalize="imagenet", channels=3))
        for pp in others:
            got = app.preprocess(url, preprocess=pp.to_dict())
            assert np.abs(got["x"] - pp(pixels)).max() <= 1e-6, pp


def test_canvas_resizing_is_what_makes_browser_and_python_differ(app, python, pillow_results):
    """Chester Fig. 9 on 20 images: the browser's own canvas resize moves the probabilities; the exact path does not."""
    canvas = app.analyze(app.urls, resize="canvas-high", allowOod=True)
    browsers = {"pillow": browser_arrays(pillow_results), "canvas-high": browser_arrays(canvas)}
    study = preprocessing_study(python, browsers, NIH_FINDINGS)
    assert set(study["finding"]) == set(NIH_FINDINGS[:-1]) | {"all findings"}  # Hernia has no operating point
    overall = study[study["finding"] == "all findings"].set_index("resize")
    assert overall.loc["pillow", "max_abs_diff"] < 1e-4
    assert overall.loc["canvas-high", "mean_abs_diff"] > 10 * overall.loc["pillow", "mean_abs_diff"]
    assert (study["n_images"] == N_IMAGES).all()


def test_choosing_a_file_shows_14_findings_and_a_heatmap_then_a_bad_file_gives_a_message(app, files, tmp_path):
    from playwright.sync_api import expect

    page = app.page
    page.check("#allow-ood")
    page.set_input_files("#file", files[0])
    expect(page.locator("#results tbody tr")).to_have_count(14, timeout=120_000)  # (no string eval: the page's CSP)
    assert page.inner_text("#cam-title").startswith("CAM heat-map: ")
    coloured = page.evaluate("""() => {
        const d = document.getElementById('display').getContext('2d').getImageData(0, 0, 224, 224).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 2]) n++; return n; }""")
    assert coloured > 1000
    bad = tmp_path / "not_an_image.png"
    bad.write_text("definitely not a PNG\n")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#status")).to_contain_text("Cannot read not_an_image.png", timeout=60_000)
    assert app.outside == []


def test_preprocessing_study_table_by_hand():
    python = {"calibrated": np.array([[0.5, 0.2], [0.4, np.nan]])}
    browser = {"canvas": {"calibrated": np.array([[0.6, 0.2], [0.3, np.nan]])}}
    table = preprocessing_study(python, browser, ["A", "B"]).set_index("finding")
    assert table.loc["A", "mean_diff"] == pytest.approx(0.0) and table.loc["A", "max_abs_diff"] == pytest.approx(0.1)
    assert table.loc["B", "max_abs_diff"] == 0 and table.loc["all findings", "mean_abs_diff"] == pytest.approx(0.2 / 3)
    with pytest.raises(ValueError, match="shape"):
        preprocessing_study(python, {"x": {"calibrated": np.zeros((3, 2))}}, ["A", "B"])


def test_export_web_refuses_preprocessing_the_browser_cannot_reproduce(tmp_path):
    untrained_classifier_bundle(tmp_path / "clahe", preprocess=Preprocess(size=64, equalize="clahe"))
    with pytest.raises(ValueError, match="CLAHE"):
        export_web(tmp_path / "clahe", tmp_path / "app")
    assert not Path(tmp_path / "app").exists() or not os.listdir(tmp_path / "app")


def test_onnxruntime_web_is_pinned_by_the_lockfile_and_npm_is_asked_only_when_needed(tmp_path, monkeypatch):
    import json

    from cxrbench.export.web import WEB_DIR, install_onnxruntime_web, onnxruntime_web_version

    lock = json.loads((WEB_DIR / "package-lock.json").read_text())["packages"]["node_modules/onnxruntime-web"]
    assert lock["version"] == onnxruntime_web_version() and lock["integrity"].startswith("sha512-")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm is not installed"):
        install_onnxruntime_web(tmp_path / "npm")
    if installed_onnxruntime_web() is not None:  # a cached install needs no npm
        assert install_onnxruntime_web() == installed_onnxruntime_web()

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
    from cxrbench.models.published import xrv_preprocess

    cases = {"clahe": (Preprocess(size=64, equalize="clahe"), "equalize 'clahe' (CLAHE)"),
             "nearest": (Preprocess(size=64, resample="nearest"), "nearest-neighbour resampling"),
             # what `cxrbench import xrv` writes on its card: the page's resize is not skimage's
             "xrv": (xrv_preprocess(64), "torchxrayvision's skimage resize (resample 'skimage'")}
    for name, (pp, reason) in cases.items():
        bundle = untrained_classifier_bundle(tmp_path / name, preprocess=pp)
        with pytest.raises(ValueError) as caught:
            export_web(bundle, tmp_path / "app")
        message = str(caught.value)
        assert message.startswith(f"{bundle}: cannot write a browser app for this classifier: it ")
        assert reason in message
        assert "probabilities would differ from Python's" in message and "cxrbench predict" in message
        assert not Path(tmp_path / "app").exists() or not os.listdir(tmp_path / "app")
    from cxrbench.export.onnx import export_models
    from cxrbench.models.bundle import load_bundle

    exported = tmp_path / "onnx-xrv"  # an ONNX export of such a bundle is refused too, naming its folder
    # (1e-3: a seeded ResNet18 on xrv inputs, in [-1024, 1024], gives large logits: 2.4e-4 apart at most here)
    export_models(load_bundle(tmp_path / "xrv"), exported, saliency=False, threads=1, tolerance=1e-3)
    with pytest.raises(ValueError, match=f"^{re.escape(str(exported))}: cannot write a browser app for this "
                                         "classifier: it resizes with torchxrayvision's skimage resize"):
        export_web(exported, tmp_path / "app")
    # outputs the weights never trained (an imported model's card 'untrained'): the page would show them as numbers
    import dataclasses

    plain = load_bundle(untrained_classifier_bundle(tmp_path / "partial", preprocess=Preprocess(size=64)))
    partial = dataclasses.replace(plain, card=dataclasses.replace(plain.card, untrained=["Hernia", "Edema"]))
    export_models(partial, tmp_path / "onnx-partial", saliency=False, threads=1)
    for source in (partial, tmp_path / "onnx-partial"):
        where = partial.path if source is partial else source
        with pytest.raises(ValueError, match=f"^{re.escape(str(where))}: cannot write a browser app for this "
                                             "classifier: its weights never trained Hernia, Edema"):
            export_web(source, tmp_path / "app")
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


# ------------------------------------------------------------------ saliency, 16-bit PNG, the blank-image guard


def _map(result, size=224):
    import base64

    return np.frombuffer(base64.b64decode(result["map_b64"]), dtype="<f4").reshape(size, size)


def test_browser_saliency_maps_equal_onnx_runtime_and_pytorch(app, bundles):
    """The gradient graph in onnxruntime-web: the summed map and one finding's map equal Python ONNX Runtime's
    and PyTorch's ChesterSaliency within 1e-4 of the map's maximum on all but MAP_OUTSIDE_SHARE of the pixels
    (and within 1e-5 on 99 %); the export's own parity rows passed. Near-ties of a ReLU input or a max-pool window
    route one unit's gradient differently in another kernel (cxrbench.export.gradient), hence not every pixel."""
    import torch

    from cxrbench.explain import get_explainer
    from cxrbench.export.gradient import MAP_OUTSIDE_SHARE
    from cxrbench.export.onnx import make_session
    from cxrbench.models.bundle import load_bundle

    session = make_session(app.folder / "models" / "saliency.onnx", threads=1)
    model = load_bundle(bundles / "clf").model.eval()
    for url in app.urls[:2]:
        x = app.preprocess(url)["x"][None]
        for finding in ("all", 3):
            result = app.analyze([url], explain="saliency", finding=finding, returnMap=True, allowOod=True)[0]
            assert result["map_kind"] == "saliency" and result["timings"]["saliency"] > 0
            assert result["map_finding"] == ("all findings" if finding == "all" else NIH_FINDINGS[3])
            browser = _map(result)
            w = np.ones((1, 14), np.float32) if finding == "all" else np.eye(14, dtype=np.float32)[[3]]
            ort_map = session.run(["saliency"], {"x": x, "w": w})[0][0, 0]
            torch_map = get_explainer("saliency", model)(torch.from_numpy(x.copy()),
                                                         targets=None if finding == "all" else [3])[0, 0]
            assert ort_map.max() > 0 and np.isfinite(browser).all()
            for name, ref in (("ONNX Runtime", ort_map), ("PyTorch", torch_map)):
                rel = np.abs(browser - ref) / ref.max()
                print(f"\n{url} {finding}: browser vs {name}: max {rel.max():.2e}, median {np.median(rel):.1e}, "
                      f"pixels beyond 1e-4: {np.mean(rel > 1e-4):.2%}")
                assert np.mean(rel > 1e-4) <= MAP_OUTSIDE_SHARE, (url, finding, name)
                assert np.quantile(rel, 0.99) <= 1e-5, (url, finding, name)
    config = app.page.evaluate("() => fetch('config.json').then(r => r.json())")
    rows = {r["output"]: r for r in config["parity"]["rows"] if r["graph"] == "saliency"}
    assert set(rows) == {"logits", "saliency_all", "saliency_finding"} and all(r["passed"] for r in rows.values())


def test_a_16_bit_png_gives_the_8_bit_probabilities_and_a_12_bit_one_its_effective_depth(app, bundles, files, tmp_path):
    from PIL import Image as PILImage

    from cxrbench.io import read_image

    grey = np.asarray(PILImage.open(files[0]).convert("L"), dtype=np.uint16)
    paths = {16: tmp_path / "chest16.png", 12: tmp_path / "chest12.png"}
    PILImage.fromarray(grey * 257).save(paths[16])
    PILImage.fromarray(np.round(grey * 4095 / 255).astype(np.uint16)).save(paths[12])
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood")
    with staged_images(app.folder, [files[0], paths[16], paths[12]]) as urls:
        eight, sixteen, twelve = app.analyze(urls, allowOod=True)
    bits = read_image(paths[12]).meta.effective_bits  # 12, or less for a dark image (max < 1024: 10)
    assert bits < 16 and (eight["effective_bits"], sixteen["effective_bits"], twelve["effective_bits"]) == (8, 16, bits)
    assert sixteen["bit_depth"] == twelve["bit_depth"] == 16
    assert sixteen["calibrated"] == eight["calibrated"]  # v * 257 / 65535 == v / 255: the same pixels
    for path, result in ((paths[16], sixteen), (paths[12], twelve)):
        report = pipe.analyze(path, explain=None, allow_ood=True)
        raw_diff = np.abs(np.array(result["raw"]) - report.raw)
        assert raw_diff.max() <= LOGIT_TOLERANCE / 4, f"{path.name}: raw differs by {raw_diff.max():.3g}"
        np.testing.assert_allclose(result["ood_score"], report.ood.score, atol=1e-4)


def test_a_16_bit_png_keeps_its_precision_in_every_resize_mode(app, files, tmp_path):
    """The canvas-* modes resize a 16-bit PNG on float16 canvases (Chromium has them), not on its 8-bit rendering:
    on a smooth 16-bit ramp every mode stays within float16's rounding of the exact resize, where the 8-bit
    rendering of the same ramp is off by up to half an 8-bit step; and the page says how it held the image."""
    from PIL import Image as PILImage

    from cxrbench.export.web.study import RESIZE_MODES
    from cxrbench.io import read_image

    ramp = np.tile(np.round(np.linspace(0, 65535, 448)).astype(np.uint16), (448, 1))
    paths = [tmp_path / "ramp16.png", tmp_path / "ramp8.png", tmp_path / "chest16.png"]
    PILImage.fromarray(ramp).save(paths[0])
    PILImage.fromarray(np.round(ramp / 257).astype(np.uint8)).save(paths[1])
    PILImage.fromarray(np.asarray(PILImage.open(files[0]).convert("L"), dtype=np.uint16) * 257).save(paths[2])
    pp = Preprocess(size=224, normalize="zero_one")
    exact = pp(read_image(paths[0]).pixels)[0]
    interior = (slice(None), slice(4, -4))  # the canvas's black border enters the outermost columns
    with staged_images(app.folder, [*paths, files[0]]) as urls:
        for resize in RESIZE_MODES:
            sixteen, eight = (app.preprocess(u, preprocess=pp.to_dict(), resize=resize)["x"][0] for u in urls[:2])
            err16, err8 = (float(np.abs(got - exact)[interior].max()) for got in (sixteen, eight))
            # observed: pillow 0 vs 8.3e-4; both canvas modes 3.8e-4 vs 3.1e-3 (float16: 2 roundings of <= 2.4e-4)
            assert err16 <= (1e-6 if resize == "pillow" else 6e-4), (resize, err16)
            assert err8 > max(5e-4, 3 * err16), (resize, err16, err8)
            chest16, chest8 = app.analyze(urls[2:], resize=resize, allowOod=True)
            assert chest16["canvas_precision"] == (None if resize == "pillow" else "float16")
            assert (chest16["bit_depth"], chest8["bit_depth"]) == (16, 8)
            # v * 257 / 65535 == v / 255: the same image; float16 rounding moves it by <= 2.4e-4 (observed raw 4e-4)
            assert np.abs(np.array(chest16["raw"]) - chest8["raw"]).max() <= (0 if resize == "pillow" else 2e-3)
    from playwright.sync_api import expect

    page = app.page
    page.check("#allow-ood")
    page.select_option("#resize", "canvas-high")
    page.set_input_files("#file", str(paths[2]))
    expect(page.locator("#status")).to_contain_text("held this 16-bit image as float16", timeout=120_000)
    page.select_option("#resize", "pillow")


def test_the_browser_gate_runs_the_blank_image_guard_with_pythons_reasons(app, bundles, files, tmp_path):
    from PIL import Image as PILImage

    from cxrbench.io import read_image
    from cxrbench.ood.guard import image_information

    config = app.page.evaluate("() => fetch('config.json').then(r => r.json())")
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood")
    assert config["guard"]["min_bits_per_pixel"] == pytest.approx(pipe.guard.min_bits_per_pixel)
    real = read_image(files[0]).pixels
    cases = {"blank.png": np.full((256, 256), 128, np.uint8),
             "gradient.png": np.tile(np.linspace(0, 255, 256), (256, 1)).astype(np.uint8),
             "tiny.png": np.round(real[:40, :48] * 255).astype(np.uint8)}
    for name, pixels in cases.items():
        PILImage.fromarray(pixels).save(tmp_path / name)
    paths = [tmp_path / n for n in cases]
    with staged_images(app.folder, paths) as urls:
        strict = app.analyze(urls)
        allowed = app.analyze(urls, allowOod=True)
    for path, result, anyway in zip(paths, strict, allowed):
        report = pipe.analyze(path, explain=None)
        assert report.rejected and not report.ood.guard.passed
        assert result["rejected"] and "probabilities" not in result and result["ood_score"] is None
        assert result["reason"] == report.ood.reason, path.name
        assert result["guard"]["check"] == report.ood.check
        assert anyway["rejected"] == (report.ood.check == "size")  # "too small" is never overridden
        assert ("probabilities" in anyway) == (report.ood.check != "size")
    for url, path in zip(app.urls[:3], files[:3]):  # the measures themselves, on radiographs that pass
        result = app.analyze([url])[0]
        expected = image_information(read_image(path).pixels)
        assert result["guard"]["passed"]
        assert result["guard"]["measures"]["bits_per_pixel"] == expected["bits_per_pixel"]  # the same PNG size
        assert result["guard"]["measures"]["spread"] == pytest.approx(expected["spread"], abs=1e-6)
    assert app.outside == [] and app.console == []


def test_the_page_offers_saliency_and_times_it_on_two_threads(app, files):
    from playwright.sync_api import expect

    page = app.page
    page.check("#allow-ood")
    page.select_option("#explain", "saliency:all")
    page.set_input_files("#file", files[1])
    expect(page.locator("#cam-title")).to_contain_text("saliency heat-map: all findings", timeout=120_000)
    expect(page.locator("#results tbody tr")).to_have_count(14)
    page.select_option("#explain", "cam")
    expect(page.locator("#cam-title")).to_contain_text("CAM heat-map: ", timeout=120_000)
    context = app.browser.new_context()  # a second Playwright session may not start inside the first
    try:
        with serve(app.folder, isolate=True) as server:
            isolated = context.new_page()
            isolated.goto(server.url)
            ready = isolated.evaluate("() => window.cxrbenchReady")
            assert ready["threads"] >= 2  # cross-origin isolated: WebAssembly threads
            runs = isolated.evaluate(
                "async (urls) => { const out = []; for (const u of urls) out.push(await window.cxrbenchAnalyze(u,"
                " {explain: 'saliency', allowOod: true, render: false})); return out; }", app.urls[:3])
    finally:
        context.close()
    seconds = sorted(r["timings"]["saliency"] for r in runs)
    print(f"\nResNet18 224 px saliency map in Chromium, {ready['threads']} threads: median {seconds[1]:.2f} s "
          f"(first load of the graph {runs[0]['timings']['saliency_load']:.2f} s)")
    assert seconds[1] < 10.0

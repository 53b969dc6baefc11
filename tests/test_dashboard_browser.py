"""The dashboard in a real browser: Voila serving notebooks/05_dashboard.ipynb, driven by Playwright + Chromium.

Needs Debian's Chromium (/usr/bin/chromium; .ci/run installs it) and the real dev images. Screenshots
go to build/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from cxrbench.app.demo import free_port, serve
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import ModelCard, save_bundle
from cxrbench.preprocess import Preprocess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.realdata,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason="Debian's chromium is not installed (.ci/run installs it)")]


def _read64(path) -> torch.Tensor:
    from cxrbench.io import read_image

    pp = Preprocess(size=64, normalize="zero_one")
    return torch.from_numpy(pp(read_image(path).pixels))


def _classifier_card_metrics() -> dict:
    """Test metrics for the fixture's (untrained) classifier, so that the page shows reliability labels:
    Hernia rests on 2 positives and Mass's CI reaches 0.5 (both "not reliable"); macro AUC 0.62 (weak)."""
    per_finding = {f: {"auc": 0.8, "auc_ci_low": 0.7, "auc_ci_high": 0.9, "n_pos": 20} for f in NIH_FINDINGS}
    per_finding["Hernia"] = {"auc": 0.95, "auc_ci_low": 0.62, "auc_ci_high": 1.0, "n_pos": 2}
    per_finding["Mass"] = {"auc": 0.6, "auc_ci_low": 0.45, "auc_ci_high": 0.74, "n_pos": 30}
    return {"test": {"n_images": 96, "summary": {"macro_auc": 0.62}, "per_finding": per_finding}}


def _gate_card(ae, x, shared_data) -> tuple[dict, dict]:
    """The two cutoffs of the fixture's gate, fitted as :mod:`cxrbench.train.ood` fits them (near: a percentile
    of held-out in-distribution scores; far: :func:`fit_far_cutoff` with the non-chest set), and the examples:
    the non-chest image scored highest, and a paediatric CXR whose score lies between the two cutoffs."""
    from cxrbench.data import load_manifest
    from cxrbench.ood import fit_cutoff, score_batch
    from cxrbench.ood.cutoffs import fit_far_cutoff

    val = score_batch(ae, x[200:256])["ssim"]
    near = fit_cutoff(val, 95.0)
    nonchest = list(load_manifest(shared_data / "cxr" / "nonchest")["path"][:24])
    far_scores = score_batch(ae, torch.stack([_read64(p) for p in nonchest]))["ssim"]
    far, record = fit_far_cutoff(val, far_scores, near=near.threshold)
    assert far_scores.max() > far.threshold, "the trained gate should call some non-chest radiograph non-chest"
    children = list(load_manifest(shared_data / "cxr" / "pediatric")["path"][:40])
    child_scores = score_batch(ae, torch.stack([_read64(p) for p in children]))["ssim"]
    between = np.flatnonzero((child_scores > near.threshold) & (child_scores <= far.threshold))
    assert between.size, f"no paediatric CXR between the cutoffs {near.threshold:.3f} and {far.threshold:.3f}"
    ood = {"cutoff": near.to_dict(), "far_cutoff": {**far.to_dict(), **record},
           "false_rejection": {"split": "val", "n_images": len(val), "near": float(near.is_ood(val).mean()),
                               "far": float(far.is_ood(val).mean())}}
    return ood, {"nonchest": nonchest[int(np.argmax(far_scores))], "child": children[int(between[0])]}


@pytest.fixture(scope="module")
def app(shared_data, tmp_path_factory):
    """Bundles (a real, briefly trained OOD autoencoder with two cutoffs; a small classifier) and a running Voila."""
    from cxrbench.data import load_manifest
    from cxrbench.models.autoencoder import ConvAutoencoder, ae_train_step
    from cxrbench.models.classifier import build_classifier
    from cxrbench.ood import score_batch

    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    nih = load_manifest(shared_data / "cxr" / "nih")
    x = torch.stack([_read64(p) for p in nih["path"][:256]])
    ae = ConvAutoencoder(latent_dim=64, base_channels=16)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        ae_train_step(ae, opt, x[torch.randint(0, len(x), (32,), generator=g)])
    ae.eval()
    ood, examples = _gate_card(ae, x, shared_data)
    chest_scores = score_batch(ae, x[:8])["ssim"]
    accepted_example = nih["path"][int(np.argmin(chest_scores))]
    save_bundle(root / "ood", ae, ModelCard(kind="ood", builder="autoencoder",
                                            builder_kwargs={"latent_dim": 64, "base_channels": 16},
                                            preprocess=Preprocess(size=64, normalize="zero_one").to_dict(), ood=ood))
    clf = build_classifier("resnet18", 14, 1).eval()
    save_bundle(root / "clf", clf, ModelCard(
        kind="classifier", builder="classifier",
        builder_kwargs={"arch": "resnet18", "num_outputs": 14, "in_channels": 1},
        labels=list(NIH_FINDINGS), preprocess=Preprocess(size=128).to_dict(), metrics=_classifier_card_metrics(),
        operating_points={"thresholds": {f: 0.5 for f in NIH_FINDINGS}, "fitted_on": "validation"}))
    long_label = f"held-out chest X-ray: Atelectasis, Effusion, Infiltration ({Path(accepted_example).name})"
    info = {"classifier": str(root / "clf"), "ood": str(root / "ood"), "examples": {long_label: str(accepted_example)}}
    port = free_port()
    t0 = time.perf_counter()
    proc = serve(info, port=port, env={"OMP_NUM_THREADS": "2"})
    up = time.perf_counter() - t0
    yield {"url": f"http://127.0.0.1:{port}/", "chest": accepted_example, "voila_up_s": up, "root": root,
           "example_label": long_label, **examples}
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def page(app):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})

        def route(r):
            host = r.request.url.split("/")[2] if "://" in r.request.url else ""
            if host.split(":")[0] in ("127.0.0.1", "localhost") or r.request.url.startswith(("data:", "blob:")):
                r.continue_()
            else:
                outside.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        pg = context.new_page()
        t0 = time.perf_counter()
        pg.goto(app["url"], timeout=120_000)
        pg.wait_for_selector(".cxr-upload", timeout=180_000)
        pg.cold_start_s = time.perf_counter() - t0
        pg.outside = outside
        yield pg
        browser.close()


def _upload(page, path) -> float:
    t0 = time.perf_counter()
    with page.expect_file_chooser() as chooser:
        page.click(".cxr-upload")
    chooser.value.set_files(str(path))
    return t0


VERDICT = ".cxr-verdict >> text="


def _result_fits_the_window(page) -> dict:
    """The main result's box and whether anything inside it scrolls."""
    return page.evaluate("""() => {
        const box = document.querySelector('.cxr-result').getBoundingClientRect();
        const inner = [...document.querySelectorAll('.cxr-result *')].filter(
            e => e.scrollHeight > e.clientHeight + 2 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY));
        return {bottom: box.bottom + window.scrollY, right: box.right, scrolling: inner.map(e => e.className)};
    }""")


def test_chest_xray_bars_equal_the_report_then_child_grey_nonchest_and_broken_files_get_their_verdicts(
        app, page, tmp_path):
    from cxrbench.inference.pipeline import Pipeline

    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = _upload(page, app["chest"])
    page.wait_for_selector(VERDICT + "A frontal chest radiograph like the training images", timeout=120_000)
    page.wait_for_selector(".cxr-bars .plotly", timeout=60_000)
    click_to_result = time.perf_counter() - t0
    bars = page.locator(".cxr-bars g.trace.bars g.point")
    assert bars.count() == 14
    shown = page.evaluate("() => { const d = document.querySelector('.cxr-bars .js-plotly-plot')._fullData[0];"
                          " return {x: Array.from(d.x), y: Array.from(d.y)}; }")
    report = Pipeline.from_paths(app["root"] / "clf", ood=app["root"] / "ood").analyze(app["chest"], explain=None)
    expected = dict(zip(report.findings, report.calibrated))
    assert set(shown["y"]) == set(NIH_FINDINGS)
    np.testing.assert_allclose(shown["x"], [expected[f] for f in shown["y"]], atol=1e-6)
    side = page.eval_on_selector_all(".cxr-bars .annotation-text", "els => els.map(e => e.textContent)")
    assert any(t.startswith("AUC 0.95 [0.62, 1.00], 2 pos.") and "not reliable" in t for t in side)
    assert "A weak model" in page.locator(".cxr-banner").inner_text()
    assert "turns away" in page.locator(".cxr-verdict").inner_text()
    src = page.locator(".cxr-overlay").get_attribute("src")
    assert src and src.startswith(("blob:", "data:image/png"))
    assert "saliency · all findings · 128 px model input" in page.locator(".cxr-caption").inner_text()
    assert page.locator(".cxr-ood-images img").count() == 3
    assert "classifier resnet18, 128 px" in page.locator(".cxr-timing").inner_text()
    fits = _result_fits_the_window(page)
    page.screenshot(path=str(SHOTS / "dashboard_chest.png"))
    assert fits["bottom"] <= 800 and fits["right"] <= 1280 and not fits["scrolling"], fits

    page.locator(".cxr-method select").select_option("gradcam")
    page.wait_for_selector(".cxr-caption >> text=gradcam", timeout=60_000)
    assert "explanation only" in page.locator(".cxr-timing").inner_text()
    page.screenshot(path=str(SHOTS / "dashboard_gradcam.png"))
    page.locator(".cxr-about summary").click()  # the model card, folded by default
    assert "Classifier" in page.locator("details.cxr-about").inner_text()
    page.locator(".cxr-about summary").click()

    _upload(page, app["child"])
    page.wait_for_selector(VERDICT + "A chest radiograph unlike the training images", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('.cxr-bars .jp-OutputArea-output').length === 0",
                           timeout=30_000)
    page.screenshot(path=str(SHOTS / "dashboard_child.png"))
    page.locator(".cxr-override input").check()
    page.wait_for_selector(VERDICT + "Analysed anyway", timeout=120_000)
    page.wait_for_selector(".cxr-bars .plotly", timeout=60_000)
    page.screenshot(path=str(SHOTS / "dashboard_child_anyway.png"))
    page.locator(".cxr-override input").uncheck()
    page.wait_for_function("document.querySelectorAll('.cxr-bars .jp-OutputArea-output').length === 0",
                           timeout=60_000)

    _upload(page, app["nonchest"])
    page.wait_for_selector(".cxr-verdict >> text=beyond the far cutoff", timeout=120_000)
    assert page.locator(".cxr-bars img, .cxr-bars svg").count() == 0
    page.screenshot(path=str(SHOTS / "dashboard_nonchest.png"))

    page.locator(".cxr-example select").select_option(label=app["example_label"])  # whole label, findable
    page.wait_for_selector(".cxr-bars .plotly", timeout=120_000)
    assert page.evaluate("() => { const s = document.querySelector('.cxr-example select');"
                         " return s.scrollWidth <= s.clientWidth + 1 }"), "the example label is cut off"
    bad = tmp_path / "not_an_image.png"
    bad.write_text("definitely not a PNG\n" * 20)
    _upload(page, bad)
    page.wait_for_selector(VERDICT + "Not an image we can read", timeout=60_000)
    assert "not_an_image.png" in page.locator(".cxr-verdict").inner_text() and "Traceback" not in page.content()
    page.wait_for_function("document.querySelectorAll('.cxr-bars .jp-OutputArea-output').length === 0",
                           timeout=30_000)
    assert page.locator(".cxr-ood-images img").count() == 0
    assert page.locator(".cxr-timing").inner_text().strip() == "" and not page.locator(".cxr-overlay").is_visible()
    assert Path(app["chest"]).name not in page.locator(".cxr-result").inner_text()
    page.screenshot(path=str(SHOTS / "dashboard_bad_file.png"))

    assert page.outside == [], f"requests to other hosts were attempted: {page.outside[:5]}"
    timings = {"voila_up_s": round(app["voila_up_s"], 2), "cold_start_s": round(page.cold_start_s, 2),
               "click_to_result_s": round(click_to_result, 2)}
    (SHOTS / "timings.json").write_text(json.dumps(timings))
    print("dashboard timings:", timings)


def test_a_blank_grey_png_is_not_a_chest_radiograph(app, page, tmp_path):
    """The blank-image guard's verdict in the browser (a uniform grey scores *in* distribution on the
    reconstruction score alone: the guard must reject it before any score is read)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    grey = tmp_path / "grey.png"
    PILImage.fromarray(np.full((512, 512), 128, np.uint8)).save(grey)
    _upload(page, grey)
    page.wait_for_selector(VERDICT + "Not a frontal chest radiograph", timeout=120_000)
    assert "blank-image check" in page.locator(".cxr-verdict").inner_text()
    assert page.locator(".cxr-bars .jp-OutputArea-output").count() == 0
    page.screenshot(path=str(SHOTS / "dashboard_grey.png"))


def _shown_bars(page) -> dict[str, float]:
    shown = page.evaluate("() => { const d = document.querySelector('.cxr-bars .js-plotly-plot')._fullData[0];"
                          " return {x: Array.from(d.x), y: Array.from(d.y)}; }")
    return dict(zip(shown["y"], shown["x"]))


def test_a_16_bit_png_and_a_monochrome1_dicom_show_the_8_bit_pngs_bars(app, page, tmp_path):
    """The same radiograph uploaded as a 16-bit PNG and as an inverted (MONOCHROME1) 12-bit DICOM, in the browser:
    the bars equal the 8-bit PNG's Report.calibrated (exactly for the 16-bit copy; the DICOM, min-max scaled, close)."""
    from dicom_factory import make_dicom

    from cxrbench.inference.pipeline import Pipeline

    grey = np.asarray(PILImage.open(app["chest"]).convert("L"))
    sixteen = tmp_path / "chest16.png"
    PILImage.fromarray((grey.astype(np.uint32) * 257).astype(np.uint16)).save(sixteen)
    dicom = tmp_path / "chest.dcm"
    dicom.write_bytes(make_dicom(np.round((255 - grey.astype(np.float64)) * 4095 / 255).astype(np.uint16),
                                 photometric="MONOCHROME1"))
    report = Pipeline.from_paths(app["root"] / "clf", ood=app["root"] / "ood").analyze(app["chest"], explain=None)
    expected = dict(zip(report.findings, report.calibrated))
    for path, atol in ((sixteen, 1e-6), (dicom, 0.02)):
        _upload(page, path)
        page.wait_for_selector(f".cxr-timing >> text={path.name}", timeout=120_000)
        page.wait_for_selector(".cxr-bars .plotly", timeout=60_000)
        shown = _shown_bars(page)
        assert set(shown) == set(NIH_FINDINGS)
        np.testing.assert_allclose([shown[f] for f in NIH_FINDINGS], [expected[f] for f in NIH_FINDINGS], atol=atol,
                                   err_msg=path.name)

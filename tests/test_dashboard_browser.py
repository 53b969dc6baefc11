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


@pytest.fixture(scope="module")
def app(shared_data, tmp_path_factory):
    """Bundles (a real, briefly trained OOD autoencoder; a small classifier) and a running Voila."""
    from cxrbench.data import load_manifest
    from cxrbench.models.autoencoder import ConvAutoencoder, ae_train_step
    from cxrbench.models.classifier import build_classifier
    from cxrbench.ood import fit_cutoff, score_batch

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
    cutoff = fit_cutoff(score_batch(ae, x[200:256])["ssim"], 99.0)
    nonchest = load_manifest(shared_data / "cxr" / "nonchest")
    candidates = list(nonchest["path"][:12])
    scores = score_batch(ae, torch.stack([_read64(p) for p in candidates]))["ssim"]
    assert scores.max() > cutoff.threshold, "the trained gate should reject some non-chest radiograph"
    rejected_example = candidates[int(np.argmax(scores))]
    chest_scores = score_batch(ae, x[:8])["ssim"]
    accepted_example = nih["path"][int(np.argmin(chest_scores))]
    save_bundle(root / "ood", ae, ModelCard(kind="ood", builder="autoencoder",
                                            builder_kwargs={"latent_dim": 64, "base_channels": 16},
                                            preprocess=Preprocess(size=64, normalize="zero_one").to_dict(),
                                            ood={"cutoff": cutoff.to_dict()}))
    clf = build_classifier("resnet18", 14, 1).eval()
    save_bundle(root / "clf", clf, ModelCard(
        kind="classifier", builder="classifier",
        builder_kwargs={"arch": "resnet18", "num_outputs": 14, "in_channels": 1},
        labels=list(NIH_FINDINGS), preprocess=Preprocess(size=128).to_dict(),
        operating_points={"thresholds": {f: 0.5 for f in NIH_FINDINGS}, "fitted_on": "validation"}))
    info = {"classifier": str(root / "clf"), "ood": str(root / "ood"),
            "examples": {"chest X-ray example": str(accepted_example)}}
    port = free_port()
    t0 = time.perf_counter()
    proc = serve(info, port=port, env={"OMP_NUM_THREADS": "2"})
    up = time.perf_counter() - t0
    yield {"url": f"http://127.0.0.1:{port}/", "chest": accepted_example, "nonchest": rejected_example,
           "voila_up_s": up}
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def page(app):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})

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


def test_chest_xray_gives_14_bars_and_an_overlay_then_nonchest_is_rejected_then_bad_file(app, page, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = _upload(page, app["chest"])
    page.wait_for_selector(".cxr-verdict >> text=Looks like a frontal chest X-ray", timeout=120_000)
    page.wait_for_selector(".cxr-bars .plotly", timeout=60_000)
    click_to_result = time.perf_counter() - t0
    bars = page.locator(".cxr-bars g.trace.bars g.point")
    assert bars.count() == 14
    labels = page.eval_on_selector_all(".cxr-bars .yaxislayer-above text", "els => els.map(e => e.textContent)")
    assert set(labels) == set(NIH_FINDINGS)
    src = page.locator(".cxr-overlay").get_attribute("src")
    assert src and src.startswith(("blob:", "data:image/png"))
    assert page.locator(".cxr-ood-images img").count() == 3
    page.locator(".cxr-about summary").click()  # the model card, folded by default
    assert "Classifier" in page.locator("details.cxr-about").inner_text()
    page.screenshot(path=str(SHOTS / "dashboard_chest.png"), full_page=True)

    _upload(page, app["nonchest"])
    page.wait_for_selector(".cxr-rejected", timeout=120_000)
    assert "does not look like a frontal chest X-ray" in page.locator(".cxr-verdict").inner_text()
    # no output at all where the bars were: JupyterLab's plotly renderer can leave the previous chart
    # behind as a static <img class="plot-img">, which a check for live plots alone would miss
    page.wait_for_function("document.querySelectorAll('.cxr-bars .jp-OutputArea-output').length === 0",
                           timeout=30_000)
    page.screenshot(path=str(SHOTS / "dashboard_rejected.png"), full_page=True)
    assert page.locator(".cxr-bars img, .cxr-bars svg").count() == 0

    bad = tmp_path / "not_an_image.png"
    bad.write_text("definitely not a PNG\n" * 20)
    _upload(page, bad)
    page.wait_for_selector(".cxr-message >> text=Cannot read", timeout=60_000)
    message = page.locator(".cxr-message").inner_text()
    assert "not_an_image.png" in message and "Traceback" not in page.content()
    page.screenshot(path=str(SHOTS / "dashboard_bad_file.png"), full_page=True)
    # the page still works: the example picker analyses a chest X-ray again
    page.locator(".cxr-example select").select_option(label="chest X-ray example")
    page.wait_for_selector(".cxr-verdict >> text=Looks like a frontal chest X-ray", timeout=120_000)
    page.wait_for_selector(".cxr-bars .plotly", timeout=60_000)
    assert page.locator(".cxr-message").inner_text().strip() == ""

    assert page.outside == [], f"requests to other hosts were attempted: {page.outside[:5]}"
    timings = {"voila_up_s": round(app["voila_up_s"], 2), "cold_start_s": round(page.cold_start_s, 2),
               "click_to_result_s": round(click_to_result, 2)}
    (SHOTS / "timings.json").write_text(json.dumps(timings))
    print("dashboard timings:", timings)

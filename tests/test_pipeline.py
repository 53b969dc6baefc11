"""cxrbench.inference.pipeline and cxrbench.app.dashboard without a browser: gate, calibration, explanation, errors."""

from __future__ import annotations

import datetime
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from cxrbench.inference.pipeline import Pipeline, RejectedImageError
from cxrbench.io import ImageReadError
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import load_bundle, save_bundle, untrained_classifier_bundle
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.preprocess import Preprocess


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    untrained_classifier_bundle(root / "clf", preprocess=Preprocess(size=64),
                                thresholds={f: 0.2 + 0.04 * i for i, f in enumerate(NIH_FINDINGS)})
    for name, thr in (("ood_open", 10.0), ("ood_closed", -1.0)):
        untrained_ood_bundle(root / name, latent_dim=16, base_channels=8, threshold=thr)
    return root


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.round(arr * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image() -> np.ndarray:
    from cxrbench.data.synthetic import make_phantom

    return make_phantom(96, findings=["Nodule"], seed=3).image


def test_report_with_gate_probabilities_and_saliency(bundles, image):
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_open")
    r = pipe.analyze(_png(image), name="x.png", explain="saliency")
    assert not r.rejected and r.in_distribution and r.source == "x.png"
    assert r.raw.shape == (14,) and np.all((r.raw > 0) & (r.raw < 1))
    # calibrated values follow Chester Eq. 1 at each operating point
    opt = pipe.operating_points
    expected = np.where(r.raw <= opt, r.raw / (2 * opt), 1 - (1 - r.raw) / (2 * (1 - opt)))
    np.testing.assert_allclose(r.calibrated, expected, atol=1e-9)
    assert r.maps.shape == (1, 64, 64) and r.map_labels == ["all findings"] and np.isfinite(r.maps).all()
    assert r.image.shape == (64, 64) and r.ood.reconstruction.shape == (64, 64)
    assert set(r.timings) >= {"read", "ood", "classify", "explain", "total"}
    table = r.table()
    assert list(table.columns) == ["finding", "calibrated", "raw", "operating_point"]
    assert table["calibrated"].is_monotonic_decreasing
    row = r.to_row()
    assert row["in_distribution"] is True and row["error"] == "" and "Hernia_raw" in row


def test_warm_up_runs_the_whole_chain_even_through_a_closed_gate(bundles, image):
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_closed")  # rejects everything
    assert not pipe.classifier_backend.explainers
    assert pipe.warm_up() > 0
    # the explainer was built and run, not skipped by the gate
    assert "saliency" in {method for method, _ in pipe.classifier_backend.explainers}
    r = pipe.analyze(_png(image), name="x.png")
    assert r.rejected and r.raw is None  # warming up did not open the gate


def test_rejected_images_get_no_probabilities_unless_overridden(bundles, image):
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_closed")
    r = pipe.analyze(image, explain="saliency")
    assert r.rejected and r.raw is None and r.maps is None and r.ood.error.shape == (64, 64)
    assert r.table().empty and r.to_row()["error"].startswith("<array>: no prediction: it does not look like the ")
    with pytest.raises(RejectedImageError, match="not recognised as a frontal chest X-ray"):
        r.require_in_distribution()
    forced = pipe.analyze(image, explain=None, allow_ood=True)
    assert forced.overridden and forced.raw is not None and not forced.rejected


def test_per_finding_explanations_and_targets(bundles, image):
    pipe = Pipeline.from_paths(bundles / "clf")
    r = pipe.analyze(image, explain="gradcam", targets=["Effusion", "Mass"])
    assert r.ood.scorer == "" and r.ood.in_distribution  # no OOD model: only the blank-image guard ran
    assert r.map_labels == ["Effusion", "Mass"] and r.maps.shape == (2, 64, 64)
    top3 = pipe.analyze(image, explain="cam")
    assert len(top3.map_labels) == 3 and top3.map_labels[0] == top3.table()["finding"].iloc[0]
    with pytest.raises(ValueError, match="unknown findings"):
        pipe.analyze(image, explain="gradcam", targets=["Broken_Arm"])


def test_bad_inputs(bundles):
    pipe = Pipeline.from_paths(bundles / "clf")
    with pytest.raises(ImageReadError, match="notes.txt"):
        pipe.analyze(b"hello", name="notes.txt")
    with pytest.raises(ValueError, match="0-255"):
        pipe.analyze(np.full((32, 32), 200.0, np.float32))
    with pytest.raises(ValueError, match="expected an OOD bundle"):
        from cxrbench.inference.pipeline import Pipeline as P

        P(load_bundle(bundles / "clf"), ood=load_bundle(bundles / "clf"))


def test_batch_keeps_going_after_a_bad_file(bundles, image, tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(_png(image))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"nope")
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_open")
    reports, errors = pipe.analyze_batch([good, bad, good], progress=False)
    assert reports[1] is None and set(errors) == {1} and reports[0].raw is not None and reports[2] is not None


def test_dashboard_callbacks_without_a_browser(bundles, image):
    from cxrbench.app.dashboard import Dashboard, png_bytes

    dash = Dashboard(Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_open"))
    dash.upload.value = ({"name": "chest.png", "type": "image/png", "size": 1, "content": memoryview(_png(image)),
                          "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    assert dash.report is not None and dash.report.raw is not None
    assert "frontal chest radiograph" in dash.verdict.value and len(dash.ood_images.children) == 3
    assert bytes(dash.overlay.value)[:4] == b"\x89PNG" and dash.bars.outputs
    assert "application/vnd.plotly.v1+json" in dash.bars.outputs[0]["data"]
    bars = dash.figure.data[0]
    assert len(bars.y) == 14 and max(bars.x) <= 1 and bars.customdata.shape == (14, 3)
    assert "test AUC" not in bars.hovertemplate  # the card has no test metrics
    first = dash.report
    # switching method re-explains the same image for the selected finding
    dash.method.value = "gradcam"
    dash.finding.value = "Effusion"
    assert dash.report is not first and dash.report.map_labels == ["Effusion"] and not dash.message.value
    before = bytes(dash.overlay.value)
    dash.opacity.value = 0.9
    assert bytes(dash.overlay.value) != before
    # display smoothing redraws from the stored map: 0 is the raw map, more blurs it
    from cxrbench.explain.overlay import overlay

    dash.smoothing.value = 0.0
    raw = overlay(dash.report.image, dash.report.maps[0], alpha=0.9)
    assert bytes(dash.overlay.value) == png_bytes(raw)
    dash.smoothing.value = 4.0
    assert bytes(dash.overlay.value) != png_bytes(raw) and dash.report.maps is not None
    # hiding weak map values lets the image through there, and only there
    from cxrbench.explain.base import gaussian_smooth

    dash.hide_below.value = 0.5
    heat = gaussian_smooth(dash.report.maps[0], 4.0)
    assert bytes(dash.overlay.value) == png_bytes(overlay(dash.report.image, heat, alpha=0.9, threshold=0.5))
    shown = np.asarray(PILImage.open(io.BytesIO(bytes(dash.overlay.value))))
    grey = np.round(dash.report.image * 255)
    assert np.abs(shown.astype(float) - grey[..., None]).max(axis=2).min() <= 1  # some pixels are just the image
    # a bad file: its verdict, no traceback, and nothing of the previous image left
    dash.analyze_bytes("broken.dcm", b"\x00" * 200)
    assert "Not an image we can read" in dash.verdict.value and "broken.dcm" in dash.verdict.value
    assert dash.report is None and not dash.bars.outputs and not dash.timing.value


def test_dashboard_takes_16_bit_png_and_monochrome1_dicom_like_the_8_bit_png(bundles, image):
    """The same radiograph uploaded as 8-bit PNG, 16-bit PNG and inverted 12-bit DICOM gives the same result."""
    from dicom_factory import make_dicom

    from cxrbench.app.dashboard import Dashboard

    dash = Dashboard(Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_open"))
    image = image / image.max()  # a DICOM without a window is read min-max scaled
    buf = io.BytesIO()
    PILImage.fromarray(np.round(image * 65535).astype(np.uint16)).save(buf, format="PNG")
    uploads = {"chest.png": _png(image), "chest16.png": buf.getvalue(),
               "chest.dcm": make_dicom(4095 - np.round(image * 4095).astype(np.uint16), photometric="MONOCHROME1")}
    reports = {}
    for name, content in uploads.items():
        dash.analyze_bytes(name, content)
        assert not dash.message.value and "frontal chest radiograph" in dash.verdict.value, name
        reports[name] = dash.report
    assert [r.meta.bit_depth for r in reports.values()] == [8, 16, 12]
    assert reports["chest.dcm"].meta.photometric == "MONOCHROME1"
    for name in ("chest16.png", "chest.dcm"):
        np.testing.assert_allclose(reports[name].image, reports["chest.png"].image, atol=2 / 255)
        np.testing.assert_allclose(reports[name].calibrated, reports["chest.png"].calibrated, atol=0.02)


def test_dashboard_says_what_the_models_are_and_how_well_they_did(bundles, image, tmp_path):
    from cxrbench.app.dashboard import WEAK_MACRO_AUC, Dashboard, model_summary

    untrained = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_open")
    text = model_summary(untrained)
    assert "no test-set metrics" in text and "About these models" in text and "OOD gate" in text
    assert Dashboard(untrained).about.value == text
    clf = load_bundle(bundles / "clf")
    per_finding = {f: {"auc": 0.6 + 0.01 * i, "auc_ci_low": 0.5, "auc_ci_high": 0.7, "n_pos": i + 1}
                   for i, f in enumerate(NIH_FINDINGS)}
    per_finding["Edema"] = {"auc": None, "auc_ci_low": None, "auc_ci_high": None, "n_pos": 0}  # no positives
    for macro, weak in ((WEAK_MACRO_AUC - 0.01, True), (0.9, False)):
        clf.card.metrics = {"test": {"n_images": 96, "summary": {"macro_auc": macro}, "per_finding": per_finding}}
        clf.card.training = {"data": "../shared/data/cxr/nih", "n_images": 481, "split_counts": {"train": 337}}
        save_bundle(tmp_path / "rated", clf.model, clf.card)
        text = model_summary(Pipeline.from_paths(tmp_path / "rated"))
        assert f"Test macro AUC <b>{macro:.3f}</b> on 96 held-out images" in text
        assert ("A weak model" in text) == weak and "No OOD gate" in text
        assert text.count("<tr>") == 15 and "337 of 481 images" in text
        assert "Hernia</td><td style='padding:0 8px 0 0'>0.730" in text
        assert "Edema</td><td style='padding:0 8px 0 0'>n/a</td><td style='padding:0 8px 0 0'>[n/a, n/a]" in text
    # and each bar's hover gives its finding's test AUC
    dash = Dashboard(Pipeline.from_paths(tmp_path / "rated"))
    dash.analyze_bytes("chest.png", _png(image))
    bars = dash.figure.data[0]
    label = dict(zip(bars.y, np.asarray(bars.customdata)[:, 2]))
    assert "test %{customdata[2]}" in bars.hovertemplate
    assert label["Hernia"].startswith("AUC 0.73 [0.50, 0.70], 14 pos.")
    assert label["Edema"] == "AUC n/a, 0 pos. · not reliable"


def test_dashboard_rejection_message(bundles, image):
    from cxrbench.app.dashboard import Dashboard

    dash = Dashboard(Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_closed"))
    dash.analyze_bytes("hand.png", _png(image))
    rejected = "Not recognised as a chest radiograph like the training images"  # an old card: one cutoff
    assert rejected in dash.verdict.value and not dash.bars.outputs and dash.note.layout.display == "none"
    dash.override.value = True
    assert "Analysed anyway" in dash.verdict.value and dash.report.raw is not None
    assert dash.bars.outputs and dash.note.layout.display == ""
    dash.override.value = False  # back to the rejection: the bars of the same image go again
    assert rejected in dash.verdict.value and not dash.bars.outputs and dash.note.layout.display == "none"


def test_demo_bundles_are_trained_once_and_reused(tmp_path):
    """`cxrbench demo prepare` on a small phantom set: a classifier and an OOD gate, cached by fingerprint."""
    import json

    from cxrbench.app.demo import DemoSettings, prepare_demo
    from cxrbench.data.synthetic import write_phantom_set

    data = write_phantom_set(tmp_path / "ph", 30, size=64, seed=2)
    settings = DemoSettings(arch="resnet18", image_size=32, epochs=1, batch_size=8, ood_epochs=1)
    info = prepare_demo(tmp_path / "demo", data=data, settings=settings, progress=False)
    assert load_bundle(info["classifier"]).card.kind == "classifier"
    assert load_bundle(info["ood"]).card.ood["cutoff"]["scorer"] == "ssim"
    assert info["examples"] and json.loads((tmp_path / "demo" / "demo.json").read_text())["ood"] == info["ood"]
    # examples: absolute paths (Voila's kernel runs elsewhere) of images neither model trained or calibrated on
    import pandas as pd

    split = pd.read_csv(Path(info["classifier"]).parent / "split.csv", dtype=str).set_index("image_id")["split"]
    for path in info["examples"].values():
        assert Path(path).is_absolute() and Path(path).is_file()
        assert split[str(Path(path).relative_to(Path(data).resolve()))] == "test", path
    assert all(Path(info[k]).is_absolute() for k in ("classifier", "ood"))
    mtime = (tmp_path / "demo" / "demo.json").stat().st_mtime_ns
    again = prepare_demo(tmp_path / "demo", data=data, settings=settings, progress=False)
    assert again == info and (tmp_path / "demo" / "demo.json").stat().st_mtime_ns == mtime
    pipe = Pipeline.from_paths(info["classifier"], ood=info["ood"])
    assert pipe.analyze(list(info["examples"].values())[0], explain=None).ood is not None


def test_demo_counterfactual_opt_in_trains_the_autoencoder_once_and_the_dashboard_uses_it(tmp_path, monkeypatch,
                                                                                           capsys):
    """`cxrbench demo prepare --counterfactual` adds an autoencoder like the classifier to a cached demo (the
    classifier and gate are not retrained), and the demo dashboard's counterfactual panel then works."""
    import json

    from cxrbench.app.counterfactual import NO_AUTOENCODER_NOTE
    from cxrbench.app.dashboard import Dashboard, dashboard_from_environment
    from cxrbench.app.demo import DemoSettings, prepare_demo
    from cxrbench.cli import main
    from cxrbench.data.synthetic import write_phantom_set

    monkeypatch.delenv("CXRBENCH_DEMO", raising=False)
    data = write_phantom_set(tmp_path / "ph", 30, size=64, seed=2, prevalence={"Effusion": 0.5})
    settings = DemoSettings(arch="resnet18", image_size=32, epochs=1, batch_size=8, ood_epochs=1, autoencoder_epochs=1)
    plain = prepare_demo(tmp_path / "demo", data=data, settings=settings, progress=False)
    assert plain["autoencoder"] is None
    without = dashboard_from_environment(demo_info=tmp_path / "demo" / "demo.json")
    assert isinstance(without, Dashboard) and without.counterfactual.button.disabled
    assert NO_AUTOENCODER_NOTE in without.counterfactual.status.value  # says how to get one
    card_mtime = (Path(plain["classifier"]) / "card.json").stat().st_mtime_ns
    info = prepare_demo(tmp_path / "demo", data=data, settings=settings, progress=False, counterfactual=True)
    ae = load_bundle(info["autoencoder"], kind="autoencoder")
    assert ae.card.training["like"] == plain["classifier"] and info["autoencoder_seconds"] > 0
    assert (Path(plain["classifier"]) / "card.json").stat().st_mtime_ns == card_mtime  # not retrained
    assert {k: info[k] for k in ("classifier", "ood", "examples")} == {k: plain[k] for k in ("classifier", "ood",
                                                                                               "examples")}
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["autoencoder"] == info["autoencoder"]
    assert prepare_demo(tmp_path / "demo", data=data, settings=settings, progress=False, counterfactual=True) == info
    import pandas as pd

    def split(bundle: str) -> pd.Series:
        return pd.read_csv(Path(bundle).parent / "split.csv", dtype=str).set_index("image_id")["split"]

    assert split(info["autoencoder"]).equals(split(plain["classifier"]))  # the examples stay unseen by it too
    dash = dashboard_from_environment(demo_info=tmp_path / "demo" / "demo.json")  # what `make demo` serves
    assert isinstance(dash, Dashboard) and not dash.counterfactual.button.disabled
    report = dash.analyze_path(list(info["examples"].values())[0])
    assert report is not None and report.raw is not None
    dash.counterfactual.button.click()
    cf = dash.counterfactual.result
    assert cf is not None and len(dash.counterfactual.frames.children) == min(4, len(cf.frames))
    assert "Latent Shift for" in dash.counterfactual.status.value
    with pytest.raises(SystemExit):
        main(["demo", "prepare", "--help"])
    assert "--counterfactual" in capsys.readouterr().out


def test_demo_data_folder_that_is_missing_or_empty_is_named(tmp_path, monkeypatch):
    from cxrbench.app.demo import prepare_demo

    with pytest.raises(FileNotFoundError, match=r"nowhere.*--data.*does not exist"):
        prepare_demo(tmp_path / "demo", data=tmp_path / "nowhere", progress=False)
    monkeypatch.setenv("CXRBENCH_DATA", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"gone.*CXRBENCH_DATA"):
        prepare_demo(tmp_path / "demo", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=r"empty.*no image files"):
        prepare_demo(tmp_path / "demo", data=tmp_path / "empty", progress=False)
    assert not (tmp_path / "demo" / "demo.json").exists()


def test_voila_runs_local_only_and_accepts_64_mb_uploads(monkeypatch):
    """The served app's settings as Voila itself parses them: 127.0.0.1, no port hopping, our template, a
    websocket message limit that lets a large DICOM through (tornado's default is 10 MB), no remote hosts,
    idle kernels culled, and our hooks (the shutdown beacon's cookie, the loading estimate) in place."""
    from cxrbench.app.demo import dashboard_notebook, voila_command, voila_env
    from cxrbench.app.server import server_class

    env = voila_env({"classifier": "c", "ood": "o"}, {"JUPYTER_CONFIG_PATH": ""})
    for key in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "CXRBENCH_DEMO"):
        monkeypatch.setenv(key, env[key])
    app = server_class()()
    command = voila_command(8999)
    assert command[:3] == [sys.executable, "-m", "cxrbench.app.server"]
    app.initialize(command[3:])
    assert app.ip == "127.0.0.1" and app.port == 8999 and app.port_retries == 0
    assert app.voila_configuration.template == "cxrbench"
    assert Path(app.notebook_path).resolve() == dashboard_notebook().resolve()
    assert app.tornado_settings["websocket_max_message_size"] == 64 * 1024 * 1024
    assert app.tornado_settings["allow_remote_access"] is False
    cull = app.config.MappingKernelManager
    assert cull.cull_idle_timeout == 120 and cull.cull_interval == 30 and cull.cull_connected is False
    assert app.voila_configuration.prelaunch_hook is not None and app.voila_configuration.page_config_hook is not None


def test_serving_on_a_taken_port_is_one_clear_error():
    import socket

    from cxrbench.app.demo import ServeError, serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeError, match=rf"127.0.0.1:{port} is already in use.*--port N"):
            serve({"classifier": "c"}, port=port)


def test_a_port_left_in_time_wait_by_a_stopped_demo_is_free():
    """Ctrl-C, then `make demo` again at once: the old server's closed connections hold the port in
    TIME_WAIT; Voila (tornado, SO_REUSEADDR) can bind it, so the pre-check must not refuse it."""
    import socket

    from cxrbench.app.demo import check_port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado's listener, hence Voila's
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    server.close()
    check_port_free(port)


# --------------------------------------------------------------------------------------------------
# one inference path: targets, backends, explanation from a report, batched predict, the lung mask


def test_explanation_targets_are_the_reports_ranking_everywhere(bundles, image):
    from cxrbench.explain.targets import explanation_targets, finding_ranking

    pipe = Pipeline.from_paths(bundles / "clf")
    r = pipe.analyze(image, explain="cam")
    expected = explanation_targets("cam", pipe.findings, ranking=finding_ranking(r.calibrated, r.raw))
    assert r.map_labels == expected.labels == list(r.table()["finding"][:3])
    assert r.explained_outputs == [pipe.findings.index(f) for f in r.map_labels]
    summed = pipe.analyze(image, explain="saliency", targets=["Effusion", "Mass"])
    assert summed.map_labels == ["Effusion+Mass"] and summed.maps.shape == (1, 64, 64)
    assert summed.explained_outputs == [2, 4]
    assert pipe.analyze(image, explain="saliency").explained_outputs == list(range(14))


def test_without_operating_points_the_raw_probabilities_rank_the_findings(image, tmp_path):
    untrained_classifier_bundle(tmp_path / "raw", preprocess=Preprocess(size=64))
    bundle = load_bundle(tmp_path / "raw")
    bundle.card.operating_points = {}
    pipe = Pipeline(bundle)
    r = pipe.analyze(image, explain="gradcam")
    assert np.isnan(r.calibrated).all()
    by_raw = [pipe.findings[i] for i in np.argsort(-r.raw, kind="stable")]
    assert r.map_labels == by_raw[:3] and list(r.table()["finding"]) == by_raw


def test_explain_recomputes_only_the_explanation(bundles, image, monkeypatch):
    pipe = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_open")
    report = pipe.analyze(image, explain=None)
    full = pipe.analyze(image, explain="gradcam", targets="Effusion")

    def no_forward(x):
        raise AssertionError("the classifier or the gate ran again")

    monkeypatch.setattr(pipe.classifier_backend, "logits", no_forward)
    monkeypatch.setattr(pipe.gate_backend, "score", no_forward)
    again = pipe.explain(report, "gradcam", "Effusion")
    assert again.map_labels == ["Effusion"] and again.method == "gradcam" and "explain" in again.timings
    np.testing.assert_allclose(again.maps, full.maps, atol=1e-6)
    assert again.raw is report.raw and again.ood is report.ood
    assert report.maps is None and "explain" not in report.timings  # the report it was given is unchanged
    from cxrbench.explain.base import minmax_normalize

    raw_maps = pipe.explain(report, "gradcam", "Effusion", options={"normalize": None})  # the method's own values
    assert not np.allclose(raw_maps.maps, again.maps)
    np.testing.assert_allclose(minmax_normalize(raw_maps.maps), again.maps, atol=1e-5)
    closed = Pipeline.from_paths(bundles / "clf", ood=bundles / "ood_closed")
    with pytest.raises(ValueError, match="rejected by the OOD gate"):
        closed.explain(closed.analyze(image, explain=None), "cam")


def test_predict_is_batched_and_gives_the_reports_probabilities(bundles, image, tmp_path):
    from cxrbench.data.synthetic import make_phantom

    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(_png(make_phantom(80, seed=i).image))
    (tmp_path / "bad.png").write_bytes(b"nope")
    files.insert(2, tmp_path / "bad.png")
    pipe = Pipeline.from_paths(bundles / "clf")
    calls = []
    logits = pipe.classifier_backend.logits
    pipe.classifier_backend.logits = lambda x: calls.append(len(x)) or logits(x)
    table = pipe.predict(files, batch_size=2)
    assert calls == [2, 2, 1]  # five readable images in three forward passes
    assert list(table["error"] != "") == [False, False, True, False, False, False]
    for i, f in enumerate(files):
        if i == 2:
            assert np.isnan(table.loc[i, "Effusion_raw"]) and table.loc[i, "file"].endswith("bad.png")
            assert "not a recognised image format" in table.loc[i, "error"]
            continue
        r = pipe.analyze(f, explain=None)
        np.testing.assert_allclose(table.loc[i, [f"{x}_raw" for x in pipe.findings]].to_numpy(float), r.raw, atol=1e-5)
        np.testing.assert_allclose(table.loc[i, pipe.findings].to_numpy(float), r.calibrated, atol=1e-5)


class _MeanBackend:
    """A backend that is not torch: logit_f = (f + 1) * (mean input - 0.5); no explanations."""

    name = "mean"
    explain_methods = ()

    def logits(self, x):
        mean = x.float().mean(dim=(1, 2, 3)).numpy()[:, None]
        return ((np.arange(14) + 1) * (mean - 0.5)).astype(np.float32)

    def explain(self, x, method, targets=None, **options):
        raise ValueError(f"the mean backend cannot explain with {method}")


def test_any_backend_that_follows_the_protocol_serves_the_same_pipeline(bundles, image):
    from cxrbench.inference.backend import ClassifierBackend
    from cxrbench.models.bundle import Bundle

    clf = load_bundle(bundles / "clf")
    assert isinstance(_MeanBackend(), ClassifierBackend)
    pipe = Pipeline(Bundle(_MeanBackend(), clf.card, clf.path), ood=load_bundle(bundles / "ood_open"))
    r = pipe.analyze(image, explain=None)
    mean = float(pipe.model_inputs(r.image).mean())
    np.testing.assert_allclose(r.raw, 1 / (1 + np.exp(-(np.arange(14) + 1) * (mean - 0.5))), rtol=1e-5)
    np.testing.assert_allclose(r.calibrated, pipe.calibrate(r.raw))
    assert r.ood is not None and r.ood.in_distribution
    assert pipe.describe()["backend"] == "mean"
    with pytest.raises(ValueError, match="cannot explain with gradcam"):
        pipe.analyze(image, explain="gradcam")


def test_the_lung_mask_of_a_report_is_predict_lung_mask(bundles, image, tmp_path):
    import torch

    from cxrbench.models.bundle import ModelCard
    from cxrbench.models.unet import UNet, predict_lung_mask

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "base_channels": 4, "depth": 2}
    save_bundle(tmp_path / "unet", UNet(**kwargs), ModelCard(kind="segmentation", builder="unet", builder_kwargs=kwargs,
                                                            labels=["lung"], preprocess=Preprocess(size=32).to_dict()))
    unet = load_bundle(tmp_path / "unet")
    pipe = Pipeline(load_bundle(bundles / "clf"), unet=unet)
    r = pipe.analyze(image, explain=None)
    assert r.lung_mask.shape == r.image.shape == (64, 64) and r.lung_mask.dtype == bool and "segment" in r.timings
    # the report segments with a channels_last copy (faster on the CPU): the bundle's model, the reference, keeps
    # its layout (and can be saved); the probabilities agree within 1e-5, so the masks do wherever p is not 0.5
    ref_mask, ref_prob = predict_lung_mask(unet.model, unet.preprocess, r.image)
    _, prob = predict_lung_mask(pipe.segmenter, unet.preprocess, r.image)
    np.testing.assert_allclose(prob, ref_prob, rtol=0, atol=1e-5)
    undecided = np.abs(ref_prob - 0.5) <= 1e-5
    np.testing.assert_array_equal(r.lung_mask[~undecided], ref_mask[~undecided])
    first = next(m for m in pipe.segmenter.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert first.weight.is_contiguous(memory_format=torch.channels_last) and not first.weight.is_contiguous()
    assert all(p.is_contiguous() for p in unet.model.parameters())
    save_bundle(tmp_path / "unet-again", unet.model, unet.card)
    unsegmented = pipe.analyze(image, explain=None, segment=False)  # the dashboard's: it shows no mask
    assert unsegmented.lung_mask is None and "segment" not in unsegmented.timings
    np.testing.assert_array_equal(unsegmented.calibrated, r.calibrated)
    calls: list[int] = []  # the dashboard's warm-up skips the U-Net its reports skip; the default runs it
    hook = pipe.segmenter.register_forward_hook(lambda *_: calls.append(1))
    assert pipe.warm_up(explain=None, segment=False) > 0 and calls == []
    assert pipe.warm_up(explain=None) > 0 and calls == [1]
    hook.remove()
    with pytest.raises(ValueError, match="expected a segmentation bundle"):
        Pipeline(load_bundle(bundles / "clf"), unet=load_bundle(bundles / "clf"))

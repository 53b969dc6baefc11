"""``--backend auto`` (the default of predict, analyze, ood-score): ONNX Runtime where no gradients are needed,
exported on first use into the fingerprinted cache, PyTorch (with one warning) where the export fails."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest

from cxrbench.cli.main import main
from cxrbench.export import cache as export_cache
from cxrbench.export.onnx import MANIFEST, ParityError, card_fingerprint
from cxrbench.export.runtime import BackendFallbackWarning, backend_note, load_pipeline
from cxrbench.models.bundle import untrained_classifier_bundle
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.preprocess import Preprocess

pytestmark = pytest.mark.realdata

TOLERANCE = 1e-4  # the parity check's tolerance on logits (cxrbench.export.onnx.export_models)


@pytest.fixture(scope="module")
def files(nih_dir):
    return sorted(str(p) for p in nih_dir.glob("*.png"))[:3]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    untrained_classifier_bundle(root / "clf", preprocess=Preprocess(size=64))
    untrained_ood_bundle(root / "ood", latent_dim=16, base_channels=8, threshold=0.55)
    return root


@pytest.fixture(scope="module")
def torch_predictions(bundles, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "t.csv"
    assert main(["predict", "--backend", "torch", "--bundle", str(bundles / "clf"), *files, "--out", str(out),
                 "-q"]) == 0
    return pd.read_csv(out)


def _numbers(table: pd.DataFrame) -> np.ndarray:
    return table.select_dtypes("number").to_numpy()


def _predict(bundles, files, out, capsys, *extra) -> tuple[pd.DataFrame, str, str]:
    assert main(["predict", "--bundle", str(bundles / "clf"), *files, "--out", str(out), *extra]) == 0
    captured = capsys.readouterr()
    return pd.read_csv(out), captured.out, captured.err


@pytest.mark.slow
def test_auto_predicts_on_onnx_runtime_like_torch_exports_once_and_reexports_a_corrupt_entry(
        bundles, files, torch_predictions, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    table, out, err = _predict(bundles, files, tmp_path / "a.csv", capsys)
    entries = [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()
    assert err.count("exporting") == 1 and f"to ONNX in {entries[0]} (first use" in err
    assert out.rstrip().endswith("0 unreadable (ONNX Runtime)")
    assert set(table["backend"]) == {"onnxruntime"} and set(torch_predictions["backend"]) == {"torch"}
    assert list(table.columns) == list(torch_predictions.columns)
    np.testing.assert_allclose(_numbers(table), _numbers(torch_predictions), atol=TOLERANCE)
    assert not (_numbers(table) == _numbers(torch_predictions)).all()  # really another runtime's numbers

    graph = entries[0] / "classifier.onnx"
    mtime = graph.stat().st_mtime_ns
    again, _, err = _predict(bundles, files, tmp_path / "b.csv", capsys)
    assert "exporting" not in err and graph.stat().st_mtime_ns == mtime  # the cached export is reused
    pd.testing.assert_frame_equal(again, table)

    data = bytearray(graph.read_bytes())  # one flipped byte: the checksum in export.json no longer matches
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    fixed, _, err = _predict(bundles, files, tmp_path / "c.csv", capsys)
    assert err.count("exporting") == 1
    assert "not trusted: classifier.onnx does not match the checksum in export.json" in err
    weights = {"classifier": card_fingerprint(export_cache.read_card(bundles / "clf"))}
    assert export_cache.entry_problem(entries[0], ["classifier", "cam"], weights) is None  # re-exported
    pd.testing.assert_frame_equal(fixed, table)
    (entries[0] / "cam.onnx").unlink()  # a missing graph is not trusted either
    assert export_cache.entry_problem(entries[0], ["classifier", "cam"], weights) == "cam.onnx is missing"


def test_a_failing_export_falls_back_to_torch_with_one_warning(bundles, files, torch_predictions, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))

    def fails(classifier, *args, **kwargs):
        raise ParityError(f"ONNX export of {classifier.path} fails the parity check on 8 images: logits 0.1 > 1e-4")

    monkeypatch.setattr(export_cache, "export_models", fails)
    table, out, err = _predict(bundles, files, tmp_path / "p.csv", capsys, "-q")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {bundles / 'clf'}: ONNX Runtime is not used (ParityError: ONNX export of "
                        f"{bundles / 'clf'} fails the parity check on 8 images: logits 0.1 > 1e-4); running it in "
                        "PyTorch instead"]
    assert out.rstrip().endswith("(PyTorch: its ONNX export failed)") and set(table["backend"]) == {"torch"}
    pd.testing.assert_frame_equal(table, torch_predictions)
    assert not [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]  # nothing kept
    with pytest.warns(BackendFallbackWarning, match="ParityError") as record:  # the Python API warns once too
        pipe = load_pipeline(bundles / "clf", backend="auto", explain=None)
    assert len(record) == 1 and pipe.backends() == {"classifier": "torch", "gate": None}
    with pytest.raises(ParityError):  # an explicit --backend onnx does not fall back
        load_pipeline(bundles / "clf", backend="onnx")


@pytest.mark.slow
def test_analyze_runs_saliency_on_onnx_runtime_keeps_other_gradients_in_torch_and_the_gate_on_onnx_runtime(
        bundles, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXRBENCH_THREADS", "2")
    common = ["--classifier", str(bundles / "clf"), "--ood", str(bundles / "ood"), *files[:2], "--allow-ood", "-q"]
    tables = {}
    for name, extra in (("auto", []), ("torch", ["--backend", "torch"]), ("none", ["--explain", "none"]),
                        ("gradcam", ["--explain", "gradcam"])):
        assert main(["analyze", *common, *extra, "--out", str(tmp_path / name)]) == 0
        tables[name] = pd.read_csv(tmp_path / name / "analysis.csv")
        tables[name + "_summary"] = capsys.readouterr().out.strip().splitlines()[-1]
    assert tables["auto_summary"].endswith("(ONNX Runtime)")  # saliency.onnx: the report's saliency on ORT
    assert tables["gradcam_summary"].endswith("(PyTorch: gradcam needs gradients; gate on ONNX Runtime)")
    assert tables["torch_summary"].endswith("(PyTorch)") and tables["none_summary"].endswith("(ONNX Runtime)")
    assert (tables["auto"][["backend", "gate_backend"]] == "onnxruntime").all().all()
    assert (tables["gradcam"]["backend"] == "torch").all()
    assert (tables["gradcam"]["gate_backend"] == "onnxruntime").all()
    assert (tables["none"][["backend", "gate_backend"]] == "onnxruntime").all().all()
    np.testing.assert_allclose(tables["auto"]["ood_score"], tables["torch"]["ood_score"], atol=TOLERANCE)
    numbers = [c for c in tables["torch"].columns if c.endswith("_raw") or c in ("Atelectasis", "ood_score")]
    for name in ("none", "auto"):
        np.testing.assert_allclose(tables[name][numbers], tables["torch"][numbers], atol=TOLERANCE)

    pipe = load_pipeline(bundles / "clf", ood=bundles / "ood", backend="auto", explain="cam")
    assert backend_note(pipe) == " (ONNX Runtime)"
    assert pipe.classifier_backend.session.get_session_options().intra_op_num_threads == 2  # $CXRBENCH_THREADS

    for backend in ("auto", "torch"):
        assert main(["ood-score", "--bundle", str(bundles / "ood"), *files, "--backend", backend,
                     "--out", str(tmp_path / f"{backend}.csv"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "unreadable (ONNX Runtime)" in out and "unreadable (PyTorch)" in out
    auto, reference = pd.read_csv(tmp_path / "auto.csv"), pd.read_csv(tmp_path / "torch.csv")
    assert set(auto["backend"]) == {"onnxruntime"} and set(reference["backend"]) == {"torch"}
    np.testing.assert_allclose(_numbers(auto), _numbers(reference), atol=TOLERANCE)


def test_a_saliency_graph_failing_its_parity_keeps_the_forward_graphs_and_explains_in_torch_with_one_warning(
        bundles, files, tmp_path, monkeypatch, capsys):
    from cxrbench.export import gradient

    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gradient, "MAP_OUTSIDE_SHARE", -1.0)  # no map passes: the gradient graph fails its parity
    with pytest.warns(BackendFallbackWarning) as record:
        pipe = load_pipeline(bundles / "clf", backend="auto", explain="saliency", progress=True)
    assert "exporting" in capsys.readouterr().err
    (entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]
    manifest = json.loads((entry / MANIFEST).read_text())
    reason = manifest["failed_graphs"]["saliency"]
    assert reason.startswith(f"ParityError: ONNX export of {bundles / 'clf'} fails the parity check on 8 images: "
                             "saliency/saliency_all")
    assert [str(w.message) for w in record] == [
        f"{bundles / 'clf'}: ONNX Runtime is not used for saliency ({reason}); running it in PyTorch instead"]
    assert pipe.backends()["classifier"] == "torch" and backend_note(pipe) == \
        " (PyTorch: its saliency graph did not export)"
    assert not (entry / "saliency.onnx").exists() and set(manifest["graphs"]) == {"classifier", "cam"}
    report = pipe.analyze(files[0], explain="saliency", allow_ood=True)
    assert report.maps is not None and report.maps.max() == 1.0  # torch explains it

    monkeypatch.undo()  # the recorded failure is not retried: no export, the forward graphs serve the rest
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.warns(BackendFallbackWarning, match="ParityError") as record:
        load_pipeline(bundles / "clf", backend="auto", explain="saliency", progress=True)
    assert len(record) == 1 and "exporting" not in capsys.readouterr().err
    assert load_pipeline(bundles / "clf", backend="auto", explain="cam").backends()["classifier"] == "onnxruntime"
    with pytest.raises(ValueError, match="the saliency graph did not export \\(ParityError"):
        load_pipeline(bundles / "clf", backend="onnx", explain="saliency")  # --backend onnx does not fall back


def test_concurrent_first_uses_export_once_and_share_the_entry(bundles, tmp_path, monkeypatch):
    calls = []
    real = export_cache.export_gate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(export_cache, "export_gate", counted)
    results: list = []
    workers = [threading.Thread(target=lambda: results.append(export_cache.cached_export(
        None, bundles / "ood", cache_dir=tmp_path))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    weights = {"ood": card_fingerprint(export_cache.read_card(bundles / "ood"))}
    assert export_cache.entry_problem(results[0], ["ood"], weights) is None
    assert export_cache.entry_problem(results[0], ["ood"], {"ood": "0" * 64}) == \
        "exported from another card or other weights than the bundle's"
    assert export_cache.entry_problem(tmp_path / "absent", ["ood"], weights) == export_cache.NOT_EXPORTED
    assert [p.name for p in tmp_path.glob(".*")] == [".locks"]  # no temporary export folder left behind


def _unet_bundle(path):
    import torch

    from cxrbench.models.bundle import ModelCard, save_bundle
    from cxrbench.models.unet import UNet

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "base_channels": 4, "depth": 2}
    save_bundle(path, UNet(**kwargs), ModelCard(kind="segmentation", builder="unet", builder_kwargs=kwargs,
                                                labels=["lung"], preprocess=Preprocess(size=32).to_dict()))
    return path


def test_the_lung_unet_runs_on_onnx_runtime_with_torchs_masks_and_falls_back_with_one_warning(
        bundles, files, tmp_path, monkeypatch, capsys):
    from cxrbench.models.bundle import BundleError
    from cxrbench.models.unet import predict_lung_mask

    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    unet = _unet_bundle(tmp_path / "unet")
    pipe = load_pipeline(bundles / "clf", bundles / "ood", unet, backend="auto", explain=None, progress=True)
    assert pipe.backends() == {"classifier": "onnxruntime", "gate": "onnxruntime", "segmenter": "onnxruntime"}
    assert f"exporting {unet} to ONNX in " in capsys.readouterr().err and backend_note(pipe) == " (ONNX Runtime)"
    entry = next(p for p in (tmp_path / "cache" / "onnx").iterdir()
                 if (p / MANIFEST).is_file() and json.loads((p / MANIFEST).read_text()).get("kind") == "segmentation")
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["card_sha256"] == {"unet": card_fingerprint(load_pipeline(bundles / "clf", unet=unet).unet.card)}
    assert [(r["graph"], r["passed"]) for r in manifest["parity"]["rows"]] == [("unet", True)]
    reference = load_pipeline(bundles / "clf", bundles / "ood", unet, backend="torch")
    assert reference.backends()["segmenter"] == "torch"
    for f in files:
        report = pipe.analyze(f, explain=None, allow_ood=True)
        ref_mask, ref_prob = predict_lung_mask(reference.unet.model, reference.unet.preprocess, report.image)
        prob = predict_lung_mask(pipe.segmenter, pipe.unet.preprocess, report.image)[1]
        np.testing.assert_allclose(prob, ref_prob, rtol=0, atol=1e-5)
        decided = np.abs(ref_prob - 0.5) > 1e-5  # a pixel can only flip where torch's probability is that near 0.5
        np.testing.assert_array_equal(report.lung_mask[decided], ref_mask[decided])
    load_pipeline(bundles / "clf", bundles / "ood", unet, backend="auto", explain=None, progress=True)
    assert "exporting" not in capsys.readouterr().err  # the cached entries

    def fails(bundle, out, **kwargs):
        raise ParityError(f"ONNX export of {bundle.path} fails the parity check on 8 images: unet/logits 0.1 > 1e-4")

    monkeypatch.setattr(export_cache, "export_segmenter", fails)
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache2"))
    with pytest.warns(BackendFallbackWarning) as record:
        fallback = load_pipeline(bundles / "clf", unet=unet, backend="auto", explain=None)
    assert [str(w.message) for w in record] == [
        f"{unet}: ONNX Runtime is not used (ParityError: ONNX export of {unet} fails the parity check on 8 images: "
        "unet/logits 0.1 > 1e-4); running it in PyTorch instead"]
    assert fallback.backends()["segmenter"] == "torch"
    assert backend_note(fallback) == " (ONNX Runtime; lung U-Net on PyTorch)"
    assert fallback.analyze(files[0], explain=None, allow_ood=True).lung_mask is not None
    with pytest.raises(ParityError):  # an explicit --backend onnx does not fall back
        load_pipeline(bundles / "clf", unet=unet, backend="onnx", explain=None)
    with pytest.raises(BundleError, match="a 'segmentation' bundle is needed"):
        load_pipeline(bundles / "clf", unet=bundles / "ood", backend="auto", explain=None)
    from cxrbench.export.onnx import export_segmenter
    from cxrbench.models.bundle import load_bundle

    with pytest.raises(ValueError, match="expected a segmentation bundle"):
        export_segmenter(load_bundle(bundles / "clf"), tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()

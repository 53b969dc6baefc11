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

"""cxrbench.export.onnx and cxrbench.export.runtime: graphs, card metadata, parity gate, the same Report on
ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cxrbench.cli.main import main
from cxrbench.evaluation.calibration import calibrate
from cxrbench.export.onnx import CalibratedClassifier, ParityError, export_models, parity_check, read_onnx_card
from cxrbench.export.runtime import (
    OnnxClassifier,
    OnnxOODModel,
    load_export,
    load_pipeline,
    make_session,
    pipeline_from_export,
)
from cxrbench.inference.pipeline import Pipeline
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import Bundle, ModelCard, load_bundle, untrained_classifier_bundle
from cxrbench.models.classifier import ResNet18, build_classifier
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.preprocess import Preprocess

pytestmark = pytest.mark.realdata

CLF_ARGS = {"arch": "resnet18", "num_outputs": 14, "in_channels": 1}
THRESHOLDS = {f: (None if f == "Hernia" else 0.25 + 0.03 * i) for i, f in enumerate(NIH_FINDINGS)}



def _card(**kw) -> ModelCard:
    return ModelCard(kind="classifier", builder="classifier", builder_kwargs=CLF_ARGS, labels=list(NIH_FINDINGS),
                     preprocess=Preprocess(size=64).to_dict(),
                     operating_points={"thresholds": THRESHOLDS, "fitted_on": "validation"}, **kw)


@pytest.fixture(scope="module")
def files(nih_dir):
    return sorted(str(p) for p in nih_dir.glob("*.png"))[:6]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, files):
    """Bundles (ResNet18 at 64 px, a small autoencoder gate) exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    untrained_classifier_bundle(root / "clf", preprocess=Preprocess(size=64), thresholds=THRESHOLDS)
    untrained_ood_bundle(root / "ood", latent_dim=16, base_channels=8, threshold=0.55)
    code = main(["export", "--bundle", str(root / "clf"), "--ood", str(root / "ood"), "--out", str(root / "onnx"),
                 "--images", *files[:3], "--threads", "1"])
    assert code == 0
    return root


def test_export_writes_four_graphs_with_the_card_and_a_passing_parity_table(exported):
    import onnx

    out = exported / "onnx"
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["graphs"]) == {"classifier", "cam", "ood", "saliency"} and manifest["opset"] >= 17
    cards = {"classifier": load_bundle(exported / "clf").card, "ood": load_bundle(exported / "ood").card}
    for graph in ("classifier", "cam", "ood"):
        stored, kind = read_onnx_card(out / f"{graph}.onnx")
        assert kind == graph
        assert stored == cards["ood" if graph == "ood" else "classifier"]
        proto = onnx.load(str(out / f"{graph}.onnx"))
        assert proto.opset_import[0].version >= 17
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    stored, kind = read_onnx_card(out / "saliency.onnx")  # forward + input gradient, batch 1, logit weights w
    proto = onnx.load(str(out / "saliency.onnx"))
    assert kind == "saliency" and stored == cards["classifier"] and [i.name for i in proto.graph.input] == ["x", "w"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "calibrated", "saliency"]
    assert not {n.op_type for n in proto.graph.node} & {"MaxPoolGrad", "ConvGrad", "ReluGrad"}  # forward ops only
    parity = pd.read_csv(out / "parity.csv")
    assert parity["passed"].all() and len(parity) == 17
    maps = parity[parity["output"].str.startswith("saliency_")]
    assert len(maps) == 2 and (maps["outside_tolerance"] <= 0.005).all() and (maps["mean_abs_diff"] < 1e-5).all()
    logits = parity[parity["output"] == "logits"]
    assert (logits["max_abs_diff"] <= 1e-4).all() and (logits["tolerance"] == 1e-4).all()
    assert manifest["parity"]["source"] == "given images" and manifest["parity"]["images"] == 3
    assert manifest["thresholds"][-1] is None and manifest["labels"] == list(NIH_FINDINGS)


def test_graphs_run_at_any_batch_size_and_calibrate_like_chester_eq1(exported):
    session = make_session(exported / "onnx" / "classifier.onnx", threads=1)
    model = load_bundle(exported / "clf").model
    ops = np.array([np.nan if v is None else v for v in THRESHOLDS.values()])
    for batch in (1, 5):
        x = torch.randn(batch, 1, 64, 64)
        logits, p, cal = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)
        np.testing.assert_allclose(cal, calibrate(p.astype(np.float64), ops), atol=1e-6)  # NaN where no operating point
        assert np.isnan(cal[:, -1]).all() and np.isfinite(cal[:, :-1]).all()


def test_in_graph_calibration_handles_operating_points_at_0_and_1():
    model = build_classifier(**CLF_ARGS).eval()
    ops = np.array([0.0, 1.0, np.nan, 0.5, 1e-3, 0.999, *[0.3] * 8])
    graph = CalibratedClassifier(model, ops)
    p = torch.rand(64, 14, dtype=torch.float64)
    p[:4] = torch.tensor([0.0, 1.0, 0.5, 1e-3])[:, None]
    q = p.float()
    with torch.no_grad():
        got = torch.where(q <= graph.opt, q * graph.low, 1 - (1 - q) * graph.high).clamp(0, 1) + graph.nan
    np.testing.assert_allclose(got.numpy(), calibrate(p.float().double().numpy(), ops), atol=2e-6)


def test_onnx_backend_gives_the_same_report_as_torch(exported, files):
    torch_pipe = Pipeline.from_paths(exported / "clf", ood=exported / "ood")
    onnx_pipe = pipeline_from_export(exported / "onnx", threads=1)
    # the same Pipeline, with the exported graphs as its backends
    assert type(onnx_pipe) is Pipeline and onnx_pipe.describe()["backend"] == "onnxruntime"
    assert isinstance(onnx_pipe.classifier_backend, OnnxClassifier) and isinstance(onnx_pipe.gate_backend, OnnxOODModel)
    assert onnx_pipe.warm_up() > 0  # the default warm-up method (saliency) runs on saliency.onnx
    gate_verdicts = set()
    for f in files:
        a = torch_pipe.analyze(f, explain="cam", allow_ood=True)
        b = onnx_pipe.analyze(f, explain="cam", allow_ood=True)
        np.testing.assert_allclose(b.raw, a.raw, atol=1e-4)
        np.testing.assert_allclose(b.calibrated, a.calibrated, atol=1e-4)  # NaN for Hernia in both
        assert b.ood.scorer == a.ood.scorer and b.ood.in_distribution == a.ood.in_distribution
        for name in ("l1", "l2", "ssim", "latent"):
            assert abs(b.ood.scores[name] - a.ood.scores[name]) < 1e-5
        np.testing.assert_allclose(b.ood.reconstruction, a.ood.reconstruction, atol=1e-5)
        assert b.map_labels == a.map_labels and b.maps.shape == a.maps.shape == (3, 64, 64)
        np.testing.assert_allclose(b.maps, a.maps, atol=1e-4)
        np.testing.assert_array_equal(b.image, a.image)
        gate_verdicts.add(a.ood.in_distribution)
    rejected = onnx_pipe.analyze(files[0], explain=None)
    assert rejected.rejected == (not rejected.ood.in_distribution)
    with pytest.raises(ValueError, match="'gradcam' needs gradients without a graph: use the torch backend"):
        onnx_pipe.analyze(files[0], explain="gradcam", allow_ood=True)


def _same_map(got, ref):
    """The saliency graph's map rule (:func:`cxrbench.export.gradient.saliency_parity`): at most
    MAP_OUTSIDE_SHARE of the pixels further than 1e-4 of the map's maximum from PyTorch's."""
    from cxrbench.export.gradient import MAP_OUTSIDE_SHARE

    assert got.shape == ref.shape and np.isfinite(got).all()
    diff = np.abs(got.astype(np.float64) - ref) / max(float(np.abs(ref).max()), 1e-12)
    assert np.mean(diff > 1e-4) <= MAP_OUTSIDE_SHARE, np.mean(diff > 1e-4)


def test_onnx_runtime_saliency_gives_torchs_report_from_one_run_per_image(exported, files, monkeypatch):
    """saliency.onnx in the pipeline: the same probabilities and maps as the torch Pipeline (summed, one finding,
    per finding), the logits and the summed map of a report from one ONNX Runtime run."""
    torch_pipe = Pipeline.from_paths(exported / "clf", ood=exported / "ood")
    onnx_pipe = pipeline_from_export(exported / "onnx", threads=1)
    backend = onnx_pipe.classifier_backend
    assert backend.explain_methods == ("cam", "saliency", "saliency_per_finding")
    runs: list[np.ndarray] = []
    graph = backend.saliency("saliency", normalize="minmax").graph
    real = graph.gradient
    monkeypatch.setattr(graph, "gradient", lambda x, w: runs.append(w) or real(x, w))
    monkeypatch.setattr(backend, "outputs", lambda x: pytest.fail("classifier.onnx ran: not one pass"))
    for f in files[:4]:
        a = torch_pipe.analyze(f, explain="saliency", allow_ood=True)
        runs.clear()
        b = onnx_pipe.analyze(f, explain="saliency", allow_ood=True)
        assert len(runs) == 1 and (runs[0] == 1).all()  # logits and map from one run, every finding weighted 1
        np.testing.assert_allclose(b.raw, a.raw, atol=1e-5)
        np.testing.assert_allclose(b.calibrated, a.calibrated, atol=1e-5)  # NaN for Hernia in both
        assert b.map_labels == a.map_labels == ["all findings"] and b.maps.shape == (1, 64, 64)
        _same_map(b.maps, a.maps)
        assert b.maps.min() == 0.0 and b.maps.max() == 1.0  # min-max normalised as the torch explainer's
        one = onnx_pipe.explain(b, "saliency", "Effusion")  # one finding: a one-hot weight
        assert one.map_labels == ["Effusion"] and (runs[-1] == np.eye(14)[NIH_FINDINGS.index("Effusion")]).all()
        _same_map(one.maps, torch_pipe.explain(a, "saliency", "Effusion").maps)
        assert np.abs(one.maps - b.maps).max() > 0.1  # really another map than the summed one
        each = onnx_pipe.analyze(f, explain="saliency_per_finding", targets=["Mass", "Effusion"], allow_ood=True)
        ref = torch_pipe.analyze(f, explain="saliency_per_finding", targets=["Mass", "Effusion"], allow_ood=True)
        assert each.map_labels == ref.map_labels == ["Mass", "Effusion"]
        _same_map(each.maps, ref.maps)
    x = torch_pipe.model_inputs(np.stack([torch_pipe.analyze(f, explain=None).image for f in files[:3]]))
    per_image = [[0, 0, 3], [1, 2, 2], [5, 6, 7]]  # a batch, per-image targets, one output chosen twice
    reference = torch_pipe.classifier_backend.explain(x, "saliency", per_image)
    _same_map(backend.explain(x, "saliency", per_image), reference)
    with pytest.raises(ValueError, match=r"takes one image of shape \(1, 1, 64, 64\), got \(1, 1, 32, 32\)"):
        backend.explain(torch.zeros(1, 1, 32, 32), "saliency")


def test_cli_predict_and_analyze_with_backend_onnx_match_torch(exported, files, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["predict", "--backend", "torch", "--bundle", str(exported / "clf"), *files[:3],
                 "--out", str(tmp_path / "t.csv"), "-q"]) == 0
    # a bundle folder is exported once into the cache; the export folder is used as it is
    for bundle in (exported / "clf", exported / "onnx"):
        assert main(["predict", "--backend", "onnx", "--bundle", str(bundle), *files[:3],
                     "--out", str(tmp_path / "o.csv"), "-q"]) == 0
        a, b = pd.read_csv(tmp_path / "t.csv"), pd.read_csv(tmp_path / "o.csv")
        assert list(a.columns) == list(b.columns) and list(a["file"]) == list(b["file"])
        num = a.select_dtypes("number").columns
        np.testing.assert_allclose(b[num].to_numpy(), a[num].to_numpy(), atol=1e-4)
    assert len([p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]) == 1
    assert main(["analyze", "--backend", "onnx", "--classifier", str(exported / "onnx"), *files[:2],
                 "--allow-ood", "--out", str(tmp_path / "an"), "-q"]) == 0
    table = pd.read_csv(tmp_path / "an" / "analysis.csv")
    assert len(table) == 2 and table["Atelectasis_raw"].notna().all()
    assert len(list((tmp_path / "an" / "overlays").glob("*.png"))) == 2  # CAM overlays


class _TracedDiffers(ResNet18):
    """Adds 1e-3 to the logits only while being traced: the exported graph disagrees with PyTorch."""

    def forward(self, x):
        out = super().forward(x)
        return out + 1e-3 if torch.jit.is_tracing() else out


def test_a_graph_that_disagrees_with_pytorch_fails_the_export_and_leaves_nothing(exported, files, tmp_path):
    torch.manual_seed(0)
    model = _TracedDiffers(num_outputs=14, in_channels=1).eval()
    bundle = Bundle(model, _card(), exported / "clf")
    with pytest.raises(ParityError, match=r"classifier/logits: max \|diff\| 0.001"):
        export_models(bundle, tmp_path / "bad", images=files[:2], threads=1, saliency=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))
    # the parity table itself says which outputs disagree
    good = load_bundle(exported / "clf")
    with torch.no_grad():
        good.model.fc.bias += 1e-2
    table = parity_check(exported / "onnx", good, images=files[:2], threads=1)
    failed = set(table.loc[~table["passed"], "output"])
    assert {"logits", "probabilities"} <= failed and "cam" not in failed  # CAM leaves the bias out


def test_a_wrong_gradient_graph_fails_the_saliency_parity(exported, files, tmp_path):
    """saliency.onnx with one transposed convolution's output 1 % off (a decomposition bug) fails its parity rows."""
    import onnx
    from onnx import helper, numpy_helper

    from cxrbench.export.gradient import saliency_parity
    from cxrbench.io import read_image

    proto = onnx.load(str(exported / "onnx" / "saliency.onnx"))
    index, node = next((i, n) for i, n in enumerate(proto.graph.node) if n.op_type == "ConvTranspose")
    out = node.output[0]
    node.output[0] = f"{out}_exact"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1.01, np.float32), "one_percent_more"))
    proto.graph.node.insert(index + 1, helper.make_node("Mul", [f"{out}_exact", "one_percent_more"], [out]))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    good = load_bundle(exported / "clf")
    x = torch.from_numpy(np.stack([good.preprocess(read_image(f).pixels) for f in files[:2]]))
    session = make_session(tmp_path / "bad.onnx", threads=1)
    rows = {r["output"]: r for r in saliency_parity(session, good.model.eval(), x, tolerance=1e-4)}
    assert rows["logits"]["passed"] and not rows["saliency_all"]["passed"] and not rows["saliency_finding"]["passed"]
    assert rows["saliency_all"]["outside_tolerance"] > 0.05


def test_errors_name_what_is_wrong(exported, tmp_path):
    import onnx

    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(exported / "onnx" / "ood.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match="not a cxrbench export"):
        read_onnx_card(foreign)
    with pytest.raises(ValueError, match="not a cxrbench ONNX export"):
        load_export(exported / "clf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a cxrbench ONNX export; choose"):
        export_models(load_bundle(exported / "clf"), tmp_path / "busy")
    with pytest.raises(ValueError, match="expected a classifier bundle"):
        export_models(load_bundle(exported / "ood"), tmp_path / "x")
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_pipeline(exported / "onnx", backend="onnx", device="cuda")

"""Published weights as bundles (``cxrbench import xrv`` / ``import chexnet`` / ``calibrate``), and the masking of
the outputs such weights never trained, on seeded ``weights=None`` torchxrayvision models and real images.

Parity is against torchxrayvision's own forward on torchxrayvision's own preprocessing
(``xrv.utils.normalize`` + ``XRayCenterCrop`` + ``XRayResizer``), while cxrbench reads the PNG and applies the
card's :class:`~cxrbench.preprocess.Preprocess`: the whole chain is compared, not just the weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from seeded_xrv import CHEX, CHEX_UNTRAINED, fit_batchnorm, xrv_input
from seeded_xrv import seeded_densenet as make_seeded_densenet

from cxrbench.cli.main import main
from cxrbench.inference.pipeline import UNTRAINED_NOTE, Pipeline
from cxrbench.io import read_image
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import load_bundle
from cxrbench.models.published import import_chexnet, import_xrv, xrv_spec
from cxrbench.models.weights import PickledCheckpointError, WeightsUnavailableError

xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision (the dev extra) is not installed")

TOL = 1e-5


@pytest.fixture(scope="module")
def images(nih_dir) -> list[Path]:
    return sorted(nih_dir.glob("*.png"))[:3]


@pytest.fixture(scope="module")
def seeded_densenet(images) -> torch.nn.Module:
    return make_seeded_densenet(images)


@pytest.fixture(scope="module")
def chex_bundle(seeded_densenet, tmp_path_factory) -> Path:
    """The seeded DenseNet saved as a state dict (as ``torch.save(model.state_dict(), ...)`` would) and imported
    as torchxrayvision's CheXpert weight set."""
    root = tmp_path_factory.mktemp("xrv")
    torch.save(seeded_densenet.state_dict(), root / "state.pt")
    return import_xrv(CHEX, root / "chex", weights=root / "state.pt")


def _trained_columns(name: str) -> tuple[list[int], list[int]]:
    """(xrv output index, cxrbench output index) of each NIH finding the weight set trains."""
    labels = xrv_spec(name)["labels"]
    pairs = [(labels.index(f), i) for i, f in enumerate(NIH_FINDINGS) if f in labels]
    return [a for a, _ in pairs], [b for _, b in pairs]


def test_densenet_import_matches_xrv_forward_logits_and_calibrated(seeded_densenet, chex_bundle, images) -> None:
    pipe = Pipeline.from_paths(chex_bundle)
    xi, ci = _trained_columns(CHEX)
    ref = xrv.models.DenseNet(weights=None)
    ref.load_state_dict(seeded_densenet.state_dict())
    ref.op_threshs = torch.tensor(xrv_spec(CHEX)["op_threshs"], dtype=torch.float32)  # as xrv sets it for CHEX
    ref.eval()
    for path in images:
        x_xrv = xrv_input(path, 224)
        x_cxr = pipe.model_inputs(pipe.classifier.preprocess.geometry(read_image(path).pixels))
        assert float((x_xrv - x_cxr).abs().max()) < 1e-3  # [-1024, 1024] scale: float rounding only
        with torch.no_grad():
            logits_xrv = seeded_densenet(x_xrv)[0].numpy()
            logits_cxr = pipe.classifier.model(x_cxr)[0].numpy()
            calibrated_xrv = ref(x_xrv)[0].numpy()
        assert np.abs(logits_xrv).max() > 0.05  # not a degenerate model
        np.testing.assert_allclose(logits_cxr[ci], logits_xrv[xi], atol=TOL, rtol=0)
        report = pipe.analyze(path, explain=None)
        np.testing.assert_allclose(report.raw[ci], 1 / (1 + np.exp(-logits_xrv[xi].astype(np.float64))), atol=TOL)
        with_op = [k for k, j in enumerate(xi) if not math.isnan(xrv_spec(CHEX)["op_threshs"][j])]
        np.testing.assert_allclose(report.calibrated[np.array(ci)[with_op]], calibrated_xrv[np.array(xi)[with_op]],
                                   atol=TOL)
        # xrv answers exactly 0.5 where the weights never trained; cxrbench shows nothing there
        untrained = [NIH_FINDINGS.index(f) for f in CHEX_UNTRAINED]
        assert np.isnan(report.raw[untrained]).all() and np.isnan(report.calibrated[untrained]).all()


@pytest.mark.slow
def test_resnet50_import_matches_xrv_forward_at_512(tmp_path, images) -> None:
    torch.manual_seed(1)
    net = torchvision.models.resnet50(num_classes=18, weights=None)  # exactly what xrv.models.ResNet builds
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    x = xrv_input(images[0], 512)
    fit_batchnorm(net, x)
    torch.save(net.state_dict(), tmp_path / "resnet50.pt")  # torchxrayvision's ResNet file is such a state dict
    bundle = load_bundle(import_xrv("resnet50-res512-all", tmp_path / "b", weights=tmp_path / "resnet50.pt"))
    assert bundle.preprocess.size == 512 and bundle.card.untrained == []
    assert bundle.card.source["dropped_outputs"] == ["Lung Lesion", "Fracture", "Lung Opacity",
                                                     "Enlarged Cardiomediastinum"]
    xi, ci = _trained_columns("resnet50-res512-all")
    with torch.no_grad():
        ref = net(x)[0].numpy()
        got = bundle.model(torch.from_numpy(bundle.preprocess(read_image(images[0]).pixels))[None])[0].numpy()
    np.testing.assert_allclose(got[ci], ref[xi], atol=TOL, rtol=0)


def test_card_records_source_preprocessing_mapping_and_published_operating_points(chex_bundle) -> None:
    card = load_bundle(chex_bundle).card
    assert card.untrained == CHEX_UNTRAINED
    assert card.preprocess == {"size": 224, "crop": "center", "resample": "skimage", "equalize": "none",
                               "clahe_clip": 0.01, "normalize": "xrv", "channels": 1}
    assert "Apache-2.0" in card.source["licence"] and "TorchXRayVision" in card.source["citation"]
    assert card.source["label_mapping"]["Atelectasis"] == 0 and card.source["label_mapping"]["Mass"] is None
    ops = card.operating_points["thresholds"]
    assert ops["Atelectasis"] == pytest.approx(xrv_spec(CHEX)["op_threshs"][0])
    assert all(ops[f] is None for f in CHEX_UNTRAINED)
    head = load_bundle(chex_bundle).model.classifier
    assert float(head.weight.detach()[[NIH_FINDINGS.index(f) for f in CHEX_UNTRAINED]].abs().sum()) == 0.0


def test_chexnet_state_dict_with_old_names_and_module_prefix_converts_with_parity(tmp_path, images) -> None:
    torch.manual_seed(2)
    net = torchvision.models.densenet121(weights=None)
    net.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())  # arnoweng's head
    fit_batchnorm(net, torch.randn(2, 3, 224, 224))
    old = {}
    for k, v in net.state_dict().items():  # pre-0.4 names: norm1 -> norm.1, and DataParallel's module.densenet121.
        for new, was in (("norm1.", "norm.1."), ("norm2.", "norm.2."), ("conv1.", "conv.1."), ("conv2.", "conv.2."),
                         ("relu1.", "relu.1."), ("relu2.", "relu.2.")):
            k = k.replace(new, was) if "denselayer" in k else k
        old[f"module.densenet121.{k}"] = v
    assert any(".norm.1." in k for k in old)
    torch.save({"state_dict": old, "epoch": 7}, tmp_path / "model.pth.tar")
    bundle = load_bundle(import_chexnet(tmp_path / "model.pth.tar", tmp_path / "b"))
    assert bundle.card.operating_points == {} and bundle.preprocess.channels == 3
    x = torch.from_numpy(bundle.preprocess(read_image(images[0]).pixels))[None]
    with torch.no_grad():
        np.testing.assert_allclose(torch.sigmoid(bundle.model(x)).numpy(), net(x).numpy(), atol=TOL, rtol=0)


def test_pickled_whole_model_is_refused_with_how_to_save_a_state_dict(tmp_path, seeded_densenet, capsys) -> None:
    torch.save(seeded_densenet, tmp_path / "whole.pt")
    for call in (lambda: import_xrv(CHEX, tmp_path / "a", weights=tmp_path / "whole.pt"),
                 lambda: import_chexnet(tmp_path / "whole.pt", tmp_path / "a")):
        with pytest.raises(PickledCheckpointError, match=r"whole\.pt.*torch\.save\(model\.state_dict\(\)"):
            call()
    assert not (tmp_path / "a").exists()
    rc = main(["import", "xrv", CHEX, "--weights", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "never unpickles" in err and "weights_only=False" in err
    with pytest.raises(WeightsUnavailableError, match="--allow-download"):
        import_xrv(CHEX, tmp_path / "a")  # no file, no permission to download


def test_predict_csv_leaves_untrained_outputs_empty_with_a_note(chex_bundle, images, tmp_path) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", "--bundle", str(chex_bundle), *map(str, images[:2]), "--out", str(out), "-q"]) == 0
    table = pd.read_csv(out)
    for f in CHEX_UNTRAINED:
        assert table[f].isna().all() and table[f"{f}_raw"].isna().all()
    assert table["Atelectasis"].notna().all() and (table["Atelectasis_raw"] != 0.5).all()
    assert table["note"].str.contains("not trained by this model").all()


def test_dashboard_explain_and_report_mask_untrained_findings(chex_bundle, images) -> None:
    from cxrbench.app.dashboard import Dashboard, model_summary

    dash = Dashboard(Pipeline.from_paths(chex_bundle))
    report = dash.analyze_path(images[0])
    assert report is not None and report.raw is not None
    assert not set(CHEX_UNTRAINED) & set(dash.finding.options)
    shown = {a.y: a.text for a in dash.figure.layout.annotations if "not trained" in (a.text or "")}
    assert set(shown) == set(CHEX_UNTRAINED)
    bars = dict(zip(dash.figure.data[0].y, dash.figure.data[0].x))
    assert all(math.isnan(bars[f]) for f in CHEX_UNTRAINED) and not math.isnan(bars["Effusion"])
    assert "Not trained by this model" in model_summary(dash.pipeline) and "Apache-2.0" in model_summary(dash.pipeline)
    row = report.to_row()  # the `cxrbench analyze` CSV row
    assert math.isnan(row["Mass"]) and math.isnan(row["Mass_raw"]) and "Mass" in row["note"]
    table = report.table()
    assert (table.set_index("finding").loc[CHEX_UNTRAINED, "note"] == UNTRAINED_NOTE).all()
    assert table["finding"].tolist()[-7:] == sorted(CHEX_UNTRAINED, key=table["finding"].tolist().index)
    with pytest.raises(ValueError, match="Mass: not trained by this model"):
        dash.pipeline.explain(report, "gradcam", "Mass")
    summed = dash.pipeline.explain(report, "saliency")
    assert summed.map_labels == ["all findings"] and not set(summed.explained_outputs) & {
        NIH_FINDINGS.index(f) for f in CHEX_UNTRAINED}
    top = dash.pipeline.explain(report, "gradcam", top=10)
    assert not set(top.map_labels) & set(CHEX_UNTRAINED) and len(top.map_labels) == 7


@pytest.mark.slow
def test_calibrate_refits_on_validation_keeps_published_and_evaluate_skips_untrained(
        chex_bundle, nih_dir, tmp_path, capsys) -> None:
    import shutil

    manifest = pd.read_csv(nih_dir / "manifest.csv").head(20)  # a small labelled "validation split"
    val = tmp_path / "val"
    val.mkdir()
    for name in manifest["file"]:
        os.symlink(nih_dir / name, val / name)
    manifest.to_csv(val / "manifest.csv", index=False)
    bundle = tmp_path / "b"
    shutil.copytree(chex_bundle, bundle)
    assert main(["calibrate", str(bundle), "--data", str(val), "-q"]) == 0
    assert "not trained by this model" in capsys.readouterr().out
    card = load_bundle(bundle).card
    ops = card.operating_points
    assert ops["method"] == "youden" and ops["n_images"] == 20
    assert ops["published"]["thresholds"]["Atelectasis"] == pytest.approx(xrv_spec(CHEX)["op_threshs"][0])
    assert ops["thresholds"]["Atelectasis"] != ops["published"]["thresholds"]["Atelectasis"]
    assert all(ops["thresholds"][f] is None for f in CHEX_UNTRAINED)
    pipe = Pipeline.from_paths(bundle)  # the refitted points are the ones used
    assert pipe.operating_points[0] == pytest.approx(ops["thresholds"]["Atelectasis"])
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(val), "--out", str(tmp_path / "e"),
                 "--bootstrap", "10", "-q"]) in (0, 1)
    out = capsys.readouterr().out
    assert "not evaluated, not trained by this model: " + ", ".join(CHEX_UNTRAINED) in out
    evaluated = pd.read_csv(tmp_path / "e" / "evaluation.csv")["finding"].tolist()
    assert evaluated == [f for f in NIH_FINDINGS if f not in CHEX_UNTRAINED]


@pytest.mark.slow
def test_onnx_export_of_imported_bundle_keeps_parity_and_the_mask(chex_bundle, images, tmp_path) -> None:
    from cxrbench.export.onnx import export_models
    from cxrbench.export.runtime import load_pipeline

    result = export_models(load_bundle(chex_bundle), tmp_path / "onnx", images=[str(p) for p in images[:2]],
                           saliency=False)  # the forward graphs are under test (the gradient graph has its own tests)
    assert result is not None
    onnx_pipe = load_pipeline(tmp_path / "onnx", backend="onnx")
    torch_report = Pipeline.from_paths(chex_bundle).analyze(images[0], explain=None)
    onnx_report = onnx_pipe.analyze(images[0], explain=None)
    np.testing.assert_allclose(onnx_report.calibrated, torch_report.calibrated, atol=1e-4)
    assert onnx_report.untrained == CHEX_UNTRAINED


def test_notebook_04s_box_set_takes_only_boxes_of_trained_findings(chex_bundle, nih_dir) -> None:
    from cxrbench.data import load_manifest
    from cxrbench.inference.localisation import box_localisation_set

    pipe = Pipeline.from_paths(chex_bundle)
    boxed = box_localisation_set(pipe, load_manifest(nih_dir, on_missing="drop"), 4)
    names = [pipe.findings[t] for t in boxed.targets]
    assert 0 < len(names) <= 4 and not set(names) & set(pipe.untrained), (names, pipe.untrained)
    assert len(boxed.reports) == len(boxed.regions) == len(names)
    with pytest.raises(ValueError, match="trained on"):  # a manifest whose boxes are all of untrained findings
        manifest = load_manifest(nih_dir, on_missing="drop")
        boxes = manifest["bbox_256_json"].fillna("")
        only_untrained = manifest[boxes.str.contains("|".join(pipe.untrained))
                                  & ~boxes.str.contains("|".join(set(pipe.findings) - set(pipe.untrained)))]
        box_localisation_set(pipe, only_untrained, 4)


def test_operating_points_read_in_plain_english(chex_bundle) -> None:
    from dataclasses import replace

    from cxrbench.app.dashboard import model_summary
    from cxrbench.models.card import operating_points_sentence

    card = load_bundle(chex_bundle).card
    assert operating_points_sentence(card) == (
        "Operating points as published by torchxrayvision with these weights, fitted on torchxrayvision's own data, "
        "not on images from here (cxrbench calibrate re-fits them on a validation split).")
    summary = model_summary(Pipeline.from_paths(chex_bundle))  # the dashboard's "About these models"
    assert "as published by torchxrayvision" in summary
    assert "publisher's split" not in summary and "op_threshs" not in summary
    youden = "(Youden's J, the threshold that best separates positives from negatives)"
    own = replace(card, source={}, operating_points={"method": "youden", "fitted_on": "validation",
                                                     "thresholds": {"Effusion": 0.3}})
    assert operating_points_sentence(own) == f"Operating points fitted on the validation split {youden}."
    refit = replace(own, operating_points={**own.operating_points, "fitted_on": "/data/val",
                                           "published": card.operating_points})
    assert operating_points_sentence(refit) == (f"Operating points fitted on /data/val {youden}. "
                                                "They replace the ones published with the weights.")
    assert operating_points_sentence(replace(own, operating_points={})) == ""


@pytest.mark.slow
def test_latent_shift_of_an_imported_xrv_bundle_converts_between_the_two_cards_scales(
        chex_bundle, nih_dir, images, tmp_path) -> None:
    """An autoencoder trained --like the xrv classifier takes [0, 1] (its card) while the classifier takes
    [-1024, 1024] (its card): the frames' probabilities are the classifier's on its own scale (about 7 s)."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = pd.read_csv(nih_dir / "manifest.csv").head(12)
    for name in manifest["file"]:
        os.symlink(nih_dir / name, data / name)
    manifest.to_csv(data / "manifest.csv", index=False)
    assert main(["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "ae"), "--like", str(chex_bundle),
                 "--epochs", "1", "--max-steps", "2", "--latent", "8", "--width", "4", "--batch-size", "4", "-q"]) == 0
    clf, ae = load_bundle(chex_bundle), load_bundle(tmp_path / "ae" / "bundle", kind="autoencoder")
    assert (clf.preprocess.normalize, ae.preprocess.normalize) == ("xrv", "zero_one")
    pipe = Pipeline.from_paths(chex_bundle, autoencoder=tmp_path / "ae" / "bundle")
    report = pipe.analyze(images[0], explain=None, use_gate=False)
    cf = pipe.counterfactual(report, "Effusion", n_frames=3)
    effusion = NIH_FINDINGS.index("Effusion")
    # the same conversion, done here from the two cards: classifier input -> grey -> autoencoder -> grey -> classifier
    x = pipe.model_inputs(report.image).numpy()
    assert x.min() < -100  # the classifier's input really is on xrv's scale
    with torch.no_grad():
        grey_input = clf.preprocess.denormalize(x)
        recon = ae.model.eval().reconstruct(torch.from_numpy(ae.preprocess.normalize_array(grey_input)))
        grey = ae.preprocess.denormalize(recon.numpy())
        p = torch.sigmoid(clf.model.eval()(torch.from_numpy(clf.preprocess.normalize_array(grey))))[0, effusion]
        unconverted = torch.sigmoid(clf.model(recon))[0, effusion]  # the reconstruction fed as it comes out
    assert cf.probabilities[0] == pytest.approx(float(p), abs=1e-5)
    assert abs(float(unconverted) - float(p)) > 1e-3  # so the check above can tell the scales apart
    np.testing.assert_allclose(cf.frames[0], grey[0, 0], atol=1e-5)
    assert 0 <= cf.frames.min() and cf.frames.max() <= 1
    assert cf.input_probability == pytest.approx(float(report.raw[effusion]), abs=1e-5)

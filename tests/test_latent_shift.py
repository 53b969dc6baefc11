"""Latent Shift counterfactuals: the explainer, its refusal without an autoencoder, the autoencoder bundle and
``cxrbench train autoencoder``, the pipeline's counterfactual."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxrbench.explain import COUNTERFACTUAL_EXPLAINERS, get_explainer
from cxrbench.explain.latent_shift import Counterfactual, LatentShift, NoAutoencoderError
from cxrbench.models.autoencoder import ConvAutoencoder
from cxrbench.models.bundle import BundleError, ModelCard, load_bundle, save_bundle
from cxrbench.preprocess import Preprocess

SIDE = 32


def _classifier(channels: int = 1, outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(64, outputs))


def _autoencoder() -> ConvAutoencoder:
    torch.manual_seed(1)
    return ConvAutoencoder(latent_dim=8, base_channels=4, image_size=SIDE).eval()


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, SIDE, SIDE, generator=g)


def test_counterfactual_lowers_the_target_probability_along_the_sweep():
    ls = LatentShift(_classifier(), autoencoder=_autoencoder(), n_frames=5)
    cf = ls.counterfactual(_image(), target=1)
    assert isinstance(cf, Counterfactual)
    assert cf.frames.shape == (5, SIDE, SIDE) and cf.difference.shape == (SIDE, SIDE)
    assert cf.lambdas[0] == 0 and np.all(np.diff(cf.lambdas) < 0)  # from the reconstruction to the counterfactual
    assert cf.probabilities[-1] < cf.probabilities[0], cf.probabilities
    assert np.mean(np.diff(cf.probabilities) <= 1e-9) >= 0.75  # monotonically-ish
    assert cf.frames.min() >= 0 and cf.frames.max() <= 1
    np.testing.assert_allclose(cf.difference, np.abs(cf.frames[0] - cf.frames[-1]), atol=1e-6)
    assert cf.difference.max() > 0 and cf.stop
    # the probabilities are the classifier's on the frames themselves
    with torch.no_grad():
        p = torch.sigmoid(ls.model(torch.from_numpy(cf.frames)[:, None])[:, 1]).numpy()
    np.testing.assert_allclose(cf.probabilities, p, atol=1e-5)


def test_explainer_maps_follow_the_classifier_normalisation_and_targets():
    pp = Preprocess(size=SIDE, normalize="imagenet", channels=3)
    model = _classifier(channels=3)
    ls = get_explainer("latent_shift", model, autoencoder=_autoencoder(), preprocess=pp, n_frames=3)
    unit = torch.cat([_image(0), _image(1)])
    x = torch.from_numpy(pp.normalize_array(unit.numpy()))
    torch.testing.assert_close(ls.to_unit(x), unit, atol=1e-5, rtol=0)
    torch.testing.assert_close(ls.to_model(unit), x, atol=1e-5, rtol=0)
    maps = ls(x, targets=[0, 2])
    assert maps.shape == (2, 2, SIDE, SIDE) and np.isfinite(maps).all()
    assert [cf.target for cf in ls.counterfactuals] == [0, 2, 0, 2]
    np.testing.assert_allclose(maps[1, 1], ls.counterfactuals[3].difference, atol=1e-6)
    assert all(m.training for m in model.modules())  # the model's own (train) mode is restored


def test_refused_without_an_autoencoder_or_at_another_resolution():
    assert COUNTERFACTUAL_EXPLAINERS == ["latent_shift"]
    with pytest.raises(NoAutoencoderError, match="cxrbench train autoencoder --like"):
        get_explainer("latent_shift", _classifier())
    with pytest.raises(TypeError, match="encode and decode"):
        get_explainer("latent_shift", _classifier(), autoencoder=nn.Linear(2, 2))
    ls = LatentShift(_classifier(), autoencoder=_autoencoder())
    with pytest.raises(ValueError, match="works at 32 px but the classifier input is \\(64, 64\\)"):
        ls.counterfactual(torch.rand(1, 1, 64, 64), target=0)
    with pytest.raises(ValueError, match="out of range"):
        ls.counterfactual(_image(), target=7)
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvAutoencoder(image_size=40)


class _MinusOneOne(nn.Module):
    """An autoencoder on [-1, 1] (input and output): the same network as ``_autoencoder()`` on another scale."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _autoencoder()
        self.image_size = SIDE

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode((x + 1) / 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(z) * 2 - 1


def test_the_autoencoders_scale_comes_from_its_preprocess_and_mismatches_name_both_models():
    from cxrbench.explain.latent_shift import ScaleMismatchError, check_scales

    xrv = Preprocess(size=SIDE, normalize="xrv")  # a torchxrayvision classifier's [-1024, 1024]
    unit = _image()
    x = torch.from_numpy(xrv.normalize_array(unit.numpy()))
    plain = LatentShift(_classifier(), autoencoder=_autoencoder(), preprocess=xrv, n_frames=3).counterfactual(x, 1)
    other = LatentShift(_classifier(), autoencoder=_MinusOneOne(), preprocess=xrv, n_frames=3,
                        autoencoder_preprocess=Preprocess(size=SIDE, normalize="minus1_1")).counterfactual(x, 1)
    np.testing.assert_allclose(other.frames, plain.frames, atol=1e-5)
    np.testing.assert_allclose(other.probabilities, plain.probabilities, atol=1e-5)
    with torch.no_grad():  # the probabilities are the classifier's on its own scale, not on the [0, 1] frames
        p = torch.sigmoid(_classifier()(torch.from_numpy(xrv.normalize_array(plain.frames[:, None])))[:, 1]).numpy()
    np.testing.assert_allclose(plain.probabilities, p, atol=1e-5)
    wrong = LatentShift(_classifier(), autoencoder=_MinusOneOne(), preprocess=xrv, n_frames=3).counterfactual(x, 1)
    assert np.abs(wrong.frames - plain.frames).max() > 1e-2  # [-1, 1] taken for [0, 1]: other frames
    with pytest.raises(ScaleMismatchError, match=r"ae/ \(autoencoder\) and clf/ \(classifier\): .* differs in "
                                                 r"equalize \(hist vs none\); .*--like clf/"):
        check_scales(xrv, Preprocess(size=SIDE, equalize="hist", normalize="zero_one"), classifier_name="clf/",
                     autoencoder_name="ae/")
    with pytest.raises(ScaleMismatchError, match="channels \\(3: an autoencoder of one grey channel"):
        LatentShift(_classifier(), autoencoder=_autoencoder(), preprocess=xrv,
                    autoencoder_preprocess=Preprocess(size=SIDE, normalize="imagenet", channels=3))


def _autoencoder_card(**preprocess) -> ModelCard:
    pp = {"size": SIDE, "normalize": "zero_one", **preprocess}
    return ModelCard(kind="autoencoder", builder="autoencoder",
                     builder_kwargs={"latent_dim": 8, "base_channels": 4, "image_size": SIDE},
                     preprocess=Preprocess(**pp).to_dict())


def test_autoencoder_bundle_round_trip_and_card_checks(tmp_path):
    path = save_bundle(tmp_path / "ae", _autoencoder(), _autoencoder_card())
    loaded = load_bundle(path, kind="autoencoder")
    assert loaded.model.image_size == SIDE
    x = _image()
    torch.testing.assert_close(loaded.model.reconstruct(x), _autoencoder().reconstruct(x))
    with pytest.raises(BundleError, match="needs preprocess size 32, normalize 'zero_one', 1 channel"):
        _autoencoder_card(normalize="minus1_1").validate(require_checksum=False)


def _autoencoder_bundle_48px(path):
    """An autoencoder bundle at 48 px: another resolution than the phantom classifier's 32 px."""
    model = ConvAutoencoder(latent_dim=8, base_channels=4, image_size=48)
    return save_bundle(path, model, ModelCard(
        kind="autoencoder", builder="autoencoder", builder_kwargs={"latent_dim": 8, "base_channels": 4,
                                                                   "image_size": 48},
        preprocess=Preprocess(size=48, normalize="zero_one").to_dict()))


@pytest.fixture(scope="module")
def phantom_runs(tmp_path_factory):
    """A tiny phantom classifier bundle and an autoencoder trained --like it through the CLI (about 10 s)."""
    from cxrbench.cli import main
    from cxrbench.data import load_manifest
    from cxrbench.data.synthetic import write_phantom_set
    from cxrbench.train import ClassifierConfig, train_classifier

    tmp = tmp_path_factory.mktemp("latent")
    root = write_phantom_set(tmp / "ph", 24, size=SIDE, seed=3, prevalence={"Effusion": 0.5})
    clf = train_classifier(load_manifest(root), tmp / "clf", ClassifierConfig(
        arch="resnet18", image_size=SIDE, epochs=1, labels=["Effusion"], augment=False, eval_bootstrap=10,
        early_stopping_patience=0), progress=False).bundle
    rc = main(["train", "autoencoder", "--data", str(root), "--out", str(tmp / "ae"), "--like", str(clf),
               "--epochs", "2", "--latent", "8", "--width", "4", "--batch-size", "8", "-q"])
    assert rc == 0
    return clf, tmp / "ae" / "bundle", root


def test_train_autoencoder_like_a_classifier_writes_an_autoencoder_bundle(phantom_runs):
    clf_path, ae_path, root = phantom_runs
    clf, ae = load_bundle(clf_path, kind="classifier"), load_bundle(ae_path, kind="autoencoder")
    assert ae.card.preprocess == Preprocess.from_dict(clf.card.preprocess).replace(normalize="zero_one",
                                                                                     channels=1).to_dict()
    assert ae.card.builder_kwargs["image_size"] == SIDE and ae.card.training["like"] == str(clf_path)
    assert 0 < ae.card.metrics["val_ssim_median"] <= 1 and "test_l1" in ae.card.metrics
    with pytest.raises(BundleError, match="kind 'autoencoder', but a 'ood' bundle"):
        load_bundle(ae_path, kind="ood")
    json.loads((ae_path / "card.json").read_text())  # plain JSON
    from cxrbench.models.card import describe_card

    assert any(line.startswith("test reconstruction: median SSIM") and str(clf_path) in line
               for line in describe_card(ae.card))


def test_pipeline_counterfactual_and_its_refusals(phantom_runs, tmp_path):
    from cxrbench.inference import Pipeline

    clf_path, ae_path, root = phantom_runs
    image = np.asarray(load_bundle(clf_path).preprocess.geometry(np.linspace(0, 1, 64 * 64).reshape(64, 64)))
    plain = Pipeline.from_paths(clf_path)
    report = plain.analyze(image, explain=None, use_gate=False)
    with pytest.raises(NoAutoencoderError, match="cxrbench train autoencoder"):
        plain.counterfactual(report, "Effusion")
    with pytest.raises(NoAutoencoderError):
        plain.explain(report, "latent_shift", "Effusion")
    pipe = Pipeline.from_paths(clf_path, autoencoder=ae_path)
    cf = pipe.counterfactual(report, "Effusion", n_frames=4)
    assert cf.frames.shape == (4, SIDE, SIDE) and cf.probabilities[-1] <= cf.probabilities[0]
    explained = pipe.explain(report, "latent_shift", "Effusion")
    assert explained.maps.shape == (1, SIDE, SIDE) and explained.map_labels == ["Effusion"]
    assert explained.maps.max() == pytest.approx(1.0)  # min-max scaled like every report map
    wrong = _autoencoder_bundle_48px(tmp_path / "ae48")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'ae48'} \(autoencoder\) and {clf_path} \(classifier\): "
                                         r".* differs in size \(48 vs 32\)"):
        Pipeline.from_paths(clf_path, autoencoder=wrong)


_NOW = datetime.datetime.now(datetime.timezone.utc)


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.round(arr * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_dashboard_counterfactual_on_request(phantom_runs):
    from cxrbench.app.counterfactual import BUTTON_LABEL
    from cxrbench.app.dashboard import Dashboard
    from cxrbench.data.synthetic import make_phantom
    from cxrbench.inference import Pipeline

    clf_path, ae_path, _ = phantom_runs
    image = make_phantom(128, findings=["Effusion"], seed=77).image
    dash = Dashboard(Pipeline.from_paths(clf_path, autoencoder=ae_path))
    panel = dash.counterfactual
    assert panel.button.description == BUTTON_LABEL and not panel.button.disabled
    assert panel.widget.layout.display == "none"  # nothing to explain yet
    dash.upload.value = ({"name": "ph.png", "type": "image/png", "size": 1, "content": memoryview(_png(image)),
                          "last_modified": _NOW},)
    assert dash.report is not None and dash.report.raw is not None
    assert panel.widget.layout.display == "" and panel.result is None and not panel.frames.children  # not on upload
    panel.button.click()
    cf = panel.result
    assert cf is not None and cf.target == dash.pipeline.findings.index(dash.finding.value)
    assert panel.difference.layout.display == "" and panel.difference.value[:8] == b"\x89PNG\r\n\x1a\n"
    tiles = panel.frames.children
    assert len(tiles) == min(4, len(cf.frames))
    shown = [t.children[1].value for t in tiles]
    assert f"p({dash.finding.value}) {cf.probabilities[0]:.2f}" in shown[0] and "reconstruction" in shown[0]
    assert f"{cf.probabilities[-1]:.2f}" in shown[-1] and "counterfactual" in shown[-1]
    assert f"raw p falls from {cf.probabilities[0]:.2f}" in panel.status.value
    dash.upload.value = ({"name": "again.png", "type": "image/png", "size": 1, "content": memoryview(_png(image)),
                          "last_modified": _NOW},)
    assert panel.result is None and not panel.frames.children  # a new image clears it

    plain = Dashboard(Pipeline.from_paths(clf_path))
    assert plain.counterfactual.button.disabled
    assert "cxrbench train autoencoder --like" in plain.counterfactual.status.value
    plain.analyze_bytes("ph.png", _png(image))
    plain.counterfactual.button.click()  # a disabled button's click still reaches run(): it refuses in words
    assert "Could not compute the counterfactual: latent_shift needs an autoencoder" in \
        plain.counterfactual.status.value


def test_phantom_comparison_rows_and_their_sentence():
    import pandas as pd

    from cxrbench.explain.metrics import VARIANTS, latent_shift_comparison, localisation_sentence

    x = torch.cat([_image(0), _image(1)])
    regions = [np.zeros((SIDE, SIDE), bool) for _ in range(2)]
    for r in regions:
        r[4:12, 4:12] = True
    table = latent_shift_comparison(_classifier(), x, [1, 1], regions, autoencoder=_autoencoder(), curve_steps=0)
    assert table["method"].tolist() == list(VARIANTS) and (table["n_images"] == 2).all()
    assert {"pointing_game", "mass_in_region"} <= set(table.columns)
    chance = pd.DataFrame([{"method": "random", "pointing_game": 0.0, "mass_in_region": 0.1}])
    made_up = pd.DataFrame([{"method": "latent_shift", "pointing_game": 1.0, "mass_in_region": 0.3}])
    assert "30.0% of its change inside the lesion, clearly more than random maps (10.0%)" in \
        localisation_sentence(pd.concat([made_up, chance]), "Phantoms")
    empty = made_up.assign(mass_in_region=np.nan)
    assert "changed no pixel" in localisation_sentence(pd.concat([empty, chance]), "Phantoms")
    with pytest.raises(ValueError, match="needs a 'latent_shift' and a 'random' row"):
        localisation_sentence(chance, "Phantoms")


def test_cli_explain_latent_shift_writes_difference_maps_and_frames(phantom_runs, tmp_path, capsys):
    import pandas as pd
    from PIL import Image as PILImage

    from cxrbench.cli import main
    from cxrbench.data import load_manifest

    clf_path, ae_path, root = phantom_runs
    manifest = load_manifest(root)
    image = str(manifest.loc[manifest["Effusion"] == 1, "path"].iloc[0])
    out = tmp_path / "out"
    rc = main(["explain", "--bundle", str(clf_path), "--method", "latent_shift", "--autoencoder", str(ae_path),
               image, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "too small (32x32 px" in err, err  # the tiny phantom is explained anyway, with a warning
    row = pd.read_csv(out / "explain_summary.csv", keep_default_na=False).iloc[0]
    stem = Path(image).stem
    assert row["error"] == "" and row["targets"] == "Effusion" and row["stop"]
    assert row["frames"] == f"{stem}_latent_shift_Effusion_frames.npy"
    frames = np.load(out / row["frames"])
    assert frames.shape == (6, SIDE, SIDE) and frames.dtype == np.float32 and 0 <= frames.min() <= frames.max() <= 1
    maps = np.load(out / f"{stem}_latent_shift.npy")  # the raw difference map: reconstruction vs counterfactual
    assert maps.shape == (1, SIDE, SIDE)
    np.testing.assert_allclose(maps[0], np.abs(frames[0] - frames[-1]), atol=1e-6)
    probabilities = [float(p) for p in row["frame_probabilities"].split(">")]
    assert len(probabilities) == 6 and probabilities[-1] <= probabilities[0]
    assert row["raw_probabilities"] and (out / f"{stem}_latent_shift_Effusion.png").is_file()
    strip = np.asarray(PILImage.open(out / f"{stem}_latent_shift_Effusion_frames.png"))
    assert strip.shape[1] == 6 * 128 + 5 * 4 and strip.shape[0] > 128  # six frames with their captions under them
    assert (strip[130:, :128] < 128).any()  # there is text in the caption band

    # refused before anything is read: no autoencoder, one made for another input, one the method does not use
    bad = [(["--method", "latent_shift"], [str(clf_path), "needs an autoencoder at the classifier's input resolution",
                                           f"--like {clf_path} --data", "--autoencoder"]),
           (["--method", "saliency", "--autoencoder", str(ae_path)], [str(ae_path), "not saliency"])]
    wrong = _autoencoder_bundle_48px(tmp_path / "ae48")
    bad.append((["--method", "latent_shift", "--autoencoder", str(wrong)],
                [str(wrong), "differs in size (48 vs 32)", f"--like {clf_path}"]))
    for options, words in bad:
        refused = tmp_path / "refused"
        assert main(["explain", "--bundle", str(clf_path), *options, image, "--out", str(refused), "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("cxrbench: error: ") and all(w in err for w in words), err
        assert not refused.exists()


def test_an_onnx_runtime_classifier_is_refused_for_latent_shift(phantom_runs, tmp_path):
    """The ONNX Runtime adapter is an nn.Module (it runs inside torch code) but gives no gradients: Latent Shift on
    it must be refused with the reason, not run on a graph whose backward does not exist."""
    from cxrbench.export.onnx import export_models
    from cxrbench.export.runtime import pipeline_from_export
    from cxrbench.inference import Pipeline

    clf_path, ae_path, _ = phantom_runs
    export_models(load_bundle(clf_path), tmp_path / "onnx", saliency=False)
    pipe = pipeline_from_export(tmp_path / "onnx")
    image = np.asarray(load_bundle(clf_path).preprocess.geometry(np.linspace(0, 1, 64 * 64).reshape(64, 64)))
    report = pipe.analyze(image, explain=None, use_gate=False)
    ort = Pipeline(pipe.classifier, autoencoder=load_bundle(ae_path, kind="autoencoder"))
    with pytest.raises(ValueError, match="Latent Shift needs the classifier's gradients.*OnnxClassifier"):
        ort.counterfactual(report, "Effusion")


def test_phantom_latent_shift_tables_refuses_an_autoencoder_of_another_scale(phantom_runs, tmp_path):
    """The package's phantom table takes two bundles like the Pipeline and refuses the same mismatches."""
    from cxrbench.inference.localisation import phantom_latent_shift_tables

    clf_path, _, _ = phantom_runs
    wrong = _autoencoder_bundle_48px(tmp_path / "ae48")
    with pytest.raises(ValueError, match=r"ae48 \(autoencoder\) and .* \(classifier\): .* differs in size \(48 "
                                         r"vs 32\)"):
        phantom_latent_shift_tables(load_bundle(clf_path), load_bundle(wrong, kind="autoencoder"), ["Effusion"], 2)

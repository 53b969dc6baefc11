"""One forward pass per report: the probabilities come from the explainer's own forward, the gate encodes once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrbench.inference.pipeline import Pipeline
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle
from cxrbench.ood.scoring import OOD_PREPROCESS, reconstruction_scores, score_batch
from cxrbench.preprocess import Preprocess


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from cxrbench.data.synthetic import make_phantom

    return make_phantom(96, findings=["Nodule"], seed=3).image


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_the_report_runs_the_network_once_and_its_probabilities_are_the_no_grad_ones(arch, method, image, tmp_path):
    untrained_classifier_bundle(tmp_path / "clf", arch=arch, preprocess=Preprocess(size=64),
                                thresholds={f: 0.3 + 0.03 * i for i, f in enumerate(NIH_FINDINGS)})
    pipe = Pipeline(load_bundle(tmp_path / "clf"))
    model = pipe.classifier_backend.model
    calls = _count_forwards(model)
    report = pipe.analyze(image, explain=method)
    assert len(calls) == 1, f"the network ran {len(calls)} times for one report"
    with torch.no_grad():
        no_grad = torch.sigmoid(model.eval()(pipe.model_inputs(report.image))).double().numpy()[0]
    np.testing.assert_allclose(report.raw, no_grad, atol=1e-6, rtol=0)
    np.testing.assert_allclose(report.calibrated, pipe.calibrate(no_grad), atol=1e-6, rtol=0)
    # the maps (and, for Grad-CAM, the chosen top findings) are those of the two-pass explanation
    two_pass = pipe.explain(pipe.analyze(image, explain=None), method)
    assert report.map_labels == two_pass.map_labels and report.explained_outputs == two_pass.explained_outputs
    np.testing.assert_allclose(report.maps, two_pass.maps, atol=1e-5)
    assert report.timings["classify"] > 0 and report.timings["explain"] > 0


def test_a_cam_report_and_named_targets_also_take_one_pass(image, tmp_path):
    untrained_classifier_bundle(tmp_path / "clf", preprocess=Preprocess(size=64))
    pipe = Pipeline(load_bundle(tmp_path / "clf"))
    calls = _count_forwards(pipe.classifier_backend.model)
    cam = pipe.analyze(image, explain="cam")
    summed = pipe.analyze(image, explain="saliency", targets=["Effusion", "Mass"])
    assert len(calls) == 2 and summed.map_labels == ["Effusion+Mass"] and summed.explained_outputs == [2, 4]
    np.testing.assert_allclose(cam.raw, summed.raw, atol=1e-6)
    with pytest.raises(ValueError, match="unknown findings"):
        pipe.analyze(image, explain="gradcam", targets="Nope")


@pytest.mark.parametrize("kind", ["ali", "autoencoder"])
def test_the_gate_encodes_once_with_the_same_scores(kind, image):
    from cxrbench.inference.backend import TorchGate
    from cxrbench.models.ali import ALI
    from cxrbench.models.autoencoder import ConvAutoencoder

    torch.manual_seed(0)
    model = (ALI if kind == "ali" else ConvAutoencoder)(latent_dim=16, base_channels=8).eval()
    x = torch.from_numpy(OOD_PREPROCESS(image))[None]
    with torch.no_grad():  # the three-pass scores of before: reconstruct, then latent_mean, then reconstruct
        reference = reconstruction_scores(x, model.reconstruct(x))
        reference["latent"] = torch.linalg.vector_norm(model.latent_mean(x), dim=1).double().numpy()
        recon = model.reconstruct(x).numpy()
    calls = _count_forwards(model.encoder)
    out = TorchGate(model).score(x)
    assert len(calls) == 1, f"the gate encoded the image {len(calls)} times"
    assert set(out.scores) == set(reference)
    for name, values in reference.items():
        np.testing.assert_array_equal(out.scores[name], values, err_msg=name)
    np.testing.assert_array_equal(out.reconstruction, recon)
    np.testing.assert_array_equal(score_batch(model, x)["ssim"], reference["ssim"])


@pytest.mark.parametrize("shape", [(300, 420), (420, 300), (256, 256)])
def test_one_geometry_source_gives_each_preprocessings_own_pixels(shape):
    from cxrbench.preprocess import GeometrySource

    pixels = np.random.default_rng(1).random(shape)  # float64, as an array caller may pass
    source = GeometrySource(pixels)
    for pp in (Preprocess(size=64), Preprocess(size=224, crop="pad"), Preprocess(size=min(shape)),
               Preprocess(size=64, resample="area"), Preprocess(size=32, crop="pad"),
               Preprocess(size=48, resample="skimage")):
        first = pp.geometry(source)
        np.testing.assert_array_equal(first, pp.geometry(pixels))
        assert first.dtype == np.float32 and first.shape == (pp.size, pp.size)
        first[:] = -1  # every call hands out its own array
        np.testing.assert_array_equal(pp.geometry(source), pp.geometry(pixels))
    assert source.shape == shape


@pytest.mark.slow  # ~7 s on the loaded 2-core machine (first torch calls of the process)
def test_the_report_resizes_the_upload_once_converted_with_the_same_pixels(image, tmp_path):
    from cxrbench.ood.guard import ImageGuard
    from cxrbench.ood.untrained import untrained_ood_bundle

    untrained_classifier_bundle(tmp_path / "clf", arch="resnet18", preprocess=Preprocess(size=64))
    pipe = Pipeline(load_bundle(tmp_path / "clf"), load_bundle(untrained_ood_bundle(tmp_path / "ood")))
    big = np.kron(image, np.ones((3, 4)))  # 288 x 384: both resizes shrink and crop
    report = pipe.analyze(big, explain=None, allow_ood=True)
    np.testing.assert_array_equal(report.image, pipe.classifier.preprocess.geometry(big))
    np.testing.assert_array_equal(report.ood.input, pipe.ood.preprocess.geometry(big))
    assert report.ood.guard == ImageGuard.from_dict(pipe.ood.card.ood.get("guard")).check(big)


def test_all_finite_agrees_with_the_elementwise_check():
    from cxrbench._types import PreprocessError, all_finite, check_unit_range

    x = np.random.default_rng(0).random((50, 60)).astype(np.float32)
    assert all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[7, 9] = bad
        assert not all_finite(y)
        with pytest.raises(PreprocessError, match="NaN or infinity"):
            check_unit_range(y)
    assert all_finite(np.full(10, 1e308))  # the sum overflows, every value is finite
    assert not all_finite(np.array([np.inf, -np.inf]))

"""LBP/HOG/CNN features, the resumable on-disk feature cache, and hybrid vectors."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrbench.hybrid.extraction import UnreadableImagesWarning, extract_features, extraction_errors
from cxrbench.hybrid.features import (
    FeatureSpec,
    cnn_embeddings,
    hog_features,
    hybrid_vectors,
    lbp_features,
)
from cxrbench.models.classifier import build_classifier, embed
from cxrbench.preprocess import Preprocess

PP = Preprocess(size=32, equalize="hist", normalize="minus1_1")


def _write_pngs(folder, n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = (rng.random((size, size + 6)) * 255).astype(np.uint8)
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return pd.DataFrame({"path": paths, "image_id": [f"img_{i}" for i in range(n)],
                         "patient_id": [str(i) for i in range(n)]})


@pytest.fixture
def manifest(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    return _write_pngs(folder, 10)


# ------------------------------------------------------------------------ single images
def test_lbp_regions_are_normalised_histograms_and_constant_image_is_all_uniform_code():
    spec = FeatureSpec(lbp_grid=4)
    rng = np.random.default_rng(0)
    f = lbp_features(rng.random((64, 64)).astype(np.float32), spec)
    assert f.shape == (16 * 10,) and f.dtype == np.float32
    np.testing.assert_allclose(f.reshape(16, 10).sum(axis=1), 1.0, atol=1e-6)
    flat = lbp_features(np.full((64, 64), 0.5, np.float32), spec).reshape(16, 10)
    # every neighbour >= centre: code P (= 8) everywhere away from the border (outside counts as 0)
    np.testing.assert_array_equal(flat[[5, 6, 9, 10], 8], 1.0)
    assert (flat[[0, 3, 12, 15], 8] < 1).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lbp_features(np.full((64, 64), 3.0, np.float32), spec)


def test_hog_dims_and_orientation_sensitivity():
    spec = FeatureSpec()
    assert spec.dim("hog", 224) == 7 * 7 * 4 * 9 == 1764  # 128 px working size, 16 px cells
    assert FeatureSpec(hog_size=224).dim("hog", 224) == 13 * 13 * 36
    x = np.linspace(0, 8 * np.pi, 224)
    vertical = (0.5 + 0.5 * np.sin(x))[None, :].repeat(224, 0).astype(np.float32)  # varies along x
    fv, fh = hog_features(vertical, spec), hog_features(vertical.T.copy(), spec)
    assert fv.shape == (1764,)
    # gradients along x vs along y land in different orientation bins
    bins_v, bins_h = fv.reshape(-1, 9).sum(0), fh.reshape(-1, 9).sum(0)
    assert np.argmax(bins_v) != np.argmax(bins_h)
    with pytest.raises(ValueError, match="cells"):
        FeatureSpec(hog_cell=32).dim("hog", 32)


def test_cnn_embeddings_match_embed_and_torchvision_fallback():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 3, in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(cnn_embeddings(model, x), embed(model, x), rtol=1e-5, atol=1e-6)
    import torchvision

    tv = torchvision.models.resnet18(num_classes=4).eval()
    x3 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(tv.children())[:-1])
        expected = torch.flatten(trunk(x3), 1)
    got = cnn_embeddings(tv, x3)
    assert got.shape == (2, 512)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ extraction cache
def test_interrupted_extraction_resumes_and_equals_an_uninterrupted_run(manifest, tmp_path):
    full = np.array(extract_features(manifest, "lbp", PP, tmp_path / "full.npy", chunk_size=3, progress=False))
    assert full.shape == (10, 160) and np.isfinite(full).all()

    def stop_after_two(c, n):
        if c == 1:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        extract_features(manifest, "lbp", PP, tmp_path / "part.npy", chunk_size=3, progress=False,
                         on_chunk=stop_after_two)
    computed = []
    resumed = extract_features(manifest, "lbp", PP, tmp_path / "part.npy", chunk_size=3, progress=False,
                               on_chunk=lambda c, n: computed.append((c, n)))
    assert computed == [(2, 4), (3, 4)]  # chunks 0 and 1 were already done
    np.testing.assert_array_equal(np.asarray(resumed), full)
    again = []
    extract_features(manifest, "lbp", PP, tmp_path / "part.npy", chunk_size=3, progress=False,
                     on_chunk=lambda c, n: again.append(c))
    assert again == []  # complete cache: nothing recomputed


def test_cache_is_recomputed_when_settings_change(manifest, tmp_path):
    calls = []
    extract_features(manifest, "hog", PP, tmp_path / "h.npy", chunk_size=5, progress=False,
                     spec=FeatureSpec(hog_cell=8))
    out = extract_features(manifest, "hog", PP, tmp_path / "h.npy", chunk_size=5, progress=False,
                           spec=FeatureSpec(hog_cell=16), on_chunk=lambda c, n: calls.append(c))
    assert calls == [0, 1] and out.shape == (10, FeatureSpec(hog_cell=16).dim("hog", 32))


def test_unreadable_images_get_nan_rows_and_one_warning(manifest, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    df = pd.concat([manifest.iloc[:3], pd.DataFrame({"path": [str(bad)], "image_id": ["b"], "patient_id": ["b"]}),
                    manifest.iloc[3:5]], ignore_index=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = extract_features(df, "lbp", PP, tmp_path / "e.npy", chunk_size=2, progress=False)
    flagged = [w for w in caught if issubclass(w.category, UnreadableImagesWarning)]
    assert len(flagged) == 1 and "1 of 6" in str(flagged[0].message)
    assert np.isnan(out[3]).all() and np.isfinite(np.delete(np.asarray(out), 3, axis=0)).all()
    assert list(extraction_errors(tmp_path / "e.npy")) == [str(bad)]


def test_cnn_extraction_equals_direct_embedding(manifest, tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", 2, in_channels=1).eval()
    out = extract_features(manifest.iloc[:4], "cnn", PP, tmp_path / "c.npy", chunk_size=3, model=model, progress=False)
    from cxrbench.io import read_image

    x = torch.stack([torch.from_numpy(PP.intensity(np.round(PP.geometry(read_image(p).pixels) * 255) / 255))
                     for p in manifest["path"][:4]]).float()
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(out), embed(model, x).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="model="):
        extract_features(manifest, "cnn", PP, tmp_path / "c2.npy", progress=False)
    with pytest.raises(ValueError, match="channels"):
        extract_features(manifest, "cnn", PP.replace(channels=3), tmp_path / "c3.npy", model=model, progress=False)


def test_cnn_extraction_from_a_bundle_uses_the_bundle_preprocessing(manifest, tmp_path):
    from cxrbench.models.bundle import ModelCard, load_bundle, save_bundle

    torch.manual_seed(0)
    model = build_classifier("resnet18", 2, in_channels=1).eval()
    card = ModelCard(kind="classifier", builder="classifier",
                     builder_kwargs={"arch": "resnet18", "num_outputs": 2, "in_channels": 1},
                     labels=["A", "B"], preprocess=PP.to_dict())
    bundle = load_bundle(save_bundle(tmp_path / "b", model, card))
    via_bundle = extract_features(manifest.iloc[:3], "cnn", None, tmp_path / "b.npy", model=bundle, progress=False)
    via_module = extract_features(manifest.iloc[:3], "cnn", PP, tmp_path / "m.npy", model=model, progress=False)
    np.testing.assert_allclose(np.asarray(via_bundle), np.asarray(via_module), rtol=1e-5, atol=1e-6)


def test_memory_stays_flat_as_n_grows(tmp_path):
    big = _write_pngs(tmp_path, 48, size=64, seed=1)
    pp = Preprocess(size=64, equalize="hist")
    extract_features(big.iloc[:6], "hog", pp, tmp_path / "warm.npy", chunk_size=6, progress=False)  # imports
    peaks = []
    for n in (12, 48):
        tracemalloc.start()
        extract_features(big.iloc[:n], "hog", pp, tmp_path / f"m{n}.npy", chunk_size=6, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks  # 4x the images, not 4x the memory


# ------------------------------------------------------------------------ hybrid vectors
def test_hybrid_vectors_use_training_statistics_only_and_balance_blocks():
    rng = np.random.default_rng(0)
    a = rng.normal(5, 3, (40, 4)).astype(np.float32)
    b = rng.normal(-2, 0.1, (40, 16)).astype(np.float32)
    a[30:] += 100.0  # test rows far away: must not move the training statistics
    b[35] = np.nan
    train = np.zeros(40, bool)
    train[:30] = True
    z, scaler = hybrid_vectors([a, b], train)
    assert z.shape == (40, 20)
    np.testing.assert_allclose(scaler.mean_[:4], a[:30].mean(0), rtol=1e-5)
    np.testing.assert_allclose(z[:30, :4].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:30, :4].std(0), 1 / 2, rtol=1e-4)       # 1/sqrt(4)
    np.testing.assert_allclose(z[:30, 4:].std(0), 1 / 4, rtol=1e-4)       # 1/sqrt(16)
    assert (z[30:, :4] > 5).all()                                          # far rows stay far
    assert np.isnan(z[35, 4:]).all() and np.isfinite(z[35, :4]).all()
    z2, _ = hybrid_vectors([a, b], np.arange(30), balance_blocks=False)
    np.testing.assert_allclose(z2[:30, :4].std(0), 1, rtol=1e-4)
    with pytest.raises(ValueError, match="block 1"):
        hybrid_vectors([a, b[:10]], train)

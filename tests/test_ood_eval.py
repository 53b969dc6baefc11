"""OOD evaluation sets, the AUROC table and the cutoff-vs-AUC trade-off (their figures: test_plots.py)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import cxrbench.ood as oe  # noqa: E402
from cxrbench.data import load_manifest  # noqa: E402
from cxrbench.data.synthetic import write_phantom_set  # noqa: E402
from cxrbench.labels import NIH_FINDINGS  # noqa: E402
from cxrbench.models.autoencoder import ConvAutoencoder  # noqa: E402
from cxrbench.models.bundle import ModelCard, load_bundle, save_bundle  # noqa: E402
from cxrbench.models.classifier import build_classifier  # noqa: E402
from cxrbench.ood import CORRUPTIONS, SCORER_NAMES  # noqa: E402
from cxrbench.preprocess import Preprocess  # noqa: E402


class FlatGreyModel:
    """OOD-protocol toy: reconstructs every image as flat 0.5 grey; latent = (mean - 0.5, std) of the image."""

    latent_dim = 2
    image_size = 64

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3)) - 0.5, x.std((1, 2, 3))], 1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 0.5)


def near_grey(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 64, 64) in [0.45, 0.55]: what FlatGreyModel reconstructs well."""
    g = torch.Generator().manual_seed(seed)
    return 0.45 + 0.1 * torch.rand(n, 1, 64, 64, generator=g)


def test_digits_and_photographs_sets():
    digits = oe.digits_set(50, seed=0)
    assert digits.shape == (50, 1, 64, 64) and digits.dtype == torch.float32
    assert float(digits.min()) >= 0 and float(digits.max()) <= 1
    assert float(digits[:, :, :, :2].mean()) < 0.05 < float(digits[:, :, 20:44, 20:44].mean())  # white ink on black
    assert oe.digits_set().shape[0] == 1797
    torch.testing.assert_close(oe.digits_set(50, seed=0), digits)
    photos = oe.photo_set(2, seed=0, names=("camera", "astronaut", "coins"))
    assert photos.shape == (6, 1, 64, 64) and 0 <= float(photos.min()) and float(photos.max()) <= 1
    torch.testing.assert_close(oe.photo_set(2, seed=0, names=("camera", "astronaut", "coins")), photos)
    assert not torch.allclose(oe.photo_set(2, seed=1, names=("camera", "astronaut", "coins")), photos)
    assert float(photos.std()) > 0.1


def test_corrupted_sets():
    x = near_grey(3)
    sets = oe.corrupted_sets(x)
    assert list(sets) == list(CORRUPTIONS)
    torch.testing.assert_close(sets["invert"], 1 - x)
    torch.testing.assert_close(torch.rot90(sets["rot180"], 2, dims=(-2, -1)), x)
    assert all(v.shape == x.shape for v in sets.values())


def test_auroc_table_on_a_toy_model():
    model = FlatGreyModel()
    x_in = near_grey(40, seed=0)
    far = torch.rand(30, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    sets = {"far": far, "same": x_in.clone()}
    table = oe.ood_auroc_table(model, x_in, sets)
    assert table.shape == (2 * len(SCORER_NAMES), 7)
    assert list(table.columns) == ["set", "scorer", "auroc", "fpr_at_95_tpr", "aupr_out", "n_in", "n_out"]
    t = table.set_index(["set", "scorer"])
    for scorer in ("l1", "l2", "ssim", "latent"):
        assert t.loc[("far", scorer), "auroc"] == 1.0 and t.loc[("far", scorer), "fpr_at_95_tpr"] == 0.0
        assert t.loc[("same", scorer), "auroc"] == pytest.approx(0.5)  # identical images: all ties
    assert t.loc[("far", "l1"), "n_out"] == 30 and t.loc[("far", "l1"), "n_in"] == 40
    # precomputed scores give the same table, without a model
    scores = oe.score_sets(model, {"in": x_in, **sets})
    pd.testing.assert_frame_equal(oe.ood_auroc_table(None, scores.pop("in"), scores), table)
    with pytest.raises(TypeError, match="no model"):
        oe.ood_auroc_table(None, x_in, sets)


def test_evaluation_sets_from_a_data_root(tmp_path):
    write_phantom_set(tmp_path / "cxr" / "nih", 4, size=64, seed=0)
    write_phantom_set(tmp_path / "cxr" / "nonchest", 3, size=80, seed=5)
    folders = oe.dev_data_folders(tmp_path)
    assert folders["nih"] == tmp_path / "cxr" / "nih" and folders["pediatric"] is None
    assert oe.dev_data_folders(tmp_path / "cxr" / "nih")["nonchest"] is None
    held, rows = oe.load_images(folders["nih"], cache_dir=tmp_path / "cache")
    assert held.shape == (4, 1, 64, 64) and len(rows) == 4
    with pytest.warns(UserWarning, match="pediatric"):
        sets = oe.evaluation_sets(tmp_path, held, n_digits=10, crops_per_photo=1, cache_dir=tmp_path / "cache")
    assert list(sets) == ["non-chest", "digits", "photographs", *CORRUPTIONS]
    assert sets["non-chest"].shape == (3, 1, 64, 64) and sets["digits"].shape == (10, 1, 64, 64)
    assert sets["photographs"].shape == (len(oe.PHOTOGRAPHS), 1, 64, 64)
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in sets.values())


def test_tradeoff_sweep_rises_as_the_gate_removes_shifted_images():
    rng = np.random.default_rng(0)
    n = 300
    ood = rng.random(n)
    y = rng.integers(0, 2, n)
    shifted = ood > 0.5  # the classifier is good on in-distribution images, random on shifted ones
    p = np.where(shifted, rng.random(n), 0.3 * rng.random(n) + 0.6 * y)
    table = oe.tradeoff_sweep(ood, y, p, bundle_cutoff=0.5, n_points=10, n_bootstrap=20)
    assert table["bundle_cutoff"].sum() == 1
    marked = table[table["bundle_cutoff"]].iloc[0]
    assert marked["cutoff"] == 0.5 and marked["retained_fraction"] == pytest.approx(1 - shifted.mean())
    assert table["retained_fraction"].iloc[0] == pytest.approx(0.1, abs=0.01)
    assert table["retained_fraction"].iloc[-1] == 1
    assert marked["auc_macro"] == pytest.approx(1.0) and table["auc_macro"].iloc[-1] < 0.85
    assert (table["auc_macro_ci_low"] <= table["auc_macro"] + 1e-12).all()
    assert (table["auc_macro"] <= table["auc_macro_ci_high"] + 1e-12).all()


def test_skill_warning_only_for_a_classifier_at_or_below_chance():
    rng = np.random.default_rng(1)
    n = 400
    ood, y = rng.random(n), rng.integers(0, 2, n)
    skilled = 0.5 * y + 0.6 * rng.random(n)
    for p, warned in ((skilled, False), (1.0 - skilled, True), (rng.random(n), True)):
        table = oe.tradeoff_sweep(ood, y, p, n_points=5, n_bootstrap=50)
        message = oe.skill_warning(table)
        assert (message is not None) == warned, (table.iloc[-1].to_dict(), message)
        if warned:
            assert "no skill" in message and f"{table['auc_macro'].iloc[-1]:.3f}" in message
    no_ci = oe.tradeoff_sweep(ood, y, 1.0 - skilled, n_points=5, n_bootstrap=0)
    assert "no skill" in oe.skill_warning(no_ci) and "[" not in oe.skill_warning(no_ci)


def test_rotate_images():
    img = np.zeros((32, 32), np.float32)
    img[4:10, 6:20] = 1.0
    np.testing.assert_allclose(oe.rotate_images([img], 90)[0], np.rot90(img), atol=1e-5)
    np.testing.assert_array_equal(oe.rotate_images([img], 0)[0], img)
    assert oe.rotate_images([img], 45)[0].shape == (32, 32)


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    clf = build_classifier("resnet18", 14, 1).eval()
    save_bundle(root / "clf", clf, ModelCard(kind="classifier", builder="classifier",
                                             builder_kwargs={"arch": "resnet18", "num_outputs": 14, "in_channels": 1},
                                             labels=list(NIH_FINDINGS), preprocess=Preprocess(size=32).to_dict()))
    ae = ConvAutoencoder(latent_dim=8, base_channels=4).eval()
    for name, thr in (("open", 10.0), ("closed", -1.0)):
        save_bundle(root / name, ae, ModelCard(kind="ood", builder="autoencoder",
                                               builder_kwargs={"latent_dim": 8, "base_channels": 4},
                                               preprocess=Preprocess(size=64, normalize="zero_one").to_dict(),
                                               ood={"cutoff": {"scorer": "ssim", "threshold": thr, "method": "test"}}))
    data = write_phantom_set(root / "ph", 16, size=64, seed=2)
    return {k: load_bundle(root / k) for k in ("clf", "open", "closed")}, load_manifest(data)


def test_rotation_and_shifted_set_tradeoffs(tiny_bundles):
    (b, manifest) = tiny_bundles
    per_angle, sweep = oe.rotation_tradeoff(b["clf"], b["open"], manifest, angles=(0, 45, 90), n_points=5,
                                            n_bootstrap=20)
    assert list(per_angle["angle"]) == [0, 45, 90] and (per_angle["n"] == 16).all()
    assert (per_angle["rejected_fraction"] == 0).all()  # a cutoff above every score keeps everything
    np.testing.assert_allclose(per_angle["auc_retained"], per_angle["auc_all"])
    assert sweep["bundle_cutoff"].sum() == 1 and sweep["retained_fraction"].max() == 1.0
    assert sweep["mean_angle_retained"].dropna().between(0, 90).all()
    assert sweep.loc[sweep["retained_fraction"] == 1.0, "mean_angle_retained"].iloc[0] == pytest.approx(45.0)

    closed, _ = oe.rotation_tradeoff(b["clf"], b["closed"], manifest, angles=(0,), n_bootstrap=0)
    assert closed["rejected_fraction"].iloc[0] == 1.0 and np.isnan(closed["auc_retained"].iloc[0])

    table = oe.shifted_set_tradeoff(b["clf"], b["open"], manifest, n_points=4, n_bootstrap=10)
    assert {"auc_Cardiomegaly", "auc_macro", "auc_macro_ci_low", "bundle_cutoff"} <= set(table.columns)
    assert table.loc[table["bundle_cutoff"], "retained_fraction"].iloc[0] == 1.0
    with pytest.raises(ValueError, match="share none"):
        oe.shifted_set_tradeoff(b["clf"], b["open"], manifest[["path", "image_id", "patient_id"]])


def test_unseen_rows_drops_the_classifiers_train_and_val_images(tiny_bundles, tmp_path):
    (b, manifest) = tiny_bundles
    clf = b["clf"]
    assert oe.unseen_rows(clf, manifest) is manifest  # no split file: nothing is known to be seen
    ids = manifest["image_id"].tolist()
    split = pd.DataFrame({"image_id": ids[:6], "patient_id": ids[:6], "split": ["train"] * 3 + ["val", "test", "test"]})
    split.to_csv(tmp_path / "split.csv", index=False)
    clf.card.training = {"split_file": str(tmp_path / "split.csv")}
    try:
        kept = oe.unseen_rows(clf, manifest)
    finally:
        clf.card.training = {}
    assert kept["image_id"].tolist() == ids[4:] and kept.attrs == manifest.attrs


@pytest.mark.realdata
def test_real_ood_sets_load_with_the_expected_counts(shared_data):
    folders = oe.dev_data_folders(shared_data)
    nonchest, _ = oe.load_images(folders["nonchest"])
    paediatric, rows = oe.load_images(folders["pediatric"])
    assert nonchest.shape == (70, 1, 64, 64) and paediatric.shape == (450, 1, 64, 64)
    assert int(rows["Pneumonia"].sum()) == 300
    for x in (nonchest, paediatric):
        assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.std()) > 0.1
    nih = load_manifest(folders["nih"])
    held, _ = oe.load_images(nih.iloc[:8])
    sets = oe.evaluation_sets(shared_data, held, n_digits=20, crops_per_photo=1)
    assert list(sets) == ["non-chest", "digits", "photographs", "paediatric", *CORRUPTIONS]
    assert len(sets["non-chest"]) == 70 and len(sets["paediatric"]) == 450 and len(sets["rot90"]) == 8


def test_ood_tradeoff_command_writes_the_sweep_and_leaves_out_seen_images(tiny_bundles, tmp_path, capsys):
    from cxrbench.cli.main import main

    (b, manifest) = tiny_bundles
    data = manifest.attrs["root"]
    args = ["ood-tradeoff", "--classifier", str(b["clf"].path), "--ood", str(b["open"].path), "--data", str(data),
            "--points", "4", "--bootstrap", "10"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    sweep = pd.read_csv(tmp_path / "plain" / "tradeoff.csv")
    assert sweep["bundle_cutoff"].sum() == 1 and sweep["retained_fraction"].max() == 1.0
    assert (tmp_path / "plain" / "tradeoff.png").stat().st_size > 1000
    assert "16 of 16 images are unseen" in capsys.readouterr().out

    assert main([*args, "--rotate", "0", "90", "--out", str(tmp_path / "rot")]) == 0
    per_angle = pd.read_csv(tmp_path / "rot" / "per_angle.csv")
    assert list(per_angle["angle"]) == [0, 90] and (per_angle["n"] == 16).all()
    assert (tmp_path / "rot" / "rotation.png").is_file()

    # a classifier whose split file lists every image as train or val: nothing is left to evaluate on
    split = pd.DataFrame({"image_id": manifest["image_id"], "patient_id": manifest["patient_id"],
                          "split": ["train"] * 12 + ["val"] * 4})
    split.to_csv(tmp_path / "split.csv", index=False)
    card = b["clf"].card
    seen = save_bundle(tmp_path / "seen", b["clf"].model, ModelCard(
        kind="classifier", builder="classifier", builder_kwargs=card.builder_kwargs, labels=card.labels,
        preprocess=card.preprocess, training={"split_file": str(tmp_path / "split.csv")}))
    assert main(["ood-tradeoff", "--classifier", str(seen), "--ood", str(b["open"].path), "--data", str(data),
                 "--out", str(tmp_path / "none")]) != 0
    assert "no image left that neither bundle trained or calibrated on" in capsys.readouterr().err

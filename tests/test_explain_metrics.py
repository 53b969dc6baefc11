"""Explanation metrics on hand-made maps, faithfulness curves, the comparison table and the explain CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrbench.explain import get_explainer
from cxrbench.explain.metrics import (
    boxes_to_mask,
    compare_methods,
    deletion_insertion,
    endpoint_scores,
    mass_fraction,
    phantom_localisation_set,
    pointing_game,
    read_bbox_list,
    topk_iou,
    topk_mask,
)
from cxrbench.plots import faithfulness_figure

# --------------------------------------------------------------------------------------------------
# localisation on hand-made maps


def test_boxes_to_mask_exact_pixels_and_scaling():
    mask = boxes_to_mask([(1, 2, 3, 4)], (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[2:6, 1:4] = True
    np.testing.assert_array_equal(mask, expected)
    # a 256 px box on an 8 px grid: (64, 128, 128, 64) -> cols 2..5, rows 4..5
    scaled = boxes_to_mask([("Mass", 64, 128, 128, 64)], (8, 8), box_size=256)
    assert scaled.sum() == 8 and scaled[4:6, 2:6].all()
    two = boxes_to_mask([(0, 0, 2, 2), (6, 6, 2, 2)], (8, 8))
    assert two.sum() == 8
    with pytest.raises(ValueError, match="box"):
        boxes_to_mask([(1, 2, 3)], (8, 8))
    with pytest.raises(ValueError, match="w, h"):
        boxes_to_mask([(1, 2, -3, 1)], (8, 8))


def test_pointing_game_hit_miss_tolerance_and_constant_map():
    heat = np.zeros((16, 16), np.float32)
    heat[4, 5] = 2.0
    heat[12, 12] = 1.0
    assert pointing_game(heat, boxes_to_mask([(4, 3, 3, 3)], (16, 16))) is True
    assert pointing_game(heat, boxes_to_mask([(10, 10, 4, 4)], (16, 16))) is False  # holds only the 2nd peak
    near = boxes_to_mask([(7, 4, 2, 2)], (16, 16))  # 2 px right of the peak
    assert not pointing_game(heat, near) and not pointing_game(heat, near, tolerance=1.5)
    assert pointing_game(heat, near, tolerance=2)
    assert pointing_game(np.ones((16, 16)), np.ones((16, 16), bool)) is False  # a flat map points nowhere
    batch = np.stack([heat, heat[::-1, ::-1]])
    np.testing.assert_array_equal(pointing_game(batch, boxes_to_mask([(4, 3, 3, 3)], (16, 16))), [True, False])
    with pytest.raises(ValueError, match="H, W"):
        pointing_game(heat, np.ones((8, 8), bool))


def test_topk_iou_exact_values():
    heat = np.arange(64, dtype=np.float32).reshape(8, 8)  # the top 25 % = rows 6 and 7
    assert topk_mask(heat, 0.25).sum() == 16 and topk_mask(heat, 0.25)[6:].all()
    left_half_bottom = boxes_to_mask([(0, 6, 4, 2)], (8, 8))  # 8 of the 16 top pixels
    assert topk_iou(heat, left_half_bottom, 0.25) == pytest.approx(8 / 16)
    bottom_three = boxes_to_mask([(0, 5, 8, 3)], (8, 8))  # 24 px containing all 16
    assert topk_iou(heat, bottom_three, 0.25) == pytest.approx(16 / 24)
    assert topk_iou(heat, boxes_to_mask([(0, 0, 8, 2)], (8, 8)), 0.25) == 0.0
    # ties broken by position: a flat map selects exactly k pixels
    assert topk_mask(np.zeros((4, 4)), 0.5).sum() == 8
    with pytest.raises(ValueError, match="fraction"):
        topk_mask(heat, 0.0)


def test_mass_fraction_of_hand_made_map():
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[0, 1], heat[3, 3], heat[2, 2] = 2.0, 1.0, 1.0, -5.0  # negatives are ignored
    region = np.zeros((4, 4), bool)
    region[0, :2] = True
    assert mass_fraction(heat, region) == pytest.approx(0.75)
    assert np.isnan(mass_fraction(np.zeros((4, 4)), region))


def test_read_bbox_list(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Infiltrate,10,20,30,40\n")
    table = read_bbox_list(str(path))
    assert table.to_dict("records") == [{"image_id": "00000001_000.png", "finding": "Infiltration",
                                         "x": 10, "y": 20, "w": 30, "h": 40}]


# --------------------------------------------------------------------------------------------------
# faithfulness


class PatchModel(nn.Module):
    """Logit 0 = 8 * mean of a 6x6 patch minus 4: only that patch matters (output 1 is noise-free 0)."""

    def __init__(self, size: int = 24) -> None:
        super().__init__()
        self.weight = torch.zeros(1, 1, size, size)
        self.weight[..., 3:9, 12:18] = 1.0 / 36

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 8.0 * (x * self.weight).sum(dim=(1, 2, 3)) - 4.0
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_deletion_of_a_perfect_map_falls_faster_than_of_a_random_map():
    model = PatchModel()
    x = torch.ones(3, 1, 24, 24)
    perfect = np.repeat(model.weight[0].numpy(), 3, axis=0)
    random = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)
    good = deletion_insertion(model, x, perfect, [0, 0, 0], steps=12, baseline="zero")
    bad = deletion_insertion(model, x, random, [0, 0, 0], steps=12, baseline="zero")
    assert good.deletion.shape == (3, 13) and good.fractions[0] == 0 and good.fractions[-1] == 1
    # both start from the intact image and end at the baseline
    np.testing.assert_allclose(good.deletion[:, 0], torch.sigmoid(torch.tensor(4.0)).item(), rtol=1e-6)
    np.testing.assert_allclose(good.deletion[:, -1], torch.sigmoid(torch.tensor(-4.0)).item(), rtol=1e-6)
    # 36 of 576 pixels matter: the perfect map removes them all in the first step (1/12 of the pixels)
    np.testing.assert_allclose(good.deletion[:, 1], good.deletion[:, -1], rtol=1e-6)
    assert np.all(good.deletion_auc < bad.deletion_auc - 0.3)
    assert np.all(good.insertion_auc > bad.insertion_auc + 0.3)
    logits = deletion_insertion(model, x[:1], perfect[:1], [0], steps=4, baseline="mean", score="logit")
    assert logits.deletion[0, 0] == pytest.approx(4.0)  # the mean of a constant image is the image
    with pytest.raises(ValueError, match="maps"):
        deletion_insertion(model, x, perfect[:2], [0, 0, 0])


def test_blur_baseline_and_batching_give_the_same_curves():
    model = PatchModel()
    x = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    heat = np.random.default_rng(1).random((2, 24, 24))
    one = deletion_insertion(model, x, heat, [0, 0], steps=6, baseline="blur", batch_size=3)
    many = deletion_insertion(model, x, heat, [0, 0], steps=6, baseline="blur", batch_size=64)
    np.testing.assert_allclose(one.deletion, many.deletion, rtol=1e-5)
    np.testing.assert_allclose(one.insertion, many.insertion, rtol=1e-5)


def test_curves_from_shared_endpoints_equal_the_curves_computed_whole():
    """compare_methods scores each image and its baseline once for every method (endpoint_scores): the curves are
    those deletion_insertion computes on its own, and the ends are the image's and the baseline's scores."""
    model = PatchModel()
    x = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    heat = np.random.default_rng(3).random((3, 24, 24))
    for score in ("probability", "logit"):
        ends = endpoint_scores(model, x, [0, 1, 0], baseline="blur", score=score)
        whole = deletion_insertion(model, x, heat, [0, 1, 0], steps=5, baseline="blur", score=score)
        shared = deletion_insertion(model, x, heat, [0, 1, 0], steps=5, baseline="blur", score=score, endpoints=ends)
        np.testing.assert_allclose(shared.deletion, whole.deletion, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(shared.insertion, whole.insertion, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(whole.deletion[:, [0, -1]], ends, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(whole.insertion[:, [0, -1]], ends[:, ::-1], rtol=1e-6, atol=1e-7)
    one_step = deletion_insertion(model, x, heat, [0, 1, 0], steps=1, endpoints=ends, score="logit")
    np.testing.assert_allclose(one_step.deletion, ends)  # nothing left to compute
    with pytest.raises(ValueError, match=r"endpoints must be \(N, 2\)"):
        deletion_insertion(model, x, heat, [0, 1, 0], endpoints=ends[:2])


# --------------------------------------------------------------------------------------------------
# the comparison table


class LeftTopNet(nn.Module):
    """Looks only at the top-left quadrant (positive weights); a DenseNet-like features/classifier layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(8, 2)
        with torch.no_grad():
            self.features[0].weight.abs_()
            self.classifier.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(x)
        keep[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 1.0
        return self.classifier(self.features(x * keep).mean(dim=(2, 3)))


def test_compare_methods_table_ranks_a_focused_model_above_chance():
    model = LeftTopNet().eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    quadrant = np.zeros((32, 32), bool)
    quadrant[:16, :16] = True
    lungs = np.ones((3, 32, 32), bool)
    lungs[:, :, 16:] = False
    methods = ["saliency", "gradcam", "cam", "integrated_gradients"]
    table, detail, curves, maps = compare_methods(model, x, [0, 1, 0], [quadrant, [(0, 0, 16, 16)], quadrant],
                                            methods=methods, lung_masks=lungs, top_fraction=0.1, curve_steps=4,
                                            explainer_options={"integrated_gradients": {"n_steps": 4}},
                                            return_details=True)
    assert list(table["method"]) == [*methods, "random"]
    assert {"seconds_per_image", "pointing_game", "iou_top10%", "mass_in_region", "mass_in_lungs",
            "deletion_auc", "insertion_auc"} <= set(table.columns)
    assert len(detail) == 3 * (len(methods) + 1) and (table["n_images"] == 3).all()
    # the curves behind the table's AUC columns come back too (the notebook plots them without recomputing)
    assert list(curves) == [*methods, "random"] and curves["gradcam"].deletion.shape == (3, 5)
    # and the maps they were computed on (the notebook's figures show them without recomputing)
    assert list(maps) == [*methods, "random"] and maps["gradcam"].shape == (3, 32, 32)
    np.testing.assert_array_equal(maps["saliency"][1], get_explainer("saliency", model)(x[1:2])[0, 0])
    expected = table.set_index("method").loc["gradcam", "deletion_auc"]
    assert curves["gradcam"].deletion_auc.mean() == pytest.approx(expected)
    fig = faithfulness_figure(curves, ["gradcam", "random"])
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
    rows = table.set_index("method")
    for m in ("saliency", "gradcam", "integrated_gradients"):
        assert rows.loc[m, "pointing_game"] == 1.0 and rows.loc[m, "mass_in_region"] > 0.9
        assert rows.loc[m, "mass_in_region"] > rows.loc["random", "mass_in_region"] + 0.5
    assert 0.1 < rows.loc["random", "mass_in_region"] < 0.4  # chance: a quarter of the image
    assert rows.loc["random", "mass_in_lungs"] == pytest.approx(0.5, abs=0.1)
    assert (table.loc[table["method"] != "random", "seconds_per_image"] > 0).all()
    with pytest.raises(ValueError, match="unknown methods"):
        compare_methods(model, x, [0, 0, 0], methods=["lime"])


def test_phantom_localisation_set_gives_exact_lesions():
    images, lesions, lungs = phantom_localisation_set(2, size=48, finding="Mass", seed=5)
    assert images.shape == lesions.shape == lungs.shape == (2, 48, 48)
    assert lesions.dtype == bool and lesions.any(axis=(1, 2)).all()
    assert (lesions & ~lungs).sum() == 0  # a mass lies inside the lungs


# --------------------------------------------------------------------------------------------------
# the explain CLI


@pytest.fixture(scope="module")
def classifier_bundle(tmp_path_factory):
    from cxrbench.labels import NIH_FINDINGS
    from cxrbench.models.bundle import ModelCard, save_bundle
    from cxrbench.models.classifier import build_classifier
    from cxrbench.preprocess import Preprocess

    torch.manual_seed(0)
    model = build_classifier("resnet18", len(NIH_FINDINGS), 1, pretrained=False)
    card = ModelCard(kind="classifier", builder="classifier",
                     builder_kwargs={"arch": "resnet18", "num_outputs": len(NIH_FINDINGS), "in_channels": 1},
                     labels=list(NIH_FINDINGS), preprocess=Preprocess(size=32).to_dict())
    return save_bundle(tmp_path_factory.mktemp("clf") / "bundle", model, card)


@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_explain_cli_writes_maps_overlays_and_error_rows(classifier_bundle, tmp_path, method, capsys):
    from PIL import Image

    from cxrbench.cli.main import main

    rng = np.random.default_rng(0)
    good = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["explain", "--bundle", str(classifier_bundle), "--method", method, str(good), str(broken),
            str(tmp_path / "missing.png"), "--out", str(out), "-q"]
    assert main(args) == 0
    summary = pd.read_csv(out / "explain_summary.csv", keep_default_na=False)
    assert len(summary) == 3 and (summary["error"] != "").sum() == 2
    maps = np.load(out / f"a_{method}.npy")
    n_maps = 1 if method == "saliency" else 3
    assert maps.shape == (n_maps, 32, 32) and maps.dtype == np.float32 and np.isfinite(maps).all()
    overlays = summary.loc[0, "overlays"].split("|")
    assert len(overlays) == n_maps + (n_maps > 1)
    rgb = np.asarray(Image.open(out / overlays[0]))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert "broken.png" in capsys.readouterr().err
    # explicit targets by name
    assert main([*args[:-3], "--out", str(tmp_path / "t"), "--targets", "Effusion", "Mass", "-q"]) == 0
    chosen = pd.read_csv(tmp_path / "t" / "explain_summary.csv", keep_default_na=False)
    assert chosen.loc[0, "targets"] == ("Effusion+Mass" if method == "saliency" else "Effusion|Mass")
    # every file unreadable: exit 1, still a summary
    assert main(["explain", "--bundle", str(classifier_bundle), str(broken), "--out", str(tmp_path / "e"), "-q"]) == 1
    assert json.loads((classifier_bundle / "card.json").read_text())["kind"] == "classifier"

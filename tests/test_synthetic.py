"""Tests for the synthetic chest-radiograph phantoms (cxrbench.data.synthetic)."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cxrbench.data.synthetic import (
    DEFAULT_PREVALENCE,
    SUPPORTED_FINDINGS,
    make_phantom,
    make_phantom_set,
    write_phantom_set,
)
from cxrbench.labels import NIH_FINDINGS, NO_FINDING


def _widest(mask: np.ndarray) -> int:
    cols = [np.flatnonzero(r) for r in mask if r.any()]
    return max(c[-1] - c[0] + 1 for c in cols)


def test_same_seed_same_array_different_seed_different():
    a = make_phantom(64, findings=["Nodule", "Effusion"], seed=3)
    b = make_phantom(64, findings=["Nodule", "Effusion"], seed=3)
    c = make_phantom(64, findings=["Nodule", "Effusion"], seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    np.testing.assert_array_equal(a.lesion_masks["Nodule"], b.lesion_masks["Nodule"])
    assert np.abs(a.image - c.image).mean() > 0.01
    assert not np.array_equal(a.lesion_masks["Nodule"], c.lesion_masks["Nodule"])


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_dtypes_and_range(size):
    ph = make_phantom(size, findings=["Mass"], seed=1)
    assert ph.image.shape == ph.lung_mask.shape == ph.heart_mask.shape == (size, size)
    assert ph.image.dtype == np.float32 and ph.lung_mask.dtype == bool
    assert np.isfinite(ph.image).all() and ph.image.min() >= 0.0 and ph.image.max() <= 1.0
    assert 0.2 < ph.lung_mask.mean() < 0.6  # lungs fill a chest-film-like share of the frame
    assert set(ph.labels) == set(NIH_FINDINGS) and sum(ph.labels.values()) == 1 and ph.labels["Mass"] == 1
    assert set(ph.lesion_masks) == {"Mass"} and ph.finding_labels == "Mass"


def test_anatomy_is_the_same_at_every_size():
    small, large = make_phantom(64, seed=7), make_phantom(256, seed=7)
    assert abs(small.ctr - large.ctr) < 0.04
    shrunk = large.lung_mask.reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.5
    assert (shrunk == small.lung_mask).mean() > 0.97


def test_looks_like_a_chest_film():
    ph = make_phantom(128, seed=2)
    img, lung, heart = ph.image, ph.lung_mask, ph.heart_mask
    assert img[lung].mean() < img[heart].mean() - 0.25  # dark lungs, bright heart
    assert img[lung].mean() < 0.45 and img[heart].mean() > 0.7
    assert img[:8, :8].mean() < 0.2 and img[:8, -8:].mean() < 0.2  # air beside the neck
    assert img[-10:, 40:88].mean() > 0.75  # abdomen under the diaphragm
    left, right = lung[:, :64].sum(), lung[:, 64:].sum()
    assert 0.6 < left / right < 1.6  # two lungs
    heart_cols = np.flatnonzero(heart.any(axis=0))
    assert heart_cols.mean() > 64  # heart to the image right of centre (patient's left)
    # ribs: a column through a lung alternates between rib and interspace
    column = img[np.flatnonzero(lung[:, 30])[5:-5], 30]
    assert np.ptp(column) > 0.08


@pytest.mark.parametrize("seed", range(4))
def test_nodule_is_inside_a_lung_and_brighter_than_around_it(seed):
    ph = make_phantom(128, findings=["Nodule"], seed=seed)
    nod = ph.lesion_masks["Nodule"]
    assert nod.sum() >= 5
    assert not (nod & ~ph.lung_mask).any()
    ring = ndimage.binary_dilation(nod, iterations=4) & ~ndimage.binary_dilation(nod, iterations=1) & ph.lung_mask
    assert ph.image[nod].mean() > ph.image[ring].mean() + 0.08


def test_mass_is_larger_than_a_nodule():
    nodules = [make_phantom(128, findings=["Nodule"], seed=s).lesion_masks["Nodule"].sum() for s in range(3)]
    masses = [make_phantom(128, findings=["Mass"], seed=s).lesion_masks["Mass"].sum() for s in range(3)]
    assert min(masses) > 2 * max(nodules)


def test_adding_a_finding_changes_only_its_neighbourhood():
    plain = make_phantom(128, seed=5)
    sick = make_phantom(128, findings=["Nodule"], seed=5)
    near = ndimage.binary_dilation(sick.lesion_masks["Nodule"], iterations=5)
    diff = np.abs(sick.image - plain.image)
    assert diff[near].max() > 0.15
    assert diff[~near].max() < 1e-6
    np.testing.assert_array_equal(plain.lung_mask, sick.lung_mask)


@pytest.mark.parametrize("seed", range(4))
def test_effusion_fills_a_lung_base(seed):
    ph = make_phantom(128, findings=["pleural effusion"], seed=seed)  # an alias
    fluid = ph.lesion_masks["Effusion"]
    assert ph.labels["Effusion"] == 1 and fluid.sum() > 20
    assert not (fluid & ~ph.lung_mask).any()
    half = slice(0, 64) if fluid[:, :64].sum() > fluid[:, 64:].sum() else slice(64, 128)
    lung_rows = np.flatnonzero(ph.lung_mask[:, half].any(axis=1))  # the lung on the effusion's side
    fluid_rows = np.flatnonzero(fluid.any(axis=1))
    assert fluid_rows.max() >= lung_rows.max() - 2  # reaches the costophrenic angle
    assert fluid_rows.min() > lung_rows.min() + 0.6 * (lung_rows.max() - lung_rows.min())
    assert ph.image[fluid].mean() > ph.image[ph.lung_mask & ~fluid].mean() + 0.15


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("seed", range(5))
def test_cardiothoracic_ratio(size, seed):
    normal = make_phantom(size, seed=seed)
    enlarged = make_phantom(size, findings=["Cardiomegaly"], seed=seed)
    assert normal.ctr < 0.5 < enlarged.ctr
    thorax = _widest(enlarged.lung_mask)
    assert enlarged.ctr == pytest.approx(_widest(enlarged.heart_mask) / thorax, abs=1e-9)
    np.testing.assert_array_equal(enlarged.lesion_masks["Cardiomegaly"], enlarged.heart_mask)
    assert enlarged.heart_mask.sum() > 1.3 * normal.heart_mask.sum()


@pytest.mark.parametrize("seed", range(4))
def test_pneumothorax_is_a_dark_rim_with_a_pleural_line(seed):
    ph = make_phantom(128, findings=["Pneumothorax"], seed=seed)
    rim = ph.lesion_masks["Pneumothorax"]
    assert rim.sum() > 30 and not (rim & ~ph.lung_mask).any()
    side = slice(0, 64) if rim[:, :64].sum() > rim[:, 64:].sum() else slice(64, 128)
    lung_side = np.zeros_like(rim)
    lung_side[:, side] = ph.lung_mask[:, side]
    assert np.flatnonzero(rim.any(axis=1)).min() <= np.flatnonzero(lung_side.any(axis=1)).min() + 1  # at the apex
    inner = ndimage.binary_dilation(rim, iterations=6) & lung_side & ~ndimage.binary_dilation(rim, iterations=2)
    assert ph.image[rim].mean() < ph.image[inner].mean() - 0.03  # darker than the collapsed lung beside it
    line = ndimage.binary_dilation(rim, iterations=2) & ~rim & lung_side
    assert ph.image[line].mean() > ph.image[rim].mean() + 0.03  # the visible pleural line


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Nodule"):
        make_phantom(64, findings=["Hernia"])
    with pytest.raises(ValueError, match="supported|support"):
        make_phantom(64, findings=["not a finding"])
    with pytest.raises(TypeError):
        make_phantom(64, findings="Nodule")
    with pytest.raises(ValueError, match="size"):
        make_phantom(16)
    with pytest.raises(ValueError, match="seed"):
        make_phantom(64, seed=-1)
    with pytest.raises(ValueError, match="prevalence"):
        make_phantom_set(2, size=32, prevalence={"Nodule": 1.5})
    with pytest.raises(ValueError, match="Hernia"):
        make_phantom_set(2, size=32, prevalence={"Hernia": 0.5})


def test_phantom_set_has_a_mix_and_is_reproducible():
    phantoms = make_phantom_set(40, size=32, seed=1)
    again = make_phantom_set(40, size=32, seed=1)
    assert [p.seed for p in phantoms] == [p.seed for p in again]
    assert all(np.array_equal(p.image, q.image) for p, q in zip(phantoms, again))
    counts = {f: sum(p.labels[f] for p in phantoms) for f in SUPPORTED_FINDINGS}
    assert sum(p.finding_labels == NO_FINDING for p in phantoms) >= 5
    assert sum(c > 0 for c in counts.values()) >= 4
    assert sum(counts.values()) > 10
    redrawn = make_phantom(32, findings=phantoms[3].findings, seed=phantoms[3].seed)
    np.testing.assert_array_equal(redrawn.image, phantoms[3].image)
    only = make_phantom_set(5, size=32, seed=2, prevalence={"nodule": 1.0})
    assert all(p.findings == ("Nodule",) for p in only)
    assert set(DEFAULT_PREVALENCE) == set(SUPPORTED_FINDINGS)


def test_write_phantom_set_round_trip(tmp_path):
    root = write_phantom_set(tmp_path / "phantoms", 8, size=64, seed=3)
    expected = make_phantom_set(8, size=64, seed=3)
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    assert {"file", "patient_id", "finding_labels", "lesion_bbox_json", *NIH_FINDINGS} <= set(rows[0])
    for row, ph in zip(rows, expected):
        image = np.asarray(Image.open(root / row["file"]))
        assert image.dtype == np.uint8 and image.shape == (64, 64)
        np.testing.assert_array_equal(image, np.round(ph.image * 255).astype(np.uint8))
        mask = np.asarray(Image.open(root / row["mask_file"]))
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, ph.lung_mask)
        assert row["finding_labels"] == ph.finding_labels
        assert [int(row[f]) for f in NIH_FINDINGS] == [ph.labels[f] for f in NIH_FINDINGS]
        boxes = json.loads(row["lesion_bbox_json"])
        assert [b[0] for b in boxes] == list(ph.findings)
        for label, x, y, w, h in boxes:
            ys, xs = np.nonzero(ph.lesion_masks[label])
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert len({r["patient_id"] for r in rows}) == 8


def test_written_set_reads_back_through_the_manifest_reader(tmp_path):
    from cxrbench.data.manifests import load_manifest

    root = write_phantom_set(tmp_path, 6, size=32, seed=0)
    df = load_manifest(root)
    expected = [[p.labels[f] for f in NIH_FINDINGS] for p in make_phantom_set(6, size=32, seed=0)]
    assert len(df) == 6 and df["patient_id"].nunique() == 6
    np.testing.assert_array_equal(df[list(NIH_FINDINGS)].to_numpy(), expected)


def test_sixty_four_phantoms_at_256_px_take_well_under_five_seconds():
    start = time.process_time()  # CPU time: robust to other jobs sharing the machine
    phantoms = make_phantom_set(64, size=256, seed=0)
    elapsed = time.process_time() - start
    assert len(phantoms) == 64
    assert elapsed < 4.0, f"64 phantoms took {elapsed:.2f} s of CPU"

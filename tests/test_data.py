"""cxrbench.data: readers, patient-level splits, the cached Dataset, the catalogue check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image as PILImage

from cxrbench.data import (
    CXRDataset,
    ManifestError,
    MissingFiles,
    SplitError,
    bounding_boxes,
    check_patient_disjoint,
    load_manifest,
    load_split,
    patient_split,
    read_kermany,
    read_mask_pairs,
    read_nih,
    read_nih_table,
    save_split,
    split_summary,
)
from cxrbench.data.catalog import check_dataset, list_datasets
from cxrbench.labels import NIH_FINDINGS
from cxrbench.preprocess import Preprocess


def _png(path: Path, value: int = 128, size=(32, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size, value, np.uint8)
    arr[::4] = 255 - value  # some structure
    PILImage.fromarray(arr).save(path)
    return path


def _link_copy(src: Path, dst: Path) -> Path:
    """A folder of symlinks to the real files (cheap 'copy' that a test may modify)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


# ------------------------------------------------------------------------------------------ readers


@pytest.mark.realdata
def test_shared_dev_manifests(shared_data):
    nih = load_manifest(shared_data / "cxr" / "nih")
    assert len(nih) == 481 and nih["patient_id"].nunique() == 480 and nih.attrs["kind"] == "nih"
    assert list(nih.attrs["label_columns"]) == list(NIH_FINDINGS)
    # counts from the data README
    assert nih["Infiltration"].sum() == 90 and nih["Hernia"].sum() == 17 and nih["Edema"].sum() == 13
    assert (nih[list(NIH_FINDINGS)].sum(axis=1) == 0).sum() == 82  # No Finding
    assert sum(len(bounding_boxes(r)) > 0 for _, r in nih.iterrows()) == 11
    ped = load_manifest(shared_data / "cxr" / "pediatric")
    assert len(ped) == 450 and ped["patient_id"].nunique() == 413 and ped["Pneumonia"].sum() == 300
    assert set(ped["label"]) == {"normal", "bacterial", "viral"}
    masks = load_manifest(shared_data / "cxr" / "masks")
    assert len(masks) == 79 and masks["patient_id"].nunique() == 42
    assert all(os.path.isfile(p) for p in masks["mask_path"])
    assert len(load_manifest(shared_data / "cxr" / "nonchest")) == 70


@pytest.mark.realdata
def test_nih_label_table(nih_table):
    t0 = time.perf_counter()
    table = read_nih_table(nih_table)
    assert time.perf_counter() - t0 < 10
    assert len(table) == 112_120 and table["patient_id"].nunique() == 30_805
    assert table[list(NIH_FINDINGS)].to_numpy().dtype == np.int8
    row = table.set_index("image_id").loc["00000001_001.png"]
    assert row["Cardiomegaly"] == 1 and row["Emphysema"] == 1 and row[list(NIH_FINDINGS)].sum() == 2


def test_official_nih_layout_with_missing_images_and_split_lists(tmp_path):
    root = tmp_path / "nih"
    rows = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
    rows += "a_000.png,Effusion|Mass,0,1,50,M,PA\nb_000.png,No Finding,0,2,40,F,AP\nc_000.png,Hernia,0,3,60,F,PA\n"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv").write_text(rows)
    _png(root / "images_001" / "images" / "a_000.png")
    _png(root / "images_002" / "images" / "b_000.png")
    (root / "train_val_list.txt").write_text("a_000.png\nc_000.png\n")
    (root / "test_list.txt").write_text("b_000.png\n")
    df = read_nih(root)  # c_000 absent: a partial download is usable
    assert list(df["image_id"]) == ["a_000.png", "b_000.png"] and df.attrs["n_absent"] == 1
    assert df.loc[0, "Effusion"] == 1 and df.loc[0, "Mass"] == 1 and df.loc[1, list(NIH_FINDINGS)].sum() == 0
    assert list(df["official_split"]) == ["trainval", "test"]
    with pytest.raises(MissingFiles, match="1 of 3 files are missing"):
        read_nih(root, images_only=False)


def test_kermany_layout_labels_and_patients(tmp_path):
    for rel in ("train/NORMAL/IM-0115-0001.jpeg", "train/NORMAL/NORMAL2-IM-0001-0001.jpeg",
                "train/PNEUMONIA/person1_bacteria_1.jpeg", "train/PNEUMONIA/person1_virus_6.jpeg",
                "test/PNEUMONIA/person7_virus_2.jpeg", "val/NORMAL/IM-0200-0001.jpeg"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(p, format="JPEG")
    df = read_kermany(tmp_path)
    by = df.set_index("image_id")
    assert by.loc["person1_bacteria_1.jpeg", "label"] == "bacterial"
    assert by.loc["person1_virus_6.jpeg", "label"] == "viral"
    assert by.loc["person1_virus_6.jpeg", "patient_id"] == by.loc["person1_bacteria_1.jpeg", "patient_id"]
    assert by.loc["IM-0115-0001.jpeg", "patient_id"] == "train/IM-0115"
    assert df["Pneumonia"].sum() == 3 and set(df["source_split"]) == {"train", "test", "val"}
    assert load_manifest(tmp_path).attrs["kind"] == "kermany"


def test_missing_files_are_reported_together(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(8):
        _png(tmp_path / "images" / f"img{i}.png")
        if i % 3:
            _png(tmp_path / "masks" / f"img{i}.png")
    with pytest.raises(MissingFiles) as info:
        read_mask_pairs(tmp_path)
    err = info.value
    assert len(err.missing) == 3 and err.total == 16 and "3 of 16 files are missing" in str(err)
    assert {Path(m).name for m in err.missing} == {"img0.png", "img3.png", "img6.png"}
    with pytest.warns(UserWarning, match="dropped 3 of 8"):
        assert len(read_mask_pairs(tmp_path, on_missing="drop")) == 5


def test_unknown_layouts_and_columns_raise_clearly(tmp_path):
    with pytest.raises(ManifestError, match="no such"):
        load_manifest(tmp_path / "absent")
    (tmp_path / "manifest.csv").write_text("name,label\na.png,1\n")
    with pytest.raises(ManifestError, match="missing columns"):
        load_manifest(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="no image files"):
        load_manifest(empty)


# ------------------------------------------------------------------------------------------ splits


@pytest.mark.realdata
def test_patient_split_of_the_full_nih_table(nih_table, tmp_path):
    table = read_nih_table(nih_table)
    t0 = time.perf_counter()
    split = patient_split(table, seed=0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"split took {elapsed:.2f} s"
    check_patient_disjoint(table, split)  # no patient crosses splits
    per_patient = pd.DataFrame({"p": table["patient_id"], "s": split}).groupby("p")["s"].nunique()
    assert per_patient.max() == 1 and len(per_patient) == 30_805
    frac = split.value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.01 and abs(frac["val"] - 0.1) < 0.01 and abs(frac["test"] - 0.2) < 0.01
    again = patient_split(table.sample(frac=1.0, random_state=3), seed=0)  # row order does not matter
    assert again.sort_index().equals(split.sort_index())
    assert not patient_split(table, seed=1).equals(split)
    path = save_split(table, split, tmp_path / "split.csv", seed=0, fractions=(0.7, 0.1, 0.2))
    assert load_split(path, table).equals(split)


def test_split_validation_and_leak_detection():
    df = pd.DataFrame({"image_id": list("abcdef"), "patient_id": ["1", "1", "2", "3", "4", "5"]})
    with pytest.raises(SplitError, match="sum to 1"):
        patient_split(df, (0.5, 0.2, 0.2))
    with pytest.raises(SplitError, match="patient ids"):
        patient_split(df.drop(columns="patient_id"))
    bad = pd.Series(["train", "test", "train", "val", "test", "test"])
    with pytest.raises(SplitError, match="1 patients are in more than one split"):
        check_patient_disjoint(df, bad)
    summary = split_summary(df, patient_split(df, seed=0))
    assert summary["images"].sum() == 6 and summary["patients"].sum() == 5


def test_load_split_reports_images_absent_from_the_csv(tmp_path):
    df = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["1", "2"]})
    path = save_split(df.iloc[:1], pd.Series(["train"]), tmp_path / "s.csv")
    with pytest.raises(SplitError, match="1 images of the manifest are not in the split"):
        load_split(path, df)


# ------------------------------------------------------------------------------------------ dataset


def _tiny_manifest(tmp_path: Path, n: int = 6) -> pd.DataFrame:
    rows = []
    for i in range(n):
        p = _png(tmp_path / "imgs" / f"x{i}.png", value=20 * i + 10, size=(40, 60))
        rows.append({"path": str(p), "image_id": p.name, "patient_id": str(i // 2), "A": i % 2, "B": int(i == 0)})
    df = pd.DataFrame(rows)
    df.attrs["label_columns"] = ["A", "B"]
    return df


def test_dataset_items_labels_and_statistics(tmp_path):
    df = _tiny_manifest(tmp_path)
    ds = CXRDataset(df, Preprocess(size=32), cache_dir=tmp_path / "cache")
    x, y, i = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    assert y.tolist() == [1.0, 0.0] and i == 3
    assert ds.prevalence().round(3).tolist() == [0.5, round(1 / 6, 3)]
    np.testing.assert_allclose(ds.pos_weight().numpy(), [1.0, 5.0])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 1, 32, 32) and batch[2].tolist() == [0, 1, 2, 3]


def test_cache_decodes_each_file_once(tmp_path, monkeypatch):
    import cxrbench.data.dataset as dsmod

    calls = []
    real = dsmod.read_image
    monkeypatch.setattr(dsmod, "read_image", lambda p, **kw: calls.append(p) or real(p, **kw))
    df = _tiny_manifest(tmp_path)
    ds = CXRDataset(df, Preprocess(size=32), cache_dir=tmp_path / "cache")
    report = ds.build_cache()
    assert report.n_decoded == 6 and report.n_failed == 0 and len(calls) == 6
    first = [ds[i][0] for i in range(6)]
    assert len(calls) == 6  # items come from the cache
    # a new Dataset over the same files (e.g. the next notebook run) reuses the cache on disk
    ds2 = CXRDataset(df, Preprocess(size=32, normalize="zero_one"), cache_dir=tmp_path / "cache")
    assert ds2.build_cache().n_cached_before == 6 and len(calls) == 6
    assert torch.allclose(ds2[2][0] * 2 - 1, first[2], atol=1e-6)
    # another size is another cache
    CXRDataset(df, Preprocess(size=16), cache_dir=tmp_path / "cache").build_cache()
    assert len(calls) == 12
    # a subset shares the parent's cache
    sub = ds.subset(np.array([False, True, False, True, False, False]))
    assert len(sub) == 2 and sub.labels.tolist() == [[1, 0], [1, 0]] and torch.equal(sub[1][0], first[3])
    assert len(calls) == 12


def test_uncached_dataset_matches_cached(tmp_path):
    df = _tiny_manifest(tmp_path)
    a = CXRDataset(df, Preprocess(size=32), cache_dir=None)[4][0]
    b = CXRDataset(df, Preprocess(size=32), cache_dir=tmp_path / "c")[4][0]
    assert torch.allclose(a, b, atol=1 / 255 * 2 + 1e-6)  # the cache stores uint8


def test_unreadable_files_are_collected_not_fatal(tmp_path):
    df = _tiny_manifest(tmp_path)
    Path(df.loc[1, "path"]).write_bytes(b"not a png")
    Path(df.loc[4, "path"]).write_bytes(Path(df.loc[0, "path"]).read_bytes()[:60])
    ds = CXRDataset(df, Preprocess(size=32), cache_dir=tmp_path / "cache")
    report = ds.build_cache()
    assert report.n_failed == 2 and report.n_decoded == 4
    assert {Path(p).name for p in report.failures} == {"x1.png", "x4.png"}
    assert "2 unreadable" in report.summary() and "x1.png" in report.summary()
    good = ds.readable()
    assert len(good) == 4 and list(good.manifest["image_id"]) == ["x0.png", "x2.png", "x3.png", "x5.png"]
    from cxrbench.io import ImageReadError

    with pytest.raises(ImageReadError, match="x1.png"):
        ds[1]


@pytest.mark.realdata
def test_real_nih_dataset_with_augmentation(nih_dir, tmp_path):
    df = load_manifest(nih_dir).iloc[:8]
    flip = lambda t: torch.flip(t, dims=[-1])  # noqa: E731
    ds = CXRDataset(df, Preprocess(size=64), cache_dir=tmp_path / "cache", transform=flip)
    plain = CXRDataset(df, Preprocess(size=64), cache_dir=tmp_path / "cache")
    assert torch.allclose(ds[0][0], torch.flip(plain[0][0], dims=[-1]))
    assert ds.labels.shape == (8, 14)


# ------------------------------------------------------------------------------------------ catalogue


def test_catalogue_has_every_required_dataset():
    names = set(list_datasets())
    assert {"nih-chestxray14", "pediatric-pneumonia", "lung-masks", "mura", "nonchest-radiographs",
            "cifar100", "mnist"} <= names
    for spec in list_datasets().values():
        assert spec.licence and spec.citation and spec.obtain and spec.layouts


@pytest.mark.realdata
def test_data_check_verdicts(shared_data, tmp_path):
    ok = check_dataset("nih-chestxray14", shared_data / "cxr" / "nih")
    assert ok.verdict == "ok" and ok.n_present == 481 and not ok.missing_files
    broken = _link_copy(shared_data / "cxr" / "nih", tmp_path / "nih")
    victim = sorted(broken.glob("*.png"))[5]
    victim.unlink()
    bad = check_dataset("nih", broken)
    assert bad.verdict == "incomplete" and bad.missing_files == [str(victim)]
    assert victim.name in bad.report() and "INCOMPLETE" in bad.report()
    unknown = check_dataset("mura", tmp_path)
    assert unknown.verdict == "unrecognised" and "MURA-v1.1.zip" in unknown.report()


# ------------------------------------------------------------------------------------------ labels and columns


def _manifest(tmp_path, header: str, rows: list[str]):
    from PIL import Image

    for i in range(len(rows)):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path


@pytest.mark.parametrize("bad", ["0.7", "-1", "2", "yes", ""])
def test_labels_that_are_not_0_or_1_are_refused_naming_file_and_column(tmp_path, bad):
    from cxrbench.data import ManifestError, load_manifest

    root = _manifest(tmp_path, "file,pneumonia,patient_key", ["im0.png,1,p0", f"im1.png,{bad},p1"])
    with pytest.raises(ManifestError, match=r"manifest\.csv: column 'pneumonia' must hold 0 or 1 labels.*row 3"):
        load_manifest(root)


def test_nih_style_finding_columns_are_checked_too(tmp_path):
    from cxrbench.data import ManifestError, load_manifest
    from cxrbench.labels import NIH_FINDINGS

    header = "file,finding_labels,patient_id," + ",".join(NIH_FINDINGS)
    ok = "im0.png,No Finding,p0," + ",".join("0" * len(NIH_FINDINGS))
    half = "im1.png,Effusion,p1," + ",".join(["0.7"] + ["0"] * (len(NIH_FINDINGS) - 1))
    with pytest.raises(ManifestError, match="column 'Atelectasis' must hold 0 or 1"):
        load_manifest(_manifest(tmp_path, header, [ok, half]))


def test_a_column_typo_is_refused_with_the_expected_layouts(tmp_path):
    from cxrbench.data import ManifestError, load_manifest

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ManifestError, match="'pnuemonia'.*did you mean 'pneumonia'.*paediatric pneumonia"):
        load_manifest(_manifest(tmp_path / "a", "file,pnuemonia,patient_key", ["im0.png,1,p0"]))
    with pytest.raises(ManifestError, match="missing columns \\['file'\\].*layouts"):
        load_manifest(_manifest(tmp_path / "b", "filename,label", ["im0.png,x"]))


def test_some_but_not_all_finding_columns_is_an_error_not_a_silent_fallback(tmp_path):
    from cxrbench.data import ManifestError, load_manifest

    root = _manifest(tmp_path, "file,finding_labels,patient_id,Effusion,Mass", ["im0.png,Effusion,p0,1,0"])
    with pytest.raises(ManifestError, match="has 2 of the 14 finding columns"):
        load_manifest(root)

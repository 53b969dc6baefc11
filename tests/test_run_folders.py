"""Run folders keep no stale state: a used folder is refused or started clean, a saved split says what made it and
is refused when that differs, a failed run leaves no split, interrupted bundle saves are tidied, and
:func:`cxrbench.train.ensure_run` never writes into a folder unless training was asked for."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cxrbench.cli import main
from cxrbench.data import SplitError, load_manifest, patient_split, save_split
from cxrbench.data.synthetic import write_phantom_set
from cxrbench.models.bundle import load_bundle, read_card, remove_stale_temporaries, save_bundle
from cxrbench.train import (
    ClassifierConfig,
    OODConfig,
    RunFolderError,
    ensure_run,
    prepare_run_folder,
    train_classifier,
)
from cxrbench.train.common import run_split

TINY = dict(arch="resnet18", image_size=32, batch_size=8, epochs=1, eval_bootstrap=20, early_stopping_patience=0,
            max_steps_per_epoch=2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_set(tmp_path_factory.mktemp("ph") / "set", 40, size=64, seed=1)


@pytest.fixture(scope="module")
def finished_run(phantoms, tmp_path_factory) -> Path:
    """A finished 1-epoch classifier run (seed 0), trained once; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_classifier(load_manifest(phantoms), out, ClassifierConfig(**TINY), progress=False,
                     cache_dir=out.parent / "cache")
    return out


def _copy(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to))


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


TRAIN_COMMANDS = {
    "classifier": ["--arch", "resnet18", "--size", "32", "--epochs", "1", "--bootstrap", "20", "--device", "cpu"],
    "ood": ["--latent", "8", "--width", "4", "--epochs", "1", "--device", "cpu"],
    "unet": ["--size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "1", "--device", "cpu"],
}


@pytest.mark.parametrize("command", sorted(TRAIN_COMMANDS))
def test_every_train_command_refuses_a_fresh_run_into_a_used_run_folder(command, phantoms, finished_run, tmp_path,
                                                                        capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = _listing(run)
    code = main(["train", command, "--data", str(phantoms), "--out", str(run), *TRAIN_COMMANDS[command], "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{run}: already holds a run" in err and "checkpoint.pt" in err and "metrics.csv (1 epoch)" in err
    assert "--resume" in err and "--overwrite" in err
    assert _listing(run) == before  # nothing touched


def test_resume_and_overwrite_exclude_each_other_on_the_command_line(phantoms, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "classifier", "--data", str(phantoms), "--out", str(tmp_path / "r"), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_overwrite_starts_clean_and_the_new_seed_makes_the_split(phantoms, finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")  # not a run's file: kept
    (run / "evaluation_test.csv").write_text("stale\n")  # a run's file the classifier does not write: deleted
    code = main(["train", "classifier", "--data", str(phantoms), "--out", str(run), *TRAIN_COMMANDS["classifier"],
                 "--seed", "1", "--max-steps", "2", "--overwrite"])
    out = capsys.readouterr().out
    assert code == 0 and f"overwrite: deleted the earlier run in {run}" in out and "kept notes.txt" in out
    df = load_manifest(phantoms)
    split = pd.read_csv(run / "split.csv", dtype={"image_id": str})
    assert list(split["split"]) == list(patient_split(df, seed=1))  # not seed 0's split kept under a seed-1 card
    assert set(split["seed"]) == {1} and read_card(run / "bundle").training["seed"] == 1
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1]
    assert (run / "notes.txt").read_text() == "mine" and not (run / "evaluation_test.csv").exists()


@pytest.mark.parametrize("make", ["bundle", "data"])
def test_a_folder_that_is_not_a_run_folder_is_refused_even_with_overwrite(make, phantoms, finished_run, tmp_path,
                                                                          capsys):
    target = _copy(finished_run / "bundle", tmp_path / "b") if make == "bundle" else phantoms
    before = _listing(target)
    for flag in ([], ["--overwrite"], ["--resume"]):
        code = main(["train", "classifier", "--data", str(phantoms), "--out", str(target),
                     *TRAIN_COMMANDS["classifier"], "-q", *flag])
        err = capsys.readouterr().err
        assert code == 1 and f"{target}: is " in err and "not a run folder" in err
    assert _listing(target) == before


def test_a_run_that_never_finished_an_epoch_does_not_block_a_fresh_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "split.csv.tmp").write_text("half")
    assert prepare_run_folder(run).run_files == ("config.json", "split.csv.tmp")
    assert list(run.iterdir()) == []


def test_a_failed_run_leaves_no_split_that_poisons_the_folder(phantoms, tmp_path):
    df = load_manifest(phantoms)
    one_patient = df.assign(patient_id="p1")  # every image in one split: no validation images
    with pytest.raises(ValueError, match="no 'val' images"):
        train_classifier(one_patient, tmp_path / "run", ClassifierConfig(**TINY), progress=False,
                         cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run" / "split.csv").exists()
    result = train_classifier(df, tmp_path / "run", ClassifierConfig(**TINY), progress=False,
                              cache_dir=tmp_path / "cache")
    assert result.bundle is not None
    assert list(pd.read_csv(tmp_path / "run" / "split.csv")["split"]) == list(patient_split(df, seed=0))


def test_a_saved_split_records_what_made_it_and_is_refused_when_that_differs(phantoms, tmp_path):
    df = load_manifest(phantoms)
    out = tmp_path / "run"
    first = run_split(df, out, (0.7, 0.1, 0.2), seed=0)
    saved = pd.read_csv(out / "split.csv", dtype=str)
    assert {"seed", "fractions", "manifest_sha256"} <= set(saved.columns)
    assert set(saved["fractions"]) == {"0.7/0.1/0.2"} and saved["manifest_sha256"].nunique() == 1
    # the same settings and data, rows in another order: the saved split is reused
    again = run_split(df.iloc[::-1], out, (0.7, 0.1, 0.2), seed=0)
    assert (again.sort_index() == first).all()
    with pytest.raises(SplitError, match="seed 0 there, 1 now"):
        run_split(df, out, (0.7, 0.1, 0.2), seed=1)
    with pytest.raises(SplitError, match="fractions 0.7/0.1/0.2 there, 0.6/0.2/0.2 now"):
        run_split(df, out, (0.6, 0.2, 0.2), seed=0)
    relabelled = df.copy()
    relabelled.loc[0, df.attrs["label_columns"][0]] = 1 - relabelled.loc[0, df.attrs["label_columns"][0]]
    with pytest.raises(SplitError, match="the manifest differs .40 images"):
        run_split(relabelled, out, (0.7, 0.1, 0.2), seed=0)
    other = patient_split(df, seed=5)
    with pytest.raises(SplitError, match="the split given differs"):
        run_split(df, out, (0.7, 0.1, 0.2), seed=0, split=other)


def test_resume_with_other_data_is_refused_naming_the_manifest(phantoms, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    fewer = load_manifest(phantoms).iloc[:36]
    with pytest.raises(SplitError, match=r"split.csv: was made with other settings \(the manifest differs \(40 images"):
        train_classifier(fewer, run, ClassifierConfig(**{**TINY, "epochs": 2}), progress=False, resume=True,
                         cache_dir=tmp_path / "cache")


def test_interrupted_bundle_saves_are_tidied_on_resume_and_on_the_next_save(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    stale = run / ".bundle.tmp-999999999-abc"  # a pid no process has
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    prepare_run_folder(run, resume=True)
    assert not stale.exists() and (run / "bundle" / "card.json").is_file()
    # killed between the two renames of a save: the bundle was set aside, the new one not yet in place
    bundle = load_bundle(run / "bundle")
    (run / "bundle").rename(run / ".bundle.old")
    remove_stale_temporaries(run / "bundle")
    assert load_bundle(run / "bundle").card.name == bundle.card.name and not (run / ".bundle.old").exists()
    (run / ".bundle.old").mkdir()  # an old copy next to a good bundle is deleted by the next save
    save_bundle(run / "bundle", bundle.model, bundle.card)
    assert not (run / ".bundle.old").exists()


# --------------------------------------------------------------------------------------------------
# ensure_run


def test_ensure_run_never_creates_a_mistyped_folder(tmp_path):
    with pytest.raises(RunFolderError, match="no such folder, no finished classifier run .*train_if_missing"):
        ensure_run(tmp_path / "typo", ClassifierConfig(**TINY))
    assert not (tmp_path / "typo").exists()


def test_ensure_run_names_the_run_folder_of_a_bundle_and_uses_a_finished_run_as_it_is(finished_run, capsys):
    before = _listing(finished_run)
    with pytest.raises(RunFolderError, match=f"is a bundle folder, not a run folder .its run folder is {finished_run}"):
        ensure_run(finished_run / "bundle", ClassifierConfig(**TINY), train_if_missing=True)
    with pytest.raises(RunFolderError, match="holds a run of kind 'classifier'; OOD model runs .kind 'ood'."):
        ensure_run(finished_run, OODConfig(), train_if_missing=True)
    capsys.readouterr()
    assert ensure_run(finished_run, ClassifierConfig(arch="densenet121"), train_if_missing=True) == \
        finished_run / "bundle"
    assert "using the classifier run in" in capsys.readouterr().out
    assert _listing(finished_run) == before


def test_ensure_run_refuses_an_unfinished_run_unless_asked_then_announces_and_trains(phantoms, finished_run, tmp_path,
                                                                                   capsys):
    run = _copy(finished_run, tmp_path / "run")
    import shutil

    shutil.rmtree(run / "bundle")  # killed after its last checkpoint, before the bundle
    with pytest.raises(RunFolderError, match=r"an unfinished run \(checkpoint.pt, metrics.csv \(1 epoch\)"):
        ensure_run(run, ClassifierConfig(**TINY), data=phantoms)
    bundle = ensure_run(run, ClassifierConfig(**TINY), data=phantoms, train_if_missing=True, progress=False,
                        cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert bundle == run / "bundle" and read_card(bundle).kind == "classifier"
    assert out.startswith(f"training a classifier into {run} (an unfinished run")
    assert "resnet18 at 32 px, 1 epoch of 2 steps" in out and "estimated" in out and "per step, measured" in out
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1]  # resumed: the finished epoch was not rerun


def test_save_split_is_atomic_and_keeps_old_readers_working(phantoms, tmp_path):
    df = load_manifest(phantoms)
    path = save_split(df, patient_split(df), tmp_path / "s.csv", seed=0, fractions=(0.7, 0.1, 0.2))
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]
    table = pd.read_csv(path, dtype=str)
    assert list(table.columns[:3]) == ["image_id", "patient_id", "split"]
    assert list(table.columns) == ["image_id", "patient_id", "split", "seed", "fractions", "manifest_sha256"]

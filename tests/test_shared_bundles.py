"""The shared bundle cache: trains an entry once, reuses it, keys it by config + data + version, and a
concurrent second caller waits for the first and reuses what it trained."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from cxrbench.train import shared
from cxrbench.train.shared import SharedBundleError, shared_bundle, shared_bundle_key


@pytest.fixture
def fake_training(monkeypatch):
    """Replace the training by one that writes a bundle card after a short pause and counts its calls."""
    calls: list[str] = []

    def train(spec, config, extra, folder, kind, entry, progress):
        calls.append(entry.name)
        time.sleep(0.3)  # long enough for a concurrent caller to arrive while it trains
        bundle = entry / "run" / "bundle"
        bundle.mkdir(parents=True)
        (bundle / "card.json").write_text(json.dumps({"epochs": config.epochs}))
        return bundle

    monkeypatch.setattr(shared, "_train", train)
    return calls


def test_an_entry_is_trained_once_and_reused(tmp_path, fake_training, capsys):
    first = shared_bundle("phantom-classifier", cache_dir=tmp_path)
    mtime = (first / "card.json").stat().st_mtime_ns
    second = shared_bundle("phantom-classifier", cache_dir=tmp_path)
    assert first == second and len(fake_training) == 1
    assert (second / "card.json").stat().st_mtime_ns == mtime
    assert "using the shared 'phantom-classifier' bundle" in capsys.readouterr().out
    entry = json.loads((first.parents[1] / "entry.json").read_text())
    assert entry["name"] == "phantom-classifier" and entry["bundle"] == str(first)


def test_the_key_changes_with_the_config_and_a_changed_setting_is_a_new_entry(tmp_path, fake_training):
    key = shared_bundle_key("phantom-classifier")
    assert shared_bundle_key("phantom-classifier") == key  # deterministic
    assert shared_bundle_key("phantom-classifier", settings={"epochs": 2}) != key
    assert shared_bundle_key("phantom-classifier", settings={"n_images": 50}) != key
    # the DataLoader workers make no other bundle (and auto, the default now, keeps the keys of entries trained
    # when the default was 0)
    assert shared_bundle_key("phantom-classifier", settings={"num_workers": 2}) == key
    assert shared_bundle_key("phantom-classifier", settings={"num_workers": 0}) == key
    a = shared_bundle("phantom-classifier", cache_dir=tmp_path, settings={"epochs": 2})
    b = shared_bundle("phantom-classifier", cache_dir=tmp_path, settings={"epochs": 3})
    assert a != b and len(fake_training) == 2
    assert a.parents[1].name.endswith(shared_bundle_key("phantom-classifier", settings={"epochs": 2}))


def test_a_concurrent_second_caller_waits_and_reuses(tmp_path, fake_training):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(shared_bundle("phantom-classifier", cache_dir=tmp_path,
                                                                            progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_training) == 1, "only the first caller may train"
    assert len(results) == 3 and len(set(results)) == 1


def test_an_interrupted_entry_is_trained_again_not_used(tmp_path, fake_training):
    entry = tmp_path / f"phantom-classifier-{shared_bundle_key('phantom-classifier')}"
    (entry / "run").mkdir(parents=True)  # a training that died before writing entry.json
    shared_bundle("phantom-classifier", cache_dir=tmp_path, progress=False)
    assert len(fake_training) == 1 and (entry / "entry.json").is_file()


def test_unknown_names_and_settings_are_refused_with_the_choices():
    with pytest.raises(SharedBundleError, match="no shared bundle named 'nih-clasifier'; choose one of"):
        shared_bundle_key("nih-clasifier")
    with pytest.raises(SharedBundleError, match=r"unknown settings \['epoch'\]; give fields of ClassifierConfig"):
        shared_bundle_key("phantom-classifier", settings={"epoch": 2})


def test_the_classifier_key_follows_the_data(nih_dir, tmp_path):
    (tmp_path / "nih").mkdir()
    (tmp_path / "nih" / "manifest.csv").write_text((nih_dir / "manifest.csv").read_text())
    assert shared_bundle_key("nih-classifier") != shared_bundle_key("nih-classifier", tmp_path)


def test_the_cli_prepares_once_and_lists_the_entries(tmp_path, monkeypatch, fake_training, capsys):
    from cxrbench.cli.main import main

    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path))
    assert main(["bundles", "prepare", "phantom-classifier", "--json", str(tmp_path / "warm.json")]) == 0
    assert main(["bundles", "prepare", "phantom-classifier", "-q"]) == 0
    out = capsys.readouterr().out
    assert len(fake_training) == 1 and out.count("1 shared bundles ready in") == 2
    assert json.loads((tmp_path / "warm.json").read_text())["bundles"][0]["name"] == "phantom-classifier"
    assert main(["bundles", "list"]) == 0
    listed = capsys.readouterr().out
    assert "phantom-classifier   ready" in listed and "lung-unet" in listed and str(tmp_path / "bundles") in listed
    assert main(["bundles", "prepare", "nih-clasifier"]) == 1
    assert "no shared bundle named 'nih-clasifier'" in capsys.readouterr().err

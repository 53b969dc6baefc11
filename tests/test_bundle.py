"""cxrbench.models.bundle: round trip, never unpickling, clear errors for corrupted or mismatched bundles."""

from __future__ import annotations

import json

import pytest
import torch

from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import BundleError, ModelCard, load_bundle, read_card, save_bundle
from cxrbench.models.classifier import build_classifier
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.preprocess import Preprocess


def _card(**kw) -> ModelCard:
    base = dict(kind="classifier", builder="classifier",
                builder_kwargs={"arch": "resnet18", "num_outputs": 14, "in_channels": 1},
                labels=list(NIH_FINDINGS), preprocess=Preprocess(size=32).to_dict(),
                operating_points={"thresholds": {f: 0.3 for f in NIH_FINDINGS}})
    base.update(kw)
    return ModelCard(**base)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", 14, 1).eval()
    path = save_bundle(tmp_path / "b", model, _card())
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    bundle = load_bundle(path, kind="classifier")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), bundle.model(x))
    assert bundle.labels == list(NIH_FINDINGS) and bundle.preprocess == Preprocess(size=32)
    card = json.loads((path / "card.json").read_text())
    assert card["versions"]["torch"] == torch.__version__ and len(card["weights_sha256"]) == 64
    assert not bundle.model.training


def test_no_pickle_anywhere(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["card.json", "model.safetensors"]
    assert b"\x80\x04" not in (path / "model.safetensors").read_bytes()[:8]  # not a pickle stream


def test_corrupted_weights_are_caught(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(path)
    (path / "model.safetensors").write_bytes(bytes(data[:1000]))
    with pytest.raises(BundleError, match="corrupted weights"):
        load_bundle(path, verify=False)


def test_corrupted_or_missing_card(saved, tmp_path):
    _, path = saved
    (path / "card.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupted card"):
        read_card(path)
    with pytest.raises(BundleError, match="not a cxrbench bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "absent")


def test_mismatched_architecture_and_kind(saved):
    _, path = saved
    card = json.loads((path / "card.json").read_text())
    card["builder_kwargs"]["arch"] = "densenet121"
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(path, verify=False)
    # a card that lists 3 labels for a 3-output head is consistent; the 14-output weights are not
    labels, card["labels"] = card["labels"], card["labels"][:3]
    card["operating_points"]["thresholds"] = {k: card["operating_points"]["thresholds"][k] for k in card["labels"]}
    card["builder_kwargs"] = {"arch": "resnet18", "num_outputs": 3, "in_channels": 1}
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="other shapes"):
        load_bundle(path, verify=False)
    card["builder_kwargs"]["num_outputs"] = 14
    card["labels"] = labels
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="of kind 'classifier', but an? 'ood' bundle"):
        load_bundle(path, kind="ood", verify=False)


def test_unknown_builder_or_fields_refused():
    with pytest.raises(BundleError, match="unknown builder"):
        _card(builder="os:system")
    with pytest.raises(BundleError, match="unknown fields"):
        ModelCard.from_dict({**_card().to_dict(), "exec": "rm -rf /"})


def test_save_replaces_atomically(saved):
    model, path = saved
    save_bundle(path, model, _card(name="second"))
    assert read_card(path).name == "second"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_untrained_bundles_calibrate_to_the_images_they_are_given(tmp_path):
    """The plumbing bundles (export, benchmarks, app tests): seeded, real-size, with cutoffs that split the images."""
    import numpy as np

    from cxrbench.inference.pipeline import Pipeline
    from cxrbench.models.bundle import untrained_classifier_bundle
    from cxrbench.ood.guard import ImageGuard

    rng = np.random.default_rng(0)
    images = [rng.random((40 + i, 48), dtype=np.float32) for i in range(9)]
    clf = untrained_classifier_bundle(tmp_path / "c", preprocess=Preprocess(size=32), images=images,
                                      thresholds={"Hernia": None})
    again = untrained_classifier_bundle(tmp_path / "c2", preprocess=Preprocess(size=32), images=images,
                                        thresholds={"Hernia": None})
    assert read_card(clf).weights_sha256 == read_card(again).weights_sha256  # seeded
    ood = untrained_ood_bundle(tmp_path / "o", latent_dim=8, base_channels=4, images=images)
    pipe = Pipeline.from_paths(clf, ood=ood)
    pipe.guard = everything = ImageGuard(min_side=1, min_bits_per_pixel=0, min_spread=0)  # plumbing: noise passes
    reports = [pipe.analyze(im, explain=None, allow_ood=True) for im in images]
    calibrated = np.array([r.calibrated for r in reports])
    assert ((calibrated[:, :-1] > 0.5 + 1e-6).sum(axis=0) == 4).all()  # 9 images, median operating point
    assert ((calibrated[:, :-1] < 0.5 - 1e-6).sum(axis=0) == 4).all()
    assert np.isnan(calibrated[:, -1]).all()  # Hernia: no operating point
    margin = np.array([r.ood.score - r.ood.cutoff for r in reports])
    assert (margin > 1e-6).sum() == 4 and (margin < -1e-6).sum() == 4
    never = untrained_ood_bundle(tmp_path / "n", latent_dim=8, base_channels=4)
    never_pipe = Pipeline.from_paths(clf, ood=never)
    never_pipe.guard = everything
    assert all(never_pipe.analyze(im, explain=None).ood.in_distribution for im in images)
    assert load_bundle(clf).card.operating_points["fitted_on"] == "untrained"


def test_info_command_describes_any_bundle_and_verifies_it(tmp_path, capsys):
    from cxrbench.cli.main import main
    from cxrbench.models.bundle import untrained_classifier_bundle

    clf = untrained_classifier_bundle(tmp_path / "c", preprocess=Preprocess(size=32), thresholds={"Hernia": None})
    card = read_card(clf)
    card.metrics = {"test": {"n_images": 96, "summary": {"macro_auc": 0.623, "micro_f1": 0.2},
                             "per_finding": {"Edema": {"auc": None, "n_pos": 0},
                                             "Effusion": {"auc": 0.669, "auc_ci_low": 0.517, "auc_ci_high": 0.806,
                                                          "n_pos": 12}}}}
    card.training = {"data": "nih", "n_images": 481, "split_counts": {"train": 337, "val": 48, "test": 96}}
    save_bundle(tmp_path / "rated", load_bundle(clf).model, card)
    ood = untrained_ood_bundle(tmp_path / "o", latent_dim=8, base_channels=4, threshold=0.4)
    assert main(["info", str(tmp_path / "rated"), str(ood)]) == 0
    out = capsys.readouterr().out
    assert "operating points: 13 of 14 findings" in out and "481 images; train 337, val 48, test 96" in out
    assert "test: macro AUC 0.623 on 96 images" in out and "micro-F1 0.200, macro-F1 n/a" in out
    assert "Edema                AUC n/a [n/a, n/a], 0 positive(s)" in out
    assert "Effusion             AUC 0.669 [0.517, 0.806], 12 positive(s)" in out
    assert "OOD cutoff: ssim > 0.400" in out and out.count("checksum verified") == 2
    assert main(["info", "--json", str(ood)]) == 0
    assert json.loads(capsys.readouterr().out)["ood"]["cutoff"]["threshold"] == 0.4
    (tmp_path / "rated" / "model.safetensors").write_bytes(b"truncated")
    assert main(["info", str(tmp_path / "rated")]) == 1
    assert "model.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the card schema


def _edit_card(path, change) -> None:
    card = json.loads((path / "card.json").read_text())
    change(card)
    (path / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("preprocess"), "incomplete card: missing preprocess"),
    (lambda c: c.pop("weights_sha256"), "incomplete card: missing weights_sha256"),
    (lambda c: c.update(weights_sha256=""), "weights_sha256 is missing"),
    (lambda c: c.pop("format"), "missing format"),
    (lambda c: c.update(format="1"), "format must be an integer"),
    (lambda c: c.update(format=0), "unknown bundle format 0"),
    (lambda c: c.update(format=7), "newer than this cxrbench supports"),
    (lambda c: c.update(operating_points=[0.3] * 14), "operating_points must be a JSON object"),
    (lambda c: c["operating_points"]["thresholds"].update(Effusion=1.5), r"must lie in \(0, 1\)"),
    (lambda c: c["operating_points"]["thresholds"].update(Effusion=0.0), r"must lie in \(0, 1\)"),
    (lambda c: c["operating_points"]["thresholds"].update(Unicorn=0.4), "not labels"),
    (lambda c: c["builder_kwargs"].update(depthh=3), r"unexpected builder_kwargs \['depthh'\]"),
    (lambda c: c["preprocess"].update(size=4096), r"outside \[16, 2048\]"),
    (lambda c: c["preprocess"].update(size=8), r"outside \[16, 2048\]"),
    (lambda c: c.update(labels=c["labels"][:5]), "5 labels for a head with num_outputs=14"),
    (lambda c: c.update(labels="Effusion"), "labels must be a JSON list"),
    (lambda c: c.update(builder="unet"), "cannot be built by 'unet'"),
    (lambda c: c["preprocess"].update(channels=3), "3 channel"),
])
def test_an_incomplete_or_inconsistent_card_is_refused_with_the_reason(saved, change, message):
    _, path = saved
    _edit_card(path, change)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(path)
    assert str(path / "card.json") in str(err.value)


def test_flipped_weight_bytes_fail_even_where_the_card_had_no_checksum_before(saved):
    _, path = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum does not match"):
        load_bundle(path)
    _edit_card(path, lambda c: c.update(weights_sha256=""))  # no way around the check by blanking it
    with pytest.raises(BundleError, match="cannot be verified"):
        load_bundle(path)


def test_info_never_claims_a_checksum_it_did_not_verify(saved, capsys):
    from cxrbench.cli import main

    _, path = saved
    assert main(["info", str(path)]) == 0
    assert "checksum verified" in capsys.readouterr().out
    _edit_card(path, lambda c: c.pop("weights_sha256"))
    assert main(["info", str(path)]) == 1
    captured = capsys.readouterr()
    assert "checksum verified" not in captured.out and "missing weights_sha256" in captured.err


def test_the_card_knows_the_ood_scorers_of_the_gate():
    from cxrbench.models.card import OOD_SCORERS
    from cxrbench.ood.scoring import SCORER_NAMES

    assert OOD_SCORERS == SCORER_NAMES


def test_an_interrupted_save_leaves_no_temporary_folder_after_the_next_one(saved):
    model, path = saved
    stale = path.parent / f".{path.name}.tmp-999999999-abc"  # a pid no process has
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    save_bundle(path, model, _card(name="again"))
    assert not stale.exists() and read_card(path).name == "again"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

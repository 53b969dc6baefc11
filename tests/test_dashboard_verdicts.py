"""The dashboard without a browser: three verdicts with the gate's false-rejection rate, a clean slate for each
image, per-finding reliability beside the bars, captions and the no-evidence message, re-explaining from the
cached report, and the model named in the timing line. Also the far cutoff, fitted where the near one is."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image as PILImage

from cxrbench.app.dashboard import Dashboard, png_bytes
from cxrbench.evaluation.reliability import MIN_POSITIVES, finding_reliability, model_warning
from cxrbench.inference.pipeline import Pipeline
from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import BundleError, load_bundle, save_bundle, untrained_classifier_bundle
from cxrbench.ood.cutoffs import fit_far_cutoff
from cxrbench.ood.untrained import untrained_ood_bundle
from cxrbench.plots.app import MUTED_COLOURS, STRONG_COLOURS
from cxrbench.preprocess import Preprocess


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.round(arr * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from cxrbench.data.synthetic import make_phantom

    return make_phantom(96, findings=["Nodule"], seed=3).image


@pytest.fixture(scope="module")
def root(tmp_path_factory, image):
    """A classifier with test metrics (Hernia from 2 positives), and OOD gates whose two cutoffs put ``image``
    inside, between them, or beyond both."""
    root = tmp_path_factory.mktemp("verdicts")
    untrained_classifier_bundle(root / "clf", preprocess=Preprocess(size=64))
    clf = load_bundle(root / "clf")
    per_finding = {f: {"auc": 0.8, "auc_ci_low": 0.7, "auc_ci_high": 0.9, "n_pos": 20} for f in NIH_FINDINGS}
    per_finding["Hernia"] = {"auc": 0.95, "auc_ci_low": 0.62, "auc_ci_high": 1.0, "n_pos": 2}
    per_finding["Mass"] = {"auc": 0.6, "auc_ci_low": 0.45, "auc_ci_high": 0.74, "n_pos": 30}
    clf.card.metrics = {"test": {"n_images": 96, "summary": {"macro_auc": 0.62}, "per_finding": per_finding}}
    save_bundle(root / "weak", clf.model, clf.card)
    clf.card.metrics["test"]["summary"]["macro_auc"] = 0.9
    save_bundle(root / "strong", clf.model, clf.card)
    untrained_ood_bundle(root / "probe", latent_dim=16, base_channels=8)
    score = Pipeline.from_paths(root / "clf", ood=root / "probe").gate(image).score
    gate = load_bundle(root / "probe")
    false_rejection = {"split": "val", "n_images": 48, "near": 0.05, "far": 0.0125}
    for name, near, far in (("inside", score + 0.05, score + 0.1), ("between", score - 0.05, score + 0.05),
                            ("beyond", score - 0.1, score - 0.05)):
        gate.card.ood = {"cutoff": {"scorer": "ssim", "threshold": near, "method": "test"},
                         "far_cutoff": {"scorer": "ssim", "threshold": far, "method": "test"},
                         "false_rejection": false_rejection}
        save_bundle(root / name, gate.model, gate.card)
    return root


def _dash(root, clf="weak", ood="inside", **kw) -> Dashboard:
    return Dashboard(Pipeline.from_paths(root / clf, ood=root / ood if ood else None), **kw)


def test_three_verdicts_in_plain_words_with_the_gates_false_rejection_rate(root, image):
    inside = _dash(root, ood="inside")
    inside.analyze_bytes("chest.png", _png(image))
    assert "A frontal chest radiograph like the training images" in inside.verdict.value
    assert "turns away 5.0 % of validation chest X-rays" in inside.verdict.value.replace("5.0%", "5.0 %")
    assert "48 images; 1.2% as not a chest radiograph" in inside.verdict.value and inside.bars.outputs

    between = _dash(root, ood="between")
    between.analyze_bytes("child.png", _png(image))
    text = between.verdict.value
    assert "A chest radiograph unlike the training images" in text and "cxr-rejected" in text
    assert "between the near cutoff" in text and "may not hold here" in text and "analyse anyway" in text
    assert not between.bars.outputs and between.report.raw is None
    between.override.value = True  # analyse anyway: the same verdict, and the numbers, marked
    assert "A chest radiograph unlike the training images" in between.verdict.value
    assert "Analysed anyway because you asked" in between.verdict.value and between.bars.outputs

    beyond = _dash(root, ood="beyond")
    beyond.analyze_bytes("shoulder.png", _png(image))
    assert "Not a frontal chest radiograph" in beyond.verdict.value and "beyond the far cutoff" in beyond.verdict.value
    assert not beyond.bars.outputs

    broken = _dash(root)
    broken.analyze_bytes("bomb.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert "Not an image we can read" in broken.verdict.value and "bomb.png" in broken.verdict.value


def test_a_failed_blank_image_check_is_not_a_chest_radiograph_with_its_reason(root, image, monkeypatch):
    import types

    dash = _dash(root, ood="inside")

    def guard_fails(pixels):  # what the gate answers when the blank-image guard rejects (nothing is scored)
        return types.SimpleNamespace(scorer="ssim", score=float("nan"), cutoff=0.4, cutoff_method="", scores={},
                                     input=None, reconstruction=None, error=None, check="size",
                                     reason="too small (7x3 px)", overridable=False, in_distribution=False)

    monkeypatch.setattr(dash.pipeline, "gate", guard_fails)
    dash.analyze_bytes("tiny.png", _png(np.full((3, 7), 0.5)))
    assert "Not a frontal chest radiograph" in dash.verdict.value and "cxr-rejected" in dash.verdict.value
    assert "blank-image check: too small (7x3 px)" in dash.verdict.value
    assert "analyse anyway" not in dash.verdict.value  # not offered for an image too small to analyse
    assert not dash.bars.outputs and not dash.ood_images.children


def test_a_broken_file_after_a_good_one_leaves_nothing_of_the_good_one(root, image):
    dash = _dash(root)
    dash.analyze_bytes("good.png", _png(image))
    assert dash.bars.outputs and dash.ood_images.children and dash.timing.value and dash.caption.value
    thumbnails = [bytes(box.children[0].value) for box in dash.ood_images.children]
    dash.analyze_bytes("flipped.png", _png(image[::-1]))  # the same thumbnail widgets show the new image's gate
    assert [bytes(box.children[0].value) for box in dash.ood_images.children] != thumbnails
    assert dash.banner.layout.display == "" and dash.overlay.layout.visibility == "visible"
    dash.analyze_bytes("broken.png", b"not a png at all")
    assert "Not an image we can read" in dash.verdict.value and "broken.png" in dash.verdict.value
    assert "good.png" not in dash.verdict.value + dash.timing.value + dash.caption.value + dash.message.value
    assert dash.report is None and not dash.bars.outputs and not dash.ood_images.children
    assert dash.overlay.layout.visibility == "hidden" and bytes(dash.overlay.value) == b""
    assert dash.note.layout.display == "none" and dash.banner.layout.display == "none"
    assert dash.colour_bar.layout.display == "none" and dash.timing.value == ""
    assert dash.controls.layout.display == "none" and dash.override.layout.display == "none"
    dash.method.value = "gradcam"  # nothing current: nothing to re-explain, no error
    assert dash.report is None and not dash.message.value


def test_the_picker_forgets_the_previous_example_and_override_shows_only_for_a_turned_away_image(root, image, tmp_path):
    import datetime

    path = tmp_path / "ex.png"
    path.write_bytes(_png(image))
    dash = _dash(root, ood="between", examples={"an example": path})
    dash.example.value = "an example"
    assert "unlike the training images" in dash.verdict.value and dash.override.layout.display == ""
    assert dash.controls.layout.display == "none"  # no prediction, nothing to explain
    dash.upload.value = ({"name": "up.png", "type": "image/png", "size": 1, "content": memoryview(b"broken"),
                          "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    assert dash.example.value == "(choose an example)" and "up.png" in dash.verdict.value
    inside = _dash(root, ood="inside")
    inside.analyze_bytes("chest.png", _png(image))
    assert inside.override.layout.display == "none" and inside.controls.layout.display == ""


def test_a_new_image_clears_the_previous_one_before_it_is_analysed(root, image, monkeypatch):
    dash = _dash(root)
    dash.analyze_bytes("first.png", _png(image))
    seen = {}
    real = dash.pipeline.analyze

    def spy(*args, **kwargs):
        seen.update(verdict=dash.verdict.value, bars=dash.bars.outputs, timing=dash.timing.value,
                    thumbnails=len(dash.ood_images.children))
        return real(*args, **kwargs)

    monkeypatch.setattr(dash.pipeline, "analyze", spy)
    dash.analyze_bytes("second.png", _png(image[::-1]))
    assert seen == {"verdict": "", "bars": (), "timing": "", "thumbnails": 0}
    assert "second.png" in dash.timing.value


def test_reliability_beside_each_bar_and_the_weak_model_banner(root, image):
    dash = _dash(root, clf="weak")
    dash.analyze_bytes("chest.png", _png(image))
    bars = dash.figure.data[0]
    colour = dict(zip(bars.y, bars.marker.color))
    label = {a.y: a.text for a in dash.figure.layout.annotations if a.xref == "paper"}
    assert set(label) == set(NIH_FINDINGS)
    assert "AUC 0.95 [0.62, 1.00], 2 pos. · not reliable" in label["Hernia"]  # too few positives
    assert "AUC 0.60 [0.45, 0.74], 30 pos. · not reliable" in label["Mass"]  # the CI reaches 0.5
    assert label["Effusion"] == "AUC 0.80 [0.70, 0.90], 20 pos."
    assert colour["Hernia"] in MUTED_COLOURS and colour["Mass"] in MUTED_COLOURS
    assert colour["Effusion"] in STRONG_COLOURS
    assert "not reliable" in dict(zip(bars.y, np.asarray(bars.customdata)[:, 2]))["Hernia"]  # and on hover
    assert dash.banner.layout.display == "" and "A weak model (test macro AUC 0.62" in dash.banner.value
    strong = _dash(root, clf="strong")
    strong.analyze_bytes("chest.png", _png(image))
    assert strong.banner.layout.display == "none" and not strong.banner.value
    untested = _dash(root, clf="clf")
    untested.analyze_bytes("chest.png", _png(image))
    assert "no test-set metrics" in untested.banner.value and untested.banner.layout.display == ""


def test_reliability_rules():
    r = finding_reliability({"A": {"auc": 0.9, "auc_ci_low": 0.8, "auc_ci_high": 0.95, "n_pos": MIN_POSITIVES},
                             "B": {"auc": 0.9, "auc_ci_low": 0.8, "auc_ci_high": 0.95, "n_pos": MIN_POSITIVES - 1},
                             "C": {"auc": 0.7, "auc_ci_low": 0.5, "auc_ci_high": 0.9, "n_pos": 50},
                             "D": {"auc": None, "auc_ci_low": None, "auc_ci_high": None, "n_pos": 0}}, "ABCDE")
    assert [r[k].reliable for k in "ABCDE"] == [True, False, False, False, None]
    assert "only 4 positive" in r["B"].why and "reaches 0.5" in r["C"].why and r["E"].label == "not tested"
    assert model_warning({"summary": {"macro_auc": 0.8}}) == "" and "unknown" in model_warning({})


def test_every_overlay_has_a_caption_and_a_colour_bar(root, image):
    dash = _dash(root, clf="strong")
    dash.analyze_bytes("chest.png", _png(image))
    assert "saliency · all findings · 64 px model input" in dash.caption.value
    assert dash.colour_bar.layout.display == "" and "linear-gradient" in dash.colour_bar.value
    dash.method.value = "gradcam"
    dash.finding.value = "Effusion"
    assert "gradcam · Effusion · 64 px model input" in dash.caption.value
    dash.finding.value = "Mass"
    assert "gradcam · Mass" in dash.caption.value


def test_a_constant_map_says_no_evidence_instead_of_a_flat_wash(root, image, monkeypatch):
    dash = _dash(root, clf="strong")
    dash.analyze_bytes("chest.png", _png(image))
    backend = dash.pipeline.classifier_backend
    monkeypatch.setattr(backend, "explain", lambda x, method, targets=None, **o: np.zeros((1, 1, 64, 64), np.float32))
    dash.method.value = "gradcam"
    dash.finding.value = "Pneumothorax"
    assert "This method (gradcam) finds no evidence for Pneumothorax here" in dash.caption.value
    assert bytes(dash.overlay.value) == png_bytes(dash.report.image)  # the plain image, no blue wash
    assert dash.colour_bar.layout.display == "none"


def test_changing_method_or_finding_reruns_only_the_explanation(root, image, monkeypatch):
    dash = _dash(root, clf="strong")
    dash.analyze_bytes("chest.png", _png(image))
    calls = {"logits": 0, "score": 0}
    backend, gate = dash.pipeline.classifier_backend, dash.pipeline.gate_backend
    real_logits, real_score = backend.logits, gate.score

    def logits(x):
        calls["logits"] += 1
        return real_logits(x)

    def score(x):
        calls["score"] += 1
        return real_score(x)

    monkeypatch.setattr(backend, "logits", logits)
    monkeypatch.setattr(gate, "score", score)
    probabilities = dash.report.calibrated
    dash.method.value = "gradcam"
    dash.finding.value = "Effusion"
    dash.method.value = "cam"
    dash.finding.value = "Mass"
    assert calls == {"logits": 0, "score": 0}
    assert dash.report.method == "cam" and dash.report.map_labels == ["Mass"]
    assert dash.report.calibrated is probabilities and "explanation only" in dash.timing.value
    dash.override.value = True  # the gate's decision changes: that one runs the chain again
    assert calls["score"] == 1  # (the probabilities then come from the explainer's one forward pass)


def test_the_timing_line_names_the_model_and_the_picker_shows_whole_labels(root, image, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_png(image))
    long_name = "held-out chest X-ray: Atelectasis, Effusion, Infiltration (00000013_005.png)"
    dash = _dash(root, clf="strong", examples={long_name: path})
    dash.example.value = long_name
    assert "classifier resnet18, 64 px, 14 findings · gate autoencoder, 64 px" in dash.timing.value
    assert "models:" not in dash.timing.value
    assert dash.example.layout.width.endswith("ch") and int(dash.example.layout.width[:-2]) >= len(long_name) + 10


def test_far_cutoff_midpoint_floor_and_card_check(root):
    rng = np.random.default_rng(0)
    val, nonchest = rng.uniform(0.1, 0.3, 200), rng.uniform(0.6, 0.8, 50)
    far, record = fit_far_cutoff(val, nonchest, near=float(np.percentile(val, 95)))
    p99 = np.percentile(val, 99)
    assert far.threshold == pytest.approx((p99 + np.median(nonchest)) / 2) and "midpoint" in far.method
    assert record["far_set_beyond"] > 0.9 and record["in_distribution_beyond"] == 0.0
    alone, rec = fit_far_cutoff(val)
    assert alone.threshold == pytest.approx(p99) and rec["far_set_beyond"] is None
    overlapping, _ = fit_far_cutoff(val, rng.uniform(0.0, 0.2, 50))  # a non-chest set below: never under p99
    assert overlapping.threshold == pytest.approx(p99)
    card = load_bundle(root / "between").card
    card.ood["far_cutoff"]["threshold"] = card.ood["cutoff"]["threshold"] - 0.01
    with pytest.raises(BundleError, match="far_cutoff.threshold .* lies below the near cutoff"):
        card.validate(require_checksum=False)


def test_ood_training_fits_the_far_cutoff_and_records_the_false_rejection_rate(tmp_path):
    import pandas as pd

    from cxrbench.data import load_manifest
    from cxrbench.data.synthetic import write_phantom_set
    from cxrbench.train import OODConfig, train_ood

    train = write_phantom_set(tmp_path / "chest", 40, size=64, seed=1)
    other = write_phantom_set(tmp_path / "other", 12, size=64, seed=7)
    result = train_ood(load_manifest(train), tmp_path / "run", OODConfig(epochs=1, latent_dim=16, width=8,
                       batch_size=8, far_reference=str(other)), progress=False, cache_dir=tmp_path / "cache")
    ood = json.loads((result.bundle / "card.json").read_text())["ood"]
    val = pd.read_csv(tmp_path / "run" / "scores_val.csv")["ssim"].to_numpy()
    assert ood["far_cutoff"]["threshold"] >= ood["cutoff"]["threshold"]
    assert ood["far_cutoff"]["n_far_set"] == 12 and ood["far_cutoff"]["reference"] == str(other)
    assert ood["false_rejection"]["near"] == pytest.approx(np.mean(val > ood["cutoff"]["threshold"]))
    assert ood["false_rejection"]["n_images"] == len(val)
    load_bundle(result.bundle, kind="ood")  # the card with both cutoffs loads

"""The model card (``card.json``): what a bundle's weights are and how to use them, validated on load.

One schema, checked by :meth:`ModelCard.validate` every time a card is read or written: required keys,
types, ranges and cross-checks (label count equals the head's outputs, operating points in (0, 1) and only
for the card's labels, an input size a model can take, a SHA-256 of the weights, a known format version).
A card that fails is refused with one message that lists every problem and names the file, so an
incomplete card can never load with silent defaults.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import math
import platform
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cxrbench import __version__
from cxrbench.preprocess import Preprocess, PreprocessError

__all__ = ["BUILDERS", "BUNDLE_FORMAT", "KINDS", "OOD_SCORERS", "BundleError", "ModelCard", "describe_card",
           "format_metric", "operating_points_sentence", "versions"]

BUNDLE_FORMAT = 1

#: builder name in a card -> "module:callable" inside cxrbench (never a name imported from a card)
BUILDERS: dict[str, str] = {
    "classifier": "cxrbench.models.classifier:build_classifier",
    "ali": "cxrbench.models.ali:ALI",
    "autoencoder": "cxrbench.models.autoencoder:ConvAutoencoder",
    "unet": "cxrbench.models.unet:UNet",
}
#: bundle kind -> the builders that make such a model
KINDS: dict[str, tuple[str, ...]] = {"classifier": ("classifier",), "ood": ("autoencoder", "ali"),
                                     "segmentation": ("unet",), "autoencoder": ("autoencoder",)}
#: the OOD scorers a cutoff may name (:data:`cxrbench.ood.scoring.SCORER_NAMES`)
OOD_SCORERS: tuple[str, ...] = ("l1", "l2", "ssim", "latent")
#: input sizes a card may ask for, in pixels
IMAGE_SIZE_RANGE: tuple[int, int] = (16, 2048)
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: keys a card on disk must have (the others have meaningful empty defaults)
REQUIRED_KEYS: tuple[str, ...] = ("format", "kind", "builder", "builder_kwargs", "labels", "preprocess",
                                  "weights_sha256")


class BundleError(ValueError):
    """A bundle is missing, corrupted, or does not match its card; the message names the file."""


def versions() -> dict[str, str]:
    """Versions of what produced a bundle."""
    import torch
    import torchvision

    return {"cxrbench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """Everything about a model except its weights (``card.json``).

    Attributes
    ----------
    kind : ``"classifier"``, ``"ood"``, ``"segmentation"`` or ``"autoencoder"`` (an autoencoder at a classifier's
        resolution for Latent Shift counterfactuals, ``cxrbench train autoencoder``; no cutoff).
    builder : key of :data:`BUILDERS`; ``builder_kwargs`` are passed to it.
    preprocess : :meth:`Preprocess.to_dict` of the preprocessing the model was trained with (required).
    labels : output names, in output order (classifier); ``[]`` otherwise.
    operating_points : ``{"thresholds": {finding: threshold in (0, 1) or None}, "method", "fitted_on", ...}``
        (:meth:`cxrbench.evaluation.calibration.OperatingPoints.to_dict`); empty before calibration.
    ood : for OOD models: ``{"cutoff": {"scorer", "threshold", "method"}, ...}``; optionally ``"far_cutoff"``
        (same keys, threshold >= the near one) and ``"false_rejection"`` (``{"near", "far", "n_images", "split"}``).
    training : data root, split file, seed, epochs, hyper-parameters, time.
    metrics : evaluation results (e.g. per-finding AUC with spread, on which split).
    untrained : labels whose outputs the weights never trained (published weights that cover fewer findings:
        torchxrayvision returns a constant 0.5 for them). They are masked everywhere: no probability, no bar, no
        metric, no explanation ("not trained by this model").
    source : where imported weights come from (``{"origin", "weights", "url", "licence", "citation", ...}``);
        ``{}`` for a model trained here.
    weights_sha256 : SHA-256 of ``model.safetensors``, filled in by :func:`~cxrbench.models.bundle.save_bundle`.
    """

    kind: str
    builder: str
    builder_kwargs: dict[str, Any]
    preprocess: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    operating_points: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    untrained: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    description: str = ""
    versions: dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=_now)
    format: int = BUNDLE_FORMAT
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BundleError(f"unknown bundle kind {self.kind!r}; expected one of {tuple(KINDS)}")
        if self.builder not in BUILDERS:
            raise BundleError(f"unknown builder {self.builder!r}; expected one of {sorted(BUILDERS)}")

    @property
    def preprocessing(self) -> Preprocess:
        """The card's ``preprocess`` entry as a :class:`~cxrbench.preprocess.Preprocess`."""
        return Preprocess.from_dict(self.preprocess)

    @property
    def test_metrics(self) -> dict[str, Any]:
        """``metrics["test"]`` (``summary``, ``per_finding``, ``n_images``, ...), ``{}`` when not evaluated."""
        return self.metrics.get("test") or {}

    def to_dict(self) -> dict[str, Any]:
        """The card as a plain dict (what ``card.json`` holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "card") -> ModelCard:
        """A card from its JSON object, validated (:meth:`validate`); raises :class:`BundleError` naming ``where``."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: corrupted card (a JSON object expected, got {type(d).__name__})")
        _check_format(d.get("format"), where)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise BundleError(f"{where}: card has unknown fields {unknown} (written by a newer cxrbench?)")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise BundleError(f"{where}: incomplete card: missing {', '.join(missing)}")
        problems = [p for p in (_type_problem(k, d[k]) for k in d) if p]
        if problems:
            raise BundleError(f"{where}: invalid card: " + "; ".join(problems))
        card = cls(**d)
        card.validate(where)
        return card

    def validate(self, where: str = "card", *, require_checksum: bool = True) -> None:
        """Raise :class:`BundleError` listing every way this card breaks the schema (see module doc)."""
        problems = [p for p in (_type_problem(k, v) for k, v in self.to_dict().items()) if p]
        if not problems:
            problems = [*_builder_problems(self), *_label_problems(self), *_preprocess_problems(self),
                        *_operating_point_problems(self), *_ood_problems(self)]
        if require_checksum and not _SHA256.fullmatch(self.weights_sha256 or ""):
            problems.append("weights_sha256 is missing or not a SHA-256 hex digest: the weights cannot be "
                            "verified (save the bundle again with cxrbench)")
        if problems:
            raise BundleError(f"{where}: invalid card: " + "; ".join(problems))


_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str, "builder": str, "builder_kwargs": dict, "preprocess": dict, "labels": list,
    "operating_points": dict, "ood": dict, "training": dict, "metrics": dict, "untrained": list, "source": dict,
    "name": str, "description": str,
    "versions": dict, "created": str, "weights_sha256": str}


def _type_problem(key: str, value: Any) -> str | None:
    want = _TYPES.get(key)
    if want is None or isinstance(value, want):
        return None
    shown = {dict: "a JSON object", list: "a JSON list", str: "a string"}.get(want, str(want))  # type: ignore[call-overload]
    return f"{key} must be {shown}, got {type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_format(value: Any, where: str) -> None:
    if value is None:
        raise BundleError(f"{where}: incomplete card: missing format (the card's version)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BundleError(f"{where}: card format must be an integer version, got {_short(value)}")
    if value > BUNDLE_FORMAT:
        raise BundleError(f"{where}: bundle format {value} is newer than this cxrbench supports ({BUNDLE_FORMAT}); "
                          "upgrade cxrbench")
    if value < 1:
        raise BundleError(f"{where}: unknown bundle format {value} (this cxrbench reads format {BUNDLE_FORMAT})")


def _builder_problems(card: ModelCard) -> list[str]:
    if card.builder not in KINDS[card.kind]:
        return [f"a {card.kind} bundle cannot be built by {card.builder!r} (expected {' or '.join(KINDS[card.kind])})"]
    accepted = builder_parameters(card.builder)
    unexpected = sorted(set(card.builder_kwargs) - accepted)
    if unexpected:
        return [f"unexpected builder_kwargs {unexpected} for {card.builder!r}; accepted: {sorted(accepted)}"]
    return []


def builder_parameters(builder: str) -> set[str]:
    """The keyword arguments the registered ``builder`` accepts (``pretrained`` is the loader's, not the card's)."""
    module_name, attr = BUILDERS[builder].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    params = inspect.signature(factory).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"pretrained"}


def _label_problems(card: ModelCard) -> list[str]:
    labels = card.labels
    if not all(isinstance(x, str) and x for x in labels):
        return ["labels must be non-empty strings"]
    problems = []
    if len(set(labels)) != len(labels):
        problems.append("labels repeat a name")
    strangers = [u for u in card.untrained if u not in labels]
    if strangers:
        problems.append(f"untrained outputs {strangers} are not labels of this card")
    if labels and len(card.untrained) >= len(labels):
        problems.append("every output is marked untrained: the model predicts nothing")
    if card.kind == "classifier":
        outputs = card.builder_kwargs.get("num_outputs")
        if not labels:
            problems.append("a classifier card needs its labels (the names of the outputs, in order)")
        elif outputs is not None and outputs != len(labels):
            problems.append(f"{len(labels)} labels for a head with num_outputs={outputs}")
    return problems


def _preprocess_problems(card: ModelCard) -> list[str]:
    try:
        pp = Preprocess.from_dict(card.preprocess)
    except (PreprocessError, TypeError) as exc:
        return [f"preprocess: {exc}"]
    lo, hi = IMAGE_SIZE_RANGE
    if not lo <= pp.size <= hi:
        return [f"preprocess size {pp.size} px is outside [{lo}, {hi}]"]
    in_channels = card.builder_kwargs.get("in_channels")
    if in_channels is not None and in_channels != pp.channels:
        return [f"preprocess makes {pp.channels} channel(s) for a model with in_channels={in_channels}"]
    if card.builder == "autoencoder":  # a [0, 1] grey image at the network's own side
        side = card.builder_kwargs.get("image_size", 64)
        if pp.size != side or pp.normalize != "zero_one" or pp.channels != 1:
            return [f"an autoencoder of image_size {side} needs preprocess size {side}, normalize 'zero_one', "
                    f"1 channel; got size {pp.size}, normalize {pp.normalize!r}, {pp.channels} channel(s)"]
    return []


def _operating_point_problems(card: ModelCard) -> list[str]:
    ops = card.operating_points
    if not ops:
        return []
    thresholds = ops.get("thresholds")
    if not isinstance(thresholds, dict):
        return ["operating_points needs 'thresholds': a JSON object {finding: threshold in (0, 1) or null}"]
    problems = []
    strangers = sorted(set(thresholds) - set(card.labels))
    if strangers:
        problems.append(f"operating points for findings that are not labels: {strangers}")
    bad = {k: v for k, v in thresholds.items()
           if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < 1.0)}
    if bad:
        problems.append(f"operating points must lie in (0, 1) or be null: {_short(bad)}")
    return problems


def _ood_problems(card: ModelCard) -> list[str]:
    if card.kind != "ood":
        return []
    cutoff = card.ood.get("cutoff")
    if not isinstance(cutoff, dict):
        return ["an ood card needs ood.cutoff: {'scorer', 'threshold', 'method'}"]
    problems = []
    if cutoff.get("scorer") not in OOD_SCORERS:
        problems.append(f"ood.cutoff.scorer must be one of {OOD_SCORERS}, got {_short(cutoff.get('scorer'))}")
    threshold = cutoff.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        problems.append(f"ood.cutoff.threshold must be a finite number, got {_short(threshold)}")
    far = card.ood.get("far_cutoff")
    if far is not None:  # optional (older cards have one cutoff); when there, beyond the near one
        far_threshold = far.get("threshold") if isinstance(far, dict) else None
        if (isinstance(far_threshold, bool) or not isinstance(far_threshold, (int, float))
                or not math.isfinite(far_threshold)):
            problems.append(f"ood.far_cutoff.threshold must be a finite number, got {_short(far_threshold)}")
        elif isinstance(threshold, (int, float)) and far_threshold < threshold:
            problems.append(f"ood.far_cutoff.threshold {far_threshold:.4g} lies below the near cutoff {threshold:.4g}")
    return problems + _guard_problems(card.ood.get("guard"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: ``ood["guard"]`` (the blank-image guard, :class:`cxrbench.ood.guard.ImageGuard`): key -> (is valid, what it must be)
_GUARD_KEYS: dict[str, tuple[Any, str]] = {
    "min_side": (lambda v: _is_int(v) and 1 <= v <= 2048, "an integer in [1, 2048]"),
    "min_bits_per_pixel": (lambda v: _is_number(v) and 0 <= v <= 8, "a number in [0, 8]"),
    "min_spread": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "size": (lambda v: _is_int(v) and 8 <= v <= 2048, "an integer in [8, 2048]"),
    "kept_fraction_validation": (lambda v: _is_number(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
}


def _guard_problems(guard: Any) -> list[str]:
    """An OOD card's blank-image guard block; absent (older cards) is fine: the guard's defaults apply."""
    if guard is None:
        return []
    if not isinstance(guard, dict):
        return [f"ood.guard must be a JSON object {{{', '.join(_GUARD_KEYS)}, ...}}, got {_short(guard)}"]
    problems = [f"ood.guard needs {k}" for k in ("min_side", "min_bits_per_pixel", "min_spread") if k not in guard]
    problems += [f"ood.guard.{k} must be {what}, got {_short(guard[k])}"
                 for k, (ok, what) in _GUARD_KEYS.items() if k in guard and not ok(guard[k])]
    return problems


# --------------------------------------------------------------------------------------------------
# describing a card


def format_metric(value: Any, digits: int = 3) -> str:
    """A metric for display; ``"n/a"`` where it is undefined (None or NaN, e.g. AUC without positives)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def describe_card(card: ModelCard) -> list[str]:
    """What a bundle is, in a few plain lines (``cxrbench info``): model, input, labels, training data,
    operating points or cutoff, test metrics, versions."""
    pp = card.preprocessing
    lines = [f"{card.kind} bundle {card.name or '(unnamed)'}: {card.builder} {card.builder_kwargs}",
             f"input: {pp.size} px, {pp.channels} channel(s), normalize={pp.normalize}, equalize={pp.equalize}"]
    if card.description:
        lines.append(f"description: {card.description}")
    if card.labels:
        lines.append(f"labels ({len(card.labels)}): {', '.join(card.labels)}")
    if card.untrained:
        lines.append(f"not trained by this model ({len(card.untrained)}, masked): {', '.join(card.untrained)}")
    if card.source:
        src = card.source
        lines.append(f"source: {src.get('origin', '?')} {src.get('weights', '')}; licence {src.get('licence', '?')}; "
                     f"cite {src.get('citation', '?')}")
    lines += _describe_training(card.training) + _describe_calibration(card) + _describe_test(card)
    lines.append(f"created {card.created}; " + ", ".join(f"{k} {v}" for k, v in card.versions.items()))
    return lines


def _describe_training(t: dict[str, Any]) -> list[str]:
    if not t.get("data"):
        return []
    counts = ", ".join(f"{k} {v}" for k, v in (t.get("split_counts") or {}).items())
    return [f"trained on: {t['data']} ({t.get('n_images', '?')} images{'; ' + counts if counts else ''}), "
            f"seed {t.get('seed', '?')}, {t.get('epochs_run', '?')} epochs, split {t.get('split_file', '?')}"]


def _describe_calibration(card: ModelCard) -> list[str]:
    lines = []
    ops = card.operating_points
    if ops.get("thresholds"):
        defined = sum(v is not None for v in ops["thresholds"].values())
        lines.append(f"operating points: {defined} of {len(ops['thresholds'])} findings, "
                     f"{ops.get('method', '?')} on the {ops.get('fitted_on', '?')} split")
    cut = card.ood.get("cutoff")
    if cut:
        lines.append(f"OOD cutoff: {cut.get('scorer')} > {format_metric(cut.get('threshold'))} is out of "
                     f"distribution ({cut.get('method', '?')})")
    if card.kind == "ood":
        lines.append(_describe_guard(card.ood.get("guard")))
    return lines


#: how each ``operating_points["method"]`` reads in a sentence
_OP_METHODS = {"youden": "Youden's J, the threshold that best separates positives from negatives"}


def operating_points_sentence(card: ModelCard) -> str:
    """Where the card's operating points come from, in plain English; ``""`` when it has none.

    Published ones (an imported bundle, card ``method`` "published ...") say who published them and that they
    were fitted on the publisher's own data; fitted ones say on which split and how, and that they replaced the
    published ones when ``cxrbench calibrate`` re-fitted an imported bundle."""
    ops = card.operating_points
    if not ops.get("thresholds"):
        return ""
    method = str(ops.get("method") or "")
    if method.startswith("published"):
        publisher = str(card.source.get("origin") or "the publisher")
        return (f"Operating points as published by {publisher} with these weights, fitted on {publisher}'s own "
                "data, not on images from here (cxrbench calibrate re-fits them on a validation split).")
    where = str(ops.get("fitted_on") or "an unrecorded")
    where = f"the {where} split" if where in ("validation", "val", "train", "test", "an unrecorded") else where
    how = _OP_METHODS.get(method, method)
    sentence = f"Operating points fitted on {where}" + (f" ({how})" if how else "") + "."
    if ops.get("published"):
        sentence += " They replace the ones published with the weights."
    return sentence


def _describe_guard(g: dict[str, Any] | None) -> str:
    if not g:
        return ("blank-image guard: none in this card (an older bundle); the cxrbench defaults apply "
                "(cxrbench.ood.guard.ImageGuard)")
    kept = g.get("kept_fraction_validation")
    fit = (f"fitted: {g.get('method', '?')}, keeps {kept:.1%} of them" if _is_number(kept)
           else f"{g.get('method', '?')}")
    return (f"blank-image guard: short side >= {g['min_side']} px, >= {g['min_bits_per_pixel']:.2f} bits/pixel, "
            f"intensity spread >= {g['min_spread']:.3f} ({fit})")


def _describe_test(card: ModelCard) -> list[str]:
    num = format_metric
    if card.kind == "autoencoder" and "test_ssim_median" in card.metrics:
        return [f"test reconstruction: median SSIM {num(card.metrics['test_ssim_median'])}, mean L1 "
                f"{num(card.metrics.get('test_l1'), 4)}" + (f"; made for {card.training['like']}"
                                                          if card.training.get("like") else "")]
    test = card.test_metrics
    summary = test.get("summary") or {}
    if "macro_auc" in summary:
        lines = [f"test: macro AUC {num(summary['macro_auc'])} on {test.get('n_images', '?')} images, "
                 f"micro-F1 {num(summary.get('micro_f1'))}, macro-F1 {num(summary.get('macro_f1'))}, "
                 f"Hamming {num(summary.get('hamming_loss'))}"]
        if test.get("source"):  # which inputs the numbers were computed on (a training run's: as `predict` reads)
            lines.append(f"  predicted by: {test['source']}")
        for finding, m in (test.get("per_finding") or {}).items():
            lines.append(f"  {finding:<20} AUC {num(m.get('auc'))} [{num(m.get('auc_ci_low'))}, "
                         f"{num(m.get('auc_ci_high'))}], {int(m.get('n_pos') or 0)} positive(s)")
        return lines
    if "dice_mean" in test:
        return [f"test: Dice {num(test['dice_mean'])} (sd {num(test.get('dice_std'))}) on "
                f"{test.get('n_images', '?')} images of {test.get('n_patients', '?')} patients"]
    if "test_rejected_fraction" in card.metrics:
        return [f"test: the cutoff rejects {card.metrics['test_rejected_fraction']:.1%} of held-out "
                "in-distribution images"]
    return ["test metrics: none in the card"]

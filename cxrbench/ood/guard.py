"""The blank-image guard: what a frontal chest radiograph must pass before any OOD score is read.

Reconstruction distances favour simple images: a uniform grey square, a gradient or a checkerboard is
reconstructed *better* than a radiograph, so it scores as in-distribution (the "input complexity" weakness
of likelihood and reconstruction OOD scores; Serrà et al., ICLR 2020). The guard looks at the image itself:

- **size**: the short side must have at least ``min_side`` pixels (default 64);
- **information**, on the gate's own 64 px input, as two numbers:
  ``bits_per_pixel``, the PNG-compressed size of the 8-bit image (a complexity estimate in the spirit of
  Serrà et al.: flat images, gradients and regular patterns compress to a fraction of a radiograph), and
  ``spread``, the 1st-to-99th percentile intensity range (near-flat images, and noise averaged away by the
  resize, have almost none).

Each has a cutoff fitted on the in-distribution *validation* images, like the reconstruction cutoff:
``margin x`` their 1st percentile (margins 0.7 and 0.25: far below every chest radiograph seen, far above
blank and synthetic images), recorded in the OOD card (``ood["guard"]``). Without a fitted guard (no OOD
bundle, or an older card) the defaults of :class:`ImageGuard` apply: 2.5 bits/pixel and a spread of 0.15,
below every chest radiograph of ../shared/data (NIH, paediatric, lung-mask sets: minima 2.85 and 0.23) and
every synthetic phantom, above flat images, gradients, checkerboards, stripes and noise.

A "too small" verdict cannot be overridden (the model would see nothing but interpolation); an
"almost no image content" verdict can, like a reconstruction rejection (:attr:`GuardVerdict.overridable`).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image as _PILImage

from cxrbench.preprocess import GeometrySource, Preprocess

__all__ = ["GuardVerdict", "ImageGuard", "fit_guard", "image_information"]

#: the gate's analysis resolution (the OOD models' input)
GUARD_SIZE = 64
_FIT_PERCENTILE = 1.0
_FIT_MARGINS = {"bits_per_pixel": 0.7, "spread": 0.25}


def image_information(pixels: np.ndarray | GeometrySource, size: int = GUARD_SIZE) -> dict[str, float]:
    """``bits_per_pixel`` (PNG size of the 8-bit ``size`` px crop) and ``spread`` (1st to 99th percentile).

    ``pixels``: ``(H, W)`` float in [0, 1], as :func:`cxrbench.io.read_image` gives it (or its
    :class:`~cxrbench.preprocess.GeometrySource`).
    """
    small = Preprocess(size=size, normalize="zero_one").geometry(pixels)
    u8 = np.round(small * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    _PILImage.fromarray(u8).save(buf, format="PNG", compress_level=9)
    lo, hi = np.percentile(small, [1, 99])
    return {"bits_per_pixel": 8.0 * len(buf.getvalue()) / u8.size, "spread": float(hi - lo)}


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's answer: ``passed``, and when not, a plain ``reason`` and which check failed."""

    passed: bool
    check: str = ""
    reason: str = ""
    measures: dict[str, float] = field(default_factory=dict)
    #: the cutoffs the measures were held to (``short_side`` / ``bits_per_pixel`` / ``spread``)
    limits: dict[str, float] = field(default_factory=dict)

    @property
    def overridable(self) -> bool:
        """Whether a caller may analyse the image anyway (``allow_ood``): every rejection but "too small"."""
        return self.check != "size"


@dataclass(frozen=True)
class ImageGuard:
    """Size and information cutoffs (see the module doc); the defaults are used when no OOD card has fitted ones."""

    min_side: int = 64
    min_bits_per_pixel: float = 2.5
    min_spread: float = 0.15
    size: int = GUARD_SIZE
    method: str = "cxrbench defaults (no fitted cutoffs)"

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.size < 8:
            raise ValueError(f"min_side must be >= 1 and size >= 8, got {self.min_side}, {self.size}")
        if self.min_bits_per_pixel < 0 or not 0 <= self.min_spread < 1:
            raise ValueError(f"min_bits_per_pixel must be >= 0 and min_spread in [0, 1), got "
                             f"{self.min_bits_per_pixel}, {self.min_spread}")

    def check(self, pixels: np.ndarray | GeometrySource) -> GuardVerdict:
        """Check an ``(H, W)`` [0, 1] image (or its :class:`~cxrbench.preprocess.GeometrySource`); size first
        (no measure of a 1-pixel image means anything)."""
        h, w = (pixels.shape if isinstance(pixels, GeometrySource) else np.asarray(pixels).shape)[:2]
        if min(h, w) < self.min_side:
            return GuardVerdict(False, "size", f"too small ({w}x{h} px; a chest radiograph needs at least "
                                f"{self.min_side} px on the short side)", {"short_side": float(min(h, w))},
                                {"short_side": float(self.min_side)})
        info = image_information(pixels, self.size)
        limits = {"bits_per_pixel": float(self.min_bits_per_pixel), "spread": float(self.min_spread)}
        if info["spread"] < self.min_spread or info["bits_per_pixel"] < self.min_bits_per_pixel:
            return GuardVerdict(False, "information", "almost no image content (blank, flat or a simple pattern: "
                                f"{info['bits_per_pixel']:.2f} bits/pixel, intensity spread {info['spread']:.3f}; "
                                f"chest radiographs have at least {self.min_bits_per_pixel:.2f} and "
                                f"{self.min_spread:.3f})", info, limits)
        return GuardVerdict(True, measures=info, limits=limits)

    def to_dict(self) -> dict[str, Any]:
        """The guard's thresholds as a plain dict (the OOD card's ``ood["guard"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ImageGuard:
        """The guard of an OOD card's ``ood["guard"]`` entry; the defaults where the card has none (older cards)."""
        if not d:
            return cls()
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def fit_guard(images: Sequence[np.ndarray], *, min_side: int = 64, size: int = GUARD_SIZE,
              percentile: float = _FIT_PERCENTILE) -> tuple[ImageGuard, dict[str, Any]]:
    """Fit the information cutoffs on in-distribution validation images (``(H, W)`` [0, 1] each).

    Returns the guard and a record for the card: the measures' summaries, the share of ``images`` the
    guard keeps (it should be ~100 %; the OOD issue asks for at least 95 %).
    """
    if len(images) == 0:
        raise ValueError("fit_guard needs at least one validation image")
    infos = [image_information(im, size) for im in images]
    values = {k: np.array([i[k] for i in infos]) for k in _FIT_MARGINS}
    cut = {k: float(_FIT_MARGINS[k] * np.percentile(v, percentile)) for k, v in values.items()}
    guard = ImageGuard(min_side=min_side, min_bits_per_pixel=cut["bits_per_pixel"], min_spread=cut["spread"],
                       size=size, method=f"{_FIT_MARGINS['bits_per_pixel']} x / {_FIT_MARGINS['spread']} x the "
                                         f"percentile {percentile:g} of {len(images)} validation images")
    kept = float(np.mean([guard.check(im).passed for im in images]))
    record = {"kept_fraction_validation": kept, "n_validation": len(images),
              **{f"validation_{k}": {"min": float(v.min()), "p1": float(np.percentile(v, 1)),
                                      "median": float(np.median(v))} for k, v in values.items()}}
    return guard, record

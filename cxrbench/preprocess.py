"""One preprocessing path for every model: square scale-and-crop, resize, equalise, normalise.

A :class:`Preprocess` is a small frozen, JSON-serialisable config. Every model bundle stores the one it
was trained with, and every path into a model (training, evaluation, the dashboard, export) goes
through it, so images are never silently scaled differently at inference than in training — the most
common failure of chest X-ray models in other hands.

The work is split in two steps so the expensive one can be cached:

``geometry``  (H, W) float [0, 1] -> (size, size) float32 [0, 1]
    square centre crop (or black padding) then an antialiased resize: never a stretch (Chester §5.1).
    ``resample="skimage"`` is torchxrayvision's ``XRayResizer`` (``skimage.transform.resize``, bilinear, its
    default anti-aliasing, constant mid-grey border), so imported xrv models see the pixels they were trained on.
    This is also the *displayed crop* on which explanation maps are overlaid.
``intensity`` (size, size) float [0, 1] -> (C, size, size) float32 model input
    optional histogram equalisation / CLAHE, then the normalisation mode, then 1 or 3 channels.

Normalisation modes
-------------------
``zero_one``  x                         (values in [0, 1])
``minus1_1``  2x - 1                    (the hybrid report's choice)
``xrv``       (2x - 1) * 1024           (torchxrayvision's [-1024, 1024])
``imagenet``  (x - mean) / std          (ImageNet statistics per channel; one channel uses their average)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from PIL import Image as _PILImage

from cxrbench._types import PreprocessError, check_unit_range

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "GeometrySource", "Preprocess", "PreprocessError"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "bilinear": _PILImage.Resampling.BILINEAR,
    "bicubic": _PILImage.Resampling.BICUBIC,
    "lanczos": _PILImage.Resampling.LANCZOS,
    "area": _PILImage.Resampling.BOX,
    "nearest": _PILImage.Resampling.NEAREST,
}
#: ``resample`` modes done by scikit-image instead of Pillow (torchxrayvision's resizer)
_SKIMAGE_RESAMPLE = ("skimage",)
_NORMALIZE = ("zero_one", "minus1_1", "xrv", "imagenet")
_EQUALIZE = ("none", "hist", "clahe")
_CROP = ("center", "pad")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input.

    Parameters
    ----------
    size : output side in pixels (square).
    crop : ``"center"`` crops the central square (default, Chester's scale-and-crop), ``"pad"`` pads the
        short side with black to a square. Neither stretches.
    resample : ``"bilinear"`` (antialiased when shrinking), ``"area"``, ``"bicubic"``, ``"lanczos"``, or
        ``"skimage"`` (torchxrayvision's ``XRayResizer``; not available in the browser-only app).
    equalize : ``"none"``, ``"hist"`` (global histogram equalisation) or ``"clahe"``.
    clahe_clip : CLAHE clip limit (scikit-image ``equalize_adapthist``), used with ``equalize="clahe"``.
    normalize : ``"zero_one"``, ``"minus1_1"``, ``"xrv"`` or ``"imagenet"`` (see module doc).
    channels : 1 or 3 (grey copied to 3 channels for ImageNet-style models).
    """

    size: int = 224
    crop: Literal["center", "pad"] = "center"
    resample: Literal["bilinear", "bicubic", "lanczos", "area", "nearest", "skimage"] = "bilinear"
    equalize: Literal["none", "hist", "clahe"] = "none"
    clahe_clip: float = 0.01
    normalize: Literal["zero_one", "minus1_1", "xrv", "imagenet"] = "minus1_1"
    channels: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 8:
            raise PreprocessError(f"size must be an integer >= 8, got {self.size!r}")
        if self.crop not in _CROP:
            raise PreprocessError(f"crop must be one of {_CROP}, got {self.crop!r}")
        if self.resample not in _RESAMPLE and self.resample not in _SKIMAGE_RESAMPLE:
            raise PreprocessError(f"resample must be one of {(*_RESAMPLE, *_SKIMAGE_RESAMPLE)}, got {self.resample!r}")
        if self.equalize not in _EQUALIZE:
            raise PreprocessError(f"equalize must be one of {_EQUALIZE}, got {self.equalize!r}")
        if self.normalize not in _NORMALIZE:
            raise PreprocessError(f"normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        if self.channels not in (1, 3):
            raise PreprocessError(f"channels must be 1 or 3, got {self.channels!r}")
        if not 0 < self.clahe_clip <= 1:
            raise PreprocessError(f"clahe_clip must be in (0, 1], got {self.clahe_clip!r}")

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what a bundle's card stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Settings from :meth:`to_dict`; PreprocessError naming any unknown field."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PreprocessError(f"unknown Preprocess fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        """The settings as canonical JSON (sorted keys), e.g. a cache key."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> "Preprocess":
        """A copy with ``changes`` applied, validated again."""
        return type(self).from_dict({**self.to_dict(), **changes})

    # ---------------------------------------------------------------- steps
    def geometry(self, image: "np.ndarray | GeometrySource") -> np.ndarray:
        """Square crop (or pad) and resize: ``(H, W)`` [0, 1] -> ``(size, size)`` float32 [0, 1].

        ``image`` may be a :class:`GeometrySource`: then the check and the conversion of a large image are
        shared with the other preprocessings that resize it (the same pixels as from the array)."""
        source = image if isinstance(image, GeometrySource) else GeometrySource(image)
        return source.resized(self.crop, self.size, self.resample)

    def intensity(self, image: np.ndarray) -> np.ndarray:
        """Equalise and normalise a ``(size, size)`` [0, 1] image into ``(C, size, size)`` float32."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise PreprocessError(f"expected a 2-D image, got shape {image.shape}")
        check_unit_range(image)
        image = self.equalized(image)
        out = self.normalize_array(image[None])
        return np.ascontiguousarray(out, dtype=np.float32)

    def equalized(self, image: np.ndarray) -> np.ndarray:
        """The ``equalize`` step alone, ``(H, W)`` [0, 1] -> ``(H, W)`` float32 [0, 1]."""
        if self.equalize == "none":
            return image.astype(np.float32, copy=False)
        from skimage import exposure

        if float(image.max()) - float(image.min()) < 1e-8:  # constant: nothing to equalise
            return image.astype(np.float32, copy=False)
        if self.equalize == "hist":
            out = exposure.equalize_hist(image, nbins=256)
        else:
            out = exposure.equalize_adapthist(image, clip_limit=self.clahe_clip)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def normalize_array(self, x: np.ndarray) -> np.ndarray:
        """Normalise ``(1, H, W)`` (or ``(B, 1, H, W)``) values in [0, 1] and expand to ``channels``."""
        x = np.asarray(x, dtype=np.float32)
        channel_axis = x.ndim - 3
        if x.shape[channel_axis] != 1:
            raise PreprocessError(f"expected one channel on axis {channel_axis}, got shape {x.shape}")
        if self.channels == 3:
            x = np.repeat(x, 3, axis=channel_axis)
        mean, std = self.stats()
        shape = [1] * x.ndim
        shape[channel_axis] = self.channels
        return (x - np.reshape(mean, shape)) / np.reshape(std, shape)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, std)`` such that ``model_input = (x - mean) / std`` for x in [0, 1]."""
        if self.normalize == "zero_one":
            mean, std = [0.0], [1.0]
        elif self.normalize == "minus1_1":
            mean, std = [0.5], [0.5]
        elif self.normalize == "xrv":
            mean, std = [0.5], [0.5 / 1024.0]
        else:  # imagenet
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
            if self.channels == 1:
                mean, std = [float(np.mean(mean))], [float(np.mean(std))]
        if self.normalize != "imagenet":
            mean, std = mean * self.channels, std * self.channels
        return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)

    def input_range(self) -> tuple[float, float]:
        """The (min, max) a model input can take for inputs in [0, 1] (the range check used at inference)."""
        mean, std = self.stats()
        return float(np.min((0 - mean) / std)), float(np.max((1 - mean) / std))

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalize_array` on the first channel: model input -> [0, 1]."""
        x = np.asarray(x, dtype=np.float32)
        mean, std = self.stats()
        channel_axis = x.ndim - 3
        first = np.take(x, [0], axis=channel_axis)
        return first * std[0] + mean[0]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Full path: ``(H, W)`` [0, 1] -> ``(C, size, size)`` float32 model input."""
        return self.intensity(self.geometry(image))


class GeometrySource:
    """An ``(H, W)`` [0, 1] image checked once, for :meth:`Preprocess.geometry` at several sizes.

    A report resizes the same upload for the classifier, the gate and the blank-image guard; for a 3000 px
    DICOM, checking the range and converting the pixels to a Pillow image each time cost more than the
    resizes. This keeps the checked float32 pixels and the Pillow image of each crop mode; every
    :meth:`resized` is what ``geometry`` of the array gives (a fresh array each call).
    """

    def __init__(self, image: np.ndarray) -> None:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim != 2:
            raise PreprocessError(
                f"expected a 2-D grey image (H, W), got shape {image.shape}; "
                "read images with cxrbench.io.read_image, which converts colour to grey"
            )
        check_unit_range(image)
        self.pixels = image.astype(np.float32, copy=False)
        self._pil: dict[str, _PILImage.Image] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W)`` of the pixels."""
        return tuple(self.pixels.shape)

    def resized(self, crop: str, size: int, resample: str) -> np.ndarray:
        """The ``(size, size)`` float32 [0, 1] crop (see :meth:`Preprocess.geometry`)."""
        square = _square(self.pixels, crop)
        if square.shape[0] == size:
            return np.array(square, dtype=np.float32, order="C")
        if resample == "skimage":
            return _skimage_resize(square, size)
        if crop not in self._pil:
            self._pil[crop] = _PILImage.fromarray(np.ascontiguousarray(square), mode="F")
        out = np.asarray(self._pil[crop].resize((size, size), _RESAMPLE[resample]), dtype=np.float32)
        return np.clip(out, 0.0, 1.0)


def _skimage_resize(square: np.ndarray, size: int) -> np.ndarray:
    """The resize of torchxrayvision's ``XRayResizer`` (``skimage.transform.resize``, constant border).

    xrv resizes after scaling to [-1024, 1024], where its zero border is mid-grey: ``cval=0.5`` here.
    """
    from skimage.transform import resize

    out = resize(square, (size, size), mode="constant", cval=0.5, preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _square(image: np.ndarray, crop: str) -> np.ndarray:
    h, w = image.shape
    if h == w:
        return image
    if crop == "center":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return image[top : top + side, left : left + side]
    side = max(h, w)
    out = np.zeros((side, side), dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out

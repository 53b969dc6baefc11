"""Reading radiographs: PNG (8/16-bit), JPEG, TIFF/BMP, DICOM -> float32 image in [0, 1].

One entry point, :func:`read_image`, takes a path, raw bytes or a binary file object and returns an
:class:`Image`: the pixels as a ``(H, W)`` float32 array in [0, 1] (bright = dense, as a radiograph is
displayed) and :class:`ImageMeta` (source format, bit depth, original size, photometric
interpretation). Every failure is an :class:`ImageReadError` that names the source and the reason,
so a batch job can report it and go on.

Conventions
-----------
- Integer images are scaled by their *container* range (``uint8`` / 255, ``uint16`` / 65535) unless
  the file stores fewer significant bits (DICOM ``BitsStored``, 16-bit PNGs whose values never
  exceed 4095 are *not* guessed at: they are scaled by 65535 and flagged ``low_dynamic_range``).
  DICOM pixels go through rescale slope/intercept and the VOI LUT or window, then min-max.
- Colour is converted to grey with ITU-R 601-2 luma (Pillow's ``"L"``); alpha is composited on black.
- ``MONOCHROME1`` DICOMs are inverted so that bright always means dense.
- Images with more than ``max_pixels`` pixels (default 50 megapixels) are refused before decoding.
"""

from __future__ import annotations

import io as _stdio
import os
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image as _PILImage
from PIL import UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Image",
    "ImageMeta",
    "ImageReadError",
    "ImageSource",
    "read_image",
    "source_name",
]

#: Largest image accepted, in pixels (the decompression-bomb guard). 50 MP is ~7000 x 7000.
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

_DICOM_MAGIC_OFFSET = 128


class ImageReadError(ValueError):
    """An image could not be read. ``source`` names the file (or ``<bytes>``), ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


@dataclass(frozen=True)
class ImageMeta:
    """What was read and how it was converted.

    Attributes
    ----------
    source : file path or ``"<bytes>"`` / the name given by the caller.
    format : ``"PNG"``, ``"JPEG"``, ``"DICOM"``, ...
    bit_depth : significant bits per sample of the stored pixels (8, 16, 12 for a typical DICOM).
    original_size : ``(height, width)`` in pixels, before any resizing.
    photometric : ``"MONOCHROME2"`` (bright = dense), ``"MONOCHROME1"`` (inverted on read), ``"RGB"``,
        ``"RGBA"``, ``"P"`` (palette) ...
    mode : Pillow mode of the stored image, or the DICOM pixel dtype.
    inverted : True when the pixels were inverted (MONOCHROME1).
    notes : conversions applied (``"rgb_to_grey"``, ``"alpha_on_black"``, ``"voi_lut"``, ...).
    """

    source: str
    format: str
    bit_depth: int
    original_size: tuple[int, int]
    photometric: str
    mode: str
    inverted: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["original_size"] = list(self.original_size)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class Image:
    """A radiograph as read: ``pixels`` is ``(H, W)`` float32 in [0, 1], bright = dense."""

    pixels: np.ndarray
    meta: ImageMeta

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


def source_name(source: ImageSource, name: str | None = None) -> str:
    """The name used in messages: ``name`` if given, the path for a path, else ``"<bytes>"``."""
    if name:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or "<bytes>"


def read_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image:
    """Read one radiograph from a path, bytes or a binary file object.

    Parameters
    ----------
    source : path (str / PathLike), ``bytes``-like, or a binary file object.
    name : the name to use in error messages and metadata (e.g. an uploaded file's name).
    max_pixels : refuse images larger than this many pixels (decompression-bomb guard).

    Returns
    -------
    Image
        ``pixels`` ``(H, W)`` float32 in [0, 1] and :class:`ImageMeta`.

    Raises
    ------
    ImageReadError
        For a missing, empty, truncated, non-image, zero-size, multi-frame, huge or undecodable input;
        the message names the source and the reason. No other exception escapes.
    """
    label = source_name(source, name)
    try:
        data = _read_bytes(source, label)
        if not data:
            raise ImageReadError(label, "the file is empty (0 bytes)")
        if _looks_like_dicom(data):
            return _read_dicom(data, label, max_pixels)
        return _read_raster(data, label, max_pixels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(label, "not enough memory to decode this image") from None
    except Exception as exc:  # the promise: one named exception, with the reason
        raise ImageReadError(label, f"could not decode image ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------
# bytes


def _read_bytes(source: ImageSource, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageReadError(label, "no such file")
        if path.is_dir():
            raise ImageReadError(label, "is a directory, not an image file")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ImageReadError(label, f"cannot read file ({exc.strerror or exc})") from None
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageReadError(label, "file object must be opened in binary mode")
        return bytes(data)
    raise ImageReadError(label, f"unsupported source type {type(source).__name__}")


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= _DICOM_MAGIC_OFFSET + 4 and data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


# --------------------------------------------------------------------------------------------------
# PNG / JPEG / other Pillow formats


def _read_raster(data: bytes, label: str, max_pixels: int) -> Image:
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces Pillow's warning; its hard error still applies
            warnings.simplefilter("ignore", _PILImage.DecompressionBombWarning)
            pil = _PILImage.open(_stdio.BytesIO(data))
    except UnidentifiedImageError:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and 0 in struct.unpack(">II", data[16:24]):
            w, h = struct.unpack(">II", data[16:24])
            raise ImageReadError(label, f"image has zero size ({w}x{h})") from None
        raise ImageReadError(label, "not a recognised image format (PNG, JPEG, TIFF, BMP or DICOM expected)") from None
    except _PILImage.DecompressionBombError:
        raise ImageReadError(label, f"image is too large (more than {max_pixels:,} pixels)") from None

    width, height = pil.size
    fmt = pil.format or "unknown"
    if width == 0 or height == 0:
        raise ImageReadError(label, f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageReadError(
            label, f"image is too large ({width}x{height} = {width * height:,} pixels; limit {max_pixels:,})"
        )
    n_frames = getattr(pil, "n_frames", 1)
    if n_frames > 1:
        raise ImageReadError(label, f"multi-frame image ({n_frames} frames); one frame expected")
    mode = pil.mode
    try:
        pil.load()
    except OSError as exc:
        raise ImageReadError(label, f"truncated or corrupt {fmt} data ({exc})") from None

    notes: list[str] = []
    arr, bit_depth = _pil_to_grey(pil, notes)
    pixels = arr.astype(np.float32)
    photometric = {"L": "MONOCHROME2", "I;16": "MONOCHROME2", "I": "MONOCHROME2", "1": "MONOCHROME2"}.get(mode, mode)
    meta = ImageMeta(
        source=label,
        format=fmt,
        bit_depth=bit_depth,
        original_size=(height, width),
        photometric=photometric,
        mode=mode,
        notes=tuple(notes),
    )
    return Image(_finish(pixels, label), meta)


def _pil_to_grey(pil: _PILImage.Image, notes: list[str]) -> tuple[np.ndarray, int]:
    """(H, W) float64 in [0, 1] and the stored bit depth."""
    mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(pil, dtype=np.float64) / 65535.0
        return arr, 16
    if mode == "I":  # 32-bit signed ints; Pillow opens 16-bit PNGs like this
        raw = np.asarray(pil, dtype=np.int64)
        if raw.min() < 0 or raw.max() > 65535:
            lo, hi = float(raw.min()), float(raw.max())
            notes.append("min_max_scaled")
            return (raw - lo) / (hi - lo) if hi > lo else np.zeros(raw.shape), 32
        return raw / 65535.0, 16
    if mode == "F":
        raw = np.asarray(pil, dtype=np.float64)
        if not np.all(np.isfinite(raw)):
            raise ValueError("floating-point image contains NaN or infinity")
        lo, hi = float(raw.min()), float(raw.max())
        notes.append("min_max_scaled")
        return (raw - lo) / (hi - lo) if hi > lo else np.zeros(raw.shape), 32
    if mode == "1":
        return np.asarray(pil.convert("L"), dtype=np.float64) / 255.0, 1
    if mode == "L":
        return np.asarray(pil, dtype=np.float64) / 255.0, 8
    if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float64)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0
        notes.append("alpha_on_black")
        if mode not in ("LA",):
            notes.append("rgb_to_grey")
        return grey * alpha / 255.0, 8
    # RGB, P, CMYK, YCbCr, LAB, HSV ...
    notes.append("rgb_to_grey" if mode != "P" else "palette_to_grey")
    return np.asarray(pil.convert("L"), dtype=np.float64) / 255.0, 8


# --------------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(data: bytes, label: str, max_pixels: int) -> Image:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a hard dependency
        raise ImageReadError(label, "DICOM file, but pydicom is not installed") from None

    try:
        ds = pydicom.dcmread(_stdio.BytesIO(data), force=False)
    except InvalidDicomError as exc:
        raise ImageReadError(label, f"invalid DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data (not an image object)")

    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or cols == 0:
        raise ImageReadError(label, f"DICOM image has zero size ({cols}x{rows})")
    if rows * cols > max_pixels:
        raise ImageReadError(label, f"image is too large ({cols}x{rows} = {rows * cols:,} pixels; limit {max_pixels:,})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(label, f"multi-frame DICOM ({frames} frames); one frame expected")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated pixel data ...
        syntax = f"{tsyntax.name} ({tsyntax})" if tsyntax is not None else "unknown transfer syntax"
        if tsyntax is not None and getattr(tsyntax, "is_compressed", False):
            raise ImageReadError(
                label,
                f"compressed DICOM ({syntax}) and no decoder for it is installed; "
                "install pylibjpeg[all] or gdcm, or convert the file to uncompressed DICOM/PNG",
            ) from None
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({syntax}: {exc})") from None

    arr = np.asarray(arr)
    if arr.ndim == 3 and samples == 1:
        raise ImageReadError(label, f"multi-frame DICOM ({arr.shape[0]} frames); one frame expected")
    notes: list[str] = []
    if samples == 3 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        from pydicom.pixels import convert_color_space

        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        rgb = arr[..., :3].astype(np.float64)
        vmax = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        grey = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / vmax
        notes.append("rgb_to_grey")
        pixels = grey
        inverted = False
    else:
        pixels, inverted, more = _dicom_grey(ds, arr, photometric)
        notes.extend(more)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    meta = ImageMeta(
        source=label,
        format="DICOM",
        bit_depth=bits,
        original_size=(rows, cols),
        photometric=photometric,
        mode=str(arr.dtype),
        inverted=inverted,
        notes=tuple(notes),
    )
    return Image(_finish(pixels.astype(np.float32), label), meta)


def _dicom_grey(ds, arr: np.ndarray, photometric: str) -> tuple[np.ndarray, bool, list[str]]:
    """Modality LUT (rescale), VOI LUT or window, MONOCHROME1 inversion, min-max to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    notes = []
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        notes.append("modality_lut")
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        if np.array_equal(values, np.round(values)):  # a LUT is indexed by integers
            values = values.astype(np.int64)
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        notes.append("voi_lut" if "VOILUTSequence" in ds else "window")
    lo, hi = float(np.min(values)), float(np.max(values))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("DICOM pixel values are not finite")
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    notes.append("min_max_scaled")
    inverted = photometric == "MONOCHROME1"
    if inverted:
        scaled = 1.0 - scaled
        notes.append("monochrome1_inverted")
    return scaled, inverted, notes


def _finish(pixels: np.ndarray, label: str) -> np.ndarray:
    if pixels.ndim != 2:
        raise ImageReadError(label, f"expected a 2-D grey image after conversion, got shape {pixels.shape}")
    if not np.all(np.isfinite(pixels)):
        raise ImageReadError(label, "decoded pixels contain NaN or infinity")
    return np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)

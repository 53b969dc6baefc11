"""Reading radiographs: PNG (8/16-bit), JPEG, TIFF/BMP, DICOM -> float32 image in [0, 1].

One entry point, :func:`read_image`, takes a path, raw bytes or a binary file object and returns an
:class:`Image`: the pixels as a ``(H, W)`` float32 array in [0, 1] (bright = dense, as a radiograph is
displayed) and :class:`ImageMeta` (source format, bit depth, original size, photometric
interpretation). Every failure is an :class:`ImageReadError` that names the source and the reason,
so a batch job can report it and go on.

Conventions
-----------
- Integer images are scaled by their *effective* bit depth, as DICOM's ``BitsStored`` does: 8-bit
  images by 255; 16-bit images by ``2**b - 1`` where ``b`` is the PNG's ``sBIT`` chunk when present, else
  the smallest of 8, 10, 12, 14, 16 that holds the image's maximum. Many DICOM-to-PNG conversions store
  12-bit values (at most 4095) in a 16-bit PNG; divided by 65535 they would read near-black.
  ``ImageMeta.effective_bits`` records the depth used.
- DICOM pixels go through rescale slope/intercept and the VOI LUT or window, then min-max; all in
  float32 (the same pixels as pydicom's float64 path within 1e-6, several times faster).
- ``ImageMeta.low_dynamic_range`` is set when, after scaling, 98 % of the pixels span less than
  :data:`LOW_DYNAMIC_RANGE_SPREAD` of [0, 1] (a nearly flat or nearly black image): results on it
  deserve a warning.
- Colour is converted to grey with ITU-R 601-2 luma (Pillow's ``"L"``); alpha is composited on black.
- ``MONOCHROME1`` DICOMs are inverted so that bright always means dense.
- Images with more than ``max_pixels`` pixels (default 50 megapixels) are refused before decoding.
"""

from __future__ import annotations

import errno
import io as _stdio
import os
import stat
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image as _PILImage
from PIL import UnidentifiedImageError

from cxrbench._types import all_finite

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LOW_DYNAMIC_RANGE_SPREAD",
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
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: bit depths a 16-bit container is checked against, smallest first
_EFFECTIVE_DEPTHS = (8, 10, 12, 14, 16)
#: below this spread (1st to 99th percentile, in [0, 1]) an image is flagged ``low_dynamic_range``
LOW_DYNAMIC_RANGE_SPREAD = 0.1


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
    effective_bits : the bit depth the integer values were scaled by (``2**effective_bits - 1`` is 1.0);
        for DICOM its ``BitsStored``; 32 for float images (min-max scaled).
    low_dynamic_range : the pixels, as read, span less than :data:`LOW_DYNAMIC_RANGE_SPREAD` of [0, 1].
    """

    source: str
    format: str
    bit_depth: int
    original_size: tuple[int, int]
    photometric: str
    mode: str
    inverted: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    effective_bits: int = 8
    low_dynamic_range: bool = False

    def to_dict(self) -> dict:
        """The metadata as a JSON-ready dict (tuples as lists)."""
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
        """``(H, W)`` of the pixels."""
        return self.pixels.shape


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


def _link_problem(path: Path) -> str:
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 raises RuntimeError for a loop
        return "a loop of links"
    except OSError as exc:
        return "a loop of links" if exc.errno == errno.ELOOP else "its target does not exist"
    return "its target does not exist"


def _read_bytes(source: ImageSource, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            if path.is_symlink():  # a link whose target is missing, or a loop of links
                raise ImageReadError(label, f"a symbolic link that leads nowhere ({_link_problem(path)})")
            raise ImageReadError(label, "no such file")
        if path.is_dir():
            raise ImageReadError(label, "is a directory, not an image file")
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ImageReadError(label, f"cannot read file ({exc.strerror or exc})") from None
        if not stat.S_ISREG(mode):  # a FIFO would block the read forever
            raise ImageReadError(label, "not a regular file (a FIFO, socket or device); skipped")
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
        if data[:8] == _PNG_MAGIC and len(data) >= 24 and 0 in struct.unpack(">II", data[16:24]):
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
    sbit = _png_sbit(data) if fmt == "PNG" else None
    pixels, bit_depth, effective = _pil_to_grey(pil, notes, sbit)
    photometric = {"L": "MONOCHROME2", "I;16": "MONOCHROME2", "I": "MONOCHROME2", "1": "MONOCHROME2"}.get(mode, mode)
    pixels = _finish(pixels, label)
    meta = ImageMeta(
        source=label,
        format=fmt,
        bit_depth=bit_depth,
        original_size=(height, width),
        photometric=photometric,
        mode=mode,
        notes=tuple(notes),
        effective_bits=effective,
        low_dynamic_range=is_low_dynamic_range(pixels),
    )
    return Image(pixels, meta)


def is_low_dynamic_range(pixels: np.ndarray) -> bool:
    """True when the 1st to 99th percentile of ``pixels`` ((H, W) in [0, 1]) span less than
    :data:`LOW_DYNAMIC_RANGE_SPREAD` (nearly flat or nearly black); computed on every k-th row and column, ~16k
    pixels or more (a 256 px image's 65k 8-bit pixels took 0.48 ms, most of a report's read: np.partition is slow
    on many equal values; every other row and column 0.1 ms)."""
    step = max(1, int(np.sqrt(pixels.size / 16384)))
    lo, hi = np.percentile(pixels[::step, ::step], [1, 99])
    return bool(hi - lo < LOW_DYNAMIC_RANGE_SPREAD)


def _png_sbit(data: bytes) -> int | None:
    """Significant bits of a greyscale PNG from its ``sBIT`` chunk (before the image data), else None."""
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"sBIT" and length >= 1:
            bits = data[pos + 8]
            return int(bits) if 1 <= bits <= 16 else None
        pos += 12 + length
    return None


def effective_bit_depth(values: np.ndarray, container_bits: int = 16, sbit: int | None = None) -> int:
    """The bit depth integer ``values`` were stored with: ``sbit`` when given, else the smallest of 8, 10,
    12, 14, ``container_bits`` that holds ``values.max()`` (a 12-bit image in a 16-bit PNG gives 12)."""
    if sbit is not None and 1 <= sbit <= container_bits:
        return int(sbit)
    vmax = int(values.max()) if values.size else 0
    return next(b for b in (*_EFFECTIVE_DEPTHS, container_bits) if b >= container_bits or vmax < 2**b)


def _scaled(raw: np.ndarray, bits: int) -> np.ndarray:
    # a division, not a multiplication by the reciprocal: correctly rounded, so 8-bit pixels equal v / 255 exactly
    return raw.astype(np.float32) / np.float32(2**bits - 1)


def _min_max(raw: np.ndarray) -> np.ndarray:
    raw = raw.astype(np.float32, copy=False)
    lo, hi = float(raw.min()), float(raw.max())
    if not hi > lo:
        return np.zeros(raw.shape, np.float32)
    out = np.subtract(raw, np.float32(lo), dtype=np.float32)  # in place from here: no further temporaries
    out /= np.float32(hi - lo)
    return out


def _pil_to_grey(pil: _PILImage.Image, notes: list[str], sbit: int | None = None) -> tuple[np.ndarray, int, int]:
    """(H, W) float32 in [0, 1], the stored bit depth and the effective bit depth it was scaled by."""
    mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or mode == "I":  # Pillow opens 16-bit PNGs as "I"
        raw = np.asarray(pil)
        if mode == "I" and (raw.min() < 0 or raw.max() > 65535):  # true 32-bit integers
            notes.append("min_max_scaled")
            return _min_max(raw.astype(np.float64)), 32, 32
        bits = effective_bit_depth(raw, 16, sbit)
        if bits < 16:
            notes.append(f"scaled_as_{bits}_bit")
        return _scaled(raw, bits), 16, bits
    if mode == "F":
        raw = np.asarray(pil, dtype=np.float32)
        if not np.all(np.isfinite(raw)):
            raise ValueError("floating-point image contains NaN or infinity")
        notes.append("min_max_scaled")
        return _min_max(raw), 32, 32
    if mode == "1":
        return _scaled(np.asarray(pil.convert("L")), 8), 1, 1
    if mode == "L":
        return _scaled(np.asarray(pil), 8), 8, 8
    if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / np.float32(255.0)
        notes.append("alpha_on_black")
        if mode not in ("LA",):
            notes.append("rgb_to_grey")
        return grey * alpha / np.float32(255.0), 8, 8
    # RGB, P, CMYK, YCbCr, LAB, HSV ...
    notes.append("rgb_to_grey" if mode != "P" else "palette_to_grey")
    return _scaled(np.asarray(pil.convert("L")), 8), 8, 8


# --------------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(data: bytes, label: str, max_pixels: int) -> Image:
    ds = _open_dicom(data, label, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    arr = _dicom_pixel_array(ds, label)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if arr.ndim == 3 and samples == 1:
        raise ImageReadError(label, f"multi-frame DICOM ({arr.shape[0]} frames); one frame expected")
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if samples == 3 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        pixels, inverted, notes = _dicom_rgb_to_grey(ds, arr, photometric, bits), False, ["rgb_to_grey"]
    else:
        pixels, inverted, notes = _dicom_grey(ds, arr, photometric)
    pixels = _finish(pixels, label)
    meta = ImageMeta(source=label, format="DICOM", bit_depth=bits, original_size=(int(ds.Rows), int(ds.Columns)),
                     photometric=photometric, mode=str(arr.dtype), inverted=inverted, notes=tuple(notes),
                     effective_bits=bits, low_dynamic_range=is_low_dynamic_range(pixels))
    return Image(pixels, meta)


def _open_dicom(data: bytes, label: str, max_pixels: int):
    """The parsed dataset, after the checks that need no pixel decoding (pixels present, size, frames)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

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
        raise ImageReadError(label, f"image is too large ({cols}x{rows} = {rows * cols:,} pixels; "
                                    f"limit {max_pixels:,})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(label, f"multi-frame DICOM ({frames} frames); one frame expected")
    return ds


def _dicom_pixel_array(ds, label: str) -> np.ndarray:
    """Decoded pixels; a compressed file says whether a decoder is missing or the data are broken."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoder plugin, truncated or corrupt pixel data ...
        syntax = f"{tsyntax.name} ({tsyntax})" if tsyntax is not None else "unknown transfer syntax"
        if tsyntax is not None and getattr(tsyntax, "is_compressed", False) and not _decoder_available(tsyntax):
            raise ImageReadError(
                label,
                f"compressed DICOM ({syntax}) and no decoder for it is installed; "
                "install pylibjpeg[all] or gdcm, or convert the file to uncompressed DICOM/PNG",
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(label, f"corrupt or truncated DICOM pixel data ({syntax}: {reason})") from None


def _decoder_available(tsyntax) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(tsyntax).is_available)
    except Exception:  # an unknown transfer syntax has no decoder
        return False


def _dicom_rgb_to_grey(ds, arr: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    if photometric.startswith("YBR"):
        arr = convert_color_space(arr, photometric, "RGB")
    rgb = arr[..., :3].astype(np.float32)
    luma = np.float32(0.299) * rgb[..., 0] + np.float32(0.587) * rgb[..., 1] + np.float32(0.114) * rgb[..., 2]
    return luma / np.float32(2**bits - 1)


def _dicom_grey(ds, arr: np.ndarray, photometric: str) -> tuple[np.ndarray, bool, list[str]]:
    """Modality LUT (rescale), VOI LUT or window, MONOCHROME1 inversion, min-max to [0, 1]; float32."""
    notes = []
    values = _modality(ds, arr)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        notes.append("modality_lut")
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        if np.array_equal(values, np.round(values)):  # a LUT is indexed by integers
            values = values.astype(np.int64)
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
        notes.append("voi_lut")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values = _window(values, ds)
        notes.append("window")
    if not all_finite(values):
        raise ValueError("DICOM pixel values are not finite")
    scaled = _min_max(values)
    notes.append("min_max_scaled")
    inverted = photometric == "MONOCHROME1"
    if inverted:
        scaled = np.float32(1.0) - scaled
        notes.append("monochrome1_inverted")
    return scaled, inverted, notes


def _modality(ds, arr: np.ndarray) -> np.ndarray:
    """The modality LUT as float32: rescale slope/intercept, or pydicom for a LUT sequence."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    values = arr.astype(np.float32)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:  # a single value
        return float(value)


def _window(values: np.ndarray, ds) -> np.ndarray:
    """The VOI window (PS3.3 C.11.2.1.2) as in :func:`pydicom.pixels.apply_windowing`, to [0, 1] in float32
    (its output range only rescales it, and :func:`_dicom_grey` min-max scales the result anyway)."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for a SIGMOID window, got {width}")
        return np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-4.0 / width) * (values - np.float32(center))))
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width must be >= 1 for a LINEAR window, got {width}")
        center, width = center - 0.5, width - 1
        if width == 0:
            return (values > np.float32(center)).astype(np.float32)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for a LINEAR_EXACT window, got {width}")
    else:
        raise ValueError(f"unsupported VOI LUT Function {function!r}")
    out = np.subtract(values, np.float32(center), dtype=np.float32)  # in place from here: no further temporaries
    out /= np.float32(width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _finish(pixels: np.ndarray, label: str) -> np.ndarray:
    if pixels.ndim != 2:
        raise ImageReadError(label, f"expected a 2-D grey image after conversion, got shape {pixels.shape}")
    if not all_finite(pixels):
        raise ImageReadError(label, "decoded pixels contain NaN or infinity")
    return np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)

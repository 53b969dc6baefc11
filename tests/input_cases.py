"""The input cases of the trust matrix (tests/test_input_matrix.py): every kind of file a user hands cxrbench.

Each :class:`Case` is one file (or one path) and the outcome every image-reading entry point must give for it:

- ``error``: the file cannot be read; every command gives one row naming it with ``reason`` (a regex), and the batch
  goes on;
- ``guard``: the file reads, but it is not a frontal chest radiograph by the blank-image guard (flat, tiny, gradient,
  noise ...); the gated entry points (``ood-score``, ``analyze``, the dashboard) reject it with ``reason``;
- ``result``: a radiograph; its probabilities equal those of the reference 8-bit PNG within ``atol`` (the same
  pixels in another container, bit depth or photometric interpretation, or the reference under a long or
  colliding name).

The files are built from one real NIH radiograph of ``../shared/data`` (never copied into the repository).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dicom_factory import make_dicom
from PIL import Image as PILImage

#: outcome kinds
ERROR, GUARD, RESULT = "error", "guard", "result"


@dataclass(frozen=True)
class Case:
    """One input: its ``name`` (the test id), the ``path`` given to the commands, and the expected outcome."""

    name: str
    path: Path
    outcome: str  # ERROR | GUARD | RESULT
    reason: str = ""  # regex on the error / gate reason
    atol: float = 1e-3  # RESULT: max |p - p_ref| of the raw probabilities
    direct: bool = True  # given on the command line itself (False: found inside the cases folder)


def png_bytes(arr: np.ndarray, **kw) -> bytes:
    """PNG bytes of a uint8/uint16 array (greyscale, RGB or RGBA by shape)."""
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb when large); the data are a stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    stub = _chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + stub + _chunk(b"IEND", b"")


def png16(values: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit greyscale PNG of ``values``, with an ``sBIT`` chunk when given."""
    data = png_bytes(np.asarray(values).astype(np.uint16))
    if sbit is None:
        return data
    end = 8 + 8 + 13 + 4  # signature + IHDR chunk
    return data[:end] + _chunk(b"sBIT", bytes([sbit])) + data[end:]


def _encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _multi_frame(fmt: str, **kw) -> bytes:
    frames = [PILImage.fromarray(np.full((96, 96), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


def _nan_tiff() -> bytes:
    arr = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    arr[10:20, 10:20] = np.nan
    return _encoded(arr, "TIFF")


def _compressed_dicom(grey: np.ndarray, cut: bool) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = _encoded(grey, "JPEG", quality=95)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(grey.astype(np.uint16), bits_stored=8)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg[: len(jpeg) // 3] if cut else jpeg])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _broken(grey: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """Files that cannot be read: name -> (bytes, reason regex)."""
    rng = np.random.default_rng(7)
    good_png = png_bytes(grey)
    jpeg = _encoded(grey, "JPEG", quality=90)
    return {
        "empty.png": (b"", "empty"),
        "text.png": (b"this is not an image\n" * 20, "not a recognised image format"),
        "random.png": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a recognised image format"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated|corrupt|decode"),
        "truncated.jpg": (jpeg[:600], "truncated|corrupt|decode"),
        "bomb.png": (png_with_header(80_000, 80_000), "too large"),
        "zero_size.png": (png_with_header(0, 10), "zero size|decode"),
        "animated.gif": (_multi_frame("GIF"), "multi-frame"),
        "animated.png": (_multi_frame("PNG"), "multi-frame"),
        "multi.tiff": (_multi_frame("TIFF"), "multi-frame"),
        "multi.dcm": (make_dicom(np.zeros((3, 96, 96), np.uint16), frames=3), "multi-frame"),
        "nan.tiff": (_nan_tiff(), "NaN|not finite|non-finite"),
        "no_pixels.dcm": (make_dicom(np.zeros((96, 96), np.uint16), with_pixels=False), "no pixel data"),
        "truncated_jpeg.dcm": (_compressed_dicom(grey, cut=True), "corrupt or truncated DICOM pixel data"),
    }


def _not_radiographs() -> dict[str, tuple[np.ndarray, str]]:
    """Images that read but are not radiographs: name -> (uint8 pixels, guard reason regex)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:512, 0:512]
    flat = "almost no image content"
    cases: dict[str, tuple[np.ndarray, str]] = {
        f"grey_{v}.png": (np.full((512, 512), v, np.uint8), flat) for v in (100, 128, 160, 200)
    }
    cases.update({
        "black.png": (np.zeros((512, 512), np.uint8), flat),
        "white.png": (np.full((512, 512), 255, np.uint8), flat),
        "near_flat.png": (np.clip(128 + rng.normal(0, 1, (512, 512)), 0, 255).astype(np.uint8), flat),
        "gradient_h.png": ((xx / 511 * 255).astype(np.uint8), flat),
        "gradient_v.png": ((yy / 511 * 255).astype(np.uint8), flat),
        "checkerboard.png": ((((yy // 32 + xx // 32) % 2) * 255).astype(np.uint8), flat),
        "noise.png": (rng.integers(0, 256, (512, 512), dtype=np.uint8), flat),
        "red.png": (np.broadcast_to(np.array([220, 30, 30], np.uint8), (300, 300, 3)).copy(), flat),
        "one_pixel.png": (np.full((1, 1), 128, np.uint8), "too small"),
        "seven_by_three.png": (rng.integers(0, 256, (3, 7), dtype=np.uint8), "too small"),
        "thin_strip.png": (rng.integers(0, 256, (40, 512), dtype=np.uint8), "too small"),
    })
    return cases


def build_cases(root: Path, reference: Path) -> tuple[list[Case], Path]:
    """Write every case under ``root``; returns the cases and the folder to pass (holding the indirect ones).

    ``reference``: a real 8-bit greyscale radiograph (its pixels are the ``result`` cases' reference).
    """
    grey = np.asarray(PILImage.open(reference).convert("L"))
    folder = root / "cases"
    folder.mkdir(parents=True)
    cases: list[Case] = []

    def add(name: str, data: bytes, outcome: str, reason: str = "", **kw) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append(Case(name, path, outcome, reason, **kw))
        return path

    add("reference.png", png_bytes(grey), RESULT, atol=0.0)
    # the same radiograph in other containers and bit depths
    add("twelve_in_16.png", png16(np.round(grey.astype(np.float64) * 4095 / 255)), RESULT)
    add("sixteen.png", png16(grey.astype(np.uint32) * 257), RESULT)
    # a DICOM without a window is scaled from its own minimum to its maximum, not by 4095: close, not equal
    add("mono2.dcm", make_dicom(np.round(grey.astype(np.float64) * 4095 / 255).astype(np.uint16)), RESULT, atol=0.01)
    add("mono1.dcm", make_dicom(np.round((255 - grey.astype(np.float64)) * 4095 / 255).astype(np.uint16),
                                photometric="MONOCHROME1"), RESULT, atol=0.01)
    add("rgb.png", png_bytes(np.repeat(grey[..., None], 3, axis=2)), RESULT)
    add("quality95.jpg", _encoded(grey, "JPEG", quality=95), RESULT, atol=0.02)
    add("jpeg_in.dcm", _compressed_dicom(grey, cut=False), RESULT, atol=0.02)
    # dark: 12-bit values in a 16-bit PNG that says (sBIT) all 16 bits are significant: read as they are, flagged
    # (so dark that the blank-image guard finds almost no image content: the gate rejects it, predict warns)
    add("dark_sbit16.png", png16(np.round(grey.astype(np.float64) * 4095 / 255), sbit=16), GUARD,
        "almost no image content")
    # names: colliding stems, the same name in two folders, a name at the file system's limit
    add("a.png", png_bytes(grey), RESULT, atol=0.0)
    add("a.dcm", make_dicom(np.round(grey.astype(np.float64) * 4095 / 255).astype(np.uint16)), RESULT, atol=0.01)
    add("a_1.png", png_bytes(grey), RESULT, atol=0.0)
    add("other/a.png", png_bytes(grey), RESULT, atol=0.0)
    add("x" * 246 + ".png", png_bytes(grey), RESULT, atol=0.0)
    add("ünïcode name.png", png_bytes(grey), RESULT, atol=0.0)
    for name, (data, reason) in _broken(grey).items():
        add(name, data, ERROR, reason)
    for name, (pixels, reason) in _not_radiographs().items():
        add(name, png_bytes(pixels), GUARD, reason)

    # paths that are not regular files
    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "fifo.png")
    cases.append(Case("fifo_in_folder", special / "fifo.png", ERROR, "not a regular file", direct=False))
    (root / "x.png").mkdir()
    cases.append(Case("directory_x.png", root / "x.png", ERROR, "directory"))
    loop = root / "loop.png"
    loop.symlink_to(loop)
    cases.append(Case("symlink_loop", loop, ERROR, "symbolic link that leads nowhere \\(a loop of links\\)"))
    dangling = root / "dangling.png"
    dangling.symlink_to(root / "deleted_target.png")
    cases.append(Case("dangling_link", dangling, ERROR,
                      "symbolic link that leads nowhere \\(its target does not exist\\)"))
    cases.append(Case("missing", root / "missing.png", ERROR, "no such file"))
    return cases, special

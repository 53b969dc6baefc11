"""cxrbench.io: every format the readers promise, and one named error for everything else."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from dicom_factory import make_dicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from cxrbench.io import DEFAULT_MAX_PIXELS, ImageReadError, read_image


def _png_bytes(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    image = PILImage.fromarray(arr, mode=mode) if mode else PILImage.fromarray(arr)
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.realdata
def test_reads_real_nih_png(nih_dir):
    path = sorted(nih_dir.glob("*.png"))[0]
    img = read_image(path)
    ref = np.asarray(PILImage.open(path).convert("L"), dtype=np.float32) / 255
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (256, 256)
    np.testing.assert_allclose(img.pixels, ref, atol=1e-6)
    assert img.meta.format == "PNG" and img.meta.bit_depth == 8
    assert img.meta.original_size == (256, 256)
    assert img.meta.photometric == "MONOCHROME2"
    assert img.meta.source == str(path)


@pytest.mark.realdata
def test_reads_every_shared_image_kind(shared_data):
    """One file of each dev set: NIH, paediatric (was JPEG, RGB), masks, non-chest."""
    for sub in ("nih", "pediatric", "nonchest", "masks/images"):
        path = sorted((shared_data / "cxr" / sub).glob("*.png"))[0]
        img = read_image(path)
        assert 0.0 <= img.pixels.min() <= img.pixels.max() <= 1.0
        assert img.pixels.std() > 0.01, f"{path} decoded to a flat image"


@pytest.mark.realdata
def test_same_result_from_path_bytes_and_file_object(nih_dir):
    path = sorted(nih_dir.glob("*.png"))[1]
    a = read_image(path).pixels
    b = read_image(path.read_bytes(), name="upload.png")
    with open(path, "rb") as f:
        c = read_image(f).pixels
    np.testing.assert_array_equal(a, b.pixels)
    np.testing.assert_array_equal(a, c)
    assert b.meta.source == "upload.png"


# ------------------------------------------------------------------------------------------ formats


def test_png_16bit_keeps_precision():
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    img = read_image(_png_bytes(ramp))
    assert img.meta.bit_depth == 16
    np.testing.assert_allclose(img.pixels, ramp / 65535.0, atol=1e-6)
    # more than 256 distinct levels survive (an 8-bit path would collapse them)
    assert len(np.unique(img.pixels)) > 1000


def test_jpeg_and_rgb_to_grey():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> luma 0.299
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    img = read_image(buf.getvalue())
    assert img.meta.photometric == "RGB" and "rgb_to_grey" in img.meta.notes
    np.testing.assert_allclose(img.pixels, 76 / 255.0, atol=1 / 255)
    buf = io.BytesIO()
    PILImage.fromarray(np.full((32, 48), 200, np.uint8)).save(buf, format="JPEG", quality=95)
    jpg = read_image(buf.getvalue())
    assert jpg.meta.format == "JPEG" and jpg.shape == (32, 48)
    assert abs(float(jpg.pixels.mean()) - 200 / 255) < 0.01


def test_rgba_alpha_composited_on_black_and_palette():
    rgba = np.full((16, 16, 4), 255, np.uint8)
    rgba[:, :8, 3] = 0  # left half transparent
    img = read_image(_png_bytes(rgba))
    assert "alpha_on_black" in img.meta.notes
    assert img.pixels[:, :8].max() == 0.0 and img.pixels[:, 8:].min() == 1.0
    pal = PILImage.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    p = read_image(buf.getvalue())
    assert p.meta.mode == "P" and p.pixels.shape == (16, 16)


def test_dicom_rescale_and_monochrome2():
    raw = np.arange(0, 4096, 4096 // 256, dtype=np.uint16)[:256].reshape(16, 16)
    img = read_image(make_dicom(raw, slope=2.0, intercept=-1024.0), name="a.dcm")
    assert img.meta.format == "DICOM" and img.meta.bit_depth == 12 and not img.meta.inverted
    assert "modality_lut" in img.meta.notes
    # linear rescale then min-max: same ordering, full [0, 1] range
    np.testing.assert_allclose(img.pixels, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_dicom_monochrome1_is_inverted():
    raw = np.tile(np.arange(16, dtype=np.uint16) * 100, (16, 1))
    m2 = read_image(make_dicom(raw, photometric="MONOCHROME2")).pixels
    m1 = read_image(make_dicom(raw, photometric="MONOCHROME1"))
    assert m1.meta.inverted and m1.meta.photometric == "MONOCHROME1"
    np.testing.assert_allclose(m1.pixels, 1.0 - m2, atol=1e-6)


def test_dicom_window_clips_outside_values():
    raw = np.tile(np.arange(0, 4000, 250, dtype=np.uint16), (16, 1))  # 0 .. 3750
    img = read_image(make_dicom(raw, window=(1000.0, 1000.0)))
    assert "window" in img.meta.notes
    below, above = img.pixels[:, raw[0] < 400], img.pixels[:, raw[0] > 1600]
    assert np.all(below == 0.0) and np.all(above == 1.0)


def test_dicom_voi_lut_sequence_applied():
    raw = np.tile(np.arange(16, dtype=np.uint16), (16, 1))
    lut = (np.arange(16) ** 2).astype(np.uint16)  # non-linear: a plain min-max would be linear
    img = read_image(make_dicom(raw, bits_stored=16, voi_lut=lut))
    assert "voi_lut" in img.meta.notes
    np.testing.assert_allclose(img.pixels[0], lut / lut.max(), atol=1e-4)


def test_dicom_rgb_to_grey():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    img = read_image(make_dicom(rgb))
    np.testing.assert_allclose(img.pixels, 0.587, atol=1e-3)


# ------------------------------------------------------------------------------------------ failures


def _expect_error(data, match: str, **kw) -> ImageReadError:
    with pytest.raises(ImageReadError, match=match) as info:
        read_image(data, **kw)
    return info.value


def test_missing_empty_and_directory(tmp_path):
    err = _expect_error(tmp_path / "nope.png", "no such file")
    assert err.source.endswith("nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    _expect_error(tmp_path / "empty.png", "empty")
    _expect_error(tmp_path, "directory")


def test_non_image_names_file_and_reason(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 10)
    err = _expect_error(p, "not a recognised image format")
    assert str(p) in str(err) and err.reason.startswith("not a recognised")


def test_truncated_png_and_jpeg(tmp_path):
    data = _png_bytes(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8))
    _expect_error(data[: len(data) // 2], "truncated|corrupt|decode", name="cut.png")
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128), dtype=np.uint8)).save(buf, "JPEG")
    _expect_error(buf.getvalue()[:600], "truncated|corrupt|decode", name="cut.jpg")


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a size (the pixel data is a tiny stub)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_zero_size_and_huge_images_refused_before_decoding():
    _expect_error(_png_with_header(0, 10), "zero size|decode")
    # 80,000 x 80,000 claims 6.4 gigapixels: refused from the header, nothing allocated
    _expect_error(_png_with_header(80_000, 80_000), "too large")
    # just over the default limit, still only a header
    side = int(DEFAULT_MAX_PIXELS**0.5) + 2
    _expect_error(_png_with_header(side, side), "too large")
    # a caller can lower the limit
    _expect_error(_png_bytes(np.zeros((100, 100), np.uint8)), "too large", max_pixels=5_000)


def test_multi_frame_refused():
    frames = [PILImage.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    _expect_error(buf.getvalue(), "multi-frame")
    _expect_error(make_dicom(np.zeros((3, 8, 8), np.uint16), frames=3), "multi-frame")


def test_dicom_without_pixels_and_compressed_without_decoder():
    _expect_error(make_dicom(np.zeros((8, 8), np.uint16), with_pixels=False), "no pixel data")
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.zeros((8, 8), np.uint16))))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # Pillow decodes JPEG 2000, so broken data are reported as broken, not as a missing decoder
    err = _expect_error(buf.getvalue(), "corrupt or truncated DICOM pixel data", name="ct.dcm")
    assert "ct.dcm" in str(err) and "no decoder" not in str(err)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # no JPEG-LS decoder is installed
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    _expect_error(buf.getvalue(), "no decoder for it is installed", name="ls.dcm")


def test_truncated_jpeg_dicom_reports_the_decode_error_not_a_missing_decoder():
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    grey = (np.indices((32, 32)).sum(axis=0) * 4).astype(np.uint8)
    jpeg = io.BytesIO()
    PILImage.fromarray(grey).save(jpeg, format="JPEG", quality=95)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(grey.astype(np.uint16), bits_stored=8)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for payload, ok in ((jpeg.getvalue(), True), (jpeg.getvalue()[: len(jpeg.getvalue()) // 3], False)):
        ds.PixelData = encapsulate([payload])
        ds["PixelData"].VR = "OB"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        if ok:  # the valid file decodes (Pillow is pydicom's JPEG plugin here)
            assert np.abs(read_image(buf.getvalue()).pixels * 255 - grey).max() < 12
        else:
            err = _expect_error(buf.getvalue(), "corrupt or truncated DICOM pixel data", name="cut.dcm")
            assert "no decoder" not in str(err) and "pylibjpeg" not in str(err)


def test_error_is_a_value_error_with_fields():
    err = _expect_error(b"GIF89a garbage", "ImageReadError|decode|recognised", name="x.gif")
    assert isinstance(err, ValueError) and err.source == "x.gif" and err.reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes_raise_only_image_read_error(data):
    try:
        img = read_image(data)
    except ImageReadError:
        return
    assert img.pixels.dtype == np.float32 and np.isfinite(img.pixels).all()


_PREFIXES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\0" * 128 + b"DICM", b"II*\0", b"BM"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_PREFIXES), st.binary(min_size=0, max_size=1024))
def test_random_bytes_behind_real_magic_raise_only_image_read_error(prefix, data):
    try:
        read_image(prefix + data)
    except ImageReadError:
        pass


# ------------------------------------------------------------------------------------------ bit depth


def _png16(values: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit greyscale PNG of ``values`` (uint16), with an ``sBIT`` chunk when given."""
    data = _png_bytes(values.astype(np.uint16))
    if sbit is None:
        return data
    chunk = b"sBIT" + bytes([sbit])
    ihdr_end = 8 + 8 + 13 + 4
    return data[:ihdr_end] + struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[ihdr_end:]


@pytest.mark.realdata
def test_8_12_in_16_and_16_bit_pngs_of_one_radiograph_read_the_same(nih_dir):
    """12-bit values stored in a 16-bit PNG (max <= 4095) are scaled by 4095, not 65535 (which reads near-black)."""
    grey8 = np.asarray(PILImage.open(sorted(nih_dir.glob("*.png"))[3]).convert("L"))
    ref = read_image(_png_bytes(grey8))
    twelve = read_image(_png16(np.round(grey8.astype(np.float64) * 4095 / 255)))
    sixteen = read_image(_png16(grey8.astype(np.uint32) * 257))
    assert (ref.meta.effective_bits, twelve.meta.effective_bits, sixteen.meta.effective_bits) == (8, 12, 16)
    assert "scaled_as_12_bit" in twelve.meta.notes
    for img in (twelve, sixteen):
        np.testing.assert_allclose(img.pixels, ref.pixels, atol=0.5 / 255)
        assert not img.meta.low_dynamic_range
    assert twelve.pixels.max() > 0.9  # not the 0.06 of a division by 65535


def test_effective_bits_follow_the_png_sbit_chunk_and_the_maximum():
    from cxrbench.io import effective_bit_depth

    ramp = np.round(np.linspace(0, 1000, 64 * 64)).reshape(64, 64)
    assert read_image(_png16(ramp)).meta.effective_bits == 10
    assert read_image(_png16(ramp * 16)).meta.effective_bits == 14
    assert effective_bit_depth(np.array([255])) == 8 and effective_bit_depth(np.array([256])) == 10
    assert effective_bit_depth(np.array([40000])) == 16
    # sBIT says the file holds 16 significant bits: the values are dark, not 10-bit; flagged, not rescaled
    dark = read_image(_png16(ramp, sbit=16))
    assert dark.meta.effective_bits == 16 and dark.pixels.max() < 0.02 and dark.meta.low_dynamic_range
    np.testing.assert_allclose(read_image(_png16(ramp * 4, sbit=12)).pixels, ramp * 4 / 4095, atol=1e-6)


def test_flat_and_near_black_images_are_flagged_low_dynamic_range(nih_dir):
    flat = np.full((64, 64), 128, np.uint8)
    assert read_image(_png_bytes(flat)).meta.low_dynamic_range
    assert not read_image(sorted(nih_dir.glob("*.png"))[0]).meta.low_dynamic_range
    dicom = read_image(make_dicom(np.full((16, 16), 300, np.uint16)))
    assert dicom.meta.low_dynamic_range and dicom.meta.effective_bits == 12


def test_special_files_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    _expect_error(fifo, "not a regular file")  # opening a FIFO for reading would block forever


def _dicom_reference(data: bytes) -> np.ndarray:
    """The float64 path read_image used before (pydicom's modality LUT + VOI LUT/window, min-max)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        if np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    out = (values - values.min()) / (values.max() - values.min())
    return 1.0 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


@pytest.mark.parametrize("kind", ["plain", "rescale", "window", "window_exact", "sigmoid", "voi_lut", "mono1"])
def test_dicom_float32_path_gives_pydicoms_float64_pixels(kind):
    import pydicom

    raw = np.random.default_rng(1).integers(0, 4096, size=(96, 80)).astype(np.uint16)
    kw: dict = {"rescale": {"slope": 0.5, "intercept": -1024}, "window": {"window": (2000, 1500)},
                "window_exact": {"window": (2000, 1500)}, "sigmoid": {"window": (1800, 900)},
                "voi_lut": {"voi_lut": np.linspace(0, 65535, 4096) ** 1.0},
                "mono1": {"photometric": "MONOCHROME1", "window": (2100, 3000)}}.get(kind, {})
    data = make_dicom(raw, **kw)
    if kind in ("window_exact", "sigmoid"):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.VOILUTFunction = "LINEAR_EXACT" if kind == "window_exact" else "SIGMOID"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
    img = read_image(data)
    assert img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels, _dicom_reference(data), atol=1e-6)

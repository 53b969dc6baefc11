"""What the per-input commands write and refuse, driven through the real CLI: one output name per input (colliding
and over-long names), no output that overwrites an input, one-line errors for bad arguments and cards, special
files (FIFOs, folders named x.png) and broken compressed DICOMs as rows while the batch goes on."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrbench.cli.main import main
from cxrbench.cli.outputs import MAX_STEM_BYTES, output_stems

NAME_MAX = 255
LONG = "x" * 250  # a 250-character stem: with any suffix over the file system's 255-byte limit


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained bundles of each kind (32 px classifier and U-Net, 64 px autoencoder gate)."""
    from cxrbench.labels import NIH_FINDINGS
    from cxrbench.models.autoencoder import ConvAutoencoder
    from cxrbench.models.bundle import ModelCard, save_bundle
    from cxrbench.models.classifier import build_classifier
    from cxrbench.models.unet import UNet
    from cxrbench.preprocess import Preprocess

    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    clf = build_classifier("resnet18", len(NIH_FINDINGS), 1, pretrained=False)
    save_bundle(root / "clf", clf, ModelCard(
        kind="classifier", builder="classifier", labels=list(NIH_FINDINGS), preprocess=Preprocess(size=32).to_dict(),
        builder_kwargs={"arch": "resnet18", "num_outputs": len(NIH_FINDINGS), "in_channels": 1}))
    save_bundle(root / "seg", UNet(1, 4, 2), ModelCard(
        kind="segmentation", builder="unet", builder_kwargs={"in_channels": 1, "base_channels": 4, "depth": 2},
        labels=["lung"], preprocess=Preprocess(size=32, normalize="zero_one").to_dict()))
    save_bundle(root / "ood", ConvAutoencoder(latent_dim=8, base_channels=4).eval(), ModelCard(
        kind="ood", builder="autoencoder", builder_kwargs={"latent_dim": 8, "base_channels": 4},
        preprocess=Preprocess(size=64, normalize="zero_one").to_dict(),
        ood={"cutoff": {"scorer": "ssim", "threshold": 10.0, "method": "test"}}))
    return {k: root / k for k in ("clf", "seg", "ood")}


def _png(path: Path, side: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side), dtype=np.uint8)).save(path)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``cxrbench argv`` in this process: (exit code, stdout, stderr); argparse's exit is an exit code too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


def _command(kind: str, bundles: dict[str, Path]) -> list[str]:
    return {"segment": ["segment", "--bundle", bundles["seg"]], "explain": ["explain", "--bundle", bundles["clf"]],
            "analyze": ["analyze", "--classifier", bundles["clf"]], "predict": ["predict", "--bundle", bundles["clf"]],
            "ood-score": ["ood-score", "--bundle", bundles["ood"]]}[kind]


# --------------------------------------------------------------------------------------------------
# output names


def test_output_stems_are_unique_deterministic_and_short(tmp_path):
    files = ["in/a.png", "in/a.dcm", "in/a_1.png", "other/a.png", "in/B.png", "in/b.jpg", "in/c.png",
             f"in/{LONG}.png", f"in/{'é' * 200}.png", "in/c.png"]
    stems = output_stems(files)
    assert len({s.casefold() for s in stems}) == len(files)  # the same file twice gets two names too
    assert stems == output_stems(files)  # the same on every run
    assert stems[2] == "a_1" and stems[0].startswith("a-") and stems[3].startswith("a-")
    assert all(len(s.encode()) <= MAX_STEM_BYTES for s in stems)
    assert all(len(f"{s}_gradcam_Pleural_Thickening.png".encode()) <= NAME_MAX for s in stems)
    assert stems[7].startswith("x" * 100) and stems[8].startswith("é" * 50)  # cut at a character, never inside
    assert output_stems(["only/a.png"]) == ["a"]


def _colliding_inputs(tmp_path: Path) -> list[Path]:
    """a.png, a.jpg, a_1.png and another folder's a.png, each of its own size (so a mask shows whose it is)."""
    return [_png(tmp_path / "in" / "a.png", 40), _png(tmp_path / "in" / "a_1.png", 44),
            _png(tmp_path / "in" / "sub" / "a.png", 48), _png(tmp_path / "in" / "a.jpg", 52)]


def test_segment_writes_one_mask_per_input_and_each_row_names_its_own(bundles, tmp_path, capsys):
    files = _colliding_inputs(tmp_path)
    code, out, _ = _run([*_command("segment", bundles), *files, "--out", tmp_path / "o", "-q"], capsys)
    assert code == 0 and "wrote 4 masks" in out
    table = pd.read_csv(tmp_path / "o" / "segment_summary.csv", keep_default_na=False)
    assert table["mask"].nunique() == 4 and len(list((tmp_path / "o").glob("*_lung.png"))) == 4
    for f, mask in zip(table["file"], table["mask"]):
        side = Image.open(f).size[0]
        assert Image.open(mask).size == (side, side), (f, mask)  # the row's mask is made from the row's image


def test_segment_runs_the_unet_on_onnx_runtime_by_default_with_torchs_masks(bundles, nih_dir, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("CXRBENCH_CACHE", str(tmp_path / "cache"))
    files = sorted(str(p) for p in nih_dir.glob("*.png"))[:3]
    masks = {}
    for backend in ("auto", "torch", "onnx"):
        code, out, err = _run(["segment", "--bundle", bundles["seg"], *files, "--out", tmp_path / backend, "-q",
                               *(["--backend", backend] if backend != "auto" else [])], capsys)
        names = {"auto": "ONNX Runtime", "torch": "PyTorch", "onnx": "ONNX Runtime"}
        assert code == 0 and out.rstrip().endswith(f"(0 unreadable) ({names[backend]})") and "warning" not in err
        table = pd.read_csv(tmp_path / backend / "segment_summary.csv", keep_default_na=False)
        masks[backend] = [np.asarray(Image.open(m)) for m in table["mask"]]
    # the same masks (0 pixels differed when written); a pixel whose logit is within ORT's rounding (~1e-6) of 0
    # could flip, so at most 0.1 % of them may
    for backend in ("auto", "onnx"):
        for got, ref in zip(masks[backend], masks["torch"]):
            assert got.shape == ref.shape and np.mean(got != ref) <= 1e-3


def test_explain_and_analyze_write_one_set_of_files_per_input(bundles, tmp_path, capsys):
    files = _colliding_inputs(tmp_path)
    code, _, _ = _run([*_command("explain", bundles), *files, "--out", tmp_path / "e", "-q"], capsys)
    assert code == 0
    table = pd.read_csv(tmp_path / "e" / "explain_summary.csv", keep_default_na=False)
    assert table["maps"].nunique() == 4 and len(list((tmp_path / "e").glob("*.npy"))) == 4
    assert all((tmp_path / "e" / o).is_file() for o in table["overlays"])
    # the inputs are 40-52 px: below the blank-image guard's 64 px, so it is lowered for this naming test
    code, _, _ = _run([*_command("analyze", bundles), *files, "--min-side", "16", "--out", tmp_path / "a", "-q"],
                      capsys)
    assert code == 0
    table = pd.read_csv(tmp_path / "a" / "analysis.csv", keep_default_na=False)
    assert list(table["file"]) == [str(f) for f in files] and table["overlay"].nunique() == 4
    assert all((tmp_path / "a" / o).is_file() for o in table["overlay"])
    assert len(list((tmp_path / "a" / "overlays").glob("*.png"))) == 4


@pytest.mark.parametrize("kind", ["segment", "explain", "analyze"])
def test_a_250_character_name_is_written_under_the_name_limit_and_the_batch_goes_on(kind, bundles, tmp_path,
                                                                                      capsys):
    # 64 px: big enough for the blank-image guard, whose "too small" warning would be on stderr otherwise
    files = [_png(tmp_path / "in" / f"{LONG}.png", 64), _png(tmp_path / "in" / "b.png", 64, seed=1)]
    code, _, err = _run([*_command(kind, bundles), *files, "--out", tmp_path / "o", "-q"], capsys)
    assert code == 0 and err == ""
    written = [p for p in (tmp_path / "o").rglob("*") if p.is_file() and not p.name.endswith("_summary.csv")
               and p.name != "analysis.csv"]
    assert all(len(p.name.encode()) <= NAME_MAX for p in written)
    assert any(p.name.startswith("x" * 100) for p in written) and any(p.name.startswith("b") for p in written)


# --------------------------------------------------------------------------------------------------
# outputs that are inputs


@pytest.mark.parametrize("kind", ["predict", "ood-score"])
def test_an_out_csv_that_is_an_input_is_refused_before_anything_is_read(kind, bundles, tmp_path, capsys):
    image = _png(tmp_path / "x.png", 40)
    before = image.read_bytes()
    code, _, err = _run([*_command(kind, bundles), image, "--out", image], capsys)
    assert code == 2 and image.read_bytes() == before
    assert err.strip().splitlines() == [f"cxrbench {kind}: error: {image} would overwrite the input {image}; "
                                        "choose another --out"]


@pytest.mark.parametrize(("kind", "name"), [("predict", "predictions.csv"), ("ood-score", "ood_scores.csv")])
def test_an_out_folder_gets_the_csv_inside_it(kind, name, bundles, tmp_path, capsys):
    image = _png(tmp_path / "x.png", 40)
    (tmp_path / "res").mkdir()
    quiet = ["-q"] if kind == "predict" else []
    code, out, _ = _run([*_command(kind, bundles), image, "--out", tmp_path / "res", *quiet], capsys)
    assert code == 0 and f"wrote {tmp_path / 'res' / name}" in out
    assert pd.read_csv(tmp_path / "res" / name)["file"].tolist() == [str(image)]


@pytest.mark.parametrize(("kind", "victim"), [("segment", "a_lung.png"), ("explain", "a_saliency_all_findings.png"),
                                              ("analyze", "overlays/b.png")])
def test_an_out_folder_that_would_overwrite_an_input_is_refused(kind, victim, bundles, tmp_path, capsys):
    out = tmp_path / "o"
    inputs = [_png(tmp_path / "a.png", 40), _png(out / victim, 40, seed=3)]  # a re-run over the last run's outputs
    before = inputs[1].read_bytes()
    code, _, err = _run([*_command(kind, bundles), *inputs, "--out", out, "-q"], capsys)
    assert code == 2 and inputs[1].read_bytes() == before
    assert err.startswith(f"cxrbench {kind}: error: ") and str(inputs[1]) in err and len(err.splitlines()) == 1
    assert not (out / ("segment_summary.csv" if kind == "segment" else "explain_summary.csv")).exists()


# --------------------------------------------------------------------------------------------------
# bad arguments and cards


@pytest.mark.parametrize(("kind", "extra", "message"), [
    ("predict", ["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got 0"),
    ("predict", ["--batch-size", "-5"], "argument --batch-size: must be a whole number >= 1, got -5"),
    ("ood-score", ["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got 0"),
    ("explain", ["--top", "-2"], "argument --top: must be a whole number >= 1, got -2"),
    ("explain", ["--top", "two"], "argument --top: expected a whole number >= 1, got 'two'"),
    ("segment", ["--threshold", "2"], "argument --threshold: must be strictly between 0 and 1 (a probability), got 2"),
    ("segment", ["--threshold", "0"], "argument --threshold: must be strictly between 0 and 1 (a probability), got 0"),
    ("analyze", ["--explain", "bogus"], "argument --explain: invalid choice: 'bogus'"),
])
def test_bad_arguments_are_usage_errors_before_any_file_is_read(kind, extra, message, bundles, tmp_path, capsys):
    image = _png(tmp_path / "x.png", 40)
    code, _, err = _run([*_command(kind, bundles), image, *extra, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"cxrbench {kind}: error: {message}" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["classifier", "unet", "ood"])
def test_an_unknown_device_is_a_usage_error(model, tmp_path, capsys):
    code, _, err = _run(["train", model, "--data", tmp_path, "--out", tmp_path / "run", "--device", "foo"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"cxrbench train {model}: error: argument --device: unknown device 'foo'; expected auto, cpu, cuda, "
        "cuda:N or mps")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(format="1"), "card format must be an integer version, got '1'"),
    (lambda c: c["builder_kwargs"].update(bogus=3), "unexpected builder_kwargs ['bogus'] for 'classifier'"),
    (lambda c: c.update(operating_points=[0.5] * 14), "operating_points must be a JSON object, got list"),
])
@pytest.mark.parametrize("command", ["info", "predict"])
def test_a_broken_card_is_one_line_naming_the_card(edit, message, command, bundles, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["clf"], bundle)
    card = json.loads((bundle / "card.json").read_text())
    edit(card)
    (bundle / "card.json").write_text(json.dumps(card))
    argv = ["info", bundle] if command == "info" else [
        "predict", "--bundle", bundle, _png(tmp_path / "x.png", 40), "--out", tmp_path / "p.csv", "-q"]
    code, _, err = _run(argv, capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"cxrbench: error: {bundle / 'card.json'}: ") and message in err


def test_the_console_prints_one_line_and_no_traceback(bundles, tmp_path):
    image = _png(tmp_path / "x.png", 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for extra, code in ((["--out", image], 2), (["--out", tmp_path / "p.csv", "--batch-size", "0"], 2)):
        res = subprocess.run([sys.executable, "-m", "cxrbench.cli", "predict", "--bundle", str(bundles["clf"]),
                              str(image), *map(str, extra)], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == code and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("cxrbench predict: error: ")


# --------------------------------------------------------------------------------------------------
# special files and broken compressed DICOM


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging: a blocked open() of a FIFO is interrupted by the alarm."""
    def _fire(*_):
        raise TimeoutError(f"the command did not finish in {seconds} s (blocked on a special file?)")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("kind", ["predict", "ood-score", "analyze", "explain", "segment"])
def test_fifos_and_folders_named_png_are_rows_and_the_batch_goes_on(kind, bundles, tmp_path, capsys):
    folder = tmp_path / "in"
    _png(folder / "good.png", 64)  # passes the blank-image guard (64 px and more)
    os.mkfifo(folder / "fifo.png")
    (folder / "dir.png").mkdir()
    (tmp_path / "alone.png").mkdir()  # a folder named like an image, given directly
    out = tmp_path / ("o.csv" if kind in ("predict", "ood-score") else "o")
    with _deadline(120):
        code, _, err = _run([*_command(kind, bundles), folder, tmp_path / "alone.png", "--out", out]
                            + ([] if kind == "ood-score" else ["-q"]), capsys)
    assert code == 0
    table = pd.read_csv(out if out.suffix == ".csv" else next(out.glob("*.csv")), keep_default_na=False)
    errors = dict(zip(table["file"].map(lambda f: Path(f).name), table["error"]))
    assert set(errors) == {"good.png", "fifo.png", "dir.png", "alone.png"} and errors["good.png"] == ""
    assert "not a regular file" in errors["fifo.png"]
    assert "is a directory" in errors["dir.png"] and "is a directory" in errors["alone.png"]
    assert f"{folder / 'fifo.png'}: " in err and "not a regular file" in err


def _compressed_dicom(syntax: str, payload: bytes) -> bytes:
    import pydicom
    from dicom_factory import make_dicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    grey = np.zeros((32, 32), np.uint8)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(grey.astype(np.uint16), bits_stored=8)))
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([payload])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_truncated_jpeg_and_jpeg2000_dicoms_report_the_decode_error(bundles, tmp_path, capsys):
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    jpeg = io.BytesIO()
    Image.fromarray((np.indices((32, 32)).sum(axis=0) * 4).astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    files = {"ok.dcm": _compressed_dicom(JPEGBaseline8Bit, jpeg.getvalue()),
             "cut.dcm": _compressed_dicom(JPEGBaseline8Bit, jpeg.getvalue()[: len(jpeg.getvalue()) // 3]),
             "j2k.dcm": _compressed_dicom(JPEG2000Lossless, b"\xff\x4f\xff\x51" + b"\0" * 60)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code, _, err = _run(["predict", "--bundle", bundles["clf"], *(tmp_path / n for n in files),
                         "--out", tmp_path / "p.csv", "-q"], capsys)
    assert code == 0
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    errors = dict(zip(table["file"].map(lambda f: Path(f).name), table["error"]))
    assert errors["ok.dcm"] == ""
    for name in ("cut.dcm", "j2k.dcm"):
        assert errors[name].startswith("corrupt or truncated DICOM pixel data ("), errors[name]
        assert "no decoder" not in errors[name] and "pylibjpeg" not in errors[name]
    assert "pylibjpeg" not in err


def test_a_device_this_machine_lacks_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    from cxrbench.data.synthetic import write_phantom_set
    from cxrbench.train.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda:1: this machine has no CUDA device; use --device cpu or auto"):
        pick_device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu") and pick_device("auto") == torch.device("cpu")
    data = write_phantom_set(tmp_path / "ph", 8, size=32, seed=0)
    code, _, err = _run(["train", "classifier", "--data", data, "--out", tmp_path / "run", "--device", "cuda",
                         "--size", "32", "--epochs", "1", "-q"], capsys)
    assert code == 1
    assert err == "cxrbench: error: --device cuda: this machine has no CUDA device; use --device cpu or auto\n"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

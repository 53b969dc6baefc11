"""``--backend auto`` vs ``--backend torch``: ``cxrbench predict`` wall time and the first-use export; the gate alone.

    python benchmarks/bench_backend_auto.py [--out build/benchmarks] [--repeat 3]

Writes backend_auto_predict and backend_auto_gate (.csv + .md), each headed by the CPU and date.

- predict: ``cxrbench predict`` in a fresh process (import, load, export or cache check, read, forward, CSV) on the
  NIH validation split of ../shared/data (patient split 70/10/20, seed 0: about 48 images) with a DenseNet-121 at
  224 px (seeded random weights: timings do not depend on them). ``auto (first use)`` includes the ONNX export and
  its parity check into an empty cache; ``auto (cached)`` reuses it. Medians of ``--repeat`` runs. The in-process
  rows time ``Pipeline.predict`` alone (batch 16) on the same pipeline objects.
- gate: :meth:`Pipeline.gate` (the 64 px autoencoder of the demo: latent 128, width 16; guard, resize, score) on 30
  distinct NIH images after 3 warm-up ones, PyTorch vs ONNX Runtime, at 1 and 2 threads; median per image.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, write_table  # noqa: E402

from cxrbench.data import load_manifest, shared_data_root  # noqa: E402
from cxrbench.data.splits import patient_split  # noqa: E402
from cxrbench.io import read_image  # noqa: E402
from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle  # noqa: E402
from cxrbench.ood.untrained import untrained_ood_bundle  # noqa: E402


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _predict_seconds(bundle: Path, files: list[str], backend: str, cache: Path, out: Path) -> float:
    env = {**os.environ, "CXRBENCH_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cxrbench.cli", "predict", "--bundle", str(bundle), *files, "--backend",
                    backend, "--out", str(out), "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def inprocess_rows(bundle: Path, files: list[str], repeat: int, cache: Path) -> list[dict]:
    """``Pipeline.predict`` of ``files`` in this process (no start-up, import or load), torch vs auto, interleaved."""
    from cxrbench.export.runtime import load_pipeline

    os.environ["CXRBENCH_CACHE"] = str(cache)
    pipes = {"torch": load_pipeline(bundle, backend="torch"), "auto": load_pipeline(bundle, backend="auto",
                                                                                    explain=None)}
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for _ in range(repeat):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.predict(files, batch_size=16)
            times[name].append(time.perf_counter() - t0)
    return [{"run": f"in-process Pipeline.predict, {name} ({pipes[name].classifier_backend.name})",
             "median_s": statistics.median(values), "rounds": repeat} for name, values in times.items()]


def predict_rows(root: Path, files: list[str], repeat: int) -> list[dict]:
    bundle = untrained_classifier_bundle(root / "densenet121", arch="densenet121", description="benchmark")
    cache = root / "cache"
    rows = []
    firsts = []
    for _ in range(max(1, repeat // 2)):  # every first use exports DenseNet-121 again: fewer rounds
        shutil.rmtree(cache, ignore_errors=True)
        firsts.append(_predict_seconds(bundle, files, "auto", cache, root / "first.csv"))
    rows.append({"run": "auto (first use: export + parity check)", "median_s": statistics.median(firsts),
                 "rounds": len(firsts)})
    times: dict[str, list[float]] = {"torch": [], "auto": []}
    for _ in range(repeat):  # interleaved
        for backend in times:
            times[backend].append(_predict_seconds(bundle, files, backend, cache, root / f"{backend}.csv"))
    for backend, label in (("torch", "--backend torch"), ("auto", "auto (cached export, ONNX Runtime)")):
        rows.append({"run": label, "median_s": statistics.median(times[backend]), "rounds": repeat})
    rows += inprocess_rows(bundle, files, repeat, cache)
    for row in rows:
        row.update(images=len(files), per_image_ms=1e3 * row["median_s"] / len(files), load_avg=_load())
    return rows


def gate_rows(root: Path, image_paths: list[str]) -> list[dict]:
    import torch

    from cxrbench.export.runtime import load_gate
    from cxrbench.inference.pipeline import Pipeline

    classifier = load_bundle(untrained_classifier_bundle(root / "clf", description="benchmark"), kind="classifier")
    untrained_ood_bundle(root / "ood", latent_dim=128, base_channels=16)
    os.environ["CXRBENCH_CACHE"] = str(root / "cache")
    images = [read_image(p).pixels for p in image_paths]  # distinct images: the ORT adapter caches its last input
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for backend in ("torch", "onnx"):
            pipe = Pipeline(classifier, load_gate(root / "ood", backend=backend, threads=threads))
            for pixels in images[:3]:
                pipe.gate(pixels)
            times = []
            for pixels in images[3:]:
                t0 = time.perf_counter()
                pipe.gate(pixels)
                times.append(time.perf_counter() - t0)
            rows.append({"backend": backend, "threads": threads, "gate_ms": 1e3 * statistics.median(times),
                         "load_avg": _load()})
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data = shared_data_root()
    if data is None:
        raise SystemExit("needs ../shared/data (or $CXRBENCH_SHARED_DATA) for the NIH images")
    manifest = load_manifest(data / "cxr" / "nih", on_missing="drop")
    val = manifest[(patient_split(manifest, seed=0) == "val").to_numpy()]
    files = [str(p) for p in val["path"]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gate = write_table(gate_rows(root, files[:33]), args.out, "backend_auto_gate")
        print(gate.to_string(index=False))
        predict = write_table(predict_rows(root, files, args.repeat), args.out, "backend_auto_predict")
        print(predict.to_string(index=False))


if __name__ == "__main__":
    main()

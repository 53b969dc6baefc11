"""ONNX export: parity, ONNX Runtime vs PyTorch latency, the browser app's load/inference times, Chester Fig. 9.

    python benchmarks/bench_onnx.py [--out build/benchmarks] [--repeat 3] [--images 20] [--skip-browser]

Writes onnx_parity, onnx_latency, onnx_browser and onnx_fig9 (.csv + .md) and onnx_web_study.json (the raw
browser and Python outputs of the preprocessing study, read by notebooks/07_export_and_parity.ipynb).
Parity and timings use DenseNet-121 and ResNet18 at 224 px with seeded random weights (timings do not depend
on the weights; operating points at each finding's median raw probability over the study images, so
calibrated values spread around 0.5). The study uses the random DenseNet-121 or, better, a trained bundle
given with ``--bundle`` (a random network is far less sensitive to resampling than a trained one).
Needs ../shared/data (real NIH images) and, for the browser parts, Chromium and npm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_table  # noqa: E402

from cxrbench.data import load_manifest, shared_data_root  # noqa: E402
from cxrbench.io import read_image  # noqa: E402
from cxrbench.labels import NIH_FINDINGS  # noqa: E402
from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle  # noqa: E402
from cxrbench.ood.untrained import untrained_ood_bundle  # noqa: E402

CHESTER = {"load_s": "12 ± 2", "forward_s": "1.3 ± 0.5"}


def _bundles(root: Path, arch: str, pixels: list[np.ndarray]) -> tuple[Path, Path]:
    clf = untrained_classifier_bundle(root / arch, arch=arch, images=pixels, description="benchmark")
    ood = root / "ood"
    if not ood.exists():
        untrained_ood_bundle(ood, description="benchmark: never rejects")
    return clf, ood


def _browser(arch: str, app_dir: Path, files: list[str], n_timed: int, isolate: bool) -> dict:
    from cxrbench.export.web import serve
    from cxrbench.export.web.browser import BrowserApp
    from cxrbench.export.web.study import staged_images

    with serve(app_dir, isolate=isolate) as server, staged_images(app_dir, files[: n_timed + 1]) as urls, \
            BrowserApp(server.url) as app:
        first = app.analyze(urls[:1], allowOod=True)[0]
        rest = app.analyze(urls[1:], allowOod=True)
        assert app.outside == [], app.outside
    return {"model": arch, "threads": app.ready["threads"], "page_to_ready_s": app.page_load_s,
            "model_load_s": app.ready["load_s"], "first_image_s": first["timings"]["total"],
            "forward_s": statistics.median(r["timings"]["classify"] for r in rest),
            "per_image_total_s": statistics.median(r["timings"]["total"] for r in rest), "n_images": len(rest),
            "chester_load_s": CHESTER["load_s"], "chester_forward_s": CHESTER["forward_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", type=int, default=20, help="images for the preprocessing study")
    p.add_argument("--browser-images", type=int, default=6, help="images for the browser timings")
    p.add_argument("--bundle", default=None, help="classifier bundle for the study (default: DenseNet-121, random)")
    p.add_argument("--skip-browser", action="store_true")
    args = p.parse_args()
    root = shared_data_root()
    if root is None:
        sys.exit("needs the real NIH images (../shared/data or CXRBENCH_SHARED_DATA)")
    from cxrbench.export.onnx import export_models
    from cxrbench.export.runtime import latency_table
    from cxrbench.export.web import export_web

    paths = load_manifest(root / "cxr" / "nih", on_missing="drop")["path"].tolist()
    files = [str(f) for f in paths[:: max(1, len(paths) // args.images)][: args.images]]
    pixels = [read_image(f).pixels for f in files]
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    parity_rows, latency_rows, browser_rows, apps = [], [], [], {}
    for arch in ("densenet121", "resnet18"):
        bundle, ood = _bundles(tmp, arch, pixels)
        t0 = time.perf_counter()
        result = export_models(load_bundle(bundle), tmp / f"{arch}_onnx", load_bundle(ood), images=files[:8])
        export_s = time.perf_counter() - t0
        for r in result.parity.itertuples():
            if r.output in ("logits", "calibrated", "cam", "ssim"):
                parity_rows.append({"model": arch, "graph": r.graph, "output": r.output, "n_images": r.n_images,
                                    "max_abs_diff": r.max_abs_diff, "mean_abs_diff": r.mean_abs_diff,
                                    "tolerance": r.tolerance, "passed": r.passed, "export_s": export_s})
        latency = latency_table(load_bundle(bundle), tmp / f"{arch}_onnx", batches=(1, 16), repeat=args.repeat)
        latency_rows += [{"model": arch, **row} for row in latency.to_dict(orient="records")]
        if not args.skip_browser:
            apps[arch] = export_web(tmp / f"{arch}_onnx", tmp / f"{arch}_web")
            for isolate in (False, True):
                browser_rows.append(_browser(arch, apps[arch], files, args.browser_images, isolate))
    write_table(parity_rows, args.out, "onnx_parity")
    write_table(latency_rows, args.out, "onnx_latency")
    if args.skip_browser:
        return
    write_table(browser_rows, args.out, "onnx_browser")

    from cxrbench.export.web.study import (
        RESIZE_MODES,
        browser_arrays,
        input_study,
        preprocessing_study,
        python_reference,
        run_browser_study,
    )
    from cxrbench.inference.pipeline import Pipeline

    study_bundle = Path(args.bundle) if args.bundle else tmp / "densenet121"
    study_app = apps["densenet121"]
    if args.bundle:
        study_app = export_web(study_bundle, tmp / "study_web", tmp / "ood", images=files[:8])
        parity = json.loads((study_app / "models" / "export.json").read_text())["parity"]["rows"]
        write_table([{"model": str(study_bundle), **r} for r in parity if r["output"] in ("logits", "calibrated", "cam")],
                    args.out, "onnx_parity_study_bundle")
    pipe = Pipeline.from_paths(study_bundle, ood=tmp / "ood")
    python = python_reference(pipe, files)
    browser = run_browser_study(study_app, files, RESIZE_MODES, inputs=True)
    arrays = {mode: browser_arrays(res) for mode, res in browser["results"].items()}
    table = preprocessing_study(python, arrays, NIH_FINDINGS)
    write_table(table.to_dict(orient="records"), args.out, "onnx_fig9")
    pp = pipe.classifier.preprocess
    inputs = input_study([pp(read_image(f).pixels) for f in files], browser["inputs"], float(pp.stats()[1][0]))
    write_table(inputs.to_dict(orient="records"), args.out, "onnx_fig9_inputs")
    def clean(a: np.ndarray) -> list:
        return np.where(np.isnan(a), None, a).tolist()

    blob = {"findings": list(NIH_FINDINGS), "files": [Path(f).name for f in files], "model": str(study_bundle),
            "inputs": inputs.to_dict(orient="records"),
            "python": {k: clean(v) for k, v in python.items()},
            "browser": {m: {k: clean(v) for k, v in a.items()} for m, a in arrays.items()}}
    Path(args.out, "onnx_web_study.json").write_text(json.dumps(blob) + "\n")


if __name__ == "__main__":
    main()

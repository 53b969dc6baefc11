"""How fast the dashboard answers: upload -> result shown, and a change of the explained finding -> new map shown.

Three faces of the same work, on the shared bundles the dashboard notebook shows by default (``cxrbench bundles
prepare``: ResNet18 at 128 px, the 64 px autoencoder gate) and real NIH PNGs:

- ``browser``: the real Voila app in Chromium (Playwright, as tests/test_dashboard_browser.py drives it), from
  the click on the upload button until the bars (plotly) and the overlay of that file are on the page; and from
  choosing another finding (Grad-CAM) until its overlay and caption are there.
- ``in-process``: the same two through the :class:`~cxrbench.app.dashboard.Dashboard`'s callbacks without a
  browser (``upload.value`` set as ipywidgets sets it; ``finding.value``), so the browser/Voila share shows.
- ``dicom``: a 3000 px, 12-bit DICOM report end to end in process (read -> gate -> classify -> saliency), with the
  dashboard's models and with DenseNet-121 at 224 px (random weights: timing does not depend on them).

Each thread setting (``--threads 1 2 auto``; ``auto`` is cxrbench/_threads.py's rule; ``loadavg``, in process
only, the rule before it: the cores minus the 1-minute load average, this process's own work included) is a
contender; rounds are interleaved (one of each per round) and the table gives medians over ``--rounds`` rounds;
the in-process rows' ``torch_threads`` is the count each upload got (``2x5 1x4``: 2 threads in 5 rounds, 1 in 4).
``--steady S`` uploads back to back for S seconds before the timed in-process rounds (a dashboard in steady
use, whose own work is then in the load average). ``--load N`` runs N busy-loop processes for the whole run (the
header's load average then shows them). The table's header line has the CPU, the load average before and after,
and the torch version.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # dicom_factory: DICOMs as pydicom writes
import numpy as np  # noqa: E402
from _common import machine, markdown  # noqa: E402

from cxrbench._threads import THREADS_ENV, interactive_threads  # noqa: E402
from cxrbench.data import load_manifest, shared_data_root  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
#: the per-finding method whose finding change is timed (the default, saliency, sums all findings)
FINDING_METHOD = "gradcam"
TARGETS_S = {"upload": 0.5, "finding": 0.3, "dicom": 0.5}
#: the contender that follows the rule before the other-process demand: cores minus the 1-minute load average
LOADAVG = "loadavg"


def _thread_env(setting: str) -> dict[str, str]:
    """The environment of one contender: CXRBENCH_THREADS fixed (for ``loadavg``: to that rule's count now), or
    unset for the ``auto`` rule."""
    if setting == LOADAVG:
        return {THREADS_ENV: str(interactive_threads(load=os.getloadavg()[0], environ={}))}
    return {THREADS_ENV: setting} if setting != "auto" else {}


@contextlib.contextmanager
def _threads(setting: str) -> Iterator[None]:
    old = os.environ.pop(THREADS_ENV, None)
    os.environ.update(_thread_env(setting))
    try:
        yield
    finally:
        os.environ.pop(THREADS_ENV, None)
        if old is not None:
            os.environ[THREADS_ENV] = old


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` processes that spin on a core each until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def _images(n: int) -> list[Path]:
    root = shared_data_root()
    if root is None:
        sys.exit("bench_dashboard needs the real dev images (../shared/data)")
    return [Path(p) for p in load_manifest(root / "cxr" / "nih")["path"].tolist()[:n]]


def _other_finding(options: tuple[str, ...], current: str, k: int) -> str:
    rest = [f for f in options if f != current]
    return rest[k % len(rest)]


# ------------------------------------------------------------------------------------------ in process

class InProcess:
    """A Dashboard over the shared bundles, loaded and warmed up as the notebook does."""

    def __init__(self, info: dict[str, Any]):
        import torch

        from cxrbench.app.dashboard import Dashboard
        from cxrbench.inference.pipeline import Pipeline

        self.torch = torch
        pipeline = Pipeline.from_paths(info["classifier"], ood=info["ood"], unet=info["unet"])
        pipeline.warm_up()
        self.dash = Dashboard(pipeline)
        self.chosen: dict[str, list[int]] = {}  # setting -> torch's thread count after each timed upload

    def upload(self, path: Path, setting: str) -> float:
        content = path.read_bytes()
        item = {"name": path.name, "type": "image/png", "size": len(content), "content": memoryview(content),
                "last_modified": datetime.datetime.now(datetime.timezone.utc)}
        with _threads(setting):
            self.dash.method.value = "saliency"
            t0 = time.perf_counter()
            self.dash.upload.value = (item,)
            seconds = time.perf_counter() - t0
        self.chosen.setdefault(setting, []).append(self.torch.get_num_threads())
        assert self.dash.report is not None and self.dash.report.maps is not None, path
        assert self.dash.bars.outputs and self.dash.overlay.value, f"{path.name}: no bars or overlay"
        return seconds

    def finding(self, k: int, setting: str) -> float:
        d = self.dash
        with _threads(setting):
            d.method.value = FINDING_METHOD
            new = _other_finding(d.finding.options, d.finding.value, k)
            t0 = time.perf_counter()
            d.finding.value = new
            seconds = time.perf_counter() - t0
        assert d.report is not None and d.report.map_labels == [new], (new, d.report and d.report.map_labels)
        return seconds

    def threads_now(self, setting: str) -> int:
        from cxrbench._threads import use_interactive_threads

        with _threads(setting):
            return use_interactive_threads()


def dicom_bytes(path: Path, size: int = 3000) -> bytes:
    """``path`` (an NIH PNG) at ``size`` x ``size`` px as a 12-bit MONOCHROME2 DICOM."""
    from dicom_factory import make_dicom
    from PIL import Image

    grey = Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return make_dicom(np.round(np.asarray(grey, dtype=np.float64) * 4095 / 255).astype(np.uint16))


def dicom_pipelines(info: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from cxrbench.inference.pipeline import Pipeline
    from cxrbench.models.bundle import untrained_classifier_bundle

    dense = untrained_classifier_bundle(tmp / "densenet", arch="densenet121", description="benchmark")
    pipes = {"resnet18 128 px (dashboard)": Pipeline.from_paths(info["classifier"], ood=info["ood"]),
             "densenet121 224 px": Pipeline.from_paths(dense, ood=info["ood"])}
    for p in pipes.values():
        p.warm_up()
    return pipes


def dicom_report(pipe: Any, blob: bytes, setting: str) -> dict[str, float]:
    from cxrbench._threads import use_interactive_threads

    with _threads(setting):
        use_interactive_threads()
        t0 = time.perf_counter()
        r = pipe.analyze(blob, name="chest3000.dcm", explain="saliency", allow_ood=True)
        total = time.perf_counter() - t0
    assert r.maps is not None and r.meta.original_size == (3000, 3000), r.meta
    return {**{k: v for k, v in r.timings.items() if k != "total"}, "total": total}


# ------------------------------------------------------------------------------------------ browser

#: page-side times (performance.now(), ms) of one upload: the file chosen (``start``), the kernel's "analysing"
#: line shown (``busy``) and gone (``done``), the bars drawn (``bars``)
MARKS_JS = """() => {
    const m = window.cxrMarks = {start: performance.now()};
    const busy = document.querySelector('.cxr-busy');
    if (window.cxrObserver) window.cxrObserver.disconnect();
    window.cxrObserver = new MutationObserver(() => {
        const now = performance.now(), text = busy.textContent;
        if (text.includes('analysing') && m.busy === undefined) m.busy = now;
        if (m.busy !== undefined && !text.includes('analysing') && m.done === undefined) m.done = now;
        if (m.done !== undefined && m.bars === undefined && document.querySelector('.cxr-bars .plotly .bars'))
            m.bars = now;
    });
    window.cxrObserver.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


class BrowserPage:
    """One Voila server (its kernel with one thread setting) and a Chromium page on it."""

    def __init__(self, info: dict[str, Any], setting: str, browser: Any):
        from cxrbench.app.demo import free_port, serve

        self.setting = setting
        self.marks: list[dict[str, float]] = []
        self.port = free_port()
        self.proc = serve(info, port=self.port, env=_thread_env(setting))
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.route("**/*", _local_only)
        self.page = self.context.new_page()
        self.page.goto(f"http://127.0.0.1:{self.port}/", timeout=120_000)
        self.page.wait_for_selector(".cxr-upload", timeout=180_000)

    def upload(self, path: Path) -> float:
        pg = self.page
        if pg.locator(".cxr-method select").is_visible():
            pg.locator(".cxr-method select").select_option("saliency")
            pg.wait_for_selector(".cxr-caption >> text=saliency · all findings", timeout=60_000)
        pg.evaluate(MARKS_JS)
        t0 = time.perf_counter()
        with pg.expect_file_chooser() as chooser:
            pg.click(".cxr-upload")
        chooser.value.set_files(str(path))
        pg.wait_for_function(
            """name => {
                const t = document.querySelector('.cxr-timing'), img = document.querySelector('.cxr-overlay');
                return t && t.textContent.includes(name) && document.querySelector('.cxr-bars .plotly .bars')
                    && img && img.src && getComputedStyle(img).visibility === 'visible'
                    && document.querySelector('.cxr-caption').textContent.includes('saliency');
            }""", arg=path.name, timeout=120_000, polling="raf")
        seconds = time.perf_counter() - t0
        self.marks.append(pg.evaluate("() => window.cxrMarks"))
        return seconds

    def finding(self, k: int) -> float:
        pg = self.page
        method = pg.locator(".cxr-method select")
        if method.input_value() != FINDING_METHOD:
            method.select_option(FINDING_METHOD)
            pg.wait_for_selector(f".cxr-caption >> text={FINDING_METHOD}", timeout=60_000)
        select = pg.locator(".cxr-finding select")
        options = tuple(select.evaluate("s => [...s.options].map(o => o.value)"))
        new = _other_finding(options, select.input_value(), k)
        before = pg.locator(".cxr-overlay").get_attribute("src")
        t0 = time.perf_counter()
        select.select_option(new)
        pg.wait_for_function(
            """([label, before]) => {
                const img = document.querySelector('.cxr-overlay'), c = document.querySelector('.cxr-caption');
                return img && img.src && img.src !== before && c.textContent.includes(' · ' + label + ' · ');
            }""", arg=[new, before], timeout=120_000, polling="raf")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.context.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _local_only(route: Any) -> None:
    url = route.request.url
    host = url.split("/")[2].split(":")[0] if "://" in url else ""
    if host in ("127.0.0.1", "localhost") or url.startswith(("data:", "blob:")):
        route.continue_()
    else:
        route.abort()


# ------------------------------------------------------------------------------------------ the run

def interleaved(rounds: int, settings: list[str], measure: Callable[[int, str], float | dict[str, float]]
                ) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {s: [] for s in settings}
    for k in range(rounds):
        for s in settings if k % 2 == 0 else settings[::-1]:  # alternate the order: no setting always goes first
            out[s].append(measure(k, s))
    return out


def _row(face: str, what: str, setting: str, seconds: list[float], threads: int | str, **extra: Any) -> dict:
    median = statistics.median(seconds)
    target = TARGETS_S.get(what.split()[0])
    return {"face": face, "what": what, "threads": setting, "torch_threads": threads, "rounds": len(seconds),
            "median_ms": round(1000 * median, 1), "min_ms": round(1000 * min(seconds), 1),
            "target_ms": round(1000 * target) if target else "", **extra}


def run(args: argparse.Namespace) -> list[dict]:
    from cxrbench.app.dashboard import shared_demo_info

    with contextlib.redirect_stdout(io.StringIO()):  # the shared cache's "using ..." lines
        info = {**shared_demo_info(), "examples": {}}
    images = _images(args.rounds + 1)
    settings = list(args.threads)
    rows, threads = in_process_rows(info, images, settings, args.rounds, args.steady)
    rows += dicom_rows(info, images[0], settings, args.rounds, threads)
    print(markdown(_frame(rows)), flush=True)
    served = [s for s in settings if s != LOADAVG]  # a Voila kernel follows its own rule, not the bench's
    if args.browser and served:
        rows += browser_rows(info, images, served, args.rounds, threads)
    return rows


def in_process_rows(info: dict[str, Any], images: list[Path], settings: list[str], rounds: int,
                    steady: float = 0.0) -> tuple[list[dict], dict[str, int]]:
    app = InProcess(info)
    threads = {s: app.threads_now(s) for s in settings}
    app.upload(images[-1], settings[0])  # the first image's figure and PNG set-up are not timed
    end, k = time.monotonic() + steady, 0
    while time.monotonic() < end:  # a dashboard in steady use: its own work is in the load average
        app.upload(images[k % len(images)], settings[k % len(settings)])
        k += 1
    app.chosen.clear()
    up = interleaved(rounds, settings, lambda k, s: app.upload(images[k], s))
    find = interleaved(rounds, settings, app.finding)
    rows = []
    for s in settings:
        counts = collections.Counter(app.chosen[s])
        rows.append(_row("in-process", "upload -> result", s, up[s], " ".join(f"{n}x{c}" for n, c in counts.items())))
        rows.append(_row("in-process", f"finding change ({FINDING_METHOD})", s, find[s], threads[s]))
    return rows, threads


def dicom_rows(info: dict[str, Any], image: Path, settings: list[str], rounds: int, threads: dict[str, int]
               ) -> list[dict]:
    rows = []
    blob = dicom_bytes(image)
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipe in dicom_pipelines(info, Path(tmp)).items():
            dicom_report(pipe, blob, settings[0])
            got = interleaved(rounds, settings, lambda k, s, p=pipe: dicom_report(p, blob, s))
            for s in settings:
                stages = {k: round(1000 * statistics.median([g[k] for g in got[s]]), 1)
                          for k in got[s][0] if k != "total"}
                rows.append(_row("in-process", f"dicom 3000 px report, {name}", s, [g["total"] for g in got[s]],
                                 threads[s], stages_ms=" ".join(f"{k} {v:g}" for k, v in stages.items())))
    return rows


def browser_rows(info: dict[str, Any], images: list[Path], settings: list[str], rounds: int,
                 threads: dict[str, int]) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pages = {s: BrowserPage(info, s, browser) for s in settings}
        try:
            for p in pages.values():
                p.upload(images[-1])  # the page's first plotly figure is not timed
                p.marks.clear()
            up = interleaved(rounds, settings, lambda k, s: pages[s].upload(images[k]))
            find = interleaved(rounds, settings, lambda k, s: pages[s].finding(k))
        finally:
            for p in pages.values():
                p.close()
            browser.close()
    for s in settings:
        rows.append(_row("browser (Voila + Chromium)", "upload -> result", s, up[s], threads[s],
                         stages_ms=_mark_stages(pages[s].marks)))
        rows.append(_row("browser (Voila + Chromium)", f"finding change ({FINDING_METHOD})", s, find[s], threads[s]))
    return rows


def _mark_stages(marks: list[dict[str, float]]) -> str:
    """Medians of the page-side stages of the uploads: to the kernel, in the kernel, drawing the bars."""
    spans = {"to kernel": ("start", "busy"), "kernel": ("busy", "done"), "bars drawn": ("done", "bars")}
    out = []
    for name, (a, b) in spans.items():
        values = [m[b] - m[a] for m in marks if a in m and b in m]
        if values:
            out.append(f"{name} {statistics.median(values):.0f}")
    return " ".join(out)


def _frame(rows: list[dict]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows).fillna("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", nargs="+", default=["1", "2", "auto"],
                   help=f"contenders: fixed counts (CXRBENCH_THREADS), 'auto' (the interactive rule), "
                        f"'{LOADAVG}' (the rule before: cores minus the load average)")
    p.add_argument("--steady", type=float, default=0.0,
                   help="seconds of untimed back-to-back uploads (contenders in turn) before the in-process rounds")
    p.add_argument("--load", type=int, default=0, help="busy-loop processes running during the whole benchmark")
    p.add_argument("--no-browser", dest="browser", action="store_false", help="only the in-process rows")
    p.add_argument("--name", default="", help="table name (default dashboard[_loadN])")
    args = p.parse_args()
    for s in args.threads:
        if s not in ("auto", LOADAVG) and not s.isdigit():
            p.error(f"--threads {s!r}: expected a whole number, 'auto' or '{LOADAVG}'")
    if args.browser and not os.path.exists(CHROMIUM):
        sys.exit(f"{CHROMIUM} is missing (apt-get install chromium), or run with --no-browser")
    import torch

    os.environ.pop(THREADS_ENV, None)  # the servers inherit this environment: "auto" must not find one
    load_before = os.getloadavg()
    with busy_loops(args.load):
        rows = run(args)
    load_after = os.getloadavg()
    name = args.name or f"dashboard{f'_load{args.load}' if args.load else ''}"
    df = _frame(rows)
    header = (f"<!-- {machine()}, torch {torch.__version__}, {args.load} busy-loop processes, load average "
              f"{load_before[0]:.2f} before / {load_after[0]:.2f} after, {time.strftime('%Y-%m-%d %H:%M')} -->\n")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / f"{name}.csv", index=False)
    (folder / f"{name}.md").write_text(header + markdown(df))
    print(header + markdown(df))
    print(f"wrote {folder / name}.csv and .md")


if __name__ == "__main__":
    main()

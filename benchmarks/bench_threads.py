"""The interactive thread rule in steady use: the other processes' demand (``auto``) against the load average.

A dashboard that serves uploads back to back puts its own work into the 1-minute load average; the rule before
(``loadavg``: the cores minus that average) then dropped to 1 thread on an idle machine. This runs the
:class:`~cxrbench.app.dashboard.Dashboard` on the shared bundles and real NIH PNGs for ``--seconds``, the two
rules as contenders in alternating order (as bench_dashboard.py's), and records per upload the count each rule
chose, its time, the load average, and the cores the other processes kept busy meanwhile (a second
:class:`~cxrbench._threads.OtherDemand`). On a shared machine the other jobs come and go, so the table splits the
uploads by what the others did: pairs of consecutive uploads (one of each rule) while they kept less than
``--quiet`` cores busy (the idle case), and uploads while they kept a core or more busy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, markdown  # noqa: E402
from bench_dashboard import LOADAVG, InProcess, _frame, _images, interleaved  # noqa: E402

from cxrbench._threads import THREADS_ENV, OtherDemand  # noqa: E402

RULES = ["auto", LOADAVG]


def steady(app: InProcess, images: list[Path], seconds: float) -> list[dict]:
    probe = OtherDemand()
    probe()
    rows: list[dict] = []

    def one(k: int, rule: str) -> float:
        ms = 1000 * app.upload(images[len(rows) % len(images)], rule)
        others = probe()  # over this upload (and the moment since the previous one)
        rows.append({"rule": rule, "threads": app.chosen[rule][-1], "ms": ms, "load": os.getloadavg()[0],
                     "others": others})
        return ms

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        interleaved(2, RULES, one)
    return rows


def _summary(what: str, rule: str, rows: list[dict]) -> dict:
    if not rows:
        return {"uploads": what, "rule": rule, "n": 0}
    return {"uploads": what, "rule": rule, "n": len(rows),
            "threads": " ".join(f"{n}x{c}" for n, c in sorted(Counter(r["threads"] for r in rows).items())),
            "median_ms": round(statistics.median(r["ms"] for r in rows), 1),
            "load_average": f"{min(r['load'] for r in rows):.2f}-{max(r['load'] for r in rows):.2f}"}


def table(rows: list[dict], quiet: float) -> list[dict]:
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2]) if max(a["others"], b["others"]) < quiet]
    busy = [r for r in rows if r["others"] >= 1.0]
    out = []
    for rule in RULES:
        paired = [r for pair in pairs for r in pair if r["rule"] == rule]
        out.append(_summary(f"pairs, others < {quiet:g} cores", rule, paired))
        out.append(_summary("others >= 1 core", rule, [r for r in busy if r["rule"] == rule]))
    if pairs:
        ratio = statistics.median(a["ms"] / b["ms"] if a["rule"] == "auto" else b["ms"] / a["ms"] for a, b in pairs)
        out[0]["auto_over_loadavg"] = round(ratio, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--seconds", type=float, default=75.0, help="how long to upload back to back")
    p.add_argument("--quiet", type=float, default=0.2, help="the others' cores below which a pair counts as idle")
    args = p.parse_args()
    from cxrbench.app.dashboard import shared_demo_info

    os.environ.pop(THREADS_ENV, None)  # "auto" must not find one
    with contextlib.redirect_stdout(io.StringIO()):  # the shared cache's "using ..." lines
        info = {**shared_demo_info(), "examples": {}}
    images = _images(12)
    app = InProcess(info)
    app.upload(images[-1], "auto")  # the first figure and PNG set-up are not timed
    load_before = os.getloadavg()[0]
    rows = steady(app, images, args.seconds)
    df = _frame(table(rows, args.quiet))
    header = (f"<!-- {machine()}, {len(rows)} uploads in {args.seconds:g} s, load average {load_before:.2f} before / "
              f"{os.getloadavg()[0]:.2f} after, {time.strftime('%Y-%m-%d %H:%M')} -->\n")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    _frame(rows).to_csv(folder / "threads_uploads.csv", index=False)
    (folder / "threads.md").write_text(header + markdown(df))
    print(header + markdown(df))
    print(f"wrote {folder / 'threads.md'} and threads_uploads.csv")


if __name__ == "__main__":
    main()

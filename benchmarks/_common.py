"""Helpers shared by the benchmark scripts: argument parsing, timing, writing the table."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="build/benchmarks", help="folder for the table (CSV + Markdown)")
    p.add_argument("--repeat", type=int, default=3)
    return p.parse_args()


def timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, float]:
    """Median and min seconds of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def machine() -> str:
    """The CPU model and core count (timings differ between machines that share a name)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_table(rows: list[dict], out: str, name: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / f"{name}.csv", index=False)
    header = f"<!-- {machine()}, python {platform.python_version()}, {time.strftime('%Y-%m-%d')} -->\n"
    (folder / f"{name}.md").write_text(header + markdown(df))
    print(df.to_string(index=False))
    print(f"wrote {folder / name}.csv and .md")
    return df


def markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (floats to 4 significant digits)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"

"""Each notebook's runtime at its defaults (the done-when budget of issue 17: <= 90 s each on this 2-core CPU, idle).

The shared bundles are prepared first (trained once into the cache, then reused: the warm-up row), then every
notebook runs under papermill at its defaults, as ``make notebooks-html`` does (:mod:`cxrbench.cli.notebooks`), into
``<out>/notebooks``. Each row has the wall seconds, the 1-minute load average before and after (the machine is
shared: a number without its load means little) and the slowest cell with its share of the cell time.
``--only 01 04`` runs a subset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_table  # noqa: E402

from cxrbench.cli.notebooks import WARM_UP, _checkout, run_notebooks, warm_up_row  # noqa: E402

BUDGET_S = 90.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/benchmarks", help="folder for the table (CSV + Markdown)")
    ap.add_argument("--only", nargs="*", default=None, help="notebook number prefixes, e.g. 01 04")
    args = ap.parse_args()
    names = sorted((_checkout() / "notebooks").glob("*.ipynb"))
    if args.only:
        names = [n for n in names if any(n.name.startswith(k) for k in args.only)]
    out = Path(args.out) / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    rows = [warm_up_row(), *run_notebooks(names, out, {})]
    table = []
    for r in rows:
        slow = (r.get("slowest_cells") or [{}])[0]
        table.append({"notebook": r["notebook"], "seconds": r["seconds"], "load_before": r.get("load_before"),
                      "load_after": r.get("load_after"),
                      "slowest_cell": f"{slow['cell']}: {slow['source']}" if slow else "",
                      "slowest_share": slow.get("share"),
                      "within_90s": "" if r["notebook"] == WARM_UP or "error" in r else r["seconds"] <= BUDGET_S,
                      "result": f"failed: {r['error']}" if "error" in r else "ok"})
    write_table(table, args.out, "notebooks")
    failed = [r["notebook"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"notebooks failed: {failed}")


if __name__ == "__main__":
    main()

"""Execute the notebooks and export them to HTML that renders offline: ``make notebooks-html``.

``python -m cxrbench.cli.notebooks --out build/notebooks [--parameters params.json] [--only 02 ...]`` runs each
notebook with papermill (at its defaults, or with the parameters given per notebook in a JSON file
``{"02_roc_operating_points.ipynb": {"epochs": 1}, ...}``; ``"{out}"`` in a string value is the output folder)
and writes ``<name>.ipynb`` and ``<name>.html`` side by side, with ``mathjax/tex-svg-full.js`` next to them.

Offline means: the formulas are typeset by a local MathJax 3 (the pinned npm ``mathjax`` package, installed
once into ``$CXRBENCH_NPM_DIR/mathjax`` or ``~/.cache/cxrbench/npm/mathjax``), plotly figures carry plotly.js
inline (the notebooks' ``notebook`` renderer embeds it), and the page does not need require.js from a CDN.
A page that would still load a script from outside is an error, never a silently broken page.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MATHJAX_VERSION", "RESULTS_KEY", "RESULTS_MIMETYPE", "WARM_UP", "cell_durations", "export_html",
           "install_mathjax", "main", "outside_scripts", "publish_results", "read_results", "run_notebooks",
           "runtimes_table", "warm_up_row"]

#: the first row of ``runtimes.json``: the shared bundles prepared before the notebooks run
WARM_UP = "shared bundles (cxrbench bundles prepare)"

#: output metadata key that marks a notebook's published results (the tests read them back)
RESULTS_KEY = "cxrbench_results"
#: their own JSON mimetype: Jupyter, Voila and nbconvert do not render it and show the one-line text instead
RESULTS_MIMETYPE = "application/vnd.cxrbench.results+json"

#: the pinned MathJax (npm); 3.x renders into ``<mjx-container>`` elements
MATHJAX_VERSION = "3.2.2"
MATHJAX_FILE = "tex-svg-full.js"  # one self-contained file: SVG output needs no web fonts


def _checkout() -> Path:
    """The source checkout whose notebooks/ this runs (the notebooks are not part of the wheel)."""
    from cxrbench.data.locations import source_checkout

    root = source_checkout()
    if root is None:
        raise SystemExit("error: the notebooks live in a source checkout of cxrbench (git clone), not in the wheel")
    return root

#: MathJax 3 reads its settings from window.MathJax before it loads; the same delimiters as Jupyter's
_MATHJAX_CONFIG = """<script>
window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']],
                        processEscapes: true, processEnvironments: true, tags: 'ams'},
                  options: {enableMenu: false}, svg: {fontCache: 'global'}};
</script>
"""


def _jsonable(value: Any) -> Any:
    """DataFrames as lists of records, numpy scalars and arrays as Python numbers and lists, NaN as None."""
    import numpy as np
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return json.loads(value.to_json(orient="records"))
    if isinstance(value, pd.Series):
        return json.loads(value.to_json())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    return value


def publish_results(name: str, results: dict[str, Any]) -> None:
    """Show a notebook's key results as a JSON output tagged ``name`` (read back by :func:`read_results`).

    ``results`` may hold numbers, strings, lists, arrays and DataFrames (as records). Returns nothing, so
    the cell shows only the one-line note, not the data a second time.
    """
    from IPython.display import display

    data = _jsonable(results)
    text = f"results '{name}' published: {', '.join(data)}"
    display({RESULTS_MIMETYPE: data, "text/plain": text}, raw=True, metadata={RESULTS_KEY: name})


def read_results(notebook: str | os.PathLike | Any) -> dict[str, Any]:
    """The results an executed notebook published (name -> JSON data); a path or a notebook node."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4) if isinstance(notebook, (str, os.PathLike)) else notebook
    found: dict[str, Any] = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            name = (out.get("metadata") or {}).get(RESULTS_KEY)
            if name is not None:
                found[name] = out["data"][RESULTS_MIMETYPE]
    return found


def _npm_dir() -> Path:
    env = os.environ.get("CXRBENCH_NPM_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "cxrbench" / "npm") / "mathjax"


def install_mathjax(npm_dir: str | os.PathLike | None = None) -> Path:
    """The pinned MathJax's ``es5/tex-svg-full.js``, installed with npm the first time.

    Raises ``RuntimeError`` (with npm's message) when npm is missing or the install fails.
    """
    folder = Path(npm_dir) if npm_dir else _npm_dir()
    package = folder / "node_modules" / "mathjax"
    script = package / "es5" / MATHJAX_FILE
    if script.is_file() and json.loads((package / "package.json").read_text()).get("version") == MATHJAX_VERSION:
        return script
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is not installed: it is needed once to fetch mathjax {MATHJAX_VERSION} for the "
                           "offline HTML (install Node.js, or set CXRBENCH_NPM_DIR to a folder that has it)")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--ignore-scripts",
           "--loglevel=error", f"mathjax@{MATHJAX_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not script.is_file():
        raise RuntimeError(f"'npm install mathjax@{MATHJAX_VERSION}' in {folder} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout)[-2000:]}")
    return script


def outside_scripts(page: str) -> list[str]:
    """The ``src`` of every ``<script>`` of an HTML page that is not a relative or file:// address."""
    sources = re.findall(r"<script[^>]*\ssrc=[\"']([^\"']+)[\"']", page)
    return [s for s in sources if re.match(r"^(https?:)?//", s)]


def _without_cdn_loaders(page: str) -> str:
    """Drop the two CDN scripts these pages do not need: the lab template's require.js (plotly.js, embedded
    by the notebook renderer, defines ``Plotly`` itself when no AMD loader is present) and the MathJax that
    each plotly figure asks a CDN for (the page loads the local MathJax once)."""
    page = re.sub(r"<script src=\"https?://[^\"]*require(\.min)?\.js\"></script>\s*", "", page)
    return re.sub(r"<script src=\"https?://[^\"]*/mathjax/[^\"]*\"></script>", "", page)


def export_html(notebook: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                mathjax: str | os.PathLike | None = None) -> Path:
    """Export an executed notebook to ``<out_dir>/<name>.html`` (lab template) that renders offline.

    The local MathJax (``mathjax``: a ``tex-svg-full.js``; default :func:`install_mathjax`) is copied to
    ``<out_dir>/mathjax/``. Saved widget state is dropped: widgets show their static form (their ``text/html``).
    Raises ``FileNotFoundError`` for a missing notebook and ``RuntimeError`` when the page would still load a
    script from outside.
    """
    import nbformat
    from nbconvert import HTMLExporter

    src = Path(notebook)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such notebook")
    out = Path(out_dir) if out_dir is not None else src.parent
    local = Path(mathjax) if mathjax else install_mathjax()
    (out / "mathjax").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, out / "mathjax" / MATHJAX_FILE)
    exporter = HTMLExporter(template_name="lab", mathjax_url=f"mathjax/{MATHJAX_FILE}")
    nb = nbformat.read(src, as_version=4)
    # without a kernel a widget cannot move: drop the saved widget state (whose renderer nbconvert loads from a
    # CDN), so each widget output shows its static form (text/html, e.g. an explorer's snapshot) instead
    nb.metadata.pop("widgets", None)
    page, _ = exporter.from_notebook_node(nb)
    tag = f'<script src="mathjax/{MATHJAX_FILE}">'
    if tag not in page:
        raise RuntimeError(f"{src}: the HTML template did not load MathJax from {tag!r}; nbconvert changed?")
    page = _without_cdn_loaders(page.replace(tag, _MATHJAX_CONFIG + tag, 1))
    if outside := outside_scripts(page):
        raise RuntimeError(f"{src}: the exported page would load scripts from outside: {outside}")
    dest = out / f"{src.stem}.html"
    dest.write_text(page, encoding="utf-8")
    return dest


def _parameters(path: str | None, out: Path) -> dict[str, dict[str, Any]]:
    if not path:
        return {}
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: {path}: cannot read the notebook parameters ({exc})") from None
    return {name: {k: v.replace("{out}", str(out)) if isinstance(v, str) else v for k, v in p.items()}
            for name, p in given.items()}


def cell_durations(notebook: str | os.PathLike | Any) -> list[dict[str, Any]]:
    """Each code cell's seconds in an executed notebook (papermill's ``papermill.duration``) and its share of
    their sum, slowest first: ``{"cell": index, "seconds", "share", "source": its first line}``."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4) if isinstance(notebook, (str, os.PathLike)) else notebook
    cells = [(i, float((c.get("metadata", {}).get("papermill") or {}).get("duration") or 0.0), c.source)
             for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    total = sum(seconds for _, seconds, _ in cells) or 1.0
    rows: list[dict[str, Any]] = [
        {"cell": i, "seconds": round(seconds, 2), "share": round(seconds / total, 3),
         "source": next((line for line in source.splitlines() if line.strip()), "")[:80]}
        for i, seconds, source in cells]
    return sorted(rows, key=lambda r: -r["seconds"])


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none): timings on a shared machine need it beside them."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def run_notebooks(names: Sequence[Path], out: Path, parameters: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Execute each notebook into ``out`` and export its HTML; one row each: name, seconds, the load average
    before and after, the three slowest cells (:func:`cell_durations`), and the html or the error.

    A notebook that fails is reported and the others still run."""
    import papermill as pm

    script, rows = install_mathjax(), []
    for nb in names:
        t0, load = time.perf_counter(), _load()
        executed = out / nb.name
        row: dict[str, Any] = {"notebook": nb.name}
        try:
            pm.execute_notebook(str(nb), str(executed), parameters=parameters.get(nb.name, {}), cwd=str(_checkout()),
                                kernel_name="python3", progress_bar=False, log_output=False)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["html"] = str(export_html(executed, out, mathjax=script))
        except Exception as exc:  # noqa: BLE001 - a batch goes on past a failing notebook, and says why
            first = str(exc).strip().splitlines()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["error"] = next((line for line in first if line.strip()), type(exc).__name__)[:300]
        row.update(load_before=load, load_after=_load())
        if executed.is_file():
            row["slowest_cells"] = cell_durations(executed)[:3]
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def warm_up_row() -> dict[str, Any]:
    """Prepare the shared bundles (:func:`cxrbench.train.shared.prepare_shared_bundles`: trained once, then found in
    the cache) so the notebooks at their defaults train nothing; the row says how long that took."""
    from cxrbench.train.shared import prepare_shared_bundles

    t0, load = time.perf_counter(), _load()
    bundles = prepare_shared_bundles()
    return {"notebook": WARM_UP, "seconds": round(time.perf_counter() - t0, 1), "load_before": load,
            "load_after": _load(), "bundles": {b["name"]: b["seconds"] for b in bundles}}


def runtimes_table(rows: Sequence[dict[str, Any]]) -> str:
    """``runtimes.json`` as a Markdown table (notebook, seconds, load average before / after, the slowest cell and
    its share, result), the warm-up row first."""
    lines = ["| notebook | seconds | load before / after | slowest cell (share) | result |", "|---|---:|---|---|---|"]
    for row in rows:
        result = f"failed: {row['error']}" if "error" in row else (
            "cache warm-up: " + ", ".join(f"{k} {v:.0f} s" for k, v in row.get("bundles", {}).items())
            if row["notebook"] == WARM_UP else "ok")
        load = f"{row.get('load_before', '')} / {row.get('load_after', '')}" if "load_before" in row else ""
        slow = row.get("slowest_cells") or []
        cell = f"{slow[0]['cell']}: {slow[0]['seconds']:.1f} s ({100 * slow[0]['share']:.0f} %)" if slow else ""
        lines.append(f"| {row['notebook']} | {row['seconds']:.1f} | {load} | {cell} | {result} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: execute and export the notebooks; exit 1 when any failed."""
    ap = argparse.ArgumentParser(prog="python -m cxrbench.cli.notebooks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/notebooks", help="output folder (default build/notebooks)")
    ap.add_argument("--parameters", help="JSON file: notebook file name -> papermill parameters")
    ap.add_argument("--only", nargs="*", default=None, help="notebook names or number prefixes (e.g. 02 04)")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="do not prepare the shared bundles first (notebooks then train missing ones themselves)")
    ap.add_argument("--table", metavar="RUNTIMES_JSON", help="print a runtimes.json as a Markdown table and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(runtimes_table(json.loads(Path(args.table).read_text())))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted((_checkout() / "notebooks").glob("*.ipynb"))
    if args.only:
        names = [n for n in names if any(n.name.startswith(k) for k in args.only)]
        if not names:
            print(f"error: no notebook matches {args.only}", file=sys.stderr)
            return 2
    warm = [] if args.no_warm_up else [warm_up_row()]
    rows = warm + run_notebooks(names, out, _parameters(args.parameters, out))
    (out / "runtimes.json").write_text(json.dumps(rows, indent=1))
    failed = [r["notebook"] for r in rows if "error" in r]
    print(f"{len(rows) - len(warm) - len(failed)} of {len(rows) - len(warm)} notebooks exported to {out}" +
          (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The HTML export of a notebook renders offline: its formula is typeset by the local MathJax and its plotly
figure is drawn by the embedded plotly.js, with every request that is not file:// or 127.0.0.1 blocked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cxrbench.cli.notebooks import export_html, outside_scripts

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "build" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def test_outside_scripts_finds_cdn_scripts_only():
    page = ('<script src="mathjax/tex-svg-full.js"></script><script src="https://cdn.x/require.js"></script>'
            "<script src='//unpkg.com/a.js'></script><script>var a = 1;</script>")
    assert outside_scripts(page) == ["https://cdn.x/require.js", "//unpkg.com/a.js"]


def test_export_of_a_missing_notebook_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.ipynb: no such notebook"):
        export_html(tmp_path / "absent.ipynb", tmp_path, mathjax=tmp_path / "x.js")


def _small_notebook(path: Path) -> None:
    """Notebook 02's formula cell and a plotly ROC grid, executed the way the notebooks run."""
    import nbformat

    nb02 = nbformat.read(ROOT / "notebooks" / "02_roc_operating_points.ipynb", as_version=4)
    formula = next(c for c in nb02.cells if c.cell_type == "markdown" and "$$" in c.source)
    code = ("import numpy as np\nimport plotly.io as pio\nfrom cxrbench.plots.evaluation import roc_figure\n"
            'pio.renderers.default = "plotly_mimetype+notebook"\n'
            "rng = np.random.default_rng(0)\ny = (rng.random((40, 2)) < 0.5).astype(int)\n"
            'roc_figure(y, y * 0.5 + 0.5 * rng.random(y.shape), ["Effusion", "Mass"], [0.5, 0.5], ncols=2)')
    nb = nbformat.v4.new_notebook(cells=[formula, nbformat.v4.new_markdown_cell("Inline $x \\le opt$ too."),
                                         nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.browser
@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_exported_page_renders_formula_and_plot_offline(tmp_path):
    import papermill as pm
    from playwright.sync_api import sync_playwright

    from cxrbench.cli.notebooks import install_mathjax

    try:
        mathjax = install_mathjax()
    except RuntimeError as exc:  # no npm and nothing cached: say why, fail under CI (conftest)
        pytest.skip(str(exc))
    src = tmp_path / "formula.ipynb"
    _small_notebook(src)
    executed = tmp_path / "out" / "formula.ipynb"
    executed.parent.mkdir()
    pm.execute_notebook(str(src), str(executed), cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    page = export_html(executed, executed.parent, mathjax=mathjax)
    assert (page.parent / "mathjax" / "tex-svg-full.js").is_file() and not outside_scripts(page.read_text())

    outside: list[str] = []

    def only_local(route):
        url = route.request.url
        if url.startswith(("file://", "http://127.0.0.1", "data:", "blob:")):
            return route.continue_()
        outside.append(url)
        return route.abort()

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            context.route("**/*", only_local)
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(page.as_uri())
            tab.wait_for_selector("mjx-container", timeout=30_000)
            tab.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            n_formulas = tab.locator("mjx-container").count()
            text = tab.inner_text("body")
            ticks = tab.locator(".js-plotly-plot .xtick").count()
            tab.screenshot(path=str(SHOTS / "notebook_html_offline.png"), full_page=True)
        finally:
            browser.close()
    assert n_formulas >= 2, "the display formula and the inline one should both be typeset"
    assert "$$" not in text and "\\begin{cases}" not in text, "raw LaTeX left on the page"
    assert ticks > 0, "the plotly figure shows no tick labels"
    assert not errors, errors
    assert not outside, f"the page asked for outside addresses: {outside}"


def test_published_results_round_trip_through_a_notebook_output():
    import nbformat
    import numpy as np
    import pandas as pd

    from cxrbench.cli.notebooks import RESULTS_KEY, RESULTS_MIMETYPE, _jsonable, read_results

    data = _jsonable({"table": pd.DataFrame({"a": [1.0, np.nan], "ok": [True, False]}), "auc": np.float32(0.5),
                      "n": np.int64(3), "y": np.eye(2, dtype=int)})
    assert data == {"table": [{"a": 1.0, "ok": True}, {"a": None, "ok": False}], "auc": 0.5, "n": 3,
                    "y": [[1, 0], [0, 1]]}
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("display_data", data={RESULTS_MIMETYPE: data, "text/plain": "x"},
                                           metadata={RESULTS_KEY: "demo"}),
                    nbformat.v4.new_output("display_data", data={"text/plain": "not a result"})]
    nb = nbformat.v4.new_notebook(cells=[cell])
    assert read_results(nb) == {"demo": data}


def test_runtimes_name_the_slowest_cells_with_their_share_and_the_load():
    """run_notebooks' rows carry the slowest cells (papermill's per-cell durations) and the load average; the
    table shows both, so a runtime measured on a shared machine says how loaded it was and where its time went."""
    import nbformat

    from cxrbench.cli.notebooks import cell_durations, runtimes_table

    cells = [nbformat.v4.new_markdown_cell("# title")]
    for seconds, source in ((1.0, "import torch"), (6.0, "train(model)\nmore"), (3.0, "\nplot()")):
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["papermill"] = {"duration": seconds}
        cells.append(cell)
    cells.append(nbformat.v4.new_code_cell("never ran"))  # no papermill metadata: counts as 0 s
    slow = cell_durations(nbformat.v4.new_notebook(cells=cells))
    assert [(r["cell"], r["seconds"], r["share"], r["source"]) for r in slow] == [
        (2, 6.0, 0.6, "train(model)"), (3, 3.0, 0.3, "plot()"), (1, 1.0, 0.1, "import torch"),
        (4, 0.0, 0.0, "never ran")]
    table = runtimes_table([{"notebook": "01_x.ipynb", "seconds": 12.34, "load_before": 1.5, "load_after": 2.25,
                             "slowest_cells": slow[:3], "html": "01_x.html"},
                            {"notebook": "02_y.ipynb", "seconds": 3.0, "error": "boom"}])
    lines = table.splitlines()
    assert lines[2] == "| 01_x.ipynb | 12.3 | 1.5 / 2.25 | 2: 6.0 s (60 %) | ok |"
    assert lines[3] == "| 02_y.ipynb | 3.0 |  |  | failed: boom |"

"""Drive the exported web app in Debian's headless Chromium through Playwright (tests, benchmarks, notebooks).

Every request that is not to 127.0.0.1 / localhost (or a data:/blob: URL) is aborted and recorded in
``outside``, so a caller can assert that nothing left the machine. Playwright's own browser download is
never used (``executable_path`` points at the system Chromium).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from playwright.sync_api import Playwright

__all__ = ["CHROMIUM_ARGS", "BrowserApp", "chromium_path"]

CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")


def chromium_path() -> str | None:
    """The system Chromium (``$CXRBENCH_CHROMIUM``, ``chromium`` on PATH, /usr/bin/chromium), or None."""
    for candidate in (os.environ.get("CXRBENCH_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


class BrowserApp:
    """The page at ``url`` in headless Chromium, models loaded.

    >>> with BrowserApp("http://127.0.0.1:8000/") as app:       # doctest: +SKIP
    ...     results = app.analyze(["images/a.png"], resize="pillow", allowOod=True)

    Attributes after entering: ``page`` (Playwright page), ``ready`` ({load_s, threads, ort}),
    ``page_load_s`` (navigation to models loaded, seconds), ``outside`` (blocked URLs), ``console`` (errors).
    """

    def __init__(self, url: str, *, timeout_s: float = 180.0) -> None:
        self.url, self.timeout_ms = url, int(timeout_s * 1000)
        self.outside: list[str] = []
        self.console: list[str] = []

    def __enter__(self) -> "BrowserApp":
        from playwright.sync_api import sync_playwright

        executable = chromium_path()
        if executable is None:
            raise RuntimeError("no system Chromium found (install Debian's 'chromium' or set CXRBENCH_CHROMIUM)")
        pw = sync_playwright().start()
        self._pw: Playwright | None = pw
        try:
            self.browser = pw.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_ARGS))
            context = self.browser.new_context()
            context.route("**/*", self._route)
            self.page = context.new_page()
            self.page.set_default_timeout(self.timeout_ms)
            self.page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)
            self.page.on("pageerror", lambda e: self.console.append(str(e)))
            t0 = time.perf_counter()
            self.page.goto(self.url, timeout=self.timeout_ms)
            self.ready = self.page.evaluate("() => window.cxrbenchReady")
            self.page_load_s = time.perf_counter() - t0
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _route(self, route: Any) -> None:
        url = route.request.url
        host = url.split("/")[2].split(":")[0] if "://" in url else ""
        if host in ("127.0.0.1", "localhost") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def __exit__(self, *exc: Any) -> None:
        browser = getattr(self, "browser", None)
        if browser is not None:
            browser.close()
        pw = getattr(self, "_pw", None)
        if pw is not None:
            pw.stop()
            self._pw = None

    def analyze(self, urls: Sequence[str], **options: Any) -> list[dict[str, Any]]:
        """``window.cxrbenchAnalyze`` on each URL (relative to the page), in order, without re-rendering."""
        return self.page.evaluate(
            "async ([urls, opts]) => { const out = [];"
            " for (const u of urls) out.push(await window.cxrbenchAnalyze(u, opts)); return out; }",
            [list(urls), {"render": False, **options}])

    def preprocess(self, url: str, **options: Any) -> dict[str, Any]:
        """``window.cxrbenchPreprocess``: the model inputs the page computes.

        ``x`` ``(C, S, S)`` and ``x_ood`` ``(1, 64, 64)`` (None without a gate) as float32 arrays.
        """
        import base64

        import numpy as np

        out = self.page.evaluate("async ([u, opts]) => window.cxrbenchPreprocess(u, opts)",
                                 [url, {**options, "encoding": "base64"}])
        decode = lambda s: np.frombuffer(base64.b64decode(s), dtype="<f4")  # noqa: E731
        out["x"] = decode(out["x"]).reshape(out["channels"], out["size"], out["size"])
        if out["x_ood"] is not None:
            out["x_ood"] = decode(out["x_ood"]).reshape(1, out["ood_size"], out["ood_size"])
        return out

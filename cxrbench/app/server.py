"""Voila, as the demo runs it: local only, kernels that end with their page, and a loading line that tells the truth.

``python -m cxrbench.app.server NOTEBOOK [voila options]`` is Voila 0.5.13 (pinned) with three additions that
the pinned version cannot be configured to do:

- **Host and Origin check.** Every request whose ``Host`` is not ``127.0.0.1``, ``localhost`` or ``[::1]`` with
  the served port, or that carries any other ``Origin``, gets ``403`` before a handler runs (so no kernel starts):
  a web page the user visits cannot reach the app through DNS rebinding. (Voila sets ``allow_remote_access=True``;
  our ``voila.json`` turns it off as well, but jupyter_server's own check ignores the port and the ``Origin`` of
  a GET.)
- **The shutdown beacon works.** The page sends ``POST /voila/api/shutdown/<kernel>`` with the ``_xsrf`` cookie
  on ``beforeunload``, but the pinned Voila never sets that cookie, so the request is refused with
  ``403 '_xsrf' argument missing`` (voila#1458) and every closed tab leaves its kernel behind. Rendering the page
  now sets the cookie. Kernels whose page went away without a beacon are culled (``MappingKernelManager`` in
  ``cxrbench/app/voila/config/voila.json``).
- **A loading estimate.** The template shows "loading the models (first start takes ~N s)"; N is how long the last
  page took to render on this server (kernel start, imports and model loading), or :data:`DEFAULT_FIRST_START_S`
  before the first one.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["DEFAULT_FIRST_START_S", "LOCAL_HOSTS", "main", "refusal", "server_class"]

#: the estimate shown before any page has rendered: a cold kernel on a loaded 2-core machine (15-22 s measured)
DEFAULT_FIRST_START_S = 20
#: the host names a browser on this machine uses for 127.0.0.1 (Voila binds 127.0.0.1 only)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")

_last_render_s: list[float] = []


def _allowed_hosts(port: int) -> set[str]:
    return {f"{h}:{port}" for h in LOCAL_HOSTS}


def refusal(host: str | None, origin: str | None, port: int) -> str | None:
    """Why a request with these ``Host`` and ``Origin`` headers is refused, or ``None`` when it is local.

    Accepted: ``Host`` one of :data:`LOCAL_HOSTS` with ``:port``; no ``Origin`` or ``http://`` + such a host.
    """
    allowed = _allowed_hosts(port)
    if (host or "").lower() not in allowed:
        return f"Host {host!r} is not this local app (expected 127.0.0.1:{port} or localhost:{port})"
    if origin is not None:
        m = re.fullmatch(r"http://([^/]+)", origin.strip().lower())
        if not m or m.group(1) not in allowed:
            return f"Origin {origin!r} is not this local app"
    return None


def _guard_rule(port: int, log: Any):
    """A tornado routing rule, placed first, that answers 403 to every request :func:`refusal` refuses."""
    from tornado.routing import Matcher, Rule
    from tornado.web import RequestHandler

    def reason_for(request) -> str | None:
        return refusal(request.headers.get("Host"), request.headers.get("Origin"), port)

    class Refuse(RequestHandler):
        def prepare(self) -> None:
            reason = reason_for(self.request)
            log.warning("refused %s %s: %s", self.request.method, self.request.path, reason)
            self.set_status(403)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"403 Forbidden: {reason}\n")

    class NotLocal(Matcher):
        def match(self, request):
            return None if reason_for(request) is None else {}

    return Rule(NotLocal(), Refuse)


def _set_xsrf_cookie(handler, notebook=None, cwd=None):
    """Voila's prelaunch hook: reading ``xsrf_token`` sets the ``_xsrf`` cookie the shutdown beacon sends back."""
    handler.xsrf_token  # noqa: B018 (the property sets the cookie)
    return None


def _first_start_hook(page_config: dict, **_: Any) -> dict:
    """Voila's page-config hook: the template's loading estimate (seconds, rounded up)."""
    estimate = _last_render_s[-1] if _last_render_s else DEFAULT_FIRST_START_S
    return {**page_config, "cxrbenchFirstStartS": int(math.ceil(estimate))}


def _log_request(handler) -> None:
    """The tornado ``log_function``: jupyter_server's access log, and the render time of each page."""
    from jupyter_server.log import log_request
    from voila.handler import VoilaHandler

    if isinstance(handler, VoilaHandler) and handler.request.method == "GET" and handler.get_status() == 200:
        _last_render_s[:] = [handler.request.request_time()]
    log_request(handler)


def server_class() -> Any:
    """Voila's application class with this module's additions (made on call: importing Voila is slow)."""
    from voila.app import Voila

    class CxrbenchVoila(Voila):
        """Voila with the Host/Origin guard, the ``_xsrf`` cookie and the loading estimate (module docstring)."""

        def initialize(self, argv=None):
            super().initialize(argv)
            self.voila_configuration.prelaunch_hook = _set_xsrf_cookie
            self.voila_configuration.page_config_hook = _first_start_hook

        def init_handlers(self):
            # called by Voila.start once self.app exists, before it listens
            self.app.default_router.rules.insert(0, _guard_rule(self.port, self.log))
            self.app.settings["log_function"] = _log_request
            return super().init_handlers()

    return CxrbenchVoila


def main(argv: list[str] | None = None) -> None:
    """Run the server (the command line is Voila's)."""
    server_class().launch_instance(argv)


if __name__ == "__main__":
    main()

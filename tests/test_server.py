"""The demo server as a demo audience meets it: ``cxrbench demo serve`` in a subprocess, driven by Chromium.

Kernels end with their page (the shutdown beacon works) or are culled; memory stays flat over PAGE_LOADS page
loads (10; 20 with CXRBENCH_PAGE_LOADS=20); only local Host and Origin headers are answered; SIGTERM stops the
server and its kernels and frees the port; the page shows the app's title and a loading line while the kernel
starts. Screenshots go to build/screenshots/.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrbench.app.server import refusal

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "build" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
#: page loads of the memory test (each starts and ends a kernel: ~15 s on a quiet 2-core machine)
PAGE_LOADS = int(os.environ.get("CXRBENCH_PAGE_LOADS", "10"))
#: server + Voila + kernels, resident, at any point of the 20 page loads: one live kernel (~1.3 GB with torch and
#: the models) + Voila (~0.1 GB) + the `cxrbench demo serve` process (~0.8 GB: it imported torch to prepare).
#: Twenty leaked kernels would hold ~26 GB.
MEMORY_BOUND_MB = 3500
#: the growth allowed from the first closed page to the last (allocator noise, Voila's caches)
MEMORY_GROWTH_MB = 300

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="Debian's chromium is not installed (.ci/run installs it)")


# ---------------------------------------------------------------------------------------------- no server needed

@pytest.mark.parametrize("host,origin", [("127.0.0.1:8866", None), ("localhost:8866", None), ("[::1]:8866", None),
                                         ("LOCALHOST:8866", "http://localhost:8866"),
                                         ("127.0.0.1:8866", "http://127.0.0.1:8866")])
def test_local_host_and_origin_are_accepted(host, origin):
    assert refusal(host, origin, 8866) is None


@pytest.mark.parametrize("host,origin,word", [
    ("evil.example:8866", None, "Host"), ("evil.example", None, "Host"), (None, None, "Host"),
    ("127.0.0.1:9999", None, "Host"), ("127.0.0.1", None, "Host"), ("127.0.0.2:8866", None, "Host"),
    ("127.0.0.1:8866", "http://evil.example", "Origin"), ("127.0.0.1:8866", "http://localhost:9999", "Origin"),
    ("127.0.0.1:8866", "null", "Origin"), ("127.0.0.1:8866", "https://127.0.0.1:8866", "Origin")])
def test_other_hosts_and_origins_are_refused_with_the_reason(host, origin, word):
    reason = refusal(host, origin, 8866)
    assert reason is not None and reason.startswith(word)


def test_the_shipped_config_culls_idle_kernels_and_refuses_remote_hosts():
    config = json.loads((ROOT / "cxrbench" / "app" / "voila" / "config" / "voila.json").read_text())
    cull = config["MappingKernelManager"]
    assert cull["cull_idle_timeout"] > 0 and cull["cull_interval"] > 0 and cull["cull_connected"] is False
    assert config["Voila"]["tornado_settings"]["allow_remote_access"] is False


# ---------------------------------------------------------------------------------------------- the real server

def _tiny_bundles(root: Path, shared_data: Path) -> dict:
    """An untrained small classifier and OOD autoencoder (the server's lifecycle does not depend on their skill)."""
    import torch

    from cxrbench.labels import NIH_FINDINGS
    from cxrbench.models.autoencoder import ConvAutoencoder
    from cxrbench.models.bundle import ModelCard, save_bundle
    from cxrbench.models.classifier import build_classifier
    from cxrbench.ood import fit_cutoff, score_batch
    from cxrbench.preprocess import Preprocess

    torch.manual_seed(0)
    ae = ConvAutoencoder(latent_dim=16, base_channels=8).eval()
    cutoff = fit_cutoff(score_batch(ae, torch.rand(16, 1, 64, 64))["ssim"], 99.0)
    save_bundle(root / "ood", ae, ModelCard(kind="ood", builder="autoencoder",
                                            builder_kwargs={"latent_dim": 16, "base_channels": 8},
                                            preprocess=Preprocess(size=64, normalize="zero_one").to_dict(),
                                            ood={"cutoff": cutoff.to_dict()}))
    clf = build_classifier("resnet18", 14, 1).eval()
    save_bundle(root / "clf", clf, ModelCard(
        kind="classifier", builder="classifier",
        builder_kwargs={"arch": "resnet18", "num_outputs": 14, "in_channels": 1},
        labels=list(NIH_FINDINGS), preprocess=Preprocess(size=64).to_dict(),
        operating_points={"thresholds": {f: 0.5 for f in NIH_FINDINGS}, "fitted_on": "validation"}))
    return {"classifier": str(root / "clf"), "ood": str(root / "ood"), "examples": {}}


def _demo_out(tmp: Path, shared_data: Path) -> Path:
    """A ``--out`` folder whose demo.json `cxrbench demo serve` takes as up to date (so it trains nothing)."""
    from cxrbench.app.demo import DemoSettings, _fingerprint, demo_data

    train_dir, kind = demo_data(shared_data)
    info = {**_tiny_bundles(tmp, shared_data), "fingerprint": _fingerprint(train_dir, DemoSettings()),
            "data": str(train_dir), "kind": kind}
    (tmp / "demo.json").write_text(json.dumps(info))
    return tmp


def _start_cli(out: Path, shared_data: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CXRBENCH_DATA": str(shared_data), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    env.pop("CXRBENCH_DEMO", None)
    return subprocess.Popen([sys.executable, "-m", "cxrbench.cli", "demo", "serve", "--out", str(out),
                             "--port", str(port), "-q"], env=env, cwd=str(ROOT),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _tree(pid: int) -> list:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kernels(pid: int) -> list:
    return [p for p in _tree(pid) if any("ipykernel" in part for part in _cmdline(p))]


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _rss_mb(pid: int) -> float:
    import psutil

    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _wait_until(predicate, timeout: float, step: float = 0.5) -> float:
    """Seconds until ``predicate()`` held; raises AssertionError after ``timeout``."""
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"not within {timeout:.0f} s")
        time.sleep(step)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    """`cxrbench demo serve` on a free port, as `make demo` runs it."""
    from cxrbench.app.demo import free_port, wait_for_voila

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "demo").mkdir()
    out = _demo_out(tmp / "demo", shared_data)
    port = free_port()
    log = tmp / "serve.log"
    proc = _start_cli(out, shared_data, port, log)
    try:
        wait_for_voila(port, timeout=180, proc=proc)
    except Exception:
        proc.kill()
        raise AssertionError(f"the demo server did not start:\n{log.read_text()[-3000:]}") from None
    yield {"proc": proc, "port": port, "url": f"http://127.0.0.1:{port}/", "log": log}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture
def browser_context():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = b.new_context(viewport={"width": 1280, "height": 800})
        context.route("**/*", lambda r: r.continue_() if r.request.url.split("/")[2].split(":")[0] in (
            "127.0.0.1", "localhost") or r.request.url.startswith(("data:", "blob:")) else r.abort())
        yield context
        b.close()


def _request(port: int, path: str = "/", method: str = "GET", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest(method, path, skip_host=True)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read().decode("utf-8", "replace")
    conn.close()
    return r.status, body


def _leave(page) -> None:
    """What leaving the tab does: ``beforeunload`` fires and Voila's page sends its shutdown beacon. The page
    navigates away and stays open a moment before it is closed: with ``close(run_before_unload=True)`` the beacons
    of some pages never reached the server (2 to 4 of 6 loads on a quiet machine; no 4xx in its log), most likely
    because Playwright drops a routed request (every request here goes through ``context.route``) of a page that is
    already closed. Navigating away first, the beacon arrived for 6 of 6."""
    page.goto("about:blank")
    page.wait_for_timeout(500)
    page.close()


def _load(context, url: str, shot: str | None = None) -> dict:
    """Open the page in a new tab and wait until the app is ready; returns the seconds from the request to the
    loading line, to the first widget and to ready (the upload button shown, Voila's loading screen gone)."""
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(url, wait_until="commit", timeout=120_000)
    page.wait_for_selector(".cxr-loading-line", state="visible", timeout=60_000)
    times = {"page_to_loading_line_s": time.perf_counter() - t0}
    loading = {"title": page.locator(".cxr-loading-title").inner_text(),
               "line": page.locator(".cxr-loading-line").inner_text()}
    if shot:
        page.screenshot(path=str(SHOTS / f"{shot}_loading.png"))
    page.wait_for_selector(".jupyter-widgets", state="attached", timeout=180_000)
    times["page_to_first_widgets_s"] = time.perf_counter() - t0
    page.wait_for_selector(".cxr-upload", state="visible", timeout=180_000)
    page.wait_for_selector("#loading", state="detached", timeout=30_000)
    times["page_to_ready_s"] = time.perf_counter() - t0
    if shot:
        page.screenshot(path=str(SHOTS / f"{shot}_ready.png"))
    return {"page": page, "times": times, **loading}


@pytest.mark.slow
@pytest.mark.realdata
def test_only_local_host_and_origin_headers_are_answered(server):
    from cxrbench.app.demo import READY_PATH

    port = server["port"]
    kernels_before = len(_kernels(server["proc"].pid))
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _request(port, READY_PATH, headers={"Host": host})[0] == 200
    for headers in ({"Host": "evil.example"}, {"Host": f"evil.example:{port}"},
                    {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example"},
                    {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}):
        status, body = _request(port, "/", headers=headers)
        assert status == 403, (headers, status, body[:200])
        assert "is not this local app" in body and "<html" not in body.lower()
    status, _ = _request(port, "/voila/api/shutdown/0", method="POST",
                         headers={"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example", "Content-Length": "0"})
    assert status == 403
    assert len(_kernels(server["proc"].pid)) == kernels_before, "a refused request started a kernel"
    # the server listens on 127.0.0.1 only
    with socket.socket() as s:
        s.settimeout(2)
        lan = socket.gethostbyname(socket.gethostname())
        if not lan.startswith("127."):
            assert s.connect_ex((lan, port)) != 0


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.realdata
@needs_chromium
def test_the_page_shows_the_title_and_a_loading_line_then_the_app(server, browser_context):
    SHOTS.mkdir(parents=True, exist_ok=True)
    first = _load(browser_context, server["url"], shot="server_first")
    _leave(first["page"])
    second = _load(browser_context, server["url"], shot="server_second")
    _leave(second["page"])
    for load in (first, second):
        assert load["title"] == "cxrbench · chest X-ray check"
        assert re.fullmatch(r"loading the models \(first start takes ~\d+ s\)", load["line"]), load["line"]
    # the second page's estimate is the first page's measured render time, not the default
    n = int(re.search(r"~(\d+) s", second["line"]).group(1))
    assert 0 < n <= int(first["times"]["page_to_ready_s"]) + 1, (n, first["times"])
    # the line comes with Voila's first bytes, long before the kernel has loaded the models
    assert first["times"]["page_to_loading_line_s"] < 0.5 * first["times"]["page_to_first_widgets_s"], first["times"]
    timings = {k: round(v, 2) for k, v in first["times"].items()} | {"estimate_shown_second_s": n}
    (SHOTS / "server_timings.json").write_text(json.dumps(timings))
    print("page timings:", timings)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.realdata
@needs_chromium
@pytest.mark.timeout(2400)  # 20 kernel starts: ~4 min on a quiet machine, ~20 min on a loaded one
def test_repeated_page_loads_end_their_kernels_and_memory_stays_flat(server, browser_context):
    # PAGE_LOADS (default 10: a leaked ~1.3 GB kernel per load shows after two; CXRBENCH_PAGE_LOADS=20 as in issue 15)
    pid, cull_interval = server["proc"].pid, 30
    rss, back_to_one = [], []
    log_start = len(server["log"].read_text())  # the module's server: earlier tests' lines are not this test's
    for i in range(PAGE_LOADS):
        load = _load(browser_context, server["url"])
        assert len(_kernels(pid)) >= 1
        _leave(load["page"])
        back_to_one.append(_wait_until(lambda: len(_kernels(pid)) <= 1, timeout=cull_interval))
        rss.append(_rss_mb(pid))
    _wait_until(lambda: not _kernels(pid), timeout=cull_interval)
    log = server["log"].read_text()[log_start:]
    assert "_xsrf" not in log and "403 POST /voila/api/shutdown" not in log, log[-2000:]
    assert log.count("Kernel shutdown:") >= PAGE_LOADS
    print(f"{PAGE_LOADS} page loads: kernels back to <= 1 after {max(back_to_one):.1f} s at most; server + children "
          f"resident {rss[0]:.0f} MB after the first, {rss[-1]:.0f} MB after the last, {max(rss):.0f} MB at most")
    assert max(rss) < MEMORY_BOUND_MB, rss
    assert rss[-1] - rss[0] < MEMORY_GROWTH_MB, rss


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.realdata
@needs_chromium
def test_a_page_gone_without_its_beacon_is_culled(server, browser_context, tmp_path):
    """A crashed tab sends nothing: the culler ends its kernel. A second server with a short idle timeout shows
    it (the demo server's culler, from the shipped config, is checked in the SIGTERM test once a kernel ran)."""
    from cxrbench.app.demo import free_port, voila_command, voila_env, wait_for_voila

    info = json.loads(Path(server["log"].parent / "demo" / "demo.json").read_text())
    port = free_port()
    # idle counts from the kernel's start too, so the timeout must outlast a kernel start on a loaded machine
    cmd = voila_command(port) + ["--MappingKernelManager.cull_idle_timeout=45",
                                 "--MappingKernelManager.cull_interval=5"]
    proc = subprocess.Popen(cmd, env={**voila_env(info), "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)},
                            stdout=(tmp_path / "voila.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_voila(port, timeout=120, proc=proc)
        load = _load(browser_context, f"http://127.0.0.1:{port}/")
        assert len(_kernels(proc.pid)) == 1
        load["page"].close()  # no beforeunload: no beacon
        culled_after = _wait_until(lambda: not _kernels(proc.pid), timeout=45 + 2 * 5 + 10)
        print(f"kernel of a page closed without its beacon culled after {culled_after:.1f} s")
        log = (tmp_path / "voila.log").read_text()
        assert "Culling kernels with idle durations > 45 seconds at 5 second intervals" in log
        assert "Culling kernel" in log and "Kernel shutdown:" in log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _gone(procs) -> list:
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.realdata
def test_sigterm_stops_the_server_and_its_kernels_and_frees_the_port(server):
    """Runs last in this module: it stops the module's server."""
    proc, port = server["proc"], server["port"]
    status, body = _request(port, "/", headers={"Host": f"127.0.0.1:{port}"})  # renders the page: starts a kernel
    assert status == 200 and "cxr-loading-line" in body
    # the culler of the shipped voila.json started with the first kernel
    assert "Culling kernels with idle durations > 120 seconds at 30 second intervals" in server["log"].read_text()
    tree = _tree(proc.pid)
    assert len(_kernels(proc.pid)) >= 1 and len(tree) >= 3, [_cmdline(p) for p in tree]
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stopped = time.perf_counter() - t0
    _wait_until(lambda: not _gone(tree), timeout=10)
    assert _port_free(port)
    assert "cxrbench dashboard stopped" in server["log"].read_text()
    print(f"SIGTERM: the server, Voila and {len(tree) - 2} kernel(s) stopped in {stopped:.1f} s; port {port} free")


def test_ctrl_c_stops_the_child_first():
    """SIGINT (Ctrl-C) and SIGTERM to a process in run_until_stopped end its server child before it exits."""
    import psutil

    code = ("import subprocess, sys; from cxrbench.app.demo import run_until_stopped; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
            "print(p.pid, flush=True); sys.exit(run_until_stopped(p))")
    for sig in (signal.SIGINT, signal.SIGTERM):
        parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        child = psutil.Process(int(parent.stdout.readline()))
        parent.send_signal(sig)
        assert parent.wait(timeout=30) == 0
        assert not _gone([child]), f"{sig.name}: the child survived"

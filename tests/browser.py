"""Run a static page in headless Chromium with WebGPU and collect the JSON it POSTs back.

The page (ernie_compile/web/index.html) POSTs its result to `?report=URL`; this module serves the
folder and that URL from one local http server, so a test needs neither the DevTools protocol nor a
driver. WebGPU comes from Chromium's SwiftShader adapter, which needs no GPU.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
REPORT_PATH = "/__report__"

# Found by trial with Debian's chromium 156 on a machine without a GPU: --enable-unsafe-webgpu is the
# one that matters (without it requestAdapter() returns null); --use-webgpu-adapter=swiftshader pins
# the software adapter so results do not depend on the machine's GPU. --no-sandbox because tests may
# run as root. --disable-gpu must not be given: it removes WebGPU.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
    "--mute-audio",
)


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def chromium_available() -> str | None:
    """None when a Chromium binary is on PATH, else the reason a test should skip."""
    return None if find_chromium() else f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)})"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from the served folder; a POST to REPORT_PATH hands its JSON body to the test."""

    def do_POST(self):
        if self.path != REPORT_PATH:
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()
        self.server.reports.put(body)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args):  # keep pytest output clean
        pass


def run_page(folder: Path, query: dict, timeout: float = 120, page: str = "index.html") -> dict:
    """Open `folder/page?query&report=…` in headless Chromium; return the dict the page POSTs.

    Raises TimeoutError (with the end of Chromium's log) when nothing arrives in `timeout` seconds,
    RuntimeError when Chromium exits first.
    """
    binary = find_chromium()
    if binary is None:
        raise RuntimeError(chromium_available())
    handler = functools.partial(_Handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.reports = queue.Queue()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    url = f"{origin}/{page}?" + urllib.parse.urlencode({**query, "report": origin + REPORT_PATH})

    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as tmp:
        profile, runtime_dir, log_path = Path(tmp, "profile"), Path(tmp, "xdg"), Path(tmp, "chromium.log")
        runtime_dir.mkdir(mode=0o700)
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
        with open(log_path, "wb") as log:
            # Own session: Chromium's helper processes share our process group, which we end together.
            proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return json.loads(server.reports.get(timeout=0.2))
                except queue.Empty:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"chromium exited ({proc.returncode}) before the page reported:\n"
                                       + _tail(log_path))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no report from {url} within {timeout} s; chromium log:\n" + _tail(log_path))
        finally:
            _stop(proc)
            server.shutdown()
            server.server_close()


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in text[-lines:])

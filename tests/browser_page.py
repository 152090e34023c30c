"""Headless chromium driven over the Chrome DevTools protocol (``websockets``), for the page test of
``stylegen serve`` (tests/test_serve.py, which shares its live server with that test). CI installs
chromium (.ci/run)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from stylegen import procs

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no chromium on PATH: install it (`apt-get install -y chromium`; .ci/run does) to run "
                       "the page test")


class DevTools:
    """A minimal synchronous Chrome DevTools protocol client over one page target's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30).__enter__()  # closed in close()
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 60.0, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str, timeout: float = 60.0):
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.eval(expr)
            if v:
                return v
            time.sleep(0.2)
        raise TimeoutError(f"{expr} still false after {timeout:.0f} s (status: {self.eval(STATUS)!r})")

    def close(self):
        self.ws.close()


STATUS = "document.getElementById('status').textContent"


@contextmanager
def chromium_page(tmp_path: Path):
    """Headless chromium on a free DevTools port (loopback), its page target's DevTools client; killed after."""
    from s3server import die_with_parent

    profile = tmp_path / "profile"
    argv = [find_browser(), "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=900,520", "about:blank"]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)
    log.close()
    devtools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        procs.stop(proc, timeout=20)


def images(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """Two of scikit-image's bundled photos (a cat, a stained tissue texture), downscaled."""
    from stylegen.data.embedded import skimage_data_dir

    d = skimage_data_dir()
    content, style = tmp_path / "cat.png", tmp_path / "texture.png"
    Image.open(d / "chelsea.png").convert("RGB").resize((300, 200)).save(content)
    Image.open(d / "ihc.png").convert("RGB").crop((0, 0, 256, 256)).save(style)
    return content, style, np.asarray(Image.open(content))


READ_RESULT = """(async () => {
  const r = await fetch(document.getElementById('result').src);
  const b = new Uint8Array(await r.arrayBuffer());
  let s = ''; for (const x of b) s += String.fromCharCode(x);
  return btoa(s);
})()"""


def result(dev: DevTools) -> np.ndarray:
    data = base64.b64decode(dev.eval(READ_RESULT))
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:40]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)


def wait_result(dev: DevTools, previous: str | None) -> str:
    """Wait for a finished result newer than ``previous`` (its blob URL); return its URL."""
    cond = ("(() => { const r = document.getElementById('result'); "
            f"return r.dataset.state === 'done' && r.src !== {json.dumps(previous or '')} ? r.src : ''; }})()")
    return dev.wait_for(cond)

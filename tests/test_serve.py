"""``stylegen serve``: request parsing and limits without Ray, then one live server (Ray Serve in a
subprocess, shared by the module) for the HTTP contract: PNG answers, controls, batching, every bad
upload (one JSON line, a 4xx, and the replica still answers the next good request), the token check,
and the metrics on Ray's export port found through Ray's Prometheus file_sd file; last, the page of the
same server in a headless chromium (tests/browser_page.py; CI installs chromium)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import struct
import sys
import time
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import browser_page
from stylegen import procs, serve
from stylegen.errors import UserError
from stylegen.metrics import SERVE_SPECS, ServeMetrics, series_names
from stylegen.raycluster import free_port

TOKEN = "serve-test-token-0123456789abcdef"
UPLOAD_CAP_MB = 1.0


# ----------------------------------------------------------------------------- images

def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def content_image(n: int = 64) -> np.ndarray:
    """A smooth, colourful scene: gradients plus a disc (so chroma varies)."""
    y, x = np.mgrid[0:n, 0:n] / (n - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.06
    r = 40 + 180 * x
    g = 60 + 120 * y + 60 * disc
    b = 200 - 150 * x * y
    return np.stack([r, g, b], -1).clip(0, 255)


def style_image(n: int = 64) -> np.ndarray:
    """High-contrast diagonal stripes in two colours."""
    y, x = np.mgrid[0:n, 0:n]
    s = ((x + y) // 6) % 2 == 0
    return np.where(s[..., None], [230, 200, 30], [20, 30, 160]).astype(float)


def bomb_png(w: int = 50_000, h: int = 50_000) -> bytes:
    """A valid PNG header claiming w x h pixels (7.5 GB decoded) with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:80]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)


def chroma(a: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB 0-255 -> (H, W, 2) Cb, Cr (BT.601, as stylegen.controls)."""
    yy = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    return np.stack([(a[..., 2] - yy) / 1.772, (a[..., 0] - yy) / 1.402], -1)


# ----------------------------------------------------------------------------- without Ray

def test_parse_request_checks_fields_before_decoding():
    good = {"content": png_bytes(content_image()), "style": png_bytes(style_image())}
    r = serve.parse_request(good, {"alpha": "0.5", "preserve_color": "on", "size": "128"})
    assert (r.alpha, r.preserve_color, r.size, r.content.size) == (0.5, True, 128, (64, 64))
    mixed = serve.parse_request({**good, "style2": good["content"]}, {"weights": "3 1"})
    assert mixed.weights == (0.75, 0.25)
    cases = [({"content": good["content"]}, {}, 400, "missing_field"),
             (good, {"alpha": "x"}, 400, "bad_field"),
             (good, {"alpha": "1.5"}, 400, "bad_field"),
             (good, {"size": "66"}, 400, "bad_field"),
             (good, {"size": "4096"}, 400, "bad_field"),
             (good, {"preserve_color": "maybe"}, 400, "bad_field"),
             (good, {"weights": "0.5,0.5"}, 400, "missing_field"),
             ({**good, "style2": good["style"]}, {"weights": "1"}, 400, "bad_field"),
             ({**good, "mask": good["style"]}, {}, 400, "missing_field"),
             ({**good, "content": good["content"][:80]}, {}, 400, "corrupt_image"),
             ({**good, "style": b"just text"}, {}, 415, "not_image"),
             ({**good, "style": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"}, {}, 415, "not_image"),
             ({**good, "content": bomb_png()}, {}, 413, "bomb"),
             ({**good, "content": b""}, {}, 400, "missing_field")]
    for files, form, status, reason in cases:
        with pytest.raises(serve.BadRequest) as e:
            serve.parse_request(files, form)
        assert (e.value.status, e.value.reason) == (status, reason), (sorted(files), form, e.value.message)


def test_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    """The pixel limit is checked on the header: decoding a 50000x50000 image would take 7.5 GB. Pillow's own
    guard (2 x MAX_IMAGE_PIXELS) refuses that one at open; ours (--max-pixels) the ones below it."""
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size))
    with pytest.raises(serve.BadRequest, match="decompression bomb") as e:
        serve.decode_image(bomb_png(), "content")
    assert e.value.status == 413 and e.value.reason == "bomb" and loads == []
    with pytest.raises(serve.BadRequest, match="claims 5000x5000 = 25,000,000 pixels") as e:
        serve.decode_image(bomb_png(5000, 5000), "content")
    assert e.value.status == 413 and e.value.reason == "bomb" and loads == []
    with pytest.raises(serve.BadRequest, match="over this server's limit of 1,000"):
        serve.decode_image(png_bytes(content_image()), "style", max_pixels=1000)


def test_error_body_is_one_json_line():
    body = serve.error_body(413, "bomb", "too many pixels")
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    assert json.loads(body) == {"error": "too many pixels", "reason": "bomb", "status": 413}


def test_check_auth():
    serve.check_auth(None, None)  # no token configured: open
    digest = serve.token_digest(TOKEN)
    serve.check_auth(f"Bearer {TOKEN}", digest)
    for header, status in ((None, 401), ("Bearer ", 401), (f"Basic {TOKEN}", 401), ("Bearer wrong", 403),
                           (f"Bearer {TOKEN}x", 403)):
        with pytest.raises(serve.BadRequest) as e:
            serve.check_auth(header, digest)
        assert e.value.status == status, header


def test_non_loopback_bind_needs_a_token(monkeypatch, tmp_path, capsys):
    """One line, exit 2, before any model or Ray is loaded."""
    from stylegen.cli import main

    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    monkeypatch.setattr(serve, "resolve_model", lambda spec: pytest.fail("checked the bind after loading"))
    for host in ("0.0.0.0", "192.0.2.10", "::"):
        assert main(["serve", "--host", host]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--host {host} is reachable from other machines" in err, err
        assert "--token-file" in err
    serve.check_bind("127.0.0.1", None)
    serve.check_bind("::1", None)
    serve.check_bind("localhost", None)
    serve.check_bind("0.0.0.0", TOKEN)
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_token_sources_and_checks(tmp_path, monkeypatch):
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    assert serve.find_serve_token(None, str(f), env={}) == TOKEN
    assert serve.find_serve_token(None, None, env={serve.TOKEN_ENV: TOKEN}) == TOKEN
    assert serve.find_serve_token(None, None, env={}) is None
    with pytest.raises(UserError, match="at least 16"):
        serve.find_serve_token("short", None, env={})
    f.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        serve.find_serve_token(None, str(f), env={})
    with pytest.raises(UserError, match="cannot be read"):
        serve.find_serve_token(None, str(tmp_path / "missing"), env={})


def test_serve_metrics_names_are_the_specs():
    from prometheus_client.parser import text_string_to_metric_families

    m = ServeMetrics.create("prometheus", run="shipped")
    m.request("/stylize", 200, 0.3)
    m.batch(3)
    m.error("bomb")
    names = {s.name for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}
    m.close()
    assert names <= series_names(SERVE_SPECS)
    assert {"stylegen_serve_request_duration_seconds_bucket", "stylegen_serve_batch_size_bucket",
            "stylegen_serve_errors_total", "stylegen_serve_requests_total"} <= names


def test_run_model_mixes_controls_in_one_batch():
    """Requests with different controls in one batch each get their own result: what alone they would get."""
    import torch

    from stylegen.loading import load_generator

    gen, _ = load_generator(None)
    files = {"content": png_bytes(content_image()), "style": png_bytes(style_image())}
    reqs = [serve.parse_request(files, form) for form in ({}, {"alpha": "0"}, {"preserve_color": "1"}, {})]
    items = [{"req": r, **serve.to_tensors(r)} for r in reqs]
    together = serve.run_model(gen, items)
    alone = [serve.run_model(gen, [it])[0] for it in items[:3]]
    for a, b in zip(together, alone):
        assert (a.int() - b.int()).abs().max() <= 1
    assert torch.equal(together[0], together[3])
    assert (together[0].int() - together[1].int()).abs().float().mean() > 5  # alpha changes the output


# ----------------------------------------------------------------------------- one live server

@contextmanager
def running_server(d: Path, name: str, extra: list[str], env_extra: dict[str, str] | None = None):
    """``stylegen serve`` with the TOKEN (on loopback too, to test it) in a subprocess that dies with pytest;
    stopped (exit 0 asserted) on leaving. Yields (base_url, ray temp dir, log path)."""
    from s3server import die_with_parent

    tok = d / "token"
    tok.write_text(TOKEN)
    tok.chmod(0o600)
    ray_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}{os.getpid()}"  # short: Ray's socket paths
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop(serve.TOKEN_ENV, None)
    log = d / "serve.log"
    proc = serve.launch(["--port", str(port), "--token-file", str(tok), "--temp-dir", str(ray_tmp), *extra],
                        env=env, log_path=log, preexec_fn=die_with_parent)
    base = f"http://127.0.0.1:{port}"
    try:
        serve.wait_ready(base, proc, timeout=300)
        yield base, ray_tmp, log
    except Exception:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        rc = procs.stop(proc, timeout=60)
        assert rc == 0, f"stylegen serve exited {rc}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The live server of this module: a 1 MiB upload cap, metrics flushed every second."""
    with running_server(tmp_path_factory.mktemp("serve"), "sgserve",
                        ["--max-upload-mb", str(UPLOAD_CAP_MB), "--batch-wait-ms", "50"],
                        {"RAY_metrics_report_interval_ms": "1000"}) as got:
        yield got


def post(base: str, files: dict[str, bytes] | None = None, data: dict[str, str] | None = None, *,
         token: str | None = TOKEN, **kw):
    import requests

    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{base}/stylize", files={k: (f"{k}.png", v) for k, v in (files or {}).items()},
                         data=data or {}, headers=headers, timeout=120, **kw)


CONTENT = png_bytes(content_image())
STYLE = png_bytes(style_image())


def assert_good(base: str) -> np.ndarray:
    r = post(base, {"content": CONTENT, "style": STYLE})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    out = decode_png(r.content)
    assert out.shape == (64, 64, 3)
    return out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stylize_returns_a_png_and_the_controls_act(server):
    base, _, _ = server
    content = content_image()
    out = assert_good(base)
    assert np.abs(out - content).mean() > 10  # stylized, not the content back
    r = post(base, {"content": CONTENT, "style": STYLE}, {"alpha": "0"})
    weak = decode_png(r.content)
    assert np.abs(weak - out).mean() > 5
    r = post(base, {"content": CONTENT, "style": STYLE}, {"preserve_color": "1"})
    kept = decode_png(r.content)
    # luminance-only transfer: the content's chroma within uint8 rounding (the stylized output's is far off)
    assert np.abs(chroma(kept) - chroma(content)).max() <= 1.5
    assert np.abs(chroma(out) - chroma(content)).mean() > 5
    r = post(base, {"content": CONTENT, "style": STYLE}, {"size": "128"})
    assert decode_png(r.content).shape == (128, 128, 3)
    mask = np.zeros((64, 64, 3))
    mask[:, 32:] = 255
    r = post(base, {"content": CONTENT, "style": STYLE, "style2": CONTENT, "mask": png_bytes(mask)})
    assert r.status_code == 200, r.text
    masked = decode_png(r.content)
    two = decode_png(post(base, {"content": CONTENT, "style": CONTENT}).content)
    # each half follows its style (the feature-space blend softens the edge: compare away from it)
    assert np.abs(masked[:, :24] - out[:, :24]).mean() < np.abs(masked[:, :24] - two[:, :24]).mean()
    assert np.abs(masked[:, 40:] - two[:, 40:]).mean() < np.abs(masked[:, 40:] - out[:, 40:]).mean()
    r = post(base, {"content": CONTENT, "style": STYLE, "style2": CONTENT}, {"weights": "1,0"})
    assert np.abs(decode_png(r.content) - out).max() <= 1  # weights 1/0 = the first style alone
    page = urllib.request.urlopen(base + "/", timeout=10)
    assert page.headers["content-type"].startswith("text/html") and b'id="result"' in page.read()


def _chunks(n: int, size: int = 64 * 1024):
    for _ in range(n):
        yield b"x" * size


BAD = [
    # (id, files, form, kwargs, status, reason)
    ("not-an-image", {"content": b"hello, not an image", "style": STYLE}, {}, {}, 415, "not_image"),
    ("eps-not-opened", {"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "style": STYLE}, {}, {},
     415, "not_image"),
    ("truncated-png", {"content": CONTENT[:80], "style": STYLE}, {}, {}, 400, "corrupt_image"),
    ("decompression-bomb", {"content": bomb_png(), "style": STYLE}, {}, {}, 413, "bomb"),
    ("too-large", {"content": os.urandom(int(UPLOAD_CAP_MB * 2**20) + 1000), "style": STYLE}, {}, {}, 413,
     "too_large"),
    ("missing-style", {"content": CONTENT}, {}, {}, 400, "missing_field"),
    ("bad-alpha", {"content": CONTENT, "style": STYLE}, {"alpha": "lots"}, {}, 400, "bad_field"),
    ("unknown-field", {"content": CONTENT, "style": STYLE}, {"evil": "1"}, {}, 400, "bad_field"),
    ("no-token", {"content": CONTENT, "style": STYLE}, {}, {"token": None}, 401, "unauthorized"),
    ("wrong-token", {"content": CONTENT, "style": STYLE}, {}, {"token": "x" * 32}, 403, "forbidden"),
]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_uploads_are_one_json_line_and_the_replica_lives_on(server):
    import requests

    base, _, _ = server
    raw = [  # bodies multipart clients would not send
        ("not-multipart", dict(data=b'{"content": 1}', headers={"Content-Type": "application/json"}), 400, "bad_form"),
        ("broken-multipart", dict(data=b"--xx\r\nContent-Disposition: form-data\r\n\r\nno end",
                                  headers={"Content-Type": "multipart/form-data; boundary=xx"}), 400, "bad_form"),
        ("too-large-chunked", dict(data=_chunks(int(UPLOAD_CAP_MB * 16) + 2),
                                   headers={"Content-Type": "multipart/form-data; boundary=xx"}), 413, "too_large"),
    ]
    results = []
    for name, files, form, kw, status, reason in BAD:
        results.append((name, post(base, files, form, **kw), status, reason))
    for name, kw, status, reason in raw:
        headers = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers")}
        results.append((name, requests.post(f"{base}/stylize", headers=headers, timeout=60, **kw), status, reason))
    results.append(("get-stylize", requests.get(f"{base}/stylize", timeout=30), 405, "method"))
    results.append(("no-route", requests.get(f"{base}/admin", timeout=30), 404, "not_found"))
    for name, r, status, reason in results:
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.headers["content-type"] == "application/json", name
        assert r.text.endswith("\n") and r.text.count("\n") == 1, (name, r.text)
        body = json.loads(r.text)
        assert body["reason"] == reason and body["status"] == status and body["error"], (name, body)
        if status == 401:
            assert r.headers.get("www-authenticate") == "Bearer"
        assert_good(base)  # the replica still answers


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_requests_are_batched(server):
    base, _, _ = server
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: post(base, {"content": CONTENT, "style": STYLE}), range(8)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    sizes = [int(r.headers["x-stylegen-batch"]) for r in rs]
    assert max(sizes) > 1, sizes
    first = decode_png(rs[0].content)
    assert all(np.abs(decode_png(r.content) - first).max() <= 1 for r in rs)  # batching does not change answers


def _scrape(targets: list[str]) -> str:
    text = []
    for t in targets:
        try:
            with urllib.request.urlopen(f"http://{t}/metrics", timeout=10) as r:
                text.append(r.read().decode())
        except OSError:
            pass
    return "\n".join(text)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_metrics_reach_rays_export_port_listed_for_prometheus(server):
    """The replica's metrics appear on a target of Ray's file_sd file (what infra/prometheus scrapes, job
    "ray"; the ray_ prefix is stripped there), with counts that match what this module sent."""
    from prometheus_client.parser import text_string_to_metric_families

    base, ray_tmp, _ = server
    assert_good(base)
    post(base, {"content": b"nope", "style": STYLE})
    discovery = ray_tmp / "prom_metrics_service_discovery.json"
    deadline, samples = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        if discovery.is_file():
            targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
            assert all(t.startswith("127.0.0.1:") for t in targets), targets  # the local Ray stays on loopback
            samples = {}
            for fam in text_string_to_metric_families(_scrape(targets)):
                for s in fam.samples:
                    if s.name.startswith("ray_stylegen_serve"):
                        key = (s.name, s.labels.get("reason", ""), s.labels.get("le", ""), s.labels.get("code", ""))
                        samples[key] = samples.get(key, 0.0) + s.value
            if ("ray_stylegen_serve_errors_total", "not_image", "", "") in samples and \
                    samples.get(("ray_stylegen_serve_batch_size_count", "", "", ""), 0) >= 1:
                break
        time.sleep(1.0)
    names = {k[0] for k in samples}
    assert {"ray_stylegen_serve_request_duration_seconds_bucket", "ray_stylegen_serve_batch_size_bucket",
            "ray_stylegen_serve_errors_total", "ray_stylegen_serve_requests_total",
            "ray_stylegen_serve_images_total"} <= names, sorted(names)
    assert {n.removeprefix("ray_") for n in names} <= series_names(SERVE_SPECS)
    assert samples[("ray_stylegen_serve_errors_total", "not_image", "", "")] >= 1
    assert samples[("ray_stylegen_serve_requests_total", "", "", "200")] >= 2


def test_submit_serve_sends_only_the_token_hash(tmp_path, monkeypatch):
    """``submit serve`` checks the bind and the token locally; the entrypoint carries the SHA-256, never the token."""
    import shlex

    from stylegen.cli import build_parser
    from stylegen.submit import serve_entrypoint

    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    tok = tmp_path / "tok"
    tok.write_text(TOKEN)
    tok.chmod(0o600)
    parse = build_parser().parse_args
    args = parse(["submit", "serve", "--http-host", "0.0.0.0", "--serve-token-file", str(tok),
                  "--checkpoint", "s3://bucket/sweeps/s1", "--replicas", "2"])
    entry, name = serve_entrypoint(args, [])
    argv = shlex.split(entry)
    assert TOKEN not in entry and name == "serve"
    assert argv[:4] == ["python", "-m", "stylegen", "serve"] and "--detach" in argv
    assert argv[argv.index("--token-sha256") + 1] == serve.token_digest(TOKEN)
    assert argv[argv.index("--checkpoint") + 1] == "s3://bucket/sweeps/s1"
    with pytest.raises(UserError, match="reachable from other machines"):
        serve_entrypoint(parse(["submit", "serve", "--http-host", "0.0.0.0"]), [])
    with pytest.raises(UserError, match="is relative"):
        serve_entrypoint(parse(["submit", "serve", "--checkpoint", "runs/best"]), [])
    loopback, _ = serve_entrypoint(parse(["submit", "serve"]), [])
    assert "--token-sha256" not in loopback
    # and the replica side accepts the hash as its token
    ns = parse(["serve", "--host", "0.0.0.0", "--token-sha256", serve.token_digest(TOKEN)])
    monkeypatch.setattr(serve, "resolve_model", lambda spec: serve.ModelRef(None))
    opts, _ = serve.options_from_args(ns)
    assert opts.token_sha256 == serve.token_digest(TOKEN)


def test_resolve_model(tmp_path):
    import shutil

    from stylegen.loading import shipped_checkpoint

    assert serve.resolve_model(None) == serve.ModelRef(None, "shipped", "")
    run = tmp_path / "run1"
    run.mkdir()
    shutil.copyfile(shipped_checkpoint(), run / "checkpoint.pt")
    for spec in (run, run / "checkpoint.pt"):
        ref = serve.resolve_model(str(spec))
        assert ref.checkpoint == str(run / "checkpoint.pt") and ref.run == "run1"
    with pytest.raises(UserError, match="not found"):
        serve.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not found"):  # neither a checkpoint nor a run/sweep with one
        serve.resolve_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- the page, in a browser

@pytest.fixture
def browser(tmp_path):
    with browser_page.chromium_page(tmp_path) as dev:
        yield dev


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_page_uploads_two_images_and_shows_the_result(server, browser, tmp_path):
    """The page in a real headless browser (Debian's chromium): pick a content and a style image through
    the file inputs, wait for the result, read the result image's bytes back from the page and check them;
    then the alpha slider and the colour toggle each bring a new, different result. A screenshot goes to
    the test's tmp dir, and to ``docs/serve-page.png`` with ``STYLEGEN_SCREENSHOT=docs/serve-page.png``."""
    dev = browser
    base, _, _ = server
    content_path, style_path, _ = browser_page.images(tmp_path)
    dev.call("Page.enable")
    dev.call("Emulation.setDeviceMetricsOverride", width=880, height=470, deviceScaleFactor=1, mobile=False)
    dev.call("Page.navigate", url=f"{base}/#token={TOKEN}")  # the fragment never reaches the server
    dev.wait_for("document.readyState === 'complete' && !!document.getElementById('content')")
    assert dev.eval("document.getElementById('token').value") == TOKEN
    dev.eval("document.getElementById('size').value = '128'")
    root = dev.call("DOM.getDocument")["root"]["nodeId"]
    for field, path in (("content", content_path), ("style", style_path)):
        node = dev.call("DOM.querySelector", nodeId=root, selector=f"#{field}")["nodeId"]
        dev.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])  # fires 'change' like a user's pick
    url = browser_page.wait_result(dev, None)
    out = browser_page.result(dev)
    assert out.shape == (128, 128, 3)
    # the content as the server crops it (cover 128x128), to compare the result with
    from stylegen.images import cover_crop

    content = np.asarray(cover_crop(Image.open(content_path).convert("RGB"), (128, 128))).astype(float)
    assert np.abs(out - content).mean() > 5, "the result is the content: nothing was stylized"
    assert "error" not in dev.eval("document.getElementById('status').className")
    shot = base64.b64decode(dev.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "serve-page.png").write_bytes(shot)
    assert Image.open(io.BytesIO(shot)).size[0] >= 800
    if os.environ.get("STYLEGEN_SCREENSHOT"):
        Path(os.environ["STYLEGEN_SCREENSHOT"]).write_bytes(shot)

    # the slider: alpha 0 is (nearly) the content's own style, a different picture
    dev.eval("(() => { const a = document.getElementById('alpha'); a.value = '0'; "
             "a.dispatchEvent(new Event('change')); })()")
    url = browser_page.wait_result(dev, url)
    weak = browser_page.result(dev)
    assert np.abs(weak - out).mean() > 5
    # the colour toggle: luminance-only transfer keeps the content's chroma
    dev.eval("(() => { const a = document.getElementById('alpha'); a.value = '1'; "
             "document.getElementById('preserve_color').click(); })()")
    browser_page.wait_result(dev, url)
    kept = browser_page.result(dev)

    assert np.abs(chroma(kept) - chroma(content)).max() <= 1.5
    assert np.abs(chroma(out) - chroma(content)).mean() > 3

    # a refused request shows the server's one-line error on the page
    dev.eval("document.getElementById('token').value = 'wrong-token-wrong-token'")
    dev.eval("document.getElementById('preserve_color').click()")
    dev.wait_for("document.getElementById('result').dataset.state === 'error'")
    assert "wrong token" in dev.eval(browser_page.STATUS)

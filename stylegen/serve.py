"""``stylegen serve``: the generator behind HTTP on Ray Serve, with a small web page.

    stylegen serve [--checkpoint CKPT|RUN|SWEEP|s3://...] [--host 127.0.0.1] [--port 8000]
                   [--token-file F] [--address RAY] [--replicas N] [--max-batch-size 8]

Routes (one deployment, :class:`StylizeServer`):

* ``GET /``: the page (``stylegen/assets/serve.html``: plain HTML + JS, no build step).
* ``POST /stylize``: multipart form, files ``content`` and ``style`` (optional ``style2`` with
  ``weights`` "0.7,0.3" to mix two styles, optional ``mask``: ``style2`` where it is white), fields
  ``alpha`` (0-1), ``preserve_color`` (0/1), ``size`` (output side, default 64) -> ``image/png``.

Requests of all clients meet in ``@serve.batch``: one model call per batch of up to
``--max-batch-size`` images (grouped by size and controls), run in a thread so the replica keeps
reading uploads meanwhile. Every bad request is a 4xx whose body is ONE JSON line
``{"error": "...", "reason": "..."}``; the replica never dies of an upload: the body is read with a
cap (Content-Length checked first), image headers are checked against ``--max-pixels`` before any
pixel is decoded, and only a fixed list of formats is opened (no EPS/ghostscript).

Bound to 127.0.0.1 by default. Any other host needs a token (``--token-file``, mode 0600, or
``$STYLEGEN_SERVE_TOKEN``; ``--token`` works but shows in ``ps``); with a token every ``POST``
needs ``Authorization: Bearer TOKEN`` (401 without, 403 wrong). Only the token's SHA-256 travels to
the replicas (``stylegen submit serve`` likewise sends only the hash), compared in constant time.

Metrics (``stylegen.metrics.ServeMetrics``, labels ``run``/``trial`` of the served model) go through
``ray.util.metrics``: each node's metrics agent exports them with a ``ray_`` prefix that
``infra/prometheus/prometheus.yml`` strips, found through Ray's file_sd file like training's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylegen import storage
from stylegen.best import resolve_model as resolve_model_path
from stylegen.checkpoint import FILENAME
from stylegen.errors import UserError
from stylegen.images import cover_crop, encode_png, to_rgb, to_uint8_tensor
from stylegen.loading import load_generator
from stylegen.metrics import ServeMetrics, _is_loopback
from stylegen.raycluster import check_token_file_mode, loopback_local_ray

log = logging.getLogger(__name__)

APP_NAME = "stylegen"
DEFAULT_PORT = 8000
TOKEN_ENV = "STYLEGEN_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
PAGE = "assets/serve.html"
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 4096 * 4096  # checked on the header, before decoding
MAX_SIZE = 512                    # largest output side a request may ask for
# Formats a replica opens: Pillow would otherwise try every plugin it has (EPS runs ghostscript).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FILE_FIELDS = ("content", "style", "style2", "mask")
TEXT_FIELDS = ("alpha", "preserve_color", "weights", "size")


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status``, a metric ``reason`` and a one-line message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


ERROR_REASONS = ("unauthorized", "forbidden", "not_found", "method", "too_large", "bad_form", "missing_field",
                 "bad_field", "not_image", "corrupt_image", "bomb", "internal")


# ----------------------------------------------------------------------------- pure parts (no Ray)

def error_body(status: int, reason: str, message: str) -> bytes:
    """One JSON line: what went wrong and the fix."""
    return (json.dumps({"error": message, "reason": reason, "status": status}) + "\n").encode()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_auth(header: str | None, digest: str | None) -> None:
    """No-op without a token; else a Bearer header whose SHA-256 equals ``digest`` (constant time)."""
    if digest is None:
        return
    if not header or not header.startswith("Bearer ") or not header[7:].strip():
        raise BadRequest(401, "unauthorized", "this server needs a token: send 'Authorization: Bearer TOKEN'")
    if not hmac.compare_digest(token_digest(header[7:].strip()), digest):
        raise BadRequest(403, "forbidden", "wrong token: send the token the server was started with")


def decode_image(data: bytes, field_name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Upload bytes -> RGB ``PIL.Image``; the size is checked on the header before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadRequest(400, "missing_field", f"'{field_name}' is empty: upload an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # header only
                w, h = im.size
                if w * h > max_pixels:
                    raise BadRequest(413, "bomb", f"'{field_name}' claims {w}x{h} = {w * h:,} pixels, over this "
                                     f"server's limit of {max_pixels:,}: downscale it first")
                if w < 1 or h < 1:
                    raise BadRequest(400, "corrupt_image", f"'{field_name}' has no pixels ({w}x{h})")
                im.seek(0)
                im.load()
                return to_rgb(ImageOps.exif_transpose(im)).copy()
    except BadRequest:
        raise
    except Image.DecompressionBombError:
        raise BadRequest(413, "bomb", f"'{field_name}' is a decompression bomb: downscale it first") from None
    except UnidentifiedImageError:
        raise BadRequest(415, "not_image", f"'{field_name}' is not an image: upload one of "
                         f"{', '.join(FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise BadRequest(400, "corrupt_image", f"'{field_name}' is corrupt or truncated ({msg}): "
                         "re-export the image") from None


@dataclass(frozen=True)
class Request:
    """A parsed ``POST /stylize``: decoded images and controls."""

    content: Any                 # PIL RGB
    style: Any
    style2: Any = None
    mask: Any = None
    alpha: float = 1.0
    preserve_color: bool = False
    weights: tuple[float, float] = (1.0, 0.0)
    size: int = 64


def _number(form: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    text = form.get(name, "").strip()
    if not text:
        return default
    try:
        v = float(text)
    except ValueError:
        raise BadRequest(400, "bad_field",
                         f"'{name}' must be a number in [{lo:g}, {hi:g}], got {text[:40]!r}") from None
    if not lo <= v <= hi:
        raise BadRequest(400, "bad_field", f"'{name}' must be in [{lo:g}, {hi:g}], got {text[:40]!r}")
    return v


def _flag(form: dict[str, str], name: str) -> bool:
    text = form.get(name, "").strip().lower()
    if text in ("", "0", "false", "off", "no"):
        return False
    if text in ("1", "true", "on", "yes"):
        return True
    raise BadRequest(400, "bad_field", f"'{name}' must be 0/1 (or true/false), got {text[:40]!r}")


def parse_request(files: dict[str, bytes], form: dict[str, str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Request:
    """Check every field, then decode the images (cheap checks first)."""
    for name in ("content", "style"):
        if name not in files:
            raise BadRequest(400, "missing_field", f"missing file field '{name}': send multipart/form-data with "
                             "content=@CONTENT.png and style=@STYLE.png")
    alpha = _number(form, "alpha", 1.0, 0.0, 1.0)
    preserve = _flag(form, "preserve_color")
    size = int(_number(form, "size", 64, 16, MAX_SIZE))
    if size % 4:
        raise BadRequest(400, "bad_field", f"'size' must be a multiple of 4 between 16 and {MAX_SIZE}, got {size}")
    weights = (1.0, 0.0)
    if form.get("weights", "").strip():
        if "style2" not in files:
            raise BadRequest(400, "missing_field", "'weights' mixes two styles: also send style2=@STYLE2.png")
        parts = form["weights"].replace(",", " ").split()
        try:
            w = tuple(float(x) for x in parts)
        except ValueError:
            w = ()
        if len(w) != 2 or min(w) < 0 or sum(w) <= 0:
            raise BadRequest(400, "bad_field", f"'weights' must be two non-negative numbers such as '0.7,0.3', "
                             f"got {form['weights'][:40]!r}")
        weights = (w[0] / sum(w), w[1] / sum(w))
    if "mask" in files and "style2" not in files:
        raise BadRequest(400, "missing_field", "'mask' picks style2 where it is white: also send style2=@STYLE2.png")
    if "style2" in files and "mask" not in files and not form.get("weights", "").strip():
        weights = (0.5, 0.5)
    imgs = {k: decode_image(v, k, max_pixels) for k, v in files.items() if k in FILE_FIELDS}
    return Request(imgs["content"], imgs["style"], imgs.get("style2"), imgs.get("mask"), alpha, preserve, weights,
                   size)


def to_tensors(req: Request) -> dict[str, Any]:
    """Crop/resize every image to (size, size): uint8 (3, S, S) tensors; the mask as float (S, S) in [0, 1]."""
    s = (req.size, req.size)
    out = {"content": to_uint8_tensor(cover_crop(req.content, s)), "style": to_uint8_tensor(cover_crop(req.style, s))}
    if req.style2 is not None:
        out["style2"] = to_uint8_tensor(cover_crop(req.style2, s))
    if req.mask is not None:
        out["mask"] = to_uint8_tensor(cover_crop(req.mask, s)).float().mean(0) / 255.0  # white = style2
    return out


# ----------------------------------------------------------------------------- model

@dataclass(frozen=True)
class ModelRef:
    """What a replica loads: a checkpoint path/URL (None = the shipped model) and its labels."""

    checkpoint: str | None
    run: str = "shipped"
    trial: str = ""


def resolve_model(spec: str | None) -> ModelRef:
    """``--checkpoint`` as ``stylegen stylize`` reads it: a checkpoint file, a dir holding ``checkpoint.pt``, a run
    dir (its newest) or a Tune sweep dir (its best checkpoint by val_score, as ``stylegen best``), local or
    ``s3://...``; None = the shipped model. The labels: the run (or sweep) name and the trial."""
    if spec is None:
        return ModelRef(None)
    base = spec.rstrip("/")
    if base.endswith("/" + FILENAME) or base == FILENAME:
        base = base.rsplit("/", 1)[0] if "/" in base else "."
    name = storage.name(base) if storage.is_remote(base) else Path(base).resolve().name
    checkpoint, trial = resolve_model_path(spec)
    return ModelRef(checkpoint, run=name, trial=trial)


def run_model(gen, items: list[dict[str, Any]]) -> list[Any]:
    """Stylize a batch of requests (``to_tensors`` dicts plus their ``Request`` under "req"): one
    ``controls.stylize_batch`` call per group of equal controls (it batches equal sizes in one model
    call). Returns uint8 (3, S, S) tensors in the order of ``items``."""
    from stylegen.controls import Controls, stylize_batch  # lazy: torch; not for `stylegen --help`

    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        r: Request = it["req"]
        two, masked = "style2" in it, "mask" in it
        key = (r.alpha, r.preserve_color, r.weights if two and not masked else None, masked)
        groups.setdefault(key, []).append(i)
    out: list[Any] = [None] * len(items)
    for (alpha, preserve, weights, masked), idx in groups.items():
        batch = [items[i] for i in idx]
        controls = Controls(alpha=alpha, preserve_color=preserve, weights=weights)
        styles = [[b["style"], b["style2"]] if "style2" in b else [b["style"]] for b in batch]
        masks = [b["mask"] for b in batch] if masked else None
        for i, res in zip(idx, stylize_batch(gen, [b["content"] for b in batch], styles, controls, masks),
                          strict=True):
            out[i] = res
    return out


# ----------------------------------------------------------------------------- the deployment

def page_html() -> bytes:
    import importlib.resources

    return importlib.resources.files("stylegen").joinpath(PAGE).read_bytes()


@dataclass
class ServerOptions:
    """What the replica needs; picklable (only the token's hash, never the token)."""

    model: ModelRef = field(default_factory=lambda: ModelRef(None))
    token_sha256: str | None = None
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    max_pixels: int = DEFAULT_MAX_PIXELS
    torch_threads: int = 1
    metrics_backend: str = "ray"


class StylizeServer:
    """The Serve deployment (made one in :func:`build_app`). ``__call__`` gets every HTTP request."""

    def __init__(self, opts: ServerOptions):
        import torch
        from ray import serve

        torch.set_num_threads(max(1, opts.torch_threads))
        self.opts = opts
        self.gen, _ = load_generator(opts.model.checkpoint)
        self.page = page_html()
        self.metrics = ServeMetrics.create(opts.metrics_backend, run=opts.model.run, trial=opts.model.trial)

        async def infer(items: list[dict[str, Any]]) -> list[Any]:  # a closure: serve.batch keeps its queue on it
            self.metrics.batch(len(items))
            out = await asyncio.to_thread(run_model, self.gen, items)
            return [(o, len(items)) for o in out]

        self._infer = serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_s)(infer)
        log.info("stylegen serve replica ready: model %s (run %s, trial %s), batches of up to %d",
                 opts.model.checkpoint or "shipped", opts.model.run, opts.model.trial or "-", opts.max_batch_size)

    async def __call__(self, request):
        from starlette.responses import Response

        t0 = time.perf_counter()
        path, method = request.url.path.rstrip("/") or "/", request.method
        route = path if path in ("/", "/stylize") else "other"
        try:
            if path == "/" and method in ("GET", "HEAD"):
                resp = Response(self.page, media_type="text/html; charset=utf-8",
                                headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
            elif path == "/stylize" and method == "POST":
                png, batch = await self._stylize(request)
                resp = Response(png, media_type="image/png", headers={"X-Stylegen-Batch": str(batch)})
            elif path in ("/", "/stylize"):
                raise BadRequest(405, "method", f"{method} {path} is not allowed: GET / is the page, "
                                 "POST /stylize stylizes")
            else:
                raise BadRequest(404, "not_found", f"no route {path[:80]!r}: GET / is the page, POST /stylize stylizes")
        except BadRequest as e:
            self.metrics.error(e.reason)
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
            resp = Response(error_body(e.status, e.reason, e.message), status_code=e.status,
                            media_type="application/json", headers=headers)
        except Exception as e:  # a bug, not the client's fault: one line, and the replica lives on
            log.exception("POST %s failed", path)
            self.metrics.error("internal")
            resp = Response(error_body(500, "internal", f"internal error ({type(e).__name__}); see the server log"),
                            status_code=500, media_type="application/json")
        self.metrics.request(route, resp.status_code, time.perf_counter() - t0)
        return resp

    async def _stylize(self, request) -> tuple[bytes, int]:
        """PNG bytes and the size of the batch the request was stylized in."""
        check_auth(request.headers.get("authorization"), self.opts.token_sha256)
        files, form = await self._read_form(request)
        req = parse_request(files, form, self.opts.max_pixels)
        item = {"req": req, **to_tensors(req)}
        out, batch = await self._infer(item)
        self.metrics.images(1)
        return encode_png(out), batch

    async def _read_form(self, request) -> tuple[dict[str, bytes], dict[str, str]]:
        """The body, read with a cap, parsed as multipart/form-data."""
        from starlette.datastructures import UploadFile
        from starlette.requests import Request as StarletteRequest

        cap = self.opts.max_upload_bytes
        too_big = BadRequest(413, "too_large", f"upload over this server's limit of {cap / 2**20:.1f} MiB: send "
                             "smaller images (the model works at 64x64)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise too_big
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequest(400, "bad_form", "send multipart/form-data (curl -F content=@a.png -F style=@b.png)")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > cap:
                raise too_big
            chunks.append(chunk)
        body = b"".join(chunks)
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            parsed = await StarletteRequest(request.scope, receive).form(max_files=len(FILE_FIELDS),
                                                                         max_fields=len(TEXT_FIELDS) + 4,
                                                                         max_part_size=cap)
        except Exception as e:  # starlette's MultiPartException, HTTPException, python-multipart errors
            detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e) or type(e).__name__
            raise BadRequest(400, "bad_form", f"malformed multipart body ({str(detail)[:100]}): send "
                             "multipart/form-data with content and style files") from None
        files: dict[str, bytes] = {}
        form: dict[str, str] = {}
        try:
            for key, value in parsed.multi_items():
                if key in files or key in form:
                    raise BadRequest(400, "bad_field", f"field '{key[:40]}' sent twice: send each field once")
                if isinstance(value, UploadFile):
                    if key not in FILE_FIELDS:
                        raise BadRequest(400, "bad_field", f"unexpected file field '{key[:40]}': files are "
                                         f"{', '.join(FILE_FIELDS)}")
                    files[key] = await value.read()
                elif key in FILE_FIELDS:
                    raise BadRequest(400, "bad_field", f"'{key}' must be a file upload (curl -F {key}=@FILE)")
                elif key in TEXT_FIELDS:
                    form[key] = value
                else:
                    raise BadRequest(400, "bad_field", f"unknown field '{key[:40]}': fields are "
                                     f"{', '.join(FILE_FIELDS + TEXT_FIELDS)}")
        finally:
            await parsed.close()
        return files, form


def build_app(opts: ServerOptions, *, replicas: int = 1, num_cpus: float = 1.0):
    """The Serve application: one ``StylizeServer`` deployment, replicas with ``num_cpus`` each."""
    from ray import serve

    dep = serve.deployment(StylizeServer, name="StylizeServer", num_replicas=replicas,
                           ray_actor_options={"num_cpus": num_cpus},
                           max_ongoing_requests=max(16, 4 * opts.max_batch_size))
    return dep.bind(opts)


# ----------------------------------------------------------------------------- CLI

def find_serve_token(args_token: str | None, token_file: str | None, env: dict[str, str] | None = None) -> str | None:
    """--token-file (mode 0600), else --token, else $STYLEGEN_SERVE_TOKEN; None when none is given."""
    env = os.environ if env is None else env
    token, where = None, ""
    if token_file:
        p = Path(token_file).expanduser()
        try:
            token = p.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"--token-file {token_file!r} cannot be read ({e.strerror or type(e).__name__}); "
                            "pass a readable file holding the token") from None
        check_token_file_mode(p)
        where = f"--token-file {token_file!r}"
    elif args_token:
        token, where = args_token.strip(), "--token"
        log.warning("--token shows in the process list: prefer --token-file or $%s", TOKEN_ENV)
    elif env.get(TOKEN_ENV, "").strip():
        token, where = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"the token from {where} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                        "random ones (e.g. `openssl rand -hex 32`)")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token."""
    loopback = host == "localhost" or _is_loopback(host)
    if not loopback and token is None:
        raise UserError(f"--host {host} is reachable from other machines and no token is set: pass --token-file F "
                        f"(or set ${TOKEN_ENV}) so POST /stylize needs 'Authorization: Bearer TOKEN', "
                        "or bind --host 127.0.0.1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT|RUN|SWEEP",
                   help="checkpoint.pt, a dir holding one, a train run or a sweep (its best checkpoint), local or "
                        "s3://... (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--token-file", metavar="F", help="file (mode 0600) holding the bearer token POST /stylize needs")
    p.add_argument("--token", help=f"the bearer token itself (visible in ps: prefer --token-file or ${TOKEN_ENV})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (GCS address; default $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica; also its torch threads (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per model call (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits to fill up (default 10 ms)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest request body (default {DEFAULT_MAX_UPLOAD_MB:g} MiB)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image (width x height, read from its header; default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--temp-dir", default=None, help="temp dir of the local Ray (default Ray's, /tmp/ray)")
    p.add_argument("--detach", action="store_true",
                   help="deploy and exit, leaving the app running on the cluster (needs --address; used by submit)")
    p.add_argument("--token-sha256", default=None, help=argparse.SUPPRESS)  # from `stylegen submit serve`


def options_from_args(args: argparse.Namespace) -> tuple[ServerOptions, str | None]:
    """Validate the arguments (before Ray starts); returns the options and the token."""
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is out of range: use 1-65535")
    if args.replicas < 1 or args.max_batch_size < 1 or args.num_cpus <= 0:
        raise UserError("--replicas, --max-batch-size and --num-cpus must be positive")
    if not 0 <= args.batch_wait_ms <= 10_000 or args.max_upload_mb <= 0 or args.max_pixels < 256:
        raise UserError("--batch-wait-ms must be in [0, 10000], --max-upload-mb > 0 and --max-pixels >= 256")
    token = find_serve_token(args.token, args.token_file)
    digest = args.token_sha256 or (token_digest(token) if token else None)
    if args.token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", args.token_sha256):
        raise UserError("--token-sha256 must be 64 lowercase hex digits")
    check_bind(args.host, token or args.token_sha256)
    model = resolve_model(args.checkpoint)
    if model.checkpoint is not None or args.checkpoint is None:  # loads here first: a bad file is one line now
        load_generator(model.checkpoint)
    opts = ServerOptions(model=model, token_sha256=digest, max_batch_size=args.max_batch_size,
                         batch_wait_s=args.batch_wait_ms / 1000.0, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_pixels=args.max_pixels, torch_threads=max(1, int(args.num_cpus)))
    return opts, token


def _check_port_free(host: str, port: int) -> None:
    import socket

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None


def start_ray(address: str | None, temp_dir: str | None) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray on 127.0.0.1 (token auth on by default,
    the dashboard on loopback: it writes the Prometheus file_sd file)."""
    import ray

    root = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}}
    address = address or os.environ.get("RAY_ADDRESS", "")
    try:
        if address:  # replicas use the cluster's stylegen, or a job's working_dir (submit serve): its runtime_env
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # workers import this checkout as the driver does
            ray.init(runtime_env=env, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                     logging_level=logging.WARNING, _temp_dir=temp_dir, log_to_driver=False)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {address!r} ({str(e).splitlines()[0][:120]}); "
                        "check --address / RAY_ADDRESS and that the cluster is up") from None


# ----------------------------------------------------------------------------- a server in a subprocess

def launch(argv: list[str], *, env: dict[str, str] | None = None, log_path: str | Path | None = None,
           preexec_fn=None):
    """``stylegen serve ARGV`` in a child process (tests, benchmarks); stop it with ``stylegen.procs.stop(proc, 60)``
    (SIGTERM: the server shuts Serve and its local Ray down)."""
    import subprocess

    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "stylegen", "serve", *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec_fn)
    finally:
        if log_path:
            out.close()


def wait_ready(base_url: str, proc, timeout: float = 240.0) -> float:
    """Block until ``GET base_url/`` answers 200 (the app is deployed); seconds waited. Raises if the
    process exits first or the time runs out."""
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"stylegen serve exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base_url + "/", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"stylegen serve at {base_url} not ready after {timeout:.0f} s")


def run(args: argparse.Namespace) -> int:
    opts, _ = options_from_args(args)
    remote = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if args.detach and not remote:
        raise UserError("--detach leaves the app on a running cluster: pass --address (or set RAY_ADDRESS)")
    if not remote:
        _check_port_free(args.host, args.port)
        loopback_local_ray()
    import ray
    from ray import serve

    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        start_ray(args.address, args.temp_dir)
        # after ray.init, which installs its own SIGTERM handler
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(opts, replicas=args.replicas, num_cpus=args.num_cpus), name=APP_NAME, route_prefix="/")
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"stylegen serve: http://{host}:{args.port}/  (POST /stylize; "
              f"{'token required' if opts.token_sha256 else 'no token'}; Ctrl-C stops it)", flush=True)
        if args.detach:
            return 0
        while not stop.wait(0.5):
            pass
        log.info("stopping")
        if remote:
            serve.delete(APP_NAME)  # a shared cluster keeps Serve (and other apps) running
        else:
            serve.shutdown()
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if ray.is_initialized():
            ray.shutdown()

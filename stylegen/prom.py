"""``stylegen prometheus``: run a Prometheus server on loopback with ``infra/prometheus``'s config.

The config is rendered into the data dir first (rule files made absolute, optional overrides
such as Ray's service-discovery file or the scrape interval), then ``prometheus`` runs in the
foreground with list arguments (no shell). The same helpers start the Prometheus of the live
tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from stylegen.errors import UserError
from stylegen.procs import stop
from stylegen.storage import write_bytes

log = logging.getLogger(__name__)

INSTALL_HINT = ("install it: `sudo apt-get install prometheus` (Debian/Ubuntu; ships promtool too), "
                "or put the prometheus binary from https://prometheus.io/download/ on PATH")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "prometheus" / "prometheus.yml"


def find_binary(name: str = "prometheus") -> str:
    """Absolute path of ``name`` on PATH, else a UserError saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise UserError(f"'{name}' not found on PATH: {INSTALL_HINT}")
    return path


def load_config(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UserError(f"Prometheus config {path} not found: pass --config-file PATH "
                        "(the repository ships infra/prometheus/prometheus.yml)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({e}): fix the file or pass another --config-file") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a Prometheus config (expected a mapping at the top)")
    return cfg


def render_config(cfg: dict[str, Any], base_dir: Path, *, scrape_interval: str | None = None,
                  local_targets: list[str] | None = None, targets_files: list[str] | None = None,
                  ray_discovery_file: str | None = None, sd_refresh_interval: str | None = None) -> dict[str, Any]:
    """A copy of ``cfg`` whose relative paths are absolute (against ``base_dir``), with overrides.

    ``local_targets``/``targets_files`` replace the static targets / file_sd files of job
    ``stylegen``; ``ray_discovery_file`` replaces the file_sd file of job ``ray``;
    ``sd_refresh_interval`` sets how often every file_sd file is re-read.
    """
    out = copy.deepcopy(cfg)

    def absolute(p: str) -> str:
        return p if Path(p).is_absolute() else str(base_dir / p)

    out["rule_files"] = [absolute(p) for p in out.get("rule_files") or []]
    if scrape_interval is not None:
        out.setdefault("global", {}).update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    for job in out.get("scrape_configs") or []:
        name = job.get("job_name")
        if name == "stylegen" and local_targets is not None:
            job["static_configs"] = [{"targets": list(local_targets)}] if local_targets else []
        if name == "stylegen" and targets_files is not None:
            job["file_sd_configs"] = [{"files": list(targets_files)}]
        if name == "ray" and ray_discovery_file is not None:
            for sd in job.get("file_sd_configs") or []:
                sd["files"] = [ray_discovery_file]
        for sd in job.get("file_sd_configs") or []:
            sd["files"] = [absolute(f) for f in sd.get("files") or []]
            if sd_refresh_interval is not None:
                sd["refresh_interval"] = sd_refresh_interval
    return out


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    """Write ``cfg`` as YAML atomically (a private temp file + rename: storage.write_bytes)."""
    import yaml

    write_bytes(path, yaml.safe_dump(cfg, sort_keys=False).encode())
    return path


def write_targets_file(path: Path, targets: list[str], labels: dict[str, str] | None = None) -> Path:
    """A file_sd targets file (JSON), written atomically so Prometheus never reads half of it."""
    write_bytes(path, json.dumps([{"targets": targets, "labels": labels or {}}]).encode(), fsync=False)
    return path


def check_data_dir(data_dir: Path) -> None:
    """Refuse a --data-dir Prometheus could not use before writing its config into it (Prometheus would
    otherwise start, fail on its TSDB and leave the rendered config behind)."""
    blocker = next((a for a in [data_dir, *data_dir.parents] if a.exists()), None)
    if blocker is None or not blocker.is_dir():
        where = "is a file" if blocker == data_dir else f"is under a file ({str(blocker)!r})"
        raise UserError(f"--data-dir {str(data_dir)!r} {where}; pass a writable directory")
    for sub, kind in (("tsdb", "a directory"), ("prometheus.yml", "a file")):
        p = data_dir / sub
        if p.exists() and p.is_dir() != (kind == "a directory"):
            raise UserError(f"--data-dir {str(data_dir)!r}: {str(p)!r} is not {kind} (Prometheus writes it); "
                            "pass another --data-dir")
    for d in (blocker, data_dir / "tsdb"):
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            raise UserError(f"--data-dir {str(data_dir)!r}: {str(d)!r} is not writable; pass a writable --data-dir")


def prometheus_argv(binary: str, config_file: Path, data_dir: Path, *, host: str = "127.0.0.1",
                    port: int = 9090) -> list[str]:
    return [binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address={host}:{port}"]


def start(config_file: Path, data_dir: Path, *, port: int, host: str = "127.0.0.1",
          log_file: Path | None = None) -> subprocess.Popen:
    """Start prometheus in the background; the caller stops it (``terminate``/``wait``)."""
    argv = prometheus_argv(find_binary("prometheus"), config_file, data_dir, host=host, port=port)
    out = open(log_file, "ab") if log_file is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        if log_file is not None:
            out.close()


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Block until ``base_url/-/ready`` answers 200; raise if prometheus exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"prometheus at {base_url} not ready after {timeout:.0f} s")


def query(base_url: str, promql: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Instant query through the HTTP API; returns ``data.result``."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed: {body}")
    return body["data"]["result"]


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG,
                   help="Prometheus config (default: infra/prometheus/prometheus.yml)")
    p.add_argument("--port", type=int, default=9090, help="web/API port on 127.0.0.1 (default 9090)")
    p.add_argument("--data-dir", type=Path, default=Path("runs/prometheus"),
                   help="TSDB and rendered config (default runs/prometheus)")
    p.add_argument("--ray-discovery-file", default=None,
                   help="Ray's prom_metrics_service_discovery.json when Ray runs with another --temp-dir "
                        "(default: the config's, /tmp/ray/...)")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is out of range: use 1-65535")
    data_dir = args.data_dir.resolve()
    check_data_dir(data_dir)
    binary = find_binary("prometheus")
    src = args.config_file.resolve()
    cfg = render_config(load_config(src), src.parent, ray_discovery_file=args.ray_discovery_file)
    try:
        config_file = write_config(cfg, data_dir / "prometheus.yml")
    except OSError as e:
        raise UserError(f"cannot write {str(data_dir / 'prometheus.yml')!r} ({e.strerror or type(e).__name__}); "
                        "pass a writable --data-dir") from None
    argv = prometheus_argv(binary, config_file, data_dir, port=args.port)
    print(f"Prometheus: http://127.0.0.1:{args.port}  (config {config_file}, Ctrl-C stops it)", flush=True)
    log.debug("running %s", argv)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    # SIGTERM to us stops prometheus too (instead of orphaning it); Ctrl-C reaches both anyway
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)

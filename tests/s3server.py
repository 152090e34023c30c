"""A real S3-compatible server on 127.0.0.1 for the object-storage tests (moto's server mode).

It runs as its own process (``python -m moto.server``), so the test process keeps no server
thread and Ray workers in other processes reach it over HTTP like any S3 endpoint. Import the
fixtures into a test module: ``from s3server import s3, s3_server  # noqa: F401``. Below them: what
the Ray tests on s3:// share (shards of generated images on a bucket, a `stylegen` subprocess, a listing).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylegen import procs
from stylegen.data.shard import ShardParams, build_shards, verify
from stylegen.raycluster import free_port
from tiny import ROOT

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def refusing_port():
    """A loopback port that refuses every connection for as long as the block runs.

    The socket stays bound without listening, so nothing else on the machine can take the
    port (a bare ``free_port()`` can be handed to another test's server in the meantime: under
    pytest-xdist one CI run got a 403 from a stranger instead of "unreachable").
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def client_env(endpoint: str) -> dict[str, str]:
    """What a client process needs to reach the server at endpoint."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to reach the server."""
        return client_env(self.endpoint)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL (a killed
    pytest would otherwise leave the server running; Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_server(port: int | None = None, log_path: str | None = None,
                 free_requests: int | None = None) -> tuple[subprocess.Popen, str]:
    """``free_requests``: after that many unauthenticated requests the server checks credentials
    (moto's IAM auth: the dummy keys are then refused with AccessDenied, as wrong keys on S3)."""
    port = port or free_port()
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    env = {**os.environ, **CREDENTIALS}
    if free_requests is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(free_requests)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("moto server did not start within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    procs.stop(proc, timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    proc, endpoint = start_server()
    yield endpoint
    stop_server(proc)


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """A fresh bucket on the shared server; this process's env points S3 clients at it."""
    for k, v in client_env(s3_server).items():
        monkeypatch.setenv(k, v)
    box = S3(endpoint=s3_server, bucket=f"sg-{uuid.uuid4().hex[:12]}")
    box.client().create_bucket(Bucket=box.bucket)
    return box


# ----------------------------------------------------------------------------- for the Ray tests on s3://

def images(d: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, 3)
        yy, xx = np.mgrid[0:72, 0:72]
        arr = (base + np.stack([xx * (i + 1), yy, xx + yy], -1) + rng.integers(0, 30, (72, 72, 3))) % 256
        Image.fromarray(arr.astype(np.uint8)).save(d / f"im{i:03d}.png")
    return d


def run(args: list[str], env: dict, log: Path, timeout: float,
        during: Callable[[subprocess.Popen], None] | None = None) -> subprocess.CompletedProcess:
    """A stylegen command in its own process group; the group is killed if it outlives ``timeout`` (or if
    ``during(process)``, called once it started, raises)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stylegen", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if during is not None:
                during(proc)
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                procs.kill_group(proc.pid)
                proc.wait()
    return subprocess.CompletedProcess(args, rc, log.read_text(errors="replace"), "")


def objects(bucket: S3, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        resp = bucket.client().list_objects_v2(Bucket=bucket.bucket, Prefix=prefix, **kw)
        out += [o["Key"] for o in resp.get("Contents", [])]
        token = resp.get("NextContinuationToken")
        if not token:
            return out


def shard_inputs(tmp_path: Path, s3: S3) -> list[str]:
    params = ShardParams(encoding="raw", shard_size=8, val_fraction=0.25)
    c, s = s3.url("shards", "content"), s3.url("shards", "style")
    build_shards([str(images(tmp_path / "content", 24, 0))], c, params, workers=1, progress=False)
    build_shards([str(images(tmp_path / "style", 16, 1))], s, params, workers=1, progress=False)
    for url in (c, s):
        assert verify(url)[2] == []
    return [f"data.content=['{c}']", f"data.style=['{s}']"]

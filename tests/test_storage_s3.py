"""The storage layer against a real S3 server (moto, on 127.0.0.1): shards, manifests, checkpoints,
sweeps and every bad-input path, without Ray. The Ray chain is in test_s3_ray.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s3server import S3, die_with_parent, refusing_port, s3, s3_server  # noqa: F401  (fixtures)
from stylegen import storage
from stylegen.checkpoint import load_checkpoint, save_checkpoint
from stylegen.config import DataConfig, StorageConfig
from stylegen.data import shardio
from stylegen.data.loader import build_loader, load_pairs, resolve_shards
from stylegen.data.shard import ShardParams, build_shards, verify
from stylegen.errors import UserError
from stylegen.raycluster import free_port
from tiny import ROOT

RAW = ShardParams(encoding="raw", shard_size=6, val_fraction=0.25)


def images(d: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(d / f"img{i:03d}.png")
    return d


def keys(bucket: S3, prefix: str = "") -> list[str]:
    resp = bucket.client().list_objects_v2(Bucket=bucket.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []) if not o["Key"].endswith("/"))  # no dir markers


def cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


@contextlib.contextmanager
def fault_proxy(s3: S3, counter: Path, every: int, always: str | None = None):
    """tests/faultproxy.py in front of the S3 server; yields its endpoint URL."""
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("faultproxy.py")),
                              s3.endpoint.rsplit(":", 1)[1], str(port), str(every), str(counter),
                              *([always] if always else [])], preexec_fn=die_with_parent)
    try:
        for _ in range(100):  # wait for it to listen
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


# ----------------------------------------------------------------------------- storage layer

def test_write_is_atomic_and_listing_sees_only_complete_objects(s3):
    url = s3.url("a", "x.bin")
    storage.write_bytes(url, b"0123456789")
    assert storage.read_bytes(url) == b"0123456789"
    assert storage.list_files(s3.url("a")) == [url]
    assert keys(s3) == ["a/x.bin"]  # the temp object is gone after the copy
    with pytest.raises(OSError):
        storage.write_bytes("s3://sg-no-such-bucket-zz/x.bin", b"data", StorageConfig(retries=1))
    assert keys(s3) == ["a/x.bin"]


def test_remote_and_local_paths_join_and_classify():
    assert storage.join("s3://b/p/", "x.tar") == "s3://b/p/x.tar"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.is_remote("gs://b/p") and storage.is_remote("https://h/x.tar")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("runs/ray")
    path, fs = storage.ray_storage("s3://bkt/runs")
    assert path == "bkt/runs" and fs.type_name == "s3"


def test_transient_errors_are_retried_then_raised(monkeypatch):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate (503)")
        return b"ok"
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    assert storage.retry(flaky, "s3://b/k", attempts=5) == b"ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("Path does not exist 'b/k'")
    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "s3://b/k", attempts=5)
    assert len(calls) == 1  # not transient: no retry



@pytest.mark.parametrize("port", [40312, 24013, 50399, 45001])
def test_an_endpoint_port_is_not_read_as_a_status_code(port):
    """pyarrow's message names the endpoint: a port holding 403 or 401 once made "connection refused"
    read as "access denied" (a flaky CI failure), one holding 500/503 made it transient."""
    down = OSError("When getting information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                   "HeadObject operation: curlCode: 7, Could not connect to server; Details: Failed to connect to "
                   f"127.0.0.1:{port} after 0 ms: Could not connect to server (http://127.0.0.1:{port}/b/x)")
    assert "endpoint unreachable" in storage.explain(down, "s3://b/x")
    assert not storage._transient(down)
    assert storage.status_codes(str(down).lower()) == set()
    # real status codes still count, in pyarrow's and urllib's wording
    denied = OSError(f"AWS Error UNKNOWN (HTTP status 403) during HeadObject operation (http://127.0.0.1:{port})")
    assert "access denied" in storage.explain(denied, "s3://b/x")
    assert storage._transient(OSError(f"HTTP status 503 from 127.0.0.1:{port}"))
    assert "not found" in storage.explain(OSError("HTTP Error 404: Not Found"), "https://h/x")


# ----------------------------------------------------------------------------- shards

def test_shard_to_s3_verify_and_load_same_batches_as_local(tmp_path, s3):
    src = images(tmp_path / "src", 20)
    out = s3.url("shards", "c")
    remote = build_shards([str(src)], out, RAW, workers=1, progress=False)
    local = build_shards([str(src)], tmp_path / "local", RAW, workers=1, progress=False)
    assert remote.samples == local.samples and sum(remote.samples.values()) == 20
    names = keys(s3, "shards/c/")
    assert "shards/c/manifest.parquet" in names and "shards/c/skipped.parquet" in names
    assert not [k for k in names if k.rsplit("/", 1)[-1].startswith(".")]  # no temp objects left
    assert not Path("s3:").exists()  # nothing written to a local dir named like the URL
    shards, samples, problems = verify(out)
    assert (shards, samples, problems) == (sum(remote.shards.values()), 20, [])
    assert resolve_shards([out], "train") == [storage.join(out, f) for f in
                                             sorted(p.name for p in (tmp_path / "local").glob("train-*.tar"))]
    cfg = DataConfig(batch_size=4, steps_per_epoch=5, shuffle_shards=2, hflip=False)
    a = [(c.clone(), s.clone()) for c, s in build_loader(DataConfig(**{**cfg.__dict__, "content": [out]}),
                                                         rank=0, world_size=1)]
    b = [(c.clone(), s.clone()) for c, s in build_loader(DataConfig(**{**cfg.__dict__,
                                                                        "content": [str(tmp_path / "local")]}),
                                                         rank=0, world_size=1)]
    assert len(a) == 5 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    vc, _ = load_pairs(DataConfig(content=[out]), 3)
    lc, _ = load_pairs(DataConfig(content=[str(tmp_path / "local")]), 3)
    assert torch.equal(vc, lc)


def test_shard_rerun_on_s3_keeps_matching_shards_and_rebuilds_a_tampered_one(tmp_path, s3):
    src = images(tmp_path / "src", 14)
    out = s3.url("shards")
    first = build_shards([str(src)], out, RAW, workers=1, progress=False)
    rows, _ = shardio.read_manifest(out)
    victim = rows[0]["file"]
    storage.write_bytes(storage.join(out, victim), b"garbage")
    assert any(f == victim for f, _ in verify(out)[2])
    again = build_shards([str(src)], out, RAW, workers=1, progress=False)
    assert again.kept == sum(first.shards.values()) - 1
    assert verify(out)[2] == []


def test_shard_cli_to_s3_and_verify_problems(tmp_path, s3):
    src = images(tmp_path / "src", 8)
    out = s3.url("cli")
    r = cli("shard", str(src), "--out", out, "--encoding", "raw", "--no-progress", env=s3.env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out in r.stdout and not (tmp_path / "s3:").exists()
    r = cli("shard", "verify", out, env=s3.env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    first = storage.list_files(out, "*.tar")[0]
    data = storage.read_bytes(first)
    storage.write_bytes(first, data[: len(data) // 2])  # a truncated object
    r = cli("shard", "verify", out, env=s3.env)
    assert r.returncode != 0 and storage.name(first) in r.stdout
    assert r.stderr.strip().count("\n") == 0 and "failed verification" in r.stderr


# ----------------------------------------------------------------------------- bad input: one line each

@pytest.mark.parametrize("case", ["missing_bucket", "endpoint_down", "gs_no_credentials"])
def test_unreachable_storage_is_one_line_before_any_work(tmp_path, s3, case):
    src = images(tmp_path / "src", 3)
    env = dict(s3.env)
    if case == "missing_bucket":
        out, expect = "s3://sg-no-such-bucket-zz/shards", "bucket does not exist"
    elif case == "endpoint_down":
        out, expect = s3.url("shards"), "endpoint unreachable"
    else:
        env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "none.json"), STORAGE_EMULATOR_HOST="")
        out, expect = "gs://sg-bucket/shards", "gs://sg-bucket/shards"
    with refusing_port() as dead:
        if case == "endpoint_down":
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{dead}"
        for args in (["shard", str(src), "--out", out, "--no-progress"], ["shard", "verify", out],
                     ["best", out]):
            r = cli(*args, env=env, cwd=tmp_path)
            err = r.stderr.strip()
            assert r.returncode != 0 and "Traceback" not in err, (args, err)
            assert len(err.splitlines()) == 1 and expect in err, (args, err)
    assert not list(tmp_path.glob("s3*")) and not list(tmp_path.glob("gs*"))


def test_loader_skips_and_counts_a_deleted_and_a_truncated_shard(tmp_path, s3):
    src = images(tmp_path / "src", 24)
    out = s3.url("shards")
    build_shards([str(src)], out, ShardParams(encoding="raw", shard_size=4, val_fraction=0.0), workers=1,
                 progress=False)
    tars = storage.list_files(out, "train-*.tar")
    storage.delete(tars[0])  # deleted mid-run: the manifest still names it
    data = storage.read_bytes(tars[1])
    storage.write_bytes(tars[1], data[:700])  # truncated object
    loader = build_loader(DataConfig(content=[out], batch_size=4, steps_per_epoch=6, shuffle_shards=1, hflip=False),
                          rank=0, world_size=1, storage_cfg=StorageConfig(retries=1))
    assert len(list(loader)) == 6
    assert loader.skipped >= 2


def test_loader_on_missing_bucket_is_one_line(s3):
    with pytest.raises(UserError, match="bucket does not exist"):
        resolve_shards(["s3://sg-no-such-bucket-zz/shards"], "train")


# ----------------------------------------------------------------------------- checkpoints and sweeps

def test_checkpoint_on_s3_loads_safely_and_stylize_reads_it(tmp_path, s3):
    from stylegen.config import Config, to_dict
    from stylegen.models.generator import Generator

    cfg = Config()
    cfg.model.channels, cfg.model.res_blocks = 4, 1
    gen = Generator(cfg.model)
    local = save_checkpoint(tmp_path / "ck", {"step": 3, "config": to_dict(cfg), "generator": gen.state_dict(),
                                              "discriminator": None, "opt_g": {}, "opt_d": None, "metrics": {}})
    url = s3.url("runs", "r1", "checkpoints", "step_00000003", "checkpoint.pt")
    storage.write_bytes(url, local.read_bytes())
    assert load_checkpoint(s3.url("runs", "r1"))["step"] == 3  # a run prefix: its newest step
    images(tmp_path / "in", 2)
    r = cli("stylize", "--checkpoint", s3.url("runs", "r1"), "--content", str(tmp_path / "in" / "img000.png"),
            "--style", str(tmp_path / "in" / "img001.png"), "--out", str(tmp_path / "out.png"), env=s3.env)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size[0] > 0
    r = cli("eval", "--checkpoint", url, "--features", "random", "--gatys-steps", "0", "--pairs", "1",
            "--json", str(tmp_path / "eval.json"), env=s3.env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "eval.json").stat().st_size > 0
    storage.write_bytes(s3.url("bad", "checkpoint.pt"), b"\x80\x04not a zip")
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        load_checkpoint(s3.url("bad"))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(s3.url("nothing-here"))


def test_a_ray_run_prefix_resolves_to_its_newest_step(s3, tmp_path):
    from stylegen.checkpoint import resolve_checkpoint_path

    for step in (4, 12, 8):
        storage.write_bytes(s3.url("runs", "r", f"step_{step:08d}", "checkpoint.pt"), b"x")
    storage.write_bytes(s3.url("runs", "r", "step_00000099", "epoch_0001.png"), b"x")  # no checkpoint in it
    assert resolve_checkpoint_path(s3.url("runs", "r")) == s3.url("runs", "r", "step_00000012", "checkpoint.pt")
    for step in (3, 10):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "checkpoint.pt").write_bytes(b"x")
    assert resolve_checkpoint_path(tmp_path) == str(tmp_path / "step_00000010" / "checkpoint.pt")


def test_throttling_5xx_and_resets_are_retried_for_shard_reads_and_checkpoint_writes(tmp_path, s3, monkeypatch):
    """The same data through a proxy that fails every 3rd request (503 SlowDown, 500, connection reset):
    the loader yields the same batches with nothing skipped, and checkpoint writes land whole."""
    src = images(tmp_path / "src", 16)
    out = s3.url("shards")
    build_shards([str(src)], out, ShardParams(encoding="raw", shard_size=4, val_fraction=0.0), workers=1,
                 progress=False)
    cfg = DataConfig(content=[out], batch_size=4, steps_per_epoch=6, shuffle_shards=2, hflip=False)
    clean = [c.clone() for c, _ in build_loader(cfg, rank=0, world_size=1)]

    counter = tmp_path / "faults"
    with fault_proxy(s3, counter, every=3) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        loader = build_loader(cfg, rank=0, world_size=1, storage_cfg=StorageConfig(retries=6))
        faulty = [c.clone() for c, _ in loader]
        assert loader.skipped == 0
        assert all(torch.equal(a, b) for a, b in zip(clean, faulty)) and len(faulty) == 6
        blob = np.random.default_rng(0).bytes(300_000)
        for i in range(4):
            storage.write_bytes(s3.url("ckpt", f"step_{i}", "checkpoint.pt"), blob, StorageConfig(retries=6))
        faults = int(counter.read_text())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert faults >= 5, faults  # faults really happened on reads and writes
    for i in range(4):
        assert storage.read_bytes(s3.url("ckpt", f"step_{i}", "checkpoint.pt")) == blob


def test_a_shard_that_keeps_failing_is_skipped_and_counted_and_the_epoch_still_fills(tmp_path, s3, monkeypatch):
    """One shard object answers 503 to every request: after the retries it is skipped and counted like
    a corrupt shard, and the epoch still yields all its batches from the others."""
    src = images(tmp_path / "src", 24)
    out = s3.url("shards")
    build_shards([str(src)], out, ShardParams(encoding="raw", shard_size=4, val_fraction=0.0), workers=1,
                 progress=False)
    bad = storage.name(storage.list_files(out, "train-*.tar")[2])
    cfg = DataConfig(content=[out], batch_size=4, sampling="epoch", shuffle_shards=1, hflip=False)  # reads every shard
    counter = tmp_path / "faults"
    with fault_proxy(s3, counter, every=10**9, always=bad) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        loader = build_loader(cfg, rank=0, world_size=1, storage_cfg=StorageConfig(retries=2))
        got = list(loader)
        faults = int(counter.read_text())
    assert len(got) == len(loader) == 6
    assert loader.skipped >= 1 and faults >= 2  # retried, then given up and counted


def test_the_storage_endpoint_key_works_without_the_environment_variable(tmp_path, s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = StorageConfig(endpoint=s3.endpoint)
    url = s3.url("ep", "x.bin")
    storage.write_bytes(url, b"abc", cfg)
    assert storage.read_bytes(url, cfg) == b"abc" and storage.list_files(s3.url("ep"), cfg=cfg) == [url]
    src = images(tmp_path / "src", 8)
    build_shards([str(src)], tmp_path / "local", RAW, workers=1, progress=False)
    for f in (tmp_path / "local").iterdir():
        storage.write_bytes(s3.url("sh", f.name), f.read_bytes(), cfg)
    data = DataConfig(content=[s3.url("sh")], batch_size=2, steps_per_epoch=2, hflip=False)
    assert len(list(build_loader(data, rank=0, world_size=1, storage_cfg=cfg))) == 2
    with refusing_port() as port, pytest.raises(UserError, match="storage endpoint unreachable.*storage.endpoint"):
        storage.check_access(s3.url("sh"), StorageConfig(endpoint=f"http://127.0.0.1:{port}"), what="shards")


def test_preflight_on_a_node_names_each_unreachable_target_and_refuses_local_storage_on_many_nodes(tmp_path, s3):
    """What `stylegen submit`'s preflight task runs on every node (the Ray part is test_s3_ray's)."""
    from stylegen.config import Config
    from stylegen.preflight import check_here, shared_storage_problem, targets

    shards = s3.url("shards")
    build_shards([str(images(tmp_path / "src", 8))], shards, RAW, workers=1, progress=False)
    cfg = Config()
    cfg.data.content, cfg.data.style = ["s3://sg-no-such-bucket-zz/shards"], [str(tmp_path / "no-such-dir")]
    problems = check_here(targets(cfg, s3.url("runs")), cfg)
    assert len(problems) == 2, problems
    assert "s3://sg-no-such-bucket-zz/shards" in problems[0] and "bucket does not exist" in problems[0]
    assert "no-such-dir" in problems[1] and "do not exist" in problems[1]
    cfg.data.content, cfg.data.style = [shards], [str(tmp_path / "src")]
    assert check_here(targets(cfg, s3.url("runs")), cfg) == []
    assert keys(s3, "runs/") == []  # the write probe cleans up after itself
    assert check_here(targets(cfg, "s3://sg-no-such-bucket-zz/runs"), cfg)[0].startswith("storage ")
    assert "is a local path but the cluster has 2 nodes" in shared_storage_problem(str(tmp_path / "runs"), 2)
    assert shared_storage_problem(str(tmp_path / "runs"), 1) is None and shared_storage_problem(s3.url("r"), 3) is None


def test_wrong_credentials_are_one_line(tmp_path):
    """A server that checks credentials (moto's IAM auth): the bucket exists, the keys are not valid."""
    from s3server import client_env, start_server, stop_server

    proc, endpoint = start_server(free_requests=1)
    try:
        S3(endpoint=endpoint, bucket="sg-locked").client().create_bucket(Bucket="sg-locked")  # the one free request
        env = client_env(endpoint)
        src = images(tmp_path / "src", 2)
        for args in (["shard", "verify", "s3://sg-locked/shards"], ["best", "s3://sg-locked/sweep"],
                     ["shard", str(src), "--out", "s3://sg-locked/shards", "--no-progress"]):
            r = cli(*args, env=env, cwd=tmp_path)
            err = r.stderr.strip()
            assert r.returncode != 0 and len(err.splitlines()) == 1, (args, err)
            assert "access denied" in err and "AWS_ACCESS_KEY_ID" in err and "s3://sg-locked" in err, err
    finally:
        stop_server(proc)


def test_brace_patterns_on_s3_and_shards_over_plain_http_read_like_local(tmp_path, s3):
    src = images(tmp_path / "src", 16)
    local = tmp_path / "local"
    build_shards([str(src)], local, ShardParams(encoding="raw", shard_size=4, val_fraction=0.0), workers=1,
                 progress=False)
    for f in sorted(local.glob("train-*.tar")):
        storage.write_bytes(s3.url("raw", f.name), f.read_bytes())
    cfg = DataConfig(batch_size=4, steps_per_epoch=4, shuffle_shards=2, hflip=False)

    def first_batches(spec: str) -> list[torch.Tensor]:
        return [c.clone() for c, _ in build_loader(DataConfig(**{**cfg.__dict__, "content": [spec]}),
                                                   rank=0, world_size=1)]
    want = first_batches(str(local / "train-{000000..000003}.tar"))
    assert all(torch.equal(a, b) for a, b in zip(first_batches(s3.url("raw", "train-{000000..000003}.tar")), want))
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                            str(local)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           preexec_fn=die_with_parent)
    try:
        import socket
        import time

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        got = first_batches(f"http://127.0.0.1:{port}/train-{{000000..000003}}.tar")
    finally:
        web.terminate()
        web.wait(timeout=10)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))

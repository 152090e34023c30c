"""Loader and sharding throughput against bare baselines, on data generated here.

    loader_raw / loader_png: img/s of the full training pipeline (shard list, rank split,
        resampled shuffle, decode, hflip, batch, torch tensors; num_workers=0) against a tight
        loop that reads the same tars with ``tarfile`` and decodes each sample
        (``np.frombuffer`` / PIL) with no pipeline.
    loader_scaling: img/s with 2 DataLoader workers against 1 (PNG).
    loader_seek: seconds from a saved mid-epoch data position (batch 150 of 200, raw) to the next
        batch, against the naive seek of iterating the 150 batches from the epoch's start; the
        ratio is baseline / ours (how many times faster a resume reaches its data).
    resume_seek: seconds from ``build_loader(resume=<saved DataState>)`` (the call a resumed run makes)
        to its first batch, at the middle of an epoch of ImageNet64's 1,281,167 train samples over
        8 ranks, with jobs/configs/imagenet64-8gpu.toml's data section (batch 128, shuffle_shards 8,
        1250 batches per rank per epoch; num_workers 0, so the seek is timed in-process), against
        reading one batch (the same loader's steady-state seconds per batch: the best of 4 chunks of
        125 batches, i.e. of whole windows, so each holds its share of window reads).
        The row resumes after batch 625 of 1250 (here a window start); ``#`` lines add 656 (half
        a window on) and 687 (a window's last batch: the next straddles two windows, so the resume
        reads both), a fresh epoch start, and the same with data.shuffle_shards=4. Every saved
        position comes from really iterating the epoch, and the resumed batch is checked equal to
        the one the uninterrupted iteration yielded there. Goal: ratio < 20. Measured (2 cores shared
        with other jobs): before the header-only window index, 59.6 at load 8.7 (0.90 s against 15.1 ms
        a batch: each window read whole and its headers parsed one by one in Python; 26.5 at load 18,
        when the load inflated the baseline); after it, 19.2, 15.8, 12.1 in three runs at load 2.3-2.4
        (0.070-0.073 s against 3.8-5.9 ms a batch; the steady state got ~3x faster too, so the ratio fell
        less than the seek; loader_raw 2.75 -> 4.23 back to back); half a window on 12-21, a window's
        last batch 23-37, a fresh start 13-19; shuffle_shards=4: 7-11 at the middle. (Intermediate
        states of the change: 16-24 at load 3-12.)
        The shards: 1282 raw .rgb8 shards as ``stylegen shard --encoding raw`` writes them (1281 x
        1000 + 167 samples, 64x64x3 uint8 random pixels, manifest with their counts); to spare
        17.7 GB of disk only 9 of them are real files (sharded from an ImageNet64-format npz), the
        other names hard links to those (same bytes; the loader reads every name as its own shard;
        the reads come from the page cache, for the seek and the baseline alike).
    shard: ``stylegen shard`` img/s (1 worker process) against an encode-only loop
        (open, crop/resize, PNG-encode) over the same images in one process.
    shard_2workers: the same with 2 worker processes (informational).
    loader_s3: img/s of the same pipeline (num_workers=0, hflip on) reading raw shards from
        ``s3://`` on a local moto server (``python -m moto.server``, as tests/s3server.py),
        i.e. through ``stylegen.storage`` / pyarrow's S3FileSystem, against a bare loop of
        boto3 ``get_object`` + ``iter_samples`` + ``np.frombuffer`` + a copy into a batch array
        on the same server and shards (no shuffle, no flip, no prefetch).
    loader_s3_scaling: the same S3 pipeline with 2 DataLoader workers against 1.
        The S3 rows also print ``#`` lines with the server's requests and CPU time per
        1000 images (read from its log and /proc): moto is Python and shares the 2 cores.

Data: 64x64 crops of the photos bundled with scikit-image (realistic PNG sizes).
Prints ``name: ours=X baseline=Y ratio=Z``; runs in a few minutes.
``--only NAME`` (repeatable) runs just those rows, e.g. ``--only loader_s3 --only loader_s3_scaling``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from stylegen.config import DataConfig
from stylegen.data import shardio
from stylegen.data.embedded import CONTENT, _files
from stylegen.data.loader import build_loader
from stylegen.data.shard import ShardParams, build_shards
from stylegen.data.sources import crop_box, open_rgb, render

N_IMAGES = 4000
LOCAL_ROWS = ("loader_raw", "loader_png", "loader_scaling", "loader_seek", "resume_seek", "shard", "shard_2workers")
S3_ROWS = ("loader_s3", "loader_s3_scaling")
BUCKET = "bench-loader"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def make_images(folder: Path, n: int) -> list[Path]:
    """n PNG files of random 64..200 px crops of the bundled photos (so sharding resizes)."""
    rng = np.random.default_rng(0)
    photos = [open_rgb(Path(f), max_pixels=10**8) for f in _files(CONTENT)]
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(rng.integers(64, min(200, *im.size)))  # some bundled photos are under 200 px on a side
        x, y = int(rng.integers(0, im.size[0] - side)), int(rng.integers(0, im.size[1] - side))
        p = folder / f"img{i:05d}.png"
        im.crop((x, y, x + side, y + side)).save(p, compress_level=1)
        paths.append(p)
    return paths


def baseline_read(tars: list[str], ext: str) -> float:
    t, n = time.perf_counter(), 0
    for f in tars:
        with tarfile.open(f) as tar:
            for m in tar:
                if not m.name.endswith(ext):
                    continue
                data = tar.extractfile(m).read()
                if ext == ".rgb8":
                    arr = np.frombuffer(data, np.uint8).reshape(64, 64, 3)
                else:
                    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                n += arr.shape[0] > 0
    return n / (time.perf_counter() - t)


def loader_rate(shard_dir: Path, steps: int, workers: int, batch: int = 64, warm: int = 2) -> float:
    cfg = DataConfig(content=[str(shard_dir)], steps_per_epoch=steps + warm, batch_size=batch, num_workers=workers)
    it = iter(build_loader(cfg, rank=0, world_size=1))
    for _ in range(warm):  # worker start-up and shuffle-buffer fill are one-off costs
        next(it)
    t, n = time.perf_counter(), 0
    for c, s in it:
        n += c.shape[0] + s.shape[0]
    return n / (time.perf_counter() - t)


def seek_times(shard_dir: Path, at: int, batch: int = 64) -> tuple[float, float]:
    """(resume from the saved position to the next batch, iterate ``at`` batches then take one), best of 3."""
    cfg = DataConfig(content=[str(shard_dir)], batch_size=batch, steps_per_epoch=200, hflip=True)
    loader = build_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(at):
        next(it)
    saved = loader.state()
    ours = base = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        next(iter(build_loader(cfg, rank=0, world_size=1, resume=saved)))
        ours = min(ours, time.perf_counter() - t)
        t = time.perf_counter()
        naive = iter(build_loader(cfg, rank=0, world_size=1))
        for _ in range(at + 1):
            next(naive)
        base = min(base, time.perf_counter() - t)
    return ours, base


IMAGENET64_TRAIN = 1_281_167  # ImageNet64 train images
RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "imagenet64-8gpu.toml"


def imagenet64_shards(tmp: Path, distinct: int = 8) -> Path:
    """The ImageNet64 raw shard layout (see resume_seek in the module doc); returns its directory."""
    per = 1000  # stylegen shard's default shard size
    n = distinct * per + IMAGENET64_TRAIN % per
    (tmp / "npz").mkdir(parents=True)
    data = np.random.default_rng(0).integers(0, 256, (n, 64 * 64 * 3), dtype=np.uint8)
    np.savez(tmp / "npz" / "train_data_batch_1.npz", data=data, labels=np.zeros(n, np.int64))
    del data
    build_shards([str(tmp / "npz")], tmp / "real", ShardParams(encoding="raw", shard_size=per, val_fraction=0.0),
                 workers=1, progress=False)
    real, meta = shardio.read_manifest(tmp / "real")
    full = [r for r in real if r["samples"] == per]
    last = next(r for r in real if r["samples"] < per)
    out = tmp / "imagenet64"
    out.mkdir()
    rows = []
    for i in range(IMAGENET64_TRAIN // per + 1):
        src = full[i % len(full)] if i < IMAGENET64_TRAIN // per else last
        name = shardio.shard_name("train", i)
        os.link(tmp / "real" / src["file"], out / name)
        rows.append({**src, "file": name})
    shardio.write_manifest(out, rows, meta)
    assert sum(r["samples"] for r in rows) == IMAGENET64_TRAIN
    return out


def resume_seek(shard_dir: Path, shuffle_shards: int | None = None, ranks: int = 8, rank: int = 0) -> tuple:
    """({batch: seek s}, one batch's reading s, fresh start s, batches per epoch, config): see the module doc."""
    import dataclasses
    import math

    import torch

    from stylegen.config import load_config

    cfg = dataclasses.replace(load_config(RECIPE).data, content=[str(shard_dir)], style=[], num_workers=0)
    cfg = dataclasses.replace(cfg, shuffle_shards=shuffle_shards or cfg.shuffle_shards)
    steps = len(build_loader(cfg, rank=rank, world_size=ranks))
    per_window = cfg.shuffle_shards * 1000  # samples in a window of shards
    chunk = per_window // math.gcd(per_window, cfg.batch_size)  # fewest batches that are whole windows
    chunk *= -(-100 // chunk)  # ... and at least 100 of them
    # the middle, half a window on, and a window's last batch whose successor straddles two windows
    at = [steps // 2 + int(k * per_window / cfg.batch_size) for k in (0, 0.5, 1)]
    # really iterate the epoch: the position after each ``at`` batch and the batch after it; time whole windows
    loader = build_loader(cfg, rank=rank, world_size=ranks)
    saved, pending, chunks = {}, None, []
    t = time.perf_counter()
    for content, style in loader:
        b = loader.batch
        if pending is not None:
            saved[pending[0]] = (pending[1], (content, style))
            pending = None
        if b in at:
            pending = (b, loader.state())
        if b % chunk == 0:
            if b > chunk:  # not the first chunk: it holds the start-up
                chunks.append((time.perf_counter() - t) / chunk)
            t = time.perf_counter()
        if b > at[-1]:
            break
    per_batch = min(chunks)
    fresh, seeks = float("inf"), dict.fromkeys(saved, float("inf"))
    for _ in range(5):  # interleaved, best of 5: the machine is shared, so timings are noisy
        fresh = min(fresh, _first_batch_s(cfg, rank, ranks))
        for b, (state, want) in saved.items():
            t0 = time.perf_counter()
            got = next(iter(build_loader(cfg, rank=rank, world_size=ranks, resume=state)))
            seeks[b] = min(seeks[b], time.perf_counter() - t0)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), f"the batch resumed after {b} differs"
    for b, (state, _) in saved.items():
        print(f"# resume_seek, shuffle_shards {cfg.shuffle_shards}: after batch {b}/{steps} (content window "
              f"{state.positions[0][0][0]}, offset {state.positions[0][0][1]} of {per_window}) {seeks[b]:.3f} s = "
              f"{seeks[b] / per_batch:.1f} batches' reading", flush=True)
    print(f"# resume_seek, shuffle_shards {cfg.shuffle_shards}: a fresh epoch start to its first batch {fresh:.3f} s "
          f"= {fresh / per_batch:.1f} batches' reading; one batch's reading {per_batch * 1000:.1f} ms (best of "
          f"{len(chunks)} chunks of {chunk} batches = whole windows)", flush=True)
    return seeks, per_batch, fresh, steps, cfg


def _first_batch_s(cfg, rank: int, ranks: int) -> float:
    """Seconds from build_loader (a fresh epoch, no saved position) to its first batch."""
    t = time.perf_counter()
    next(iter(build_loader(cfg, rank=rank, world_size=ranks)))
    return time.perf_counter() - t


def encode_only(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        im = open_rgb(p, max_pixels=10**8, draft=64)
        arr = render(im, crop_box(im.size[0], im.size[1], 64, None), 64)
        Image.fromarray(arr).save(io.BytesIO(), "PNG", compress_level=1)
    return len(paths) / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- S3 (moto server)

class MotoServer:
    """``python -m moto.server`` on a free loopback port, started and stopped like tests/s3server.py;
    its request log goes to a file so requests can be counted, its CPU time is read from /proc."""

    def __init__(self, log_path: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **S3_CREDENTIALS})
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto server did not start within 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def cpu(self) -> float:
        """User + system CPU seconds the server has used so far."""
        return proc_cpu(self.proc.pid)

    def requests(self) -> int:
        """Object reads served so far (GET and HEAD lines of the werkzeug log; 206 lines are colour-coded)."""
        with open(self.log_path, "rb") as f:
            return sum(1 for ln in f if (b"GET /" in ln or b"HEAD /" in ln) and b"/moto-api" not in ln)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 when it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu(exclude: int) -> float:
    """CPU seconds of this process and its live children (DataLoader workers), minus the server's."""
    me, total = os.getpid(), proc_cpu(os.getpid())
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != exclude:
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    total += proc_cpu(int(d.name))
            except OSError:
                pass
    return total


class ServerUse:
    """Server requests and CPU summed over measured windows (``start`` ... ``stop(images)``)."""

    def __init__(self, server: MotoServer) -> None:
        self.server, self.images, self.wall = server, 0, 0.0
        self.req, self.cpu, self.client = 0, 0.0, 0.0
        self._at = (0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        self._at = (self.server.requests(), self.server.cpu(), client_cpu(self.server.proc.pid), time.perf_counter())

    def stop(self, images: int) -> None:
        self.client += client_cpu(self.server.proc.pid) - self._at[2]
        self.wall += time.perf_counter() - self._at[3]
        self.req += self.server.requests() - self._at[0]
        self.cpu += self.server.cpu() - self._at[1]
        self.images += images

    def __str__(self) -> str:
        k = max(self.images, 1) / 1000
        return (f"{self.req / k:.0f} requests (GET+HEAD), {self.cpu / k:.2f} s server CPU, "
                f"{self.client / k:.2f} s client CPU (process + workers); "
                f"{(self.cpu + self.client) / max(self.wall, 1e-9):.2f} cores busy (server + client)")


def baseline_s3(client, keys: list[str], seconds: float, use: ServerUse, batch: int = 64) -> float:
    """Bare get_object + tar walk + np.frombuffer, each image copied into a (batch, 64, 64, 3) array
    (the least any loader does: hand over owned, batched pixels), shards cycled until ``seconds`` passed."""
    use.start()
    t, n, i = time.perf_counter(), 0, 0
    out = np.empty((batch, 64, 64, 3), np.uint8)
    while True:
        data = client.get_object(Bucket=BUCKET, Key=keys[i % len(keys)])["Body"].read()
        i += 1
        for _, parts in shardio.iter_samples(data):
            if "rgb8" in parts:
                off, size = parts["rgb8"]
                out[n % batch] = np.frombuffer(data, np.uint8, count=size, offset=off).reshape(64, 64, 3)
                n += 1
                if n % batch == 0:
                    out = np.empty_like(out)
        dt = time.perf_counter() - t
        if dt >= seconds and i >= len(keys):
            use.stop(n)
            return n / dt


def loader_rate_timed(content: str, seconds: float, workers: int, use: ServerUse, batch: int = 64,
                      warm: int = 2, hflip: bool = True) -> float:
    """Like loader_rate, but measured over whole batches until ``seconds`` passed (S3 speed is unknown)."""
    cfg = DataConfig(content=[content], steps_per_epoch=1_000_000, batch_size=batch, num_workers=workers, hflip=hflip)
    gen = iter(build_loader(cfg, rank=0, world_size=1))
    try:
        for _ in range(warm):  # worker start-up and shuffle-buffer fill are one-off costs
            next(gen)
        use.start()
        t, n = time.perf_counter(), 0
        for c, s in gen:
            n += c.shape[0] + s.shape[0]
            if time.perf_counter() - t >= seconds:
                break
        rate = n / (time.perf_counter() - t)
        use.stop(n)
        return rate
    finally:
        gen.close()  # shuts DataLoader workers down


def s3_rows(tmp: Path, want: set[str], seconds: float) -> None:
    import boto3

    server = MotoServer(tmp / "moto.log")
    saved = {k: os.environ.get(k) for k in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    try:
        os.environ.update({**S3_CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint})
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/shards"
        t = time.perf_counter()
        build_shards([str(tmp / "images")], url, ShardParams(encoding="raw", shard_size=500, val_fraction=0.0),
                     workers=2, progress=False)
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="shards/")["Contents"]
                      if o["Key"].endswith(".tar"))
        mib = sum(o["Size"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="shards/")["Contents"]
                  if o["Key"].endswith(".tar")) / len(keys) / 2**20
        print(f"# s3: {len(keys)} raw shards of {N_IMAGES // len(keys)} samples ({mib:.1f} MiB each) written to "
              f"{url} on moto {server.endpoint} in {time.perf_counter() - t:.1f} s", flush=True)
        use = {tag: ServerUse(server) for tag in ("get_object loop", "ours, 0 workers", "ours, 0 workers, no hflip",
                                                   "ours, 1 worker", "ours, 2 workers")}
        if "loader_s3" in want:
            base = ours = plain = 0.0
            for _ in range(3):  # interleaved, best of 3 (each loader measurement has its own warm-up)
                base = max(base, baseline_s3(client, keys, seconds, use["get_object loop"]))
                ours = max(ours, loader_rate_timed(url, seconds, 0, use["ours, 0 workers"]))
                plain = max(plain, loader_rate_timed(url, seconds, 0, use["ours, 0 workers, no hflip"], hflip=False))
            print(f"# loader_s3 with data.hflip off (the baseline flips nothing): ours={plain:.0f} ratio={plain / base:.2f}",
                  flush=True)
            line("loader_s3", ours, base, "boto3 get_object + iter_samples + np.frombuffer, copied into a batch "
                 "array, 1 process, same moto server and shards; ours: num_workers=0, with what the baseline lacks: "
                 "the seeded window shuffle, hflip of half the images, the stream position per sample")
        if "loader_s3_scaling" in want:
            one = two = 0.0
            for _ in range(3):
                one = max(one, loader_rate_timed(url, seconds, 1, use["ours, 1 worker"]))
                two = max(two, loader_rate_timed(url, seconds, 2, use["ours, 2 workers"]))
            line("loader_s3_scaling", two, one, "same S3 pipeline with 1 DataLoader worker; ours: 2 workers, raw")
        for tag, u in use.items():
            if u.images:
                print(f"# s3 server per 1000 images, {tag}: {u}", flush=True)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def line(name: str, ours: float, base: float, what: str) -> None:
    print(f"{name}: ours={ours:.0f} baseline={base:.0f} ratio={ours / base:.2f}  (img/s; baseline: {what})", flush=True)


def local_rows(tmp: Path, paths: list[Path], want: set[str]) -> None:
    p1 = ShardParams(encoding="png", shard_size=500, val_fraction=0.0)
    shard1 = shard2 = enc = 0.0
    if want & {"shard", "shard_2workers"}:
        for rep in range(2):  # interleaved, best of 2
            enc = max(enc, encode_only(paths))
            for workers in (1, 2):
                t = time.perf_counter()
                build_shards([str(tmp / "images")], tmp / f"png{workers}{rep}", p1, workers=workers, progress=False)
                rate = N_IMAGES / (time.perf_counter() - t)
                shard1, shard2 = (max(shard1, rate), shard2) if workers == 1 else (shard1, max(shard2, rate))
        (tmp / "png10").rename(tmp / "png")
    elif want & {"loader_png", "loader_scaling"}:
        build_shards([str(tmp / "images")], tmp / "png", p1, workers=2, progress=False)
    if want & {"loader_raw", "loader_seek"}:
        build_shards([str(tmp / "images")], tmp / "raw", ShardParams(encoding="raw", shard_size=500, val_fraction=0.0),
                     workers=2, progress=False)
    for name, d, ext, steps in (("loader_raw", "raw", ".rgb8", 200), ("loader_png", "png", ".png", 60)):
        if name not in want:
            continue
        tars = sorted(str(f) for f in (tmp / d).glob("*.tar"))
        base = ours = 0.0
        for _ in range(3):  # interleaved, best of 3: the machine is shared, so timings are noisy
            base = max(base, baseline_read(tars, ext))
            ours = max(ours, loader_rate(tmp / d, steps, 0))
        line(name, ours, base, f"tarfile + {'np.frombuffer' if ext == '.rgb8' else 'PIL'} loop, 1 process")
    if "loader_scaling" in want:
        one = two = 0.0
        for _ in range(2):
            one = max(one, loader_rate(tmp / "png", 100, 1))
            two = max(two, loader_rate(tmp / "png", 100, 2))
        line("loader_scaling", two, one, "same pipeline with 1 DataLoader worker; ours: 2 workers, PNG")
    if "loader_seek" in want:
        ours, base = seek_times(tmp / "raw", at=150)
        print(f"loader_seek: ours={ours:.3f}s baseline={base:.3f}s ratio={base / ours:.1f}  (seconds to the batch "
              "after a saved position at batch 150 of 200, raw, batch 64; baseline: iterate the 150 batches from the "
              "epoch's start; ratio = baseline / ours)", flush=True)
    if "resume_seek" in want:
        shards = imagenet64_shards(tmp / "resume_seek")
        seeks, base, fresh, steps, cfg = resume_seek(shards)
        (mid, ours), *others = seeks.items()
        print(f"resume_seek: ours={ours:.3f}s baseline={base:.4f}s ratio={ours / base:.1f} goal<20 "
              f"{'met' if ours / base < 20 else 'NOT MET'}  (seconds from build_loader(resume=saved position) to the "
              f"first batch after batch {mid} of {steps}, rank 0 of 8, {IMAGENET64_TRAIN} raw 64x64 samples, batch "
              f"{cfg.batch_size}, shuffle_shards {cfg.shuffle_shards}; baseline: one batch's steady-state reading by "
              f"the same loader; ratio = ours / baseline; half a window on and at a window's last batch: "
              f"{', '.join(f'{s / base:.1f}' for _, s in others)}; a fresh epoch start: {fresh / base:.1f})",
              flush=True)
        seeks4, base4, fresh4, *_ = resume_seek(shards, shuffle_shards=4)
        print(f"# resume_seek with data.shuffle_shards=4 (half the window): ratio="
              f"{', '.join(f'{s / base4:.1f}' for s in seeks4.values())} at the same three kinds of position, "
              f"a fresh start {fresh4 / base4:.1f}", flush=True)
    if "shard" in want:
        line("shard", shard1, enc, "encode-only loop (open, crop/resize, PNG), 1 process; ours: --workers 1")
    if "shard_2workers" in want:
        line("shard_2workers", shard2, enc, "same encode-only loop, 1 process; ours: --workers 2")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=LOCAL_ROWS + S3_ROWS, metavar="ROW",
                    help=f"run only this row (repeatable; default all): {', '.join(LOCAL_ROWS + S3_ROWS)}")
    ap.add_argument("--s3-seconds", type=float, default=4.0, help="length of each S3 measurement (s)")
    args = ap.parse_args(argv)
    want = set(args.only or LOCAL_ROWS + S3_ROWS)
    logging.basicConfig(level=logging.WARNING)
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the run "
          "(other jobs share the machine; ratios are interleaved best-of-n)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", N_IMAGES) if want - {"resume_seek"} else []
        if want & set(LOCAL_ROWS):
            local_rows(tmp, paths, want)
        if want & set(S3_ROWS):
            s3_rows(tmp, want, args.s3_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

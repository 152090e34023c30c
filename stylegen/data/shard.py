"""``stylegen shard``: image folders / ImageNet64 npz / image files -> WebDataset tar shards.

    stylegen shard SRC [SRC ...] --out DIR [--shard-size N] [--encoding png|raw] [--size 64]
                   [--crops-per-image K] [--val-fraction F] [--workers N] [--seed S]
    stylegen shard verify DIR

DIR may be a local directory or an object-store prefix (``s3://bucket/shards``, ``gs://...``):
every read and write goes through :mod:`stylegen.storage` (atomic objects, retries).

How the work is cut so that runs are deterministic and resumable: every sample is
a *unit* (an image crop or an npz row) with a global index (its key). Units are
assigned to a split by a seeded hash of their source, then each split's units are
cut into blocks of ``shard_size``: block i *is* shard ``{split}-{i:06d}.tar``. A
shard is therefore a pure function of (inputs, parameters), computed by one worker
process that writes it atomically. The manifest (rewritten as shards finish) keeps
a fingerprint of inputs + parameters; a re-run with the same fingerprint keeps the
shards whose checksum still matches and only builds the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stylegen import storage
from stylegen.data import shardio
from stylegen.data.sources import ImageFile, NpzFile, SkipInput, discover, load_npz, open_rgb, crop_box, render
from stylegen.errors import UserError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SHARD_FILE = re.compile(r"^(train|val)-\d{6}\.tar$")


@dataclass(frozen=True, kw_only=True)
class ShardParams:
    size: int = 64
    encoding: str = "png"            # "png" | "raw"
    shard_size: int = 1000           # samples per shard (at most)
    crops: int = 1                   # crops per image: 1 = centre crop, K > 1 = K random crops
    val_fraction: float = 0.01       # of the inputs not explicitly validation data
    seed: int = 0
    split_unit: str = "image"        # "image": all crops of an image share a split; "sample": each crop drawn alone
    max_pixels: int = 89_478_485     # larger images are rejected as decompression bombs (PIL's default)
    png_level: int = 1               # zlib level: 1 encodes ~3x faster than 6; decoding speed is the same


@dataclass
class ShardSummary:
    out: str
    samples: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    images: int = 0
    npz_rows: int = 0
    kept: int = 0
    skipped: list[dict] = field(default_factory=list)

    def line(self) -> str:
        total, nsh = sum(self.samples.values()), sum(self.shards.values())
        splits = ", ".join(f"{s} {self.samples[s]} in {self.shards[s]}" for s in sorted(self.samples))
        reasons = Counter(r["reason"].split(" (")[0] for r in self.skipped)
        why = "; ".join(f"{n} {r}" for r, n in reasons.most_common())
        return (f"sharded {total} samples into {nsh} shards ({splits}) from {self.images} images and {self.npz_rows} "
                f"npz rows; kept {self.kept} existing shards; skipped {len(self.skipped)} inputs"
                + (f" ({why})" if why else "") + f" -> {self.out}")


# ----------------------------------------------------------------------------- planning

def _uniform(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big") / 2.0**64


@dataclass
class _Plan:
    images: list[ImageFile]
    npzs: list[NpzFile]
    # per split: (kind 0=image 1=npz, source index, crop/row, global index), each (n,) int64
    units: dict[str, np.ndarray]


def plan_units(images: list[ImageFile], npzs: list[NpzFile], p: ShardParams) -> _Plan:
    rng = np.random.default_rng(p.seed)
    images = [images[i] for i in rng.permutation(len(images))]  # folders are often sorted by class
    k = max(p.crops, 1)
    cols: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    g = 0
    if images:
        n = len(images) * k
        src, sub = np.repeat(np.arange(len(images)), k), np.tile(np.arange(k), len(images))
        if p.split_unit == "sample":
            u = np.array([_uniform(p.seed, f"{images[s].key}#{c}") for s, c in zip(src, sub)])
        else:
            u = np.repeat([_uniform(p.seed, im.key) for im in images], k)
        val = np.repeat([im.val for im in images], k) | (u < p.val_fraction)
        unit = np.stack([np.zeros(n, np.int64), src, sub, np.arange(g, g + n)], 1)
        cols["val"].append(unit[val])
        cols["train"].append(unit[~val])
        g += n
    for i, f in enumerate(npzs):  # npz rows keep their order (ImageNet64 batches are already shuffled)
        u = np.random.default_rng([p.seed, zlib.crc32(f.key.encode())]).random(f.rows)
        val = np.full(f.rows, f.val) | (u < p.val_fraction)
        unit = np.stack([np.ones(f.rows, np.int64), np.full(f.rows, i), np.arange(f.rows), np.arange(g, g + f.rows)], 1)
        cols["val"].append(unit[val])
        cols["train"].append(unit[~val])
        g += f.rows
    units = {s: np.concatenate(c) if c else np.zeros((0, 4), np.int64) for s, c in cols.items()}
    return _Plan(images, npzs, units)


def fingerprint(plan: _Plan, p: ShardParams) -> str:
    h = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **asdict(p)}, sort_keys=True).encode())
    for im in plan.images:
        h.update(f"i|{im.key}|{im.path.stat().st_size if im.path.exists() else -1}|{im.val}\n".encode())
    for f in plan.npzs:
        h.update(f"n|{f.key}|{f.path.stat().st_size}|{f.rows}\n".encode())
    return h.hexdigest()


def _blocks(plan: _Plan, p: ShardParams) -> list[tuple[str, int, np.ndarray]]:
    blocks = [(s, i // p.shard_size, u[i:i + p.shard_size])
              for s, u in plan.units.items() for i in range(0, len(u), p.shard_size)]
    return sorted(blocks, key=lambda b: int(b[2][0, 3]))  # by first global index: npz files are read in order


def _tasks(plan: _Plan, blocks: list, p: ShardParams) -> Iterator[dict]:
    """Worker inputs, lazily: npz rows are sliced here (one or two npz files in memory at a time).

    An npz whose body is corrupt (its headers passed discovery) contributes no rows: the task
    carries a skip for it instead, reported with the shard like a corrupt image."""
    cache: dict[int, tuple[np.ndarray, np.ndarray | None] | str] = {}
    for split, index, units in blocks:
        items, bad = [], {}
        for kind, src, sub, gidx in units.tolist():
            if kind == 0:
                im = plan.images[src]
                items.append(("image", str(im.path), im.key, sub, gidx))
            else:
                if src not in cache:
                    if len(cache) >= 2:
                        cache.pop(min(cache))
                    try:
                        cache[src] = load_npz(plan.npzs[src].path)
                    except SkipInput as e:
                        cache[src] = str(e)
                if isinstance(cache[src], str):
                    bad[str(plan.npzs[src].path)] = cache[src]
                    continue
                data, labels = cache[src]
                lab = None if labels is None else int(labels[sub])
                items.append(("npz", np.ascontiguousarray(data[sub]), f"{plan.npzs[src].key}#{sub}", lab, gidx))
        yield {"split": split, "index": index, "items": items, "skipped": bad, "units": len(units)}


# ----------------------------------------------------------------------------- worker

def _encode(arr: np.ndarray, p: ShardParams) -> tuple[str, bytes]:
    if p.encoding == "raw":
        return "rgb8", np.ascontiguousarray(arr, np.uint8).tobytes()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=p.png_level)
    return "png", buf.getvalue()


def _load_checked(path: str, p: ShardParams):
    im = open_rgb(Path(path), max_pixels=p.max_pixels, draft=p.size if p.crops <= 1 else None)
    if min(im.size) * 2 < p.size:
        raise SkipInput(f"too small ({im.size[0]}x{im.size[1]}; shorter side must be >= {(p.size + 1) // 2}, "
                        f"images between that and {p.size} are upscaled)")
    return im


def make_shard(task: dict, p: ShardParams, out: str) -> dict:
    """Build one shard from its units and write it atomically. Runs in a worker process."""
    split, index, items = task["split"], task["index"], task["items"]
    order = np.random.default_rng([p.seed, index, split == "val"]).permutation(len(items))
    remaining = Counter(it[1] for it in items if it[0] == "image")
    decoded: dict[str, object] = {}
    members: list[tuple[str, bytes]] = []
    skipped: dict[str, str] = {}
    name = shardio.shard_name(split, index)
    for j in order.tolist():
        kind, src, key, sub, gidx = items[j]
        meta: dict = {"source": key}
        try:
            if kind == "image":
                if src in skipped:
                    continue
                im = decoded.get(src)
                if im is None:
                    im = decoded[src] = _load_checked(src, p)
                rng = np.random.default_rng([p.seed, zlib.crc32(key.encode()), sub]) if p.crops > 1 else None
                box = crop_box(im.size[0], im.size[1], p.size, rng)
                arr = render(im, box, p.size)
                remaining[src] -= 1
                if remaining[src] == 0:
                    decoded.pop(src)
                if p.crops > 1:
                    meta["crop"] = sub
            else:
                arr = src
                if arr.shape[0] != p.size:
                    from PIL import Image

                    arr = render(Image.fromarray(arr), (0, 0, arr.shape[1], arr.shape[0]), p.size)
                meta["source"], meta["label"] = key, sub
        except SkipInput as e:
            skipped[src] = str(e)
            decoded.pop(src, None)
            continue
        ext, payload = _encode(arr, p)
        skey = f"{gidx:09d}"
        members.append((f"{skey}.{ext}", payload))
        members.append((f"{skey}.json", json.dumps(meta, sort_keys=True).encode()))
    skipped.update(task.get("skipped", {}))
    skips = [{"path": s, "reason": r, "shard": name} for s, r in skipped.items()]
    units = task.get("units", len(items))
    if not members:
        return {"row": None, "skipped": skips, "units": units}
    data = shardio.tar_bytes(members)
    shardio.write_shard_file(storage.join(out, name), data)
    row = {"file": name, "split": split, "samples": len(members) // 2, "bytes": len(data),
           "sha256": shardio.sha256_bytes(data), "encoding": p.encoding}
    return {"row": row, "skipped": skips, "units": units}


def _make_shard_star(args: tuple) -> dict:
    return make_shard(*args)


# ----------------------------------------------------------------------------- driver

def _check_writable(out: str) -> None:
    if storage.is_remote(out):
        storage.check_access(out, write=True, what="--out")
        return
    try:
        storage.probe_writable(storage.local_path(out))
    except OSError as e:
        raise UserError(f"cannot write to output directory {out!r} ({e.strerror or e}); "
                        "pass a writable --out") from None


def _check_ours(out: str) -> None:
    """Refuse an --out that holds files but no manifest.parquet: this tool did not write them, and a
    run there would mix its shards with them (it never deletes or overwrites a file it did not write)."""
    if storage.is_remote(out):
        try:
            names = [storage.name(u) for u in storage.list_files(out, "*")]
        except OSError:
            return  # _check_writable names the storage problem
    else:
        path = storage.local_path(out)
        if not path.is_dir():
            return
        try:
            names = [e.name for e in os.scandir(path)]
        except OSError:
            return
    if shardio.MANIFEST in names:
        return
    foreign = sorted(n for n in names if not n.startswith("."))
    if foreign:
        raise UserError(f"--out {out!r} is not empty ({len(foreign)} entries such as {foreign[0]!r}) and holds no "
                        f"{shardio.MANIFEST}: it was not written by `stylegen shard`; pass a new or empty directory")


def _write_failed(out: str, e: OSError) -> UserError:
    if storage.is_remote(out) and e.errno is None:  # pyarrow: no errno, the message names the cause
        return UserError(f"--out {storage.explain(e, out)}; rerun the same command: finished shards are kept")
    what, fix = storage.describe_write_error(e)
    return UserError(f"cannot write to output directory {out!r} ({what}); {fix}, then rerun the same command: "
                     "finished shards are kept and only the rest is built")


def _previous(out: str, fp: str) -> tuple[dict[str, dict], list[dict], set[str]]:
    """Rows of shards from an earlier run with the same fingerprint whose bytes still match, their
    skipped rows, and every shard file the earlier manifest names (what this tool wrote there)."""
    try:
        rows, meta = shardio.read_manifest(out)
    except FileNotFoundError:
        return {}, [], set()
    except Exception as e:  # a torn or foreign manifest: rebuild, but never delete what it names
        log.warning("%s: unreadable manifest (%s); rebuilding all shards", out, type(e).__name__)
        return {}, [], set()
    ours = {r["file"] for r in rows}
    if meta.get("fingerprint") != fp:
        if rows:
            log.warning("%s: existing manifest is from other inputs or parameters; rebuilding all shards", out)
        return {}, [], ours
    kept = {}
    for r in rows:
        try:
            data = storage.read_bytes(storage.join(out, r["file"]))
        except FileNotFoundError:
            continue
        if len(data) == r["bytes"] and shardio.sha256_bytes(data) == r["sha256"]:
            kept[r["file"]] = r
    try:
        old_skips, _ = shardio.read_table(storage.join(out, shardio.SKIPPED))
    except Exception:
        old_skips = []
    return kept, [s for s in old_skips if s.get("shard") in kept], ours


def build_shards(sources: list[str], out: str | Path, params: ShardParams = ShardParams(), *,
                 workers: int | None = None, progress: bool = True) -> ShardSummary:
    """Shard ``sources`` into ``out`` (see module doc). Raises UserError when nothing is usable."""
    from tqdm import tqdm

    if params.encoding not in ("png", "raw"):
        raise UserError(f"--encoding {params.encoding!r} is not one of png, raw")
    out = str(out)
    if not storage.is_remote(out):
        out = str(storage.local_path(out))
    images, npzs, disc_skips = discover(sources)
    if storage.is_remote(out):  # a missing bucket or a dead endpoint: one line now, not after retries
        storage.check_access(out, what="--out")
    _check_ours(out)
    _check_writable(out)
    plan = plan_units(images, npzs, params)
    fp = fingerprint(plan, params)
    meta = {"fingerprint": fp, "params": asdict(params), "format": FORMAT_VERSION, "complete": False}
    kept, skips, ours = _previous(out, fp)
    rows = dict(kept)
    skips += [{"path": s.path, "reason": s.reason, "shard": ""} for s in disc_skips]
    blocks = [b for b in _blocks(plan, params) if shardio.shard_name(b[0], b[1]) not in kept]
    total = sum(len(u) for u in plan.units.values())
    todo = sum(len(b[2]) for b in blocks)
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(blocks) or 1))
    last_write = time.monotonic()

    def finish(res: dict) -> None:
        nonlocal last_write
        if res["row"]:
            rows[res["row"]["file"]] = res["row"]
        skips.extend(res["skipped"])
        bar.update(res["units"])
        if len(rows) == len(kept) + 1 or time.monotonic() - last_write > 2.0:  # first shard, then every 2 s
            shardio.write_manifest(out, list(rows.values()), meta)
            shardio.write_skipped(out, skips)
            last_write = time.monotonic()

    pool = _start_pool(workers) if workers > 1 else None
    bar = tqdm(total=total, initial=total - todo, unit="img", desc="shard", disable=None if progress else True,
               smoothing=0.1)
    failed: OSError | None = None  # a full disk / file-size limit / storage gone: one line after the cleanup
    try:
        tasks = ((t, params, str(out)) for t in _tasks(plan, blocks, params))
        if pool is None:
            for t in tasks:
                finish(make_shard(*t))
        else:
            _run_pool(pool, tasks, workers, finish)
        meta["complete"] = True
    except OSError as e:  # every write is atomic: what failed left no file, finished shards stay listed
        failed = e
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        try:  # the manifest of what did finish, so that a rerun keeps those shards
            shardio.write_manifest(out, list(rows.values()), meta)
            shardio.write_skipped(out, _dedupe(skips))
        except OSError as e:
            failed = failed or e
    if failed is not None:
        raise _write_failed(out, failed)
    _remove_stale(out, set(rows), ours)
    summary = ShardSummary(out=out, images=len(images), npz_rows=sum(f.rows for f in npzs), kept=len(kept),
                           skipped=_dedupe(skips))
    for r in rows.values():
        summary.samples[r["split"]] = summary.samples.get(r["split"], 0) + r["samples"]
        summary.shards[r["split"]] = summary.shards.get(r["split"], 0) + 1
    if not rows:
        reasons = Counter(r["reason"].split(" (")[0] for r in summary.skipped).most_common(3)
        raise UserError(f"no usable images in {' '.join(sources)} ({len(summary.skipped)} inputs skipped: "
                        f"{', '.join(f'{n} {r}' for r, n in reasons) or 'no files found'}); "
                        f"see {storage.join(out, shardio.SKIPPED)}")
    return summary


def _start_pool(workers: int):
    """Worker processes, forked when this process has no other threads (fast start), else spawned
    (the caller may run torch/Ray threads; a fork could inherit a lock one of them holds)."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    # tqdm's monitor only sleeps on an Event; the children never touch tqdm
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.name != "tqdm_monitor"]
    method = "spawn" if others else "fork"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    pool.submit(int).result()  # starts all workers now
    return pool


def _run_pool(pool, tasks, workers: int, finish) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    pending = set()  # a bounded window keeps npz slices from piling up in memory
    for t in tasks:
        pending.add(pool.submit(_make_shard_star, t))
        if len(pending) >= 2 * workers:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                finish(f.result())
    for f in pending:
        finish(f.result())


def _dedupe(skips: list[dict]) -> list[dict]:
    seen, outl = set(), []
    for s in sorted(skips, key=lambda r: (r["path"], r["shard"])):
        if (s["path"], s["reason"]) not in seen:
            seen.add((s["path"], s["reason"]))
            outl.append(s)
    return outl


def _remove_stale(out: str, keep: set[str], ours: set[str]) -> None:
    """Delete shards an earlier run of this tool wrote here (named in its manifest) that this run did
    not produce, and temp files of interrupted writes; never a file this tool did not write."""
    for url in storage.list_files(out, "*"):
        f = storage.name(url)
        if f in ours and f not in keep:
            log.info("removing stale shard %s (from an earlier run with other inputs)", url)
            storage.delete(url)
        elif f.startswith(".") and f.endswith(".tmp") and (
                SHARD_FILE.match(f[1:].rsplit(".", 2)[0])
                or f[1:].rsplit(".", 2)[0] in (shardio.MANIFEST, shardio.SKIPPED)):
            storage.delete(url)  # temp file of an interrupted write


def verify(out: str | Path) -> tuple[int, int, list[tuple[str, str]]]:
    """``(shards, samples, problems)`` after re-reading every shard of ``out``'s manifest."""
    out = str(out)
    storage.check_access(out, what="shards")
    try:
        rows, _ = shardio.read_manifest(out)
    except FileNotFoundError:
        raise UserError(f"{out!r} has no {shardio.MANIFEST}; pass a directory written by `stylegen shard`") from None
    except OSError as e:
        raise UserError(f"shards {storage.explain(e, out)}") from None
    problems = [(r["file"], why) for r in rows if (why := shardio.verify_shard(storage.join(out, r["file"]), r))]
    return len(rows), sum(r["samples"] for r in rows), problems


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="image folders (recursive; Kaggle train_64x64/train_64x64 layout too), ImageNet64 npz "
                        "files or folders of them, image files; or 'verify DIR'")
    p.add_argument("--out", metavar="DIR", help="output directory for shards, manifest.parquet, skipped.parquet")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--encoding", choices=["png", "raw"], default="png",
                   help="png (smaller) or raw 64x64x3 uint8 .rgb8 (fastest to load)")
    p.add_argument("--size", type=int, default=64, help="output side in pixels (default 64)")
    p.add_argument("--crops-per-image", type=int, default=1, metavar="K",
                   help="1: resize shorter side + centre crop; K > 1: K random square crops (large style images)")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="fraction of inputs held out as the val split (folders named valid*/val and val_data npz "
                        "always go to val); default 0.01")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed for split assignment, order and crops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.sources[0] == "verify":
        if len(args.sources) != 2:
            raise UserError("usage: stylegen shard verify DIR (exactly one directory)")
        shards, samples, problems = verify(args.sources[1])
        for f, why in problems:
            print(f"{f}: {why}")
        if problems:
            raise UserError(f"{len(problems)} of {shards} shards in {args.sources[1]} failed verification; "
                            "re-run the same `stylegen shard` command to rebuild them")
        print(f"verified {shards} shards, {samples} samples: all checksums and counts match")
        return 0
    if not args.out:
        raise UserError("--out DIR is required (where the shards and manifest.parquet go)")
    # upper bounds: --size as data.image_size; more crops per image than this is a typo that would never finish
    for name, v, lo, hi in (("--shard-size", args.shard_size, 1, 10_000_000), ("--size", args.size, 8, 1024),
                            ("--crops-per-image", args.crops_per_image, 1, 10_000), ("--workers", args.workers, 0, 1024)):
        if not lo <= v <= hi:
            raise UserError(f"{name} {v} is out of range; expected an integer between {lo} and {hi:,}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction} is out of range; expected 0 <= F < 1")
    params = ShardParams(size=args.size, encoding=args.encoding, shard_size=args.shard_size,
                         crops=args.crops_per_image, val_fraction=args.val_fraction, seed=args.seed)
    summary = build_shards(args.sources, args.out, params, workers=args.workers or None,
                           progress=not args.no_progress)
    print(summary.line())
    return 0

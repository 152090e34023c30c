"""WebDataset shards -> ``(content, style)`` uint8 batches, the same number on every rank.

Per stream (content, style) and per DataLoader worker, a small pipeline:

    shard URLs --split_by_node--> rank's URLs --[worker]--> seeded shard order
      -> windows of data.shuffle_shards shards (remote: the next window is read while this one
         decodes; local: only the headers are read to index a window, each sample when it is taken;
         hand-rolled tar walk, checksums checked for all headers at once)
      -> the window's samples in a seeded permutation, a seeded flip bit each
      -> decode into a preallocated (B, H, W, 3) array -> exactly n batches

Everything after the shard list is a function of (seed, epoch, rank, worker, window index), so a
stream's position is two integers (``StreamPos``: windows done, samples into the next) and a
resumed run seeks there by drawing the earlier windows' shard names without reading them
(``DataState`` in every checkpoint; see train/loop.py). ``data.sampling='resampled'`` draws
shards with replacement, an endless stream of which each rank takes exactly
``steps_per_epoch`` batches; ``'epoch'`` takes a seeded permutation of the rank's shards and a
batch count from the manifests that every (rank, worker) can fill, so every content sample is
seen once per epoch (the remainder dropped). Either way uneven shard counts can never make one
DDP rank stop early and hang the others. Decoding is done by hand (``np.frombuffer`` for raw,
PIL for PNG), not by webdataset's generic decoders, which are several times slower.
Batches are ``torch.uint8`` of shape (B, 3, H, W) (a channels-last view of the
decoded array, no copy); the trainer converts to float on its device.

A corrupt sample (undecodable image, wrong size, truncated shard, unreadable shard)
is skipped and counted in ``PairLoader.skipped``; it never stops training.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import itertools
import logging
import multiprocessing
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stylegen import storage
from stylegen.config import StorageConfig
from stylegen.data import shardio
from stylegen.data.augment import jitter_colors
from stylegen.data.embedded import ensure_embedded
from stylegen.data.procedural import mix_procedural
from stylegen.errors import UserError

if TYPE_CHECKING:
    from stylegen.config import DataConfig

log = logging.getLogger(__name__)
MAX_EMPTY_SHARDS = 200  # consecutive shards without one good sample: the data is unusable


# ----------------------------------------------------------------------------- shard lists

def resolve_shards(spec: list[str], split: str | None = "train", storage_cfg: StorageConfig | None = None) -> list[str]:
    """Shard URLs from dirs or object-store prefixes (their manifest's ``split`` rows; all rows when
    split is None), brace patterns (``data/train-{000000..000009}.tar``), globs, files or single URLs."""
    import webdataset as wds

    urls: list[str] = []
    for s in spec:
        if "{" in s:
            urls += wds.shardlists.expand_urls(s)
        elif storage.is_remote(s) and not s.endswith(".tar") and storage.scheme(s) not in ("http", "https"):
            urls += _remote_dir(s, split, storage_cfg)
        elif storage.is_remote(s) or s.startswith("pipe:"):
            urls.append(s)
        elif (p := Path(s).expanduser()).is_dir():
            if (p / shardio.MANIFEST).is_file():
                rows, _ = shardio.read_manifest(p)
                urls += _children(p, [r["file"] for r in rows if split is None or r["split"] == split])
            else:
                found = sorted(glob.glob(str(p / (f"{split}-*.tar" if split else "*.tar"))))
                if not found and not glob.glob(str(p / "*.tar")):
                    raise UserError(f"shard directory {s!r} has no manifest.parquet and no .tar files; "
                                    "make shards with `stylegen shard SRC --out DIR`")
                urls += found
        elif any(c in s for c in "*?["):
            found = sorted(glob.glob(str(p)))
            if not found:
                raise UserError(f"shard pattern {s!r} matches no files; check the path")
            urls += found
        elif p.is_file():
            urls.append(s)
        else:
            raise UserError(f"shard source {s!r} does not exist; pass a shard dir, a brace pattern, a glob or a .tar")
    return list(dict.fromkeys(urls))


def _children(folder: Path, names: list[str]) -> list[str]:
    """``str(folder / name)`` of each name; a plain file name (most: no '/', not '', '.' or '..') joined
    as a string to the prefix pathlib gives, ~20x cheaper (a resume builds 1282 ImageNet64 shard paths)."""
    prefix = str(folder / "x")[:-1]
    return [prefix + n if n and "/" not in n and n not in (".", "..") else str(folder / n) for n in names]


def _remote_dir(prefix: str, split: str | None, storage_cfg: StorageConfig | None) -> list[str]:
    """Shards under an object-store prefix: its manifest decides the files and the split; without
    one, the ``{split}-*.tar`` objects. Unreachable storage is one clear line, before training."""
    storage.check_access(prefix, storage_cfg, what="shards")
    try:
        rows, _ = shardio.read_manifest(prefix, storage_cfg)
    except FileNotFoundError:
        found = storage.list_files(prefix, f"{split}-*.tar" if split else "*.tar", storage_cfg)
        if not found and not storage.list_files(prefix, "*.tar", storage_cfg):
            raise UserError(f"{prefix!r} has no manifest.parquet and no .tar objects; "
                            "make shards with `stylegen shard SRC --out {prefix}`") from None
        return found
    except OSError as e:
        raise UserError(f"shards {storage.explain(e, prefix)}") from None
    return [storage.join(prefix, r["file"]) for r in rows if split is None or r["split"] == split]


def _urls_for(spec: list[str], split: str, what: str, explicit_val: bool,
              storage_cfg: StorageConfig | None) -> list[str]:
    if explicit_val:
        urls = resolve_shards(spec, None, storage_cfg)
    else:
        urls = resolve_shards(spec, split, storage_cfg)
        if not urls and split == "val":
            log.warning("no 'val' shards in %s; using its train shards for %s validation", spec, what)
            urls = resolve_shards(spec, "train", storage_cfg)
    if not urls:
        raise UserError(f"no {split} shards found for data.{what} = {spec}; check the paths or run `stylegen shard`")
    return urls


def stream_urls(data_cfg: DataConfig, split: str = "train",
                storage_cfg: StorageConfig | None = None) -> tuple[list[str], list[str], bool]:
    """``(content_urls, style_urls, style_is_content)`` following the config's defaults:
    no content -> embedded shards; no style -> embedded style (with embedded content)
    or the content shards read with another seed."""
    val = split == "val"
    content = list(data_cfg.val_content if val and data_cfg.val_content else data_cfg.content)
    style = list(data_cfg.val_style if val and data_cfg.val_style else data_cfg.style)
    c_explicit = val and bool(data_cfg.val_content)
    s_explicit = val and bool(data_cfg.val_style)
    if not content or not style and not data_cfg.content:
        emb = ensure_embedded()
        if not content:
            content, c_explicit = emb.train_content, False
        if not style:
            style, s_explicit = emb.train_style, False
    c_urls = _urls_for(content, split, "content", c_explicit, storage_cfg)
    if not style:
        return c_urls, c_urls, True
    return c_urls, _urls_for(style, split, "style", s_explicit, storage_cfg), False


def _rank_share(urls: list[str], rank: int | None, world: int | None) -> tuple[list[str], int, int]:
    """The rank's shards via ``webdataset.split_by_node`` (RANK/WORLD_SIZE or torch.distributed)."""
    import webdataset as wds

    if rank is None or world is None:
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        share = list(wds.split_by_node(urls))
    else:
        share = urls[rank::world] if world > 1 else list(urls)
    if not share:  # fewer shards than ranks: every rank resamples all, with its own seed
        share = list(urls)
    return share, rank, world


# ----------------------------------------------------------------------------- pipeline stages

class StreamPos(NamedTuple):
    """Where one sample stream stands: ``window`` windows of ``data.shuffle_shards`` shards are done
    and ``offset`` samples (corrupt ones included) of the next were consumed. Seeking to it reads
    only that window's shards: the earlier windows' shards are drawn from the seeded order, not read.
    (A NamedTuple: one is made per sample, 4x cheaper than a frozen dataclass.)"""

    window: int = 0
    offset: int = 0


def shard_order(urls: list[str], seed: int, sampling: str) -> Iterator[str]:
    """The stream's shards: drawn with replacement ('resampled'), or a seeded permutation repeated
    ('epoch': a second pass only pads a stream that corrupt samples made too short)."""
    rng = random.Random(seed)
    if sampling == "epoch":
        order = list(urls)
        rng.shuffle(order)
        while True:
            yield from order
    while True:
        yield urls[rng.randrange(len(urls))]


def read_url(url: str, storage_cfg: StorageConfig | None = None) -> bytes | storage.LocalFile:
    """A shard: ``pipe:CMD`` through webdataset's gopen, a local file opened for positional reads (a
    window's index reads only its headers, each sample is read when it is taken: a resume does not read
    the samples it skips), everything else whole through the storage layer (s3://, gs://, http(s)://,
    retried on transient faults)."""
    if url.startswith("pipe:"):
        import webdataset as wds

        with wds.gopen(url) as f:
            return f.read()
    if not storage.is_remote(url):
        return storage.LocalFile(storage.local_path(url))  # read where needed: headers, then kept samples
    return storage.read_bytes(url, storage_cfg)


def _read_in_thread(url: str, storage_cfg: StorageConfig | None) -> Future:
    """The shard's bytes, read by a thread that ends with the read (nothing lingers to shut down)."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(read_url(url, storage_cfg))
        except BaseException as e:  # delivered to the reader by fut.result()
            fut.set_exception(e)
    threading.Thread(target=run, name="stylegen-prefetch", daemon=True).start()
    return fut


def prefetched(urls: Iterator[str], storage_cfg: StorageConfig | None = None,
               ahead: int = 1) -> Iterator[tuple[str, Future]]:
    """``(url, future of its bytes)``: remote shards are read ``ahead`` shards ahead, each in a thread
    (the read releases the GIL), so the downloads of the next window overlap the decoding of this one;
    local files are opened inline when needed (nothing ahead: a fresh start or a resume indexes one
    window per stream before its first batch, reading its headers). Memory: ``ahead`` remote shards
    beyond the ones being decoded."""
    pending: collections.deque[tuple[str, Future]] = collections.deque()
    for url in urls:
        if storage.is_remote(url):
            fut = _read_in_thread(url, storage_cfg)
        else:
            fut = Future()
            try:
                fut.set_result(read_url(url, storage_cfg))
            except OSError as e:
                fut.set_exception(e)
        pending.append((url, fut))
        if len(pending) > (ahead if storage.is_remote(url) else 0):  # a local read ahead would only delay
            yield pending.popleft()
    yield from pending


def _window_items(group: list[tuple[str, Future]], counter) -> tuple[list[str], list, list[int], list[int]]:
    """``(exts, shards, offsets, sizes)``, parallel lists over every sample with an image in a window's
    shards (``shards[i]``: the bytes, or the ``storage.LocalFile``, its image is sliced from); unreadable
    shards (after the storage layer's retries) and samples without image are counted."""
    exts: list[str] = []
    shards: list = []
    offsets: list[int] = []
    sizes: list[int] = []
    for url, fut in group:
        try:
            data = fut.result()
            view = data if isinstance(data, storage.LocalFile) else memoryview(data)  # slices: no copies
            plain = shardio.plain_images(data)  # the whole shard's index at once (None: walk it sample by sample)
            if plain is not None:
                e, o, z, without = plain
                exts += e
                offsets += o
                sizes += z
                shards += [view] * len(e)
                for _ in range(without):
                    _count(counter)
                continue
            for _, parts in shardio.iter_samples(data):
                ext = "rgb8" if "rgb8" in parts else "png" if "png" in parts else None
                if ext is None:
                    _count(counter)
                    continue
                exts.append(ext)
                shards.append(view)
                offsets.append(parts[ext][0])
                sizes.append(parts[ext][1])
        except (OSError, shardio.CorruptShard) as e:
            log.warning("skipping rest of shard %s: %s", url, e)
            _count(counter)
    return exts, shards, offsets, sizes


def window_samples(urls: list[str], seed: int, data_cfg: DataConfig, counter, start: StreamPos = StreamPos(),
                   storage_cfg: StorageConfig | None = None) -> Iterator[tuple[str, memoryview, bool, StreamPos]]:
    """``(ext, payload, flip, position after it)``: the samples of each window of ``data.shuffle_shards``
    shards in a seeded permutation, with a seeded flip bit each. Everything is a function of (seed,
    window index), so a stream restarted at ``start`` continues exactly where one stopped."""
    per = data_cfg.shuffle_shards
    order = shard_order(urls, seed, data_cfg.sampling)
    for _ in range(start.window * per):  # earlier windows: drawn, never read
        next(order)
    reads = prefetched(order, storage_cfg, ahead=per)  # the next window downloads while this one decodes
    window, empty = start.window, 0
    while True:
        exts, shards, offsets, sizes = _window_items(list(itertools.islice(reads, per)), counter)
        empty = 0 if exts else empty + per
        if empty >= MAX_EMPTY_SHARDS:
            raise UserError(f"{empty} shards in a row had no readable sample (last window {window} of {urls[0]}...); "
                            "check them with `stylegen shard verify DIR`")
        rng = random.Random(seed * 1_000_003 + window)
        perm = list(range(len(exts)))
        rng.shuffle(perm)
        flips = rng.getrandbits(len(exts)) if exts and data_cfg.hflip else 0
        unreadable: set[int] = set()  # the window's shards already warned about
        for k in range(start.offset if window == start.window else 0, len(perm)):
            j = perm[k]
            ext, data, off, size = exts[j], shards[j], offsets[j], sizes[j]
            # after a window's last sample the position is the next window's start: a resume there
            # reads only that window, not this one too
            after = StreamPos(window, k + 1) if k + 1 < len(perm) else StreamPos(window + 1, 0)
            try:
                payload = data[off:off + size]
            except OSError as e:  # a local shard cut or unreadable since its window was indexed
                if id(data) not in unreadable:
                    unreadable.add(id(data))
                    log.warning("skipping unreadable samples of shard %s: %s", getattr(data, "path", "?"), e)
                payload = b""  # not decodable: counted by batches()
            yield ext, payload, bool(flips >> j & 1), after
        window += 1


def decode_into(out: np.ndarray, ext: str, payload: bytes | memoryview, flip: bool) -> bool:
    """Decode one sample into ``out`` (H, W, 3) uint8; False when it is corrupt."""
    h, w, _ = out.shape
    if not len(payload):
        return False
    if ext == "rgb8":
        if len(payload) != h * w * 3:
            side = int(round((len(payload) / 3) ** 0.5))
            if side * side * 3 != len(payload):
                return False
            from PIL import Image

            arr = np.asarray(Image.fromarray(np.frombuffer(payload, np.uint8).reshape(side, side, 3)).resize((w, h)))
        else:
            arr = np.frombuffer(payload, np.uint8).reshape(h, w, 3)
    else:
        from PIL import Image

        try:
            im = Image.open(io.BytesIO(payload))
            im.load()
        except Exception:  # PIL raises many kinds on garbage
            return False
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BICUBIC)
        arr = np.asarray(im)
    if flip:  # one plane at a time: ~3x faster than a (H, W, 3) copy reversed along W (3-byte strides)
        for c in range(3):
            out[:, :, c] = arr[:, ::-1, c]
    else:
        out[...] = arr
    return True


def batches(src: Iterator[tuple[str, memoryview, bool, StreamPos]], batch_size: int, size: int,
            counter) -> Iterator[tuple[np.ndarray, StreamPos]]:
    """Samples -> ``((B, size, size, 3) uint8, stream position after the batch)``; corrupt samples
    are counted and replaced by the next."""
    out = np.empty((batch_size, size, size, 3), np.uint8)
    i = 0
    for ext, payload, flip, pos in src:
        if decode_into(out[i], ext, payload, flip):
            i += 1
            if i == batch_size:
                yield out, pos
                out, i = np.empty_like(out), 0
        else:
            _count(counter)


def style_transform(batch: np.ndarray, data_cfg: DataConfig, key: list[int]) -> np.ndarray:
    """A training style batch after ``data.procedural_styles`` (some samples replaced by procedural
    textures) and ``data.style_jitter`` (colour maps), both drawn from an rng seeded by ``key``: the
    stream's seed and its position after the batch, which a checkpoint already carries, so a resumed
    run transforms every later batch exactly as the uninterrupted run (and no state is added)."""
    if data_cfg.procedural_styles <= 0.0 and data_cfg.style_jitter <= 0.0:
        return batch
    rng = np.random.default_rng(key)
    batch = mix_procedural(batch, rng, data_cfg.procedural_styles)
    return jitter_colors(batch, rng, data_cfg.style_jitter) if data_cfg.style_jitter > 0.0 else batch


def _count(counter) -> None:
    with counter.get_lock():
        counter.value += 1


# ----------------------------------------------------------------------------- datasets

@dataclass
class DataState:
    """The data position a checkpoint carries: epoch, batches this rank consumed in it, and where
    each (rank, DataLoader worker)'s content and style streams stand. With the seeds (data.seed and
    the epoch) it defines the rest of the stream exactly."""

    epoch: int = 0
    batch: int = 0
    world: int = 1
    workers: int = 1
    # positions[rank][worker] = [content window, content offset, style window, style offset]
    positions: list[list[list[int]]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world": self.world, "workers": self.workers,
                "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict | None) -> DataState | None:
        if not d:
            return None
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]), world=int(d["world"]), workers=int(d["workers"]),
                   positions=[[[int(v) for v in w] for w in r] for r in d["positions"]])


class PairStream(IterableDataset):
    """Iterable of exactly ``steps`` ``(content, style, worker, content pos, style pos)`` batches for one
    rank (split over DataLoader workers), each stream starting at its worker's position in ``starts``."""

    def __init__(self, data_cfg: DataConfig, content: list[str], style: list[str], *,
                 rank: int, seed: int, counter, steps: int, storage_cfg: StorageConfig | None = None,
                 augment: bool = False) -> None:
        super().__init__()
        self.augment = augment  # training split: data.procedural_styles / data.style_jitter apply to styles
        self.data_cfg, self.content, self.style = data_cfg, content, style
        self.storage_cfg, self.steps = storage_cfg, steps
        self.rank, self.seed, self.counter, self.epoch = rank, seed, counter, 0
        self.starts: list[list[int]] = []  # per worker: [c window, c offset, s window, s offset]
        self.done: list[int] = []          # per worker: batches it already yielded this epoch
        self.rotate = 0                    # resumed at global batch b: b % workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, StreamPos, StreamPos]]:
        info = get_worker_info()
        nw = info.num_workers if info else 1
        # The DataLoader takes batches round-robin from worker 0 on; a stream resumed at global batch
        # b must continue with logical worker b % nw, so physical worker i plays logical (i + b) % nw.
        w = ((info.id if info else 0) + self.rotate) % nw
        n = worker_batches(self.steps, w, nw) - (self.done[w] if self.done else 0)
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.rank * 1009 + w
        cw, co, sw, so = self.starts[w] if self.starts else (0, 0, 0, 0)
        # each worker reads its own shards when there are enough, else all with its own seed
        c = self.content[w::nw] if len(self.content) >= nw else self.content
        s = self.style[w::nw] if len(self.style) >= nw else self.style
        size, bs = self.data_cfg.image_size, self.data_cfg.batch_size
        cs = batches(window_samples(c, 2 * base, self.data_cfg, self.counter, StreamPos(cw, co), self.storage_cfg),
                     bs, size, self.counter)
        style_cfg = dataclasses.replace(self.data_cfg, sampling="resampled")  # style: always an endless draw
        ss = batches(window_samples(s, 2 * base + 1, style_cfg, self.counter, StreamPos(sw, so), self.storage_cfg),
                     bs, size, self.counter)
        for (cb, cpos), (sb, spos) in itertools.islice(zip(cs, ss), max(n, 0)):
            if self.augment:
                sb = style_transform(sb, self.data_cfg, [2 * base + 1, spos.window, spos.offset])
            # (B, H, W, 3) -> (B, 3, H, W): a channels-last view, no copy
            yield torch.from_numpy(cb).permute(0, 3, 1, 2), torch.from_numpy(sb).permute(0, 3, 1, 2), w, cpos, spos


def worker_batches(steps: int, w: int, nw: int) -> int:
    """Batches DataLoader worker ``w`` of ``nw`` yields: the loader takes them round-robin."""
    return steps // nw + (1 if w < steps % nw else 0)


class PairLoader:
    """What ``build_loader`` returns: ``len()`` = batches per epoch; the first ``iter()`` runs the epoch
    from the position it was built with, each later one the next epoch; ``state()`` is the position
    after the last batch yielded."""

    def __init__(self, stream: PairStream, num_workers: int, world: int, epoch: int, start_batch: int = 0) -> None:
        self.stream, self.num_workers, self.world = stream, num_workers, world
        self.epoch, self.batch = epoch, start_batch
        nw = max(num_workers, 1)
        self.positions = [list(p) for p in stream.starts] if stream.starts else [[0, 0, 0, 0] for _ in range(nw)]

    def __len__(self) -> int:
        return self.stream.steps

    @property
    def skipped(self) -> int:
        """Corrupt samples/shards skipped so far (all epochs, all DataLoader workers)."""
        return int(self.stream.counter.value)

    def state(self) -> DataState:
        """This rank's position (``positions`` holds only this rank's row; the loop gathers all ranks')."""
        return DataState(epoch=self.epoch, batch=self.batch, world=self.world, workers=max(self.num_workers, 1),
                         positions=[[list(p) for p in self.positions]])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = self.stream
        stream.epoch = self.epoch
        if self.num_workers == 0:
            it = iter(stream)
        else:
            it = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=4))
        for content, style, w, cpos, spos in it:
            self.positions[w] = [cpos.window, cpos.offset, spos.window, spos.offset]
            self.batch += 1
            yield content, style
        # a finished epoch: the next iter() is the next epoch, from its start
        self.epoch, self.batch = self.epoch + 1, 0
        self.positions = [[0, 0, 0, 0] for _ in self.positions]
        stream.starts, stream.done, stream.rotate = [], [], 0


def epoch_steps(data_cfg: DataConfig, urls: list[str], world: int, storage_cfg: StorageConfig | None) -> int:
    """data.sampling='epoch': batches per rank so that every (rank, DataLoader worker) has enough samples
    from the manifests (the remainder is dropped); 'resampled': data.steps_per_epoch."""
    if data_cfg.sampling != "epoch":
        return data_cfg.steps_per_epoch
    counts = shard_counts(urls, storage_cfg)
    nw = max(data_cfg.num_workers, 1)
    per_worker = []
    for r in range(world):
        share = urls[r::world] if len(urls) >= world else urls
        for w in range(nw):
            mine = share[w::nw] if len(share) >= nw else share
            per_worker.append(sum(counts[u] for u in mine) // data_cfg.batch_size)
    if min(per_worker) < 1:
        raise UserError(f"data.sampling='epoch': {len(urls)} shards hold too few samples for {world} rank(s) x {nw} "
                        f"loader worker(s) at batch size {data_cfg.batch_size}; use fewer workers, a smaller batch "
                        "or data.sampling='resampled'")
    return min(per_worker) * nw


def shard_counts(urls: list[str], storage_cfg: StorageConfig | None) -> dict[str, int]:
    """Samples per shard URL, from the manifests beside the shards."""
    counts: dict[str, int] = {}
    for d in dict.fromkeys(storage.parent(u) for u in urls):
        try:
            rows, _ = shardio.read_manifest(d, storage_cfg)
        except (OSError, ValueError):
            continue
        counts.update({storage.join(d, r["file"]): int(r["samples"]) for r in rows})
    missing = [u for u in urls if u not in counts]
    if missing:
        raise UserError(f"data.sampling='epoch' needs shard dirs with a manifest.parquet (no sample count for "
                        f"{missing[0]}); make shards with `stylegen shard` or use data.sampling='resampled'")
    return counts


def build_loader(data_cfg: DataConfig, *, split: str = "train", rank: int | None = None,
                 world_size: int | None = None, epoch_seed: int = 0,
                 storage_cfg: StorageConfig | None = None, resume: DataState | None = None) -> PairLoader:
    """Loader of one epoch (``epoch_seed``) of (content, style) uint8 (B, 3, H, W) batches, the same
    number on every rank. rank/world_size default to RANK/WORLD_SIZE (set by Ray Train) or
    torch.distributed. ``resume``: continue that epoch from a saved position (same world and
    DataLoader workers; otherwise the caller restarts the epoch)."""
    c_urls, s_urls, _ = stream_urls(data_cfg, split, storage_cfg)  # same shards for both: the style seed differs
    c_share, r, world = _rank_share(c_urls, rank, world_size)
    s_share, _, _ = _rank_share(s_urls, rank, world_size)
    counter = multiprocessing.Value("q", 0)
    seed = data_cfg.seed + (7919 if split == "val" else 0)
    stream = PairStream(data_cfg, c_share, s_share, rank=r, seed=seed, counter=counter,
                        steps=epoch_steps(data_cfg, c_urls, world, storage_cfg), storage_cfg=storage_cfg,
                        augment=split == "train")
    start = 0
    if resume is not None and resume.epoch == epoch_seed:
        stream.starts = [list(p) for p in resume.positions[r]]
        nw = max(data_cfg.num_workers, 1)
        start = resume.batch
        stream.done = [worker_batches(start, w, nw) for w in range(nw)]
        stream.rotate = start % nw
    log.debug("rank %d/%d: %d content shards, %d style shards", r, world, len(c_share), len(s_share))
    return PairLoader(stream, data_cfg.num_workers, world, epoch_seed, start)


def _first_samples(urls: list[str], n: int, size: int, rng: random.Random,
                   storage_cfg: StorageConfig | None = None) -> np.ndarray:
    order = list(urls)
    rng.shuffle(order)
    out = np.empty((n, size, size, 3), np.uint8)
    i = 0
    for url in order:
        try:
            data = read_url(url, storage_cfg)
            for _, parts in shardio.iter_samples(data):
                ext = "rgb8" if "rgb8" in parts else "png" if "png" in parts else None
                if ext and decode_into(out[i], ext, data[parts[ext][0]:sum(parts[ext])], False):
                    i += 1
                    if i == n:
                        return out
        except (OSError, shardio.CorruptShard) as e:
            log.warning("skipping shard %s: %s", url, e)
    if i == 0:
        raise UserError(f"no readable samples in {len(urls)} shards (first {urls[0]})")
    return out[np.arange(n) % i]  # fewer samples than asked for: repeat them


def load_pairs(data_cfg: DataConfig, n: int, split: str = "val", seed: int = 1234,
               storage_cfg: StorageConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fixed (content, style) uint8 (n, 3, H, W) pairs for validation grids and eval: the same every call.
    Uses the held-out val split when there is one, else the train shards (with a warning)."""
    c_urls, s_urls, same = stream_urls(data_cfg, split, storage_cfg)
    size = data_cfg.image_size
    if same:  # style stream = content stream: take 2n samples, half for each
        both = _first_samples(c_urls, 2 * n, size, random.Random(seed), storage_cfg)
        c, s = both[:n], both[n:]
    else:
        c = _first_samples(c_urls, n, size, random.Random(seed), storage_cfg)
        s = _first_samples(s_urls, n, size, random.Random(seed + 1), storage_cfg)
    return (torch.from_numpy(np.ascontiguousarray(c.transpose(0, 3, 1, 2))),
            torch.from_numpy(np.ascontiguousarray(s.transpose(0, 3, 1, 2))))

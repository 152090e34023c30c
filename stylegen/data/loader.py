"""WebDataset shards -> ``(content, style)`` uint8 batches, the same number on every rank.

Per stream (content, style) and per DataLoader worker, a small pipeline:

    shard URLs --split_by_node--> rank's URLs --[worker]--> ResampledShards(seeded)
      -> read shard (hand-rolled tar walk) -> shuffle buffer -> decode into a
         preallocated (B, H, W, 3) array (+ random hflip) -> .with_epoch(n)

``resampled=True`` makes every stream endless, so each rank simply takes exactly
``steps_per_epoch`` batches: uneven shard counts can never make one DDP rank stop
early and hang the others. Decoding is done by hand (``np.frombuffer`` for raw,
PIL for PNG), not by webdataset's generic decoders, which are several times slower.
Batches are ``torch.uint8`` of shape (B, 3, H, W) (a channels-last view of the
decoded array, no copy); the trainer converts to float on its device.

A corrupt sample (undecodable image, wrong size, truncated shard, unreadable shard)
is skipped and counted in ``PairLoader.skipped``; it never stops training.
"""

from __future__ import annotations

import glob
import io
import logging
import multiprocessing
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stylegen import storage
from stylegen.config import StorageConfig
from stylegen.data import shardio
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
                urls += [str(p / r["file"]) for r in rows if split is None or r["split"] == split]
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
        from stylegen.data.embedded import ensure_embedded

        emb = ensure_embedded()
        if not content:
            content, c_explicit = [str(emb.content_dir)], False
        if not style:
            style, s_explicit = [str(emb.style_dir)], False
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

def _zero_seed() -> int:
    return 0


def read_url(url: str, storage_cfg: StorageConfig | None = None) -> bytes:
    """A whole shard: ``pipe:CMD`` through webdataset's gopen, everything else through the storage
    layer (local, s3://, gs://, http(s)://, retried on transient faults)."""
    if url.startswith("pipe:"):
        import webdataset as wds

        with wds.gopen(url) as f:
            return f.read()
    return storage.read_bytes(url, storage_cfg)


def prefetched(src: Iterator[dict], storage_cfg: StorageConfig | None = None) -> Iterator[tuple[dict, Future]]:
    """``(item, future of its bytes)``: remote shards are read one ahead in a thread (the read releases
    the GIL), so the download of shard k+1 overlaps the decoding of shard k; local files are read inline."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="stylegen-prefetch")
    try:
        pending: tuple[dict, Future] | None = None
        for item in src:
            if storage.is_remote(item["url"]):
                fut = pool.submit(read_url, item["url"], storage_cfg)
            else:
                fut = Future()
                try:
                    fut.set_result(read_url(item["url"], storage_cfg))
                except OSError as e:
                    fut.set_exception(e)
            if pending is not None:
                yield pending
            pending = (item, fut)
        if pending is not None:
            yield pending
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_shards(src: Iterator[dict], counter, storage_cfg: StorageConfig | None = None) -> Iterator[tuple[str, bytes]]:
    """``{url}`` -> ``(ext, payload)`` per sample; unreadable shards (after the storage layer's
    retries) and samples without image are counted and skipped."""
    empty = 0
    for item, fut in prefetched(src, storage_cfg):
        good = 0
        try:
            data = fut.result()
            for _, parts in shardio.iter_samples(data):
                ext = "rgb8" if "rgb8" in parts else "png" if "png" in parts else None
                if ext is None:
                    _count(counter)
                    continue
                off, size = parts[ext]
                good += 1
                yield ext, data[off:off + size]
        except (OSError, shardio.CorruptShard) as e:
            log.warning("skipping rest of shard %s: %s", item["url"], e)
            _count(counter)
        empty = 0 if good else empty + 1
        if empty >= MAX_EMPTY_SHARDS:
            raise UserError(f"{empty} shards in a row had no readable sample (last {item['url']}); "
                            "check them with `stylegen shard verify DIR`")


def shuffle(src: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: fill ``bufsize`` items, then each new item replaces a random one, which is yielded."""
    if bufsize <= 1:
        yield from src
        return
    buf: list = []
    for x in src:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        k = rng.randrange(bufsize)
        buf[k], x = x, buf[k]
        yield x
    rng.shuffle(buf)
    yield from buf


def decode_into(out: np.ndarray, ext: str, payload: bytes, flip: bool) -> bool:
    """Decode one sample into ``out`` (H, W, 3) uint8; False when it is corrupt."""
    h, w, _ = out.shape
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
    out[...] = arr[:, ::-1] if flip else arr
    return True


def batches(src: Iterator[tuple[str, bytes]], batch_size: int, size: int, hflip: bool,
            rng: random.Random, counter) -> Iterator[np.ndarray]:
    """Samples -> (B, size, size, 3) uint8 arrays; corrupt samples are counted and replaced by the next."""
    out = np.empty((batch_size, size, size, 3), np.uint8)
    i = 0
    for ext, payload in src:
        if decode_into(out[i], ext, payload, hflip and rng.random() < 0.5):
            i += 1
            if i == batch_size:
                yield out
                out, i = np.empty_like(out), 0
        else:
            _count(counter)


def _count(counter) -> None:
    with counter.get_lock():
        counter.value += 1


def _stream(urls: list[str], seed: int, data_cfg: DataConfig, nbatches: int, counter,
            storage_cfg: StorageConfig | None = None):
    import webdataset as wds

    rng = random.Random(seed)
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=_zero_seed, deterministic=True),
        lambda src: read_shards(src, counter, storage_cfg),
        lambda src: shuffle(src, data_cfg.shuffle_buffer, rng),
        lambda src: batches(src, data_cfg.batch_size, data_cfg.image_size, data_cfg.hflip, rng, counter),
    ).with_epoch(nbatches)


# ----------------------------------------------------------------------------- datasets

class PairStream(IterableDataset):
    """Iterable of exactly ``steps`` ``(content, style)`` batches for one rank (split over DataLoader workers)."""

    def __init__(self, data_cfg: DataConfig, content: list[str], style: list[str], *, same: bool,
                 rank: int, seed: int, counter, storage_cfg: StorageConfig | None = None) -> None:
        super().__init__()
        self.data_cfg, self.content, self.style, self.same = data_cfg, content, style, same
        self.storage_cfg = storage_cfg
        self.rank, self.seed, self.counter, self.epoch = rank, seed, counter, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        steps = self.data_cfg.steps_per_epoch
        n = steps // nw + (1 if w < steps % nw else 0)
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.rank * 1009 + w
        # each worker reads its own shards when there are enough, else all with its own seed
        c = self.content[w::nw] if len(self.content) >= nw else self.content
        s = self.style[w::nw] if len(self.style) >= nw else self.style
        cs = _stream(c, 2 * base, self.data_cfg, n, self.counter, self.storage_cfg)
        ss = _stream(s, 2 * base + 1, self.data_cfg, n, self.counter, self.storage_cfg)
        return _pairs(cs, ss)


def _pairs(cs, ss) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for cb, sb in zip(cs, ss):
        # (B, H, W, 3) -> (B, 3, H, W): a channels-last view, no copy
        yield torch.from_numpy(cb).permute(0, 3, 1, 2), torch.from_numpy(sb).permute(0, 3, 1, 2)


class PairLoader:
    """What ``build_loader`` returns: ``len()`` = steps_per_epoch; each ``iter()`` is a new epoch."""

    def __init__(self, stream: PairStream, num_workers: int) -> None:
        self.stream, self.num_workers = stream, num_workers

    def __len__(self) -> int:
        return self.stream.data_cfg.steps_per_epoch

    @property
    def skipped(self) -> int:
        """Corrupt samples/shards skipped so far (all epochs, all DataLoader workers)."""
        return int(self.stream.counter.value)

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = self.stream
        if self.num_workers == 0:
            it = iter(stream)
        else:
            it = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=4))
        stream.epoch += 1
        yield from it


def build_loader(data_cfg: DataConfig, *, split: str = "train", rank: int | None = None,
                 world_size: int | None = None, epoch_seed: int = 0,
                 storage_cfg: StorageConfig | None = None) -> PairLoader:
    """Loader of exactly ``data_cfg.steps_per_epoch`` (content, style) uint8 (B, 3, H, W) batches per epoch
    on this rank. rank/world_size default to RANK/WORLD_SIZE (set by Ray Train) or torch.distributed."""
    c_urls, s_urls, same = stream_urls(data_cfg, split, storage_cfg)
    c_share, r, world = _rank_share(c_urls, rank, world_size)
    s_share, _, _ = _rank_share(s_urls, rank, world_size)
    counter = multiprocessing.Value("q", 0)
    seed = data_cfg.seed + (7919 if split == "val" else 0)
    stream = PairStream(data_cfg, c_share, s_share, same=same, rank=r, seed=seed, counter=counter,
                        storage_cfg=storage_cfg)
    stream.epoch = epoch_seed
    log.debug("rank %d/%d: %d content shards, %d style shards", r, world, len(c_share), len(s_share))
    return PairLoader(stream, data_cfg.num_workers)


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

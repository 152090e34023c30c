"""The loader's tar index: the vectorised walk (``iter_members`` / ``plain_images``) gives exactly what the
member-by-member checked walk gives, on intact and damaged archives, in memory and through
``storage.LocalFile``; a local shard cut after its window was indexed is skipped, not fatal."""

from __future__ import annotations

import multiprocessing
import random

import pytest

from stylegen import storage
from stylegen.data import shardio
from stylegen.data.loader import batches, window_samples

NAMES = ["a.rgb8", "a.json", "b.PNG", "b.rgb8", "b.png", "c.json", "d/e.RGB8", "d/e.json", "d/e.rgb8", "f.x.rgb8",
         "g", "g.png", "h.rgb8", "/h.json", "i.png", "i.png", "j.rgb9", "k.rgb", "m.\x18gb8", "n.Rgb8", "o.rgb8.",
         "é.rgb8", "x/" * 60 + "long.rgb8"]


def walked(fn, data) -> tuple[list, str | None]:
    """Members up to the first error, and the error."""
    out = []
    try:
        for m in fn(data):
            out.append(m)
    except shardio.CorruptShard as e:
        return out, str(e)
    return out, None


def images_by_samples(data) -> tuple[list, int] | None:
    """What the loader takes from ``iter_samples``: each sample's .rgb8 (else .png) member, and the count without."""
    out, without = [], 0
    try:
        for _, parts in shardio.iter_samples(data):
            ext = "rgb8" if "rgb8" in parts else "png" if "png" in parts else None
            if ext is None:
                without += 1
            else:
                out.append((ext, *parts[ext]))
    except shardio.CorruptShard:
        return None
    return out, without


def archives(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [shardio.tar_bytes([(rng.choice(NAMES), rng.randbytes(rng.randrange(0, 1100)))
                               for _ in range(rng.randrange(0, 10))]) for _ in range(n)]


def damaged(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and d:
        d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        d = d[:rng.randrange(len(d) + 1)]
    elif kind == 2 and len(d) >= 512:  # a header field byte
        at = rng.randrange(len(d) // 512) * 512 + rng.choice([0, 99, 124, 134, 135, 148, 153, 154, 155, 156, 345])
        d[at] = rng.choice([0, 32, 48, 55, 56, 45, 95, 120, 53])
    elif d:
        d[rng.randrange(len(d))] = rng.randrange(256)
    return bytes(d)


def test_fast_walk_equals_the_checked_walk_on_intact_and_damaged_archives(tmp_path):
    rng = random.Random(1)
    plain = 0
    for i, base in enumerate(archives(40) * 25):
        data = base if i < 40 else damaged(base, rng)
        want = walked(shardio._iter_members_checked, data)
        assert walked(shardio.iter_members, data) == want
        got = shardio.plain_images(data)
        if got is not None:  # None: the loader groups with iter_samples instead
            exts, offsets, sizes, without = got
            assert (list(zip(exts, offsets, sizes)), without) == images_by_samples(data)
            plain += 1
        if i % 8 == 0:  # the same from disk, through positional reads
            path = tmp_path / f"{i}.tar"
            path.write_bytes(data)
            assert walked(shardio.iter_members, storage.LocalFile(path)) == want
            assert shardio.plain_images(storage.LocalFile(path)) == got
    assert plain > 300  # the fast path is taken for most archives, damaged or not


def test_a_corrupt_header_is_still_caught_with_the_checked_walks_error():
    data = bytearray(shardio.tar_bytes([(f"{i:03d}.rgb8", bytes(100)) for i in range(4)]))
    data[2048 + 10] ^= 1  # the third header's name: its checksum no longer matches
    assert shardio.plain_images(bytes(data)) is None
    members, err = walked(shardio.iter_members, bytes(data))
    assert len(members) == 2 and err == "tar header checksum mismatch at byte 2048"


def test_a_local_shard_cut_after_its_window_was_indexed_is_skipped_not_fatal(tmp_path):
    from stylegen.config import DataConfig

    path = tmp_path / "train-000000.tar"
    path.write_bytes(shardio.tar_bytes([(f"{i:03d}.rgb8", bytes([i]) * (64 * 64 * 3)) for i in range(8)]))
    cfg = DataConfig(content=[str(tmp_path)], style=[], shuffle_shards=1, batch_size=2, hflip=False)

    counter = multiprocessing.Value("q", 0)
    samples = window_samples([str(path)], 0, cfg, counter)
    first = next(samples)  # the window is indexed: its 8 samples
    path.write_bytes(path.read_bytes()[:512 * 3 + 64 * 64 * 3])  # cut in place: only the first sample's bytes left
    got = [first, *(next(samples) for _ in range(7))]
    cut = sum(len(p) == 0 for _, p, _, _ in got)
    assert cut >= 6  # the samples past the cut read as empty...
    out = list(batches(iter(got), 1, 64, counter))
    assert len(out) == 8 - cut and counter.value == cut  # ...and batches() counts them as corrupt


@pytest.mark.parametrize("chunk", [600, 4096])
def test_local_file_reads_slices_and_refuses_a_short_read(tmp_path, chunk):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)
    f = storage.LocalFile(path, chunk=chunk)
    assert len(f) == 10240 and f[5] == 5 and f[300:310] == bytes(range(44, 54)) and f[10230:] == bytes(range(246, 256))
    assert f[1000:900] == b"" and f[-2:] == bytes([254, 255])
    path.write_bytes(b"short")
    f2 = storage.LocalFile(tmp_path / "f", chunk=chunk)
    assert len(f2) == 5
    with pytest.raises(OSError, match="cut while open"):
        f[8000:9000]  # opened at 10240 bytes, now 5

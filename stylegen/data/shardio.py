"""Shard file formats: deterministic tar writing, a fast tar reader, manifest I/O, checksums.

A shard is a plain USTAR tar (WebDataset layout): per sample ``{key}.png`` or
``{key}.rgb8`` (raw H x W x 3 uint8) followed by ``{key}.json``. Every header field
that could vary between runs (mtime, uid/gid, names, mode) is fixed, so the same
samples always give the same bytes.

``manifest.parquet`` has one row per shard: file, split, samples, bytes, sha256,
encoding; its schema metadata holds ``stylegen`` = JSON of the run parameters and
fingerprint. ``skipped.parquet`` has one row per rejected input: path, reason
(and ``shard``: the shard the input would have gone to, '' when rejected before).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stylegen import storage
from stylegen.config import StorageConfig

MANIFEST = "manifest.parquet"
SKIPPED = "skipped.parquet"
IMAGE_EXTS = ("png", "rgb8")
MANIFEST_COLUMNS = ("file", "split", "samples", "bytes", "sha256", "encoding")


class CorruptShard(Exception):
    """The tar bytes cannot be parsed (truncated, bad header checksum...)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic USTAR archive of ``(name, payload)`` in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shard_file(url: str | Path, data: bytes, storage_cfg: StorageConfig | None = None) -> None:
    """Atomic (temp + rename, or temp object + copy), without fsync: a shard lost or torn by a crash
    fails its manifest checksum and is rebuilt by the next run, so durability is not worth a sync per shard."""
    storage.write_bytes(url, data, storage_cfg, fsync=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




def _octal(field: bytes) -> int:
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


_ZERO_BLOCK = bytes(512)
_USTAR = np.frombuffer(b"ustar", np.uint8)
_SIZE_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # the 11 octal digits of a size field
_CHK_WEIGHTS = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # the 6 octal digits of a checksum field


def iter_members(data: bytes) -> Iterator[tuple[str, int, int]]:
    """``(name, offset, size)`` of the regular files in a tar: bytes in memory or anything sliced like
    them (``storage.LocalFile``: only the headers are read).

    A hand-rolled USTAR walk (the loader's hot loop): the Python loop only finds the headers (one
    ``int()`` per member); their checksums and fields are then checked for all headers at once with
    numpy (~1.3 us per member in memory against ~5-8 us checking each in Python). Any header
    the vectorised check does not accept as plain (a bad checksum, an unusual field, a truncated
    member, another member type) sends the whole archive through ``_iter_members_checked``, the
    member-by-member walk, so the members yielded and the CorruptShard raised are exactly its own.
    """
    members = _scan_plain(data)
    yield from members if members is not None else _iter_members_checked(data)


def _scan_plain(data: bytes) -> list[tuple[str, int, int]] | None:
    """``iter_members`` of a plain archive (see ``_plain_headers``); None for any other."""
    plain = _plain_headers(data)
    if plain is None:
        return None
    h, offsets, sizes = plain
    nonzero = h[:, :100] != 0
    if (nonzero.sum(axis=1) == np.where(nonzero.all(axis=1), 100, nonzero.argmin(axis=1))).all():
        names = h[:, :100].copy().view("S100").ravel().tolist()  # NUL-padded names: numpy strips the padding
    else:
        names = [bytes(hd[:100]).split(b"\0", 1)[0] for hd in h]
    # a non-empty ustar prefix (long paths) goes before the name
    for i in np.flatnonzero((h[:, 257:262] == _USTAR).all(axis=1) & (h[:, 345] != 0)):
        names[i] = bytes(h[i, 345:500]).split(b"\0", 1)[0] + b"/" + names[i]
    return [(name.decode("utf-8", "replace"), off, size)
            for name, off, size in zip(names, offsets.tolist(), sizes.tolist())]


def _plain_headers(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(headers (M, 512) uint8, data offsets (M,), sizes (M,))`` of a tar whose headers are all plain
    regular-file headers (type '0' or NUL) with NUL/space-ended octal size and checksum fields and
    valid checksums, ending in a zero block or at the end of the data with nothing stray after it;
    None when anything else is met (the caller then walks member by member, which raises)."""
    heads = _walk_file(data) if isinstance(data, storage.LocalFile) else _walk(data)
    if heads is None:
        return None
    h = np.frombuffer(b"".join(heads), np.uint8).reshape(len(heads), 512)  # (M, 512)
    size_digits, chk_digits, ends = h[:, 124:135], h[:, 148:154], h[:, [135, 154, 155]]
    if not (_all_octal(size_digits) and _all_octal(chk_digits) and ((ends == 0) | (ends == 32)).all()
            and ((h[:, 156] == 48) | (h[:, 156] == 0)).all()):
        return None
    sizes = (size_digits.astype(np.int64) - 48) @ _SIZE_WEIGHTS
    # the checksum: unsigned sum of the header with its own 8 bytes counted as spaces (as the checked walk)
    chk = (chk_digits.astype(np.int64) - 48) @ _CHK_WEIGHTS
    if not (chk == np.add.reduce(h, axis=1, dtype=np.uint32) - h[:, 148:156].sum(axis=1, dtype=np.uint32)
            + 256).all():
        return None
    offsets = np.empty(len(heads), np.int64)  # each member's data starts after its header and the members before
    offsets[:1] = 512
    offsets[1:] = 512 + np.cumsum(512 + ((sizes[:-1] + 511) & ~511))
    if len(heads) and offsets[-1] + sizes[-1] > len(data):
        return None  # truncated last member
    return h, offsets, sizes


def plain_images(data: bytes) -> tuple[list[str], list[int], list[int], int] | None:
    """``(exts, offsets, sizes, samples without image)``: each sample's image as ``iter_samples`` groups
    a plain archive (see ``_plain_headers``) with ASCII names and no name prefixes: its last ``.rgb8``
    member, else its last ``.png``. None for any other archive. The loader's hot path: the grouping is
    done with numpy over all names at once, not per member in Python; parallel lists, not a tuple per
    sample (fewer objects for the garbage collector to track)."""
    plain = _plain_headers(data)
    if plain is None:
        return None
    h, offsets, sizes = plain
    m = len(offsets)
    if m == 0:
        return [], [], [], 0
    used = np.flatnonzero((h[:, :100] != 0).any(axis=0))
    width = int(used[-1]) + 2 if used.size else 1  # every name's bytes and at least one NUL after the longest
    name = h[:, :min(width, 100)]  # (M, width): the name fields, all of their non-NUL bytes
    nonzero = name != 0
    length = nonzero.sum(axis=1)
    first_nul = np.where(nonzero.all(axis=1), name.shape[1], nonzero.argmin(axis=1))
    if (length != first_nul).any() or (name >= 128).any() or (name[:, 0] == 47).any():
        return None  # a byte after the name's NUL, non-ASCII, or a leading '/': the generic grouping
    if ((h[:, 257:262] == _USTAR).all(axis=1) & (h[:, 345] != 0)).any():
        return None
    cols = np.arange(name.shape[1])
    dots = name == 46
    slashes = name == 47
    if slashes.any():  # only dots after the last '/' count
        dots &= cols > np.where(slashes, cols, -1).max(axis=1)[:, None]
    has_dot = dots.any(axis=1)
    dot = np.where(has_dot, dots.argmax(axis=1), length)  # key = name[:dot] (split_key), ext after it
    # a member starts a new sample unless its key equals its predecessor's: same length, same bytes up to it
    same = name[1:] == name[:-1]  # (M - 1, width)
    common = np.where(same.all(axis=1), name.shape[1], same.argmin(axis=1))
    new = np.ones(m, bool)
    new[1:] = (dot[1:] != dot[:-1]) | (common < dot[1:])
    group = np.cumsum(new) - 1  # (M,) sample index of each member
    rows = np.arange(m)

    def last_with_ext(ext: bytes) -> np.ndarray:  # (samples,) last member with that ext (lowercased), -1: none
        ok = has_dot & (length - dot - 1 == len(ext))
        for j, c in enumerate(ext):
            got = name[rows, np.minimum(dot + 1 + j, name.shape[1] - 1)]
            ok &= (got | 32) == c if chr(c).isalpha() else got == c
        idx = np.flatnonzero(ok)
        out = np.full(group[-1] + 1, -1)
        if not idx.size:
            return out
        last = np.append(group[idx][1:] != group[idx][:-1], True)
        out[group[idx][last]] = idx[last]
        return out

    rgb8, png = last_with_ext(b"rgb8"), last_with_ext(b"png")
    chosen = np.where(rgb8 >= 0, rgb8, png)
    keep = chosen >= 0
    exts = np.where(rgb8 >= 0, "rgb8", "png")[keep].tolist()
    return exts, offsets[chosen[keep]].tolist(), sizes[chosen[keep]].tolist(), int((~keep).sum())


def _walk(data: bytes) -> list[bytes] | None:
    """The header blocks of a tar in memory, found by their size fields only (checked by the caller);
    None when a size is not a number or stray bytes follow the last member."""
    n, pos, heads = len(data), 0, []
    try:
        while pos + 512 <= n:
            hdr = data[pos:pos + 512]
            if hdr[0] == 0 and hdr == _ZERO_BLOCK:
                return heads  # end-of-archive block
            size = int(hdr[124:135], 8)  # the only per-member Python work: find the next header
            if size < 0:
                return None
            heads.append(hdr)
            pos += 512 + ((size + 511) & ~511)
    except ValueError:
        return None
    return None if pos < n and any(data[pos:]) else heads


def _walk_file(f: storage.LocalFile, chunk: int = 4096) -> list[bytes] | None:
    """``_walk`` of a local file, reading only around its headers: one ``os.pread`` of ``chunk`` bytes
    per header not in the chunk read last (a small member's successor usually is). OSError when the
    file was cut since it was opened."""
    n, pos, heads = len(f), 0, []
    fd, buf, at, end = f.file.fileno(), b"", 0, 0
    pread, append, zero = os.pread, heads.append, _ZERO_BLOCK  # (locals: this loop runs per member)
    try:
        while pos + 512 <= n:
            if pos + 512 > end:  # (pos only grows: a header in the chunk read last is at pos - at >= 0)
                buf = pread(fd, chunk, pos)
                at, end = pos, pos + len(buf)
                if end < pos + 512:
                    raise OSError(f"{f.path}: {len(buf)} bytes at {pos}: the file was cut while open")
            i = pos - at
            hdr = buf[i:i + 512]
            if hdr[0] == 0 and hdr == zero:
                return heads
            size = int(hdr[124:135], 8)
            if size < 0:
                return None
            append(hdr)
            pos += 512 + ((size + 511) & ~511)
    except ValueError:
        return None
    return None if pos < n and any(f[pos:]) else heads


def _all_octal(digits: np.ndarray) -> bool:
    return bool(((digits >= 48) & (digits <= 55)).all())  # b"0" .. b"7"


def _iter_members_checked(data: bytes) -> Iterator[tuple[str, int, int]]:
    """The member-by-member walk: each header checksum-checked before the next is read; pax/GNU
    long-name archives (not written by us) fall back to ``tarfile``. Raises CorruptShard on a bad
    or truncated archive, after yielding the members before the bad one."""
    n, pos = len(data), 0
    while pos + 512 <= n:
        hdr = data[pos:pos + 512]
        if hdr[0] == 0 and not any(hdr):
            return  # end-of-archive block
        try:
            chk = _octal(hdr[148:156])
            size = _octal(hdr[124:136])
        except ValueError:
            raise CorruptShard(f"unparsable tar header at byte {pos}") from None
        if size < 0:
            raise CorruptShard(f"unparsable tar header at byte {pos}")
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise CorruptShard(f"tar header checksum mismatch at byte {pos}")
        typ = hdr[156:157]
        if typ in (b"x", b"g", b"L", b"K"):
            yield from _iter_members_tarfile(data, pos)
            return
        start = pos + 512
        if start + size > n:
            raise CorruptShard(f"truncated tar: member at byte {pos} needs {size} bytes, {n - start} left")
        if typ in (b"0", b"\0"):
            name = hdr[:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            yield name.decode("utf-8", "replace"), start, size
        pos = start + ((size + 511) & ~511)
    if pos < n and any(data[pos:]):
        raise CorruptShard(f"truncated tar: {n - pos} stray bytes at the end")


def _iter_members_tarfile(data: bytes, pos: int) -> Iterator[tuple[str, int, int]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data[pos:]), mode="r:") as tar:
            for info in tar:
                if info.isreg():
                    yield info.name, pos + info.offset_data, info.size
    except tarfile.TarError as e:
        raise CorruptShard(f"bad tar: {e}") from None


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_samples(data: bytes) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Group consecutive members by key: ``(key, {ext: (offset, size)})``."""
    key, parts = None, {}
    for name, off, size in iter_members(data):
        k, ext = split_key(name)
        if k != key:
            if key is not None:
                yield key, parts
            key, parts = k, {}
        parts[ext] = (off, size)
    if key is not None:
        yield key, parts


def count_samples(data: bytes) -> int:
    """Samples with an image member (``.png`` or ``.rgb8``); raises CorruptShard."""
    return sum(1 for _, parts in iter_samples(data) if any(e in parts for e in IMAGE_EXTS))


# ----------------------------------------------------------------------------- manifests

def write_table(path: str | Path, rows: list[dict[str, Any]], columns: dict[str, Any], meta: dict | None = None,
                storage_cfg: StorageConfig | None = None) -> None:
    """Atomically write ``rows`` as parquet with the given ``{name: pyarrow type}`` schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, t) for c, t in columns.items()],
                       metadata={"stylegen": json.dumps(meta, sort_keys=True)} if meta is not None else None)
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(path, buf.getvalue(), storage_cfg)


def write_manifest(out: str | Path, rows: list[dict[str, Any]], meta: dict,
                   storage_cfg: StorageConfig | None = None) -> None:
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r["file"])
    write_table(storage.join(out, MANIFEST), rows, {"file": pa.string(), "split": pa.string(), "samples": pa.int64(),
                                                    "bytes": pa.int64(), "sha256": pa.string(),
                                                    "encoding": pa.string()}, meta, storage_cfg)


def write_skipped(out: str | Path, rows: list[dict[str, str]], storage_cfg: StorageConfig | None = None) -> None:
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: (r["path"], r["reason"], r["shard"]))
    write_table(storage.join(out, SKIPPED), rows, {"path": pa.string(), "reason": pa.string(), "shard": pa.string()},
                storage_cfg=storage_cfg)


def read_table(path: str | Path, storage_cfg: StorageConfig | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Rows and stylegen metadata of a parquet file (local or on object storage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(storage.read_bytes(path, storage_cfg)))
    raw = (table.schema.metadata or {}).get(b"stylegen")
    return table.to_pylist(), (json.loads(raw) if raw else {})


def read_manifest(out: str | Path, storage_cfg: StorageConfig | None = None) -> tuple[list[dict[str, Any]], dict]:
    """``(rows, meta)``; raises FileNotFoundError when there is no manifest."""
    return read_table(storage.join(out, MANIFEST), storage_cfg)


def verify_shard(url: str | Path, row: dict[str, Any], storage_cfg: StorageConfig | None = None) -> str | None:
    """None when ``url`` matches its manifest row, else what is wrong."""
    try:
        data = storage.read_bytes(url, storage_cfg)
    except FileNotFoundError:
        return "missing"
    if len(data) != row["bytes"]:
        return f"size {len(data)} != manifest {row['bytes']}"
    digest = sha256_bytes(data)
    if digest != row["sha256"]:
        return f"sha256 {digest[:12]}... != manifest {row['sha256'][:12]}..."
    try:
        n = count_samples(data)
    except CorruptShard as e:
        return str(e)
    if n != row["samples"]:
        return f"{n} samples != manifest {row['samples']}"
    return None

"""One storage layer for every path stylegen reads or writes: local paths, ``s3://``, ``gs://``,
and read-only ``http(s)://`` (shards).

Why ``pyarrow.fs`` (and not fsspec/s3fs): it is already a dependency (manifests are Parquet),
it is what Ray Train itself uses for ``storage_path``/``storage_filesystem`` (so the filesystem
object we build for our own reads and writes is the one Ray writes checkpoints with), its
``S3FileSystem`` takes an ``endpoint_override`` for S3-compatible servers (MinIO, Ceph, R2) and
the AWS SDK's standard retry strategy (throttling, 5xx, connection resets), and it needs no
second client stack (s3fs pulls aiobotocore). pyarrow has no HTTP filesystem: ``http(s)://``
shards are read with ``urllib`` under the same retry loop.

URLs stay strings everywhere (``s3://bucket/prefix/train-000000.tar``); :func:`resolve` turns
one into ``(filesystem, path)`` at the moment of I/O. Writes are atomic on every backend: a
local temp file renamed over the target, or a temp object server-side-copied to its key (an
object appears complete or not at all). Errors a user can fix (missing bucket, wrong
credentials, endpoint down) become one :class:`UserError` line naming the URL and the fix.
"""

from __future__ import annotations

import errno
import dataclasses
import fnmatch
import logging
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from stylegen.config import StorageConfig
from stylegen.errors import UserError

log = logging.getLogger(__name__)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
ENDPOINT_ENV = "AWS_ENDPOINT_URL"


# ----------------------------------------------------------------------------- URLs

def scheme(url: str) -> str:
    """'' for a local path (or file://), else the URL scheme ('s3', 'gs', 'http', ...)."""
    s = urlparse(str(url)).scheme.lower()
    return "" if s in ("", "file") or len(s) == 1 else s  # 'c' of a Windows drive is a path


def is_remote(url: str | Path) -> bool:
    return scheme(str(url)) in REMOTE_SCHEMES


def join(url: str | Path, *parts: str) -> str:
    """``join('s3://b/p', 'x.tar') == 's3://b/p/x.tar'``; local paths join as paths."""
    if not is_remote(url):
        return str(Path(str(url).removeprefix("file://")).joinpath(*parts))
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def name(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


def local_path(url: str | Path) -> Path:
    return Path(str(url).removeprefix("file://")).expanduser()


def absolute(url: str | Path) -> str:
    """A remote URL as it is; a local path (``~``, ``file://``, relative) as an absolute path."""
    return str(url) if is_remote(url) else str(local_path(url).resolve())


def _endpoint(cfg: StorageConfig) -> tuple[str | None, str | None]:
    """(host[:port], scheme) for endpoint_override, from the config or $AWS_ENDPOINT_URL."""
    ep = cfg.endpoint or os.environ.get(ENDPOINT_ENV, "")
    if not ep:
        return None, None
    u = urlparse(ep if "://" in ep else f"https://{ep}")
    return u.netloc, u.scheme


def filesystem(url: str, cfg: StorageConfig | None = None) -> pafs.FileSystem:
    """The pyarrow filesystem for ``url``'s scheme (picklable: Ray ships it to workers)."""
    cfg = cfg or StorageConfig()
    s = scheme(url)
    if s == "":
        return pafs.LocalFileSystem()
    if s == "s3":
        host, ep_scheme = _endpoint(cfg)
        region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=host, scheme=ep_scheme, region=region,
                                 connect_timeout=cfg.timeout, request_timeout=cfg.timeout,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries))
    if s in ("gs", "gcs"):
        from datetime import timedelta

        try:  # it resolves credentials here: a missing/bad credentials file raises now
            return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=cfg.timeout * cfg.retries))
        except Exception as e:  # pyarrow raises ArrowInvalid (not OSError) for unusable credentials
            raise OSError(f"GCS credentials: {e}") from None
    raise UserError(f"{url!r}: {s}:// is read-only here (shards only); use a local path, s3:// or gs://")


def resolve(url: str | Path, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a URL or local path."""
    url = str(url)
    if not is_remote(url):
        return pafs.LocalFileSystem(), str(local_path(url).resolve())
    u = urlparse(url)
    return filesystem(url, cfg), f"{u.netloc}{u.path}".rstrip("/")


def ray_storage(url: str, cfg: StorageConfig | None = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train/Tune ``RunConfig``: a remote URL goes
    with our filesystem (endpoint, retries) and its path stripped of the scheme, as Ray asks."""
    if not is_remote(url):
        return absolute(url), None
    fs, path = resolve(url, cfg)
    return path, fs


# ----------------------------------------------------------------------------- errors

_ADDRESS = re.compile(r"[a-z][a-z0-9+.-]*://\S+|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?")


def status_codes(text: str) -> set[int]:
    """The 3-digit numbers in an error text that can be HTTP status codes: whole numbers, not digits
    of an address (an endpoint ``http://127.0.0.1:40312`` holds no 403)."""
    return {int(n) for n in re.findall(r"\b[1-5]\d\d\b", _ADDRESS.sub(" ", text))}


def explain(e: BaseException, url: str) -> str:
    """One line naming what is wrong with ``url`` and the fix (for pyarrow / urllib errors)."""
    text = " ".join(str(e).split())
    low = text.lower()
    codes = status_codes(low)
    if "nosuchbucket" in low or "bucket does not exist" in low or ("bucket" in low and "not found" in low):
        return f"{url}: the bucket does not exist; create it or fix the bucket name"
    if any(k in low for k in ("accessdenied", "access denied", "access_denied", "invalidaccesskeyid", "signaturedoesnotmatch",
                              "forbidden", "credentials", "unauthenticated")) or codes & {403, 401}:
        return (f"{url}: access denied (wrong or missing credentials); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(or an instance role / service account; for gs:// GOOGLE_APPLICATION_CREDENTIALS)")
    if any(k in low for k in ("couldn't connect", "could not connect", "connection refused", "curlcode: 7",
                              "failed to connect", "timed out", "timeout", "name or service not known",
                              "couldn't resolve", "resolve host", "curlcode: 6", "connection reset", "urlopen error")):
        ep = os.environ.get(ENDPOINT_ENV, "")
        return (f"{url}: storage endpoint unreachable{f' ({ep})' if ep else ''}; check the endpoint "
                "(storage.endpoint / AWS_ENDPOINT_URL) and the network")
    if isinstance(e, FileNotFoundError) or "not found" in low or 404 in codes or "nosuchkey" in low:
        return f"{url}: not found; check the path"
    return f"{url}: storage error ({text[:200]})"


def _transient(e: BaseException) -> bool:
    low = str(e).lower()
    if isinstance(e, urllib.error.HTTPError):
        return e.code == 429 or e.code >= 500
    return bool(status_codes(low) & {500, 502, 503, 504}) or any(
        k in low for k in ("throttl", "slowdown", "slow down", "internalerror", "connection reset", "timed out",
                           "timeout", "broken pipe", "curlcode: 56", "curlcode: 52", "temporarily"))


def retry(fn, url: str, attempts: int = 5, base_delay: float = 0.2):
    """``fn()`` retried with jittered exponential backoff while its error looks transient
    (throttling, 5xx, reset connections); the last error is re-raised (pyarrow's non-OSError
    ArrowException as OSError, so callers handle one kind)."""
    for i in range(attempts):
        try:
            try:
                return fn()
            except pa.ArrowException as e:
                if isinstance(e, OSError):
                    raise
                raise OSError(str(e)) from None
        except (OSError, urllib.error.URLError) as e:
            if i == attempts - 1 or not _transient(e):
                raise
            delay = base_delay * 2 ** i * (0.5 + random.random())
            log.warning("%s: transient storage error (%s); retry %d/%d in %.1f s", url, str(e).splitlines()[0][:120],
                        i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- reads

def read_bytes(url: str | Path, cfg: StorageConfig | None = None) -> bytes:
    """The whole object/file, retried on transient faults. Raises OSError (FileNotFoundError when absent)."""
    url = str(url)
    cfg = cfg or StorageConfig()
    s = scheme(url)
    if s == "":
        with open(local_path(url), "rb") as f:
            return f.read()
    if s in ("http", "https"):
        def get() -> bytes:
            with urllib.request.urlopen(url, timeout=cfg.timeout) as r:
                return r.read()
        try:
            return retry(get, url, cfg.retries)
        except urllib.error.HTTPError as e:
            raise (FileNotFoundError if e.code == 404 else OSError)(f"{url}: HTTP {e.code}") from None
        except urllib.error.URLError as e:
            raise OSError(f"{url}: {e.reason}") from None
    fs, path = resolve(url, cfg)

    def get_obj() -> bytes:
        # a random-access file knows its size: one HEAD + one GET. (open_input_stream cannot seek and
        # reads in 256 KiB ranged GETs: 27 requests for a 6.6 MiB shard, 0.11x a bare get-object loop)
        with fs.open_input_file(path) as f:
            return f.read()
    return retry(get_obj, url, cfg.retries)


class LocalFile:
    """A local file opened for positional reads: ``f[a:b]`` is ``os.pread`` of those bytes, so a reader
    that needs only parts of a large file (a shard's headers, the samples it keeps) reads only those,
    not the whole file up front. A read shorter than ``chunk`` reads (and keeps) a whole chunk, so
    walking a tar's headers costs at most one read per header, none for one right after a small member.
    ``len()`` is the size when opened; a read cut short (the file shrank since) raises OSError, as does
    any failed read: unlike a memory map, a file cut in place is an error to skip, not a SIGBUS. The
    file stays open as long as the object lives."""

    def __init__(self, path: str | Path, chunk: int = 4096) -> None:
        self.path, self.chunk = str(path), chunk
        self.file = open(path, "rb", buffering=0)  # closed when the object is collected
        self.size = os.fstat(self.file.fileno()).st_size
        self.cached, self.cached_at = b"", 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, int):
            if not 0 <= key < self.size:
                raise IndexError(f"{self.path}: byte {key} of {self.size}")
            return self[key:key + 1][0]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("LocalFile slices have no step")
        n = max(stop - start, 0)
        lo = start - self.cached_at
        if 0 <= lo and start + n <= self.cached_at + len(self.cached):
            return self.cached[lo:lo + n]
        if n < self.chunk:  # a header: read a chunk, the next small member's header is often in it
            self.cached, self.cached_at = os.pread(self.file.fileno(), min(self.chunk, self.size - start), start), start
            got = self.cached[:n]
        else:
            got = os.pread(self.file.fileno(), n, start)
        if len(got) != n:
            raise OSError(f"{self.path}: {len(got)} of {n} bytes at {start}: the file was cut while open")
        return got


def _info(url: str | Path, cfg: StorageConfig | None, what):
    """``fs.get_file_info(what(path))``, retried on transient faults, failures as OSError."""
    cfg = cfg or StorageConfig()
    fs, path = resolve(url, cfg)
    return retry(lambda: fs.get_file_info(what(path)), str(url), cfg.retries), path


def list_files(url: str | Path, pattern: str = "*", cfg: StorageConfig | None = None,
               recursive: bool = False) -> list[str]:
    """Sorted URLs of the files under ``url`` whose name matches ``pattern`` ([] when it is absent)."""
    url = str(url)
    infos, path = _info(url, cfg, lambda p: pafs.FileSelector(p, allow_not_found=True, recursive=recursive))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, pattern):
            rel = info.path[len(path):].lstrip("/")
            out.append(join(url, rel))
    return sorted(out)


def file_size(url: str, cfg: StorageConfig | None = None) -> int | None:
    info = _info(url, cfg, lambda p: p)[0]
    return info.size if info.type == pafs.FileType.File else None


# ----------------------------------------------------------------------------- writes

def _honour_umask(path: str) -> None:
    """mkstemp creates 0600; give the file what a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync_dir(path: str | Path) -> None:
    """fsync a local directory (its entries: a rename into it survives a crash once this returns)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (and platforms) cannot sync a directory: not a write failure
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


WRITE_FIXES = {  # callers add their own "or choose another --out"
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f)",
    errno.EROFS: "remount it read-write",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
    errno.EEXIST: "pass another path",
}


def describe_write_error(e: OSError) -> tuple[str, str]:
    """``('ENOSPC: No space left on device', 'free disk space')``: the error by its errno name, and the fix."""
    code = errno.errorcode.get(e.errno or 0, "")
    text = e.strerror or " ".join(str(e).split())[:160] or type(e).__name__
    return (f"{code}: {text}" if code else text), WRITE_FIXES.get(e.errno or 0, "make it writable or free space")


def write_bytes(url: str | Path, data: bytes, cfg: StorageConfig | None = None, *, fsync: bool = True) -> None:
    """Atomic write: local temp file + rename (file and directory fsync'd unless ``fsync=False``;
    the file gets 0666 & ~umask, as open() would give it), or a temp object
    server-side-copied to ``url`` and deleted, retried on transient faults."""
    url = str(url)
    if not is_remote(url):
        path = local_path(url)
        if path.exists() and not path.is_file() and not path.is_dir():  # the rename would delete it
            raise OSError(errno.EEXIST, "a FIFO, device or socket, not a regular file", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            _honour_umask(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if fsync:  # the rename itself lives in the directory: sync it too, or a crash may lose the new name
            fsync_dir(path.parent)
        return
    cfg = cfg or StorageConfig()
    fs, path = resolve(url, cfg)
    tmp = f"{path.rsplit('/', 1)[0]}/.{name(path)}.{uuid.uuid4().hex[:8]}.tmp"

    def put() -> None:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    try:
        retry(put, url, cfg.retries)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def delete(url: str | Path, cfg: StorageConfig | None = None) -> None:
    cfg = cfg or StorageConfig()
    fs, path = resolve(url, cfg)
    try:
        retry(lambda: fs.delete_file(path), str(url), cfg.retries)
    except FileNotFoundError:
        pass


def download(url: str, dest: Path, cfg: StorageConfig | None = None) -> Path:
    """Copy one file/object to a local path (atomically)."""
    write_bytes(dest, read_bytes(url, cfg), fsync=False)
    return dest


def probe_writable(directory: Path) -> None:
    """Create ``directory`` (and its parents) and a temporary file in it; the OSError when either fails."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix=".write-probe-", dir=directory):
        pass


def check_output_file(path: str | Path, flag: str, example: str = "") -> None:
    """Refuse, before any work, a local output file that could not be written at the end: a directory,
    a path under a regular file, or one whose nearest existing directory is not writable (a side output
    such as a metrics textfile must not fail after the main output was written). ``example``: a file
    name the directory message suggests."""
    if is_remote(path):
        return
    p = local_path(path).absolute()
    if p.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory; pass a file name" + (f" such as {example}" if example else ""))
    if p.exists() and not p.is_file():
        raise UserError(f"{flag} {str(path)!r} is not a regular file (a FIFO, device or socket); pass a file name")
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is None or not parent.is_dir():
        raise UserError(f"{flag} {str(path)!r} is under a file ({str(parent)!r}); pass a path in a writable directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: {str(parent)!r} is not writable; pass a path in a writable directory")


# ----------------------------------------------------------------------------- preflight

def check_access(url: str, cfg: StorageConfig | None = None, *, write: bool = False, what: str = "storage") -> None:
    """Fail fast with one line when ``url`` cannot be listed (or, with ``write``, written): a missing
    bucket, wrong credentials or an unreachable endpoint, before any work starts."""
    url = str(url)
    if not is_remote(url):
        return
    # two attempts, not storage.retries: a dead endpoint is reported in well under a second instead
    # of after the SDK's full backoff (~5 s per call at 5 attempts); the work itself keeps all retries
    cfg = dataclasses.replace(cfg or StorageConfig(), retries=min((cfg or StorageConfig()).retries, 2))
    try:
        if scheme(url) in ("http", "https"):
            read_bytes(url, cfg)
            return
        fs, path = resolve(url, cfg)
        bucket = path.split("/", 1)[0]
        if retry(lambda: fs.get_file_info(bucket).type, url, 1) == pafs.FileType.NotFound:
            raise FileNotFoundError(f"NoSuchBucket {bucket}")
        retry(lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), url, 1)
        if write:
            probe = join(url, f".stylegen-write-probe-{uuid.uuid4().hex[:8]}")
            write_bytes(probe, b"", cfg)
            delete(probe, cfg)
    except UserError:
        raise
    except (OSError, urllib.error.URLError) as e:
        line = explain(e, url)
        if "bucket does not exist" in line or "NoSuchBucket" in str(e):
            line = f"{url}: the bucket does not exist; create it or fix the bucket name"
        raise UserError(f"{what} {line}") from None

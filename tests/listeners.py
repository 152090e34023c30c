"""Listening TCP sockets of process trees, read from /proc, and README's "Ports and listeners" table.

Used by tests/test_local_cluster.py (a local cluster's processes) and tests/test_s3_ray.py (the
processes of a CLI's own local Ray: README's in-process table).
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stylegen.raycluster import auth_headers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "Ports and listeners"


# ----------------------------------------------------------------------------- listeners from /proc

@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int
    process: str

    @property
    def loopback(self) -> bool:
        ip = self.address.removeprefix("::ffff:")
        return ip == "::1" or ip.startswith("127.")


def process_tree(roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every TCP socket in LISTEN state in this network namespace."""
    out = {}
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(addr_hex)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = (socket.inet_ntop(family, raw), int(port_hex, 16))
    return out


def exposed_ports() -> set[int]:
    """Ports that any process in this network namespace listens on beyond loopback."""
    return {port for addr, port in _listening_sockets().values() if not Listener(addr, port, 0, "").loopback}


def process_label(pid: int) -> str:
    """How README names a process: `gcs_server`, `raylet`, `dashboard.py`, `ray.util.client.server`,
    `ray::DashboardAgent` (Ray's process titles), `python` (a driver), `stylegen` (`python -m stylegen`)."""
    argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    first = argv[0].strip() if argv else "?"
    if first.startswith("ray::"):
        return first.split()[0]
    if Path(first).name.startswith("python"):
        rest = [a for a in argv[1:] if a not in ("-u", "-B", "-E", "-s")]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return rest[1]
        if not rest or rest[0] == "-c":
            return "python"
        return Path(rest[0]).name
    return Path(first).name


def listeners(roots: list[int]) -> set[Listener]:
    socks = _listening_sockets()
    found = set()
    for pid in process_tree(roots):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            label = process_label(pid)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in socks:
                found.add(Listener(*socks[int(target[8:-1])], pid, label))
    return found


# ----------------------------------------------------------------------------- README's table

@dataclass(frozen=True)
class Row:
    listener: str
    processes: tuple[str, ...]  # fnmatch patterns
    loopback: bool
    reason: str


def readme_rows(text: str) -> list[Row]:
    """The first table under the "Ports and listeners" heading:
    | Listener | Port | Process | Bound to | Why not loopback |"""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(rf"#+ {SECTION}\s*$", ln)), None)
    assert start is not None, f"README.md has no '{SECTION}' heading"
    return _table_rows(lines, start, SECTION)


def _table_rows(lines: list[str], start: int, what: str) -> list[Row]:
    """The first table after the heading at ``lines[start]`` and before the next heading of its level
    or above, as Rows (header and separator rows skipped)."""
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    rows: list[Row] = []
    for ln in lines[start + 1:]:
        heading = re.match(r"(#+) ", ln)
        if heading and len(heading.group(1)) <= level:
            break
        if not ln.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if cells[0] == "Listener" or set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) == 5, f"README '{what}' row needs 5 cells: {ln!r}"
        processes = tuple(re.findall(r"`([^`]+)`", cells[2]))
        assert processes, f"README '{what}' row names no `process`: {ln!r}"
        rows.append(Row(cells[0], processes, cells[3].startswith("127.0.0.1"), cells[4]))
    return rows


def matching(row: Row, lst: Listener) -> bool:
    return any(fnmatch.fnmatchcase(lst.process, pattern) for pattern in row.processes)


def unobserved(found: set[Listener], rows: list[Row]) -> list[Row]:
    """Rows that claim an exposure (not loopback) that no listener in ``found`` shows any more."""
    exposed = [lst for lst in found if not lst.loopback]
    return [row for row in rows if not row.loopback and not any(matching(row, lst) for lst in exposed)]


def format_listeners(found: set[Listener]) -> str:
    """One line per listener (address, port, process), exposed ones first: for failure messages."""
    return "\n".join(f"  {x.address:>17} {x.port:5d}  {x.process}"
                     for x in sorted(found, key=lambda x: (x.loopback, x.process, x.port)))


def unexplained(found: set[Listener], rows: list[Row]) -> list[Listener]:
    """Listeners the README does not account for: off loopback without a non-loopback row (with a
    reason) for their process, or on loopback from a process no row names."""
    bad = []
    for lst in sorted(found, key=lambda x: (x.process, x.port)):
        if lst.loopback:
            ok = any(matching(r, lst) for r in rows)
        else:
            ok = any(matching(r, lst) and not r.loopback and r.reason for r in rows)
        if not ok:
            bad.append(lst)
    return bad


# ----------------------------------------------------------------------------- the in-process table

IN_PROCESS_HEADING = "#### Without `--address`"


def in_process_rows(text: str) -> list[Row]:
    """The table under README's IN_PROCESS_HEADING (the Ray a CLI starts itself), as Rows."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(IN_PROCESS_HEADING)), None)
    assert start is not None, f"README.md has no '{IN_PROCESS_HEADING}' heading"
    return _table_rows(lines, start, IN_PROCESS_HEADING)


def other_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (a UDP connect sends no packet)."""
    candidates = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    return next((a for a in candidates if not a.startswith("127.") and a != "0.0.0.0"), None)


def http_status(url: str, token: str | None = None) -> int:
    """The HTTP status of a GET of ``url`` (with ``token`` as the bearer token, if given)."""
    req = urllib.request.Request(url, headers=auth_headers(token))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def accepts(address: str, port: int) -> bool:
    """Does anything accept a TCP connection on address:port (3 s)?"""
    try:
        socket.create_connection((address, port), timeout=3).close()
        return True
    except OSError:
        return False

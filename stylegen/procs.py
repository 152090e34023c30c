"""Child processes: whether a pid still runs, stopping a child (SIGTERM, then SIGKILL), killing a group.

One place for what the local cluster, ``stylegen prometheus``, ``stylegen serve`` and the
tests' servers all do with the processes they start.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid`` (a child started with ``start_new_session``), if any of it is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM ``proc`` (if it still runs), SIGKILL it after ``timeout`` seconds; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode

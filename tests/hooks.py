"""Step hooks the tests inject into the training loop, and readers of what they record.

In the test process, pass them to the loop: ``run_local(..., hooks=(trace(dir),))``. A run in another
process (``stylegen train`` subprocesses, Ray Train workers) builds them from ``train.hooks``:
``hook_sets(trace=dir, kill_after=(10, flag))`` gives the ``--set`` value, and each training process
imports this module as ``tests.hooks`` (Ray workers and ``python -m stylegen`` run from the repo root).

- ``trace=DIR``: every rank appends one JSON line per report to ``DIR/rank<R>.jsonl``: what
  ``ray.train.report`` does not keep (rank 1's metrics, pid, start step, an exact digest of the
  parameters, a digest of every batch trained since the previous report).
- ``kill_after_step=N:FLAG``: SIGKILL this process right after step N, once: whoever deletes FLAG first dies.
- ``pause_after_step=N:DIR``: after step N, touch ``DIR/rank<R>`` and wait (at most 180 s) until ``DIR/go``
  exists: the run holds still (DDP up, every actor alive) while the test looks at it.
- ``await_preemption_after_step=N:DIR``: after step N, touch ``DIR/rank<R>`` and wait (at most 120 s) until
  Ray Train tells this worker its node is preempted (``ray.train.get_preemption_info``): the test drains
  the node while the run waits, so the next report step is N, whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stylegen.models import unwrap
from stylegen.train.loop import StepEvent

log = logging.getLogger(__name__)


def params_digest(module: torch.nn.Module) -> str:
    """Exact fingerprint of the parameters (bytes of every tensor): equal only when bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for p in unwrap(module).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def batch_digest(content: torch.Tensor, style: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(content.contiguous().numpy().tobytes())
    h.update(style.contiguous().numpy().tobytes())
    return h.hexdigest()


class Trace:
    """The ``trace`` hook of one training process (see the module doc)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.first_batch = ""
        self.batches: dict[str, str] = {}  # step -> digest of its batch, since the last report

    def __call__(self, event: StepEvent) -> None:
        if event.phase == "trained":
            digest = batch_digest(event.content, event.style)
            self.first_batch = self.first_batch or digest
            self.batches[str(event.state.step)] = digest
            return
        rec = {"rank": event.rank, "world": event.world_size, "pid": os.getpid(), "start_step": event.start_step,
               **event.metrics, "first_batch": self.first_batch, "checkpoint": event.checkpoint,
               "params_digest": params_digest(event.state.generator), "time": time.time(), "batches": self.batches,
               "data": event.state.data}
        self.batches = {}
        with open(self.directory / f"rank{event.rank}.jsonl", "a") as f:  # one short line per append: readable
            f.write(json.dumps(rec) + "\n")                                 # while the run goes on


def trace(arg: str) -> Trace:
    """``tests.hooks:trace=DIR``."""
    return Trace(Path(arg))


def kill_after_step(arg: str):
    """``tests.hooks:kill_after_step=N:FLAG``."""
    n, _, flag = arg.partition(":")
    step, flag_path = int(n), Path(flag)

    def hook(event: StepEvent) -> None:
        if event.phase != "trained" or event.state.step != step:
            return
        try:
            flag_path.unlink()
        except FileNotFoundError:
            return
        log.warning("test fault: SIGKILL pid %d after step %d", os.getpid(), step)
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _hold_after_step(arg: str, released: Callable[[Path], bool], limit_s: float):
    """After step N of ``N:DIR``: touch ``DIR/rank<R>``, then wait (at most ``limit_s``) until ``released(DIR)``."""
    n, _, directory = arg.partition(":")
    step, marks = int(n), Path(directory)

    def hook(event: StepEvent) -> None:
        if event.phase != "trained" or event.state.step != step:
            return
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"rank{event.rank}").touch()
        deadline = time.monotonic() + limit_s
        while not released(marks) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.warning("test: rank %d held after step %d, released: %s", event.rank, step, released(marks))

    return hook


def pause_after_step(arg: str):
    """``tests.hooks:pause_after_step=N:DIR``."""
    return _hold_after_step(arg, lambda marks: (marks / "go").exists(), 180)


def await_preemption_after_step(arg: str):
    """``tests.hooks:await_preemption_after_step=N:DIR`` (a Ray Train worker only)."""
    import ray.train

    return _hold_after_step(arg, lambda _: ray.train.get_preemption_info() is not None, 120)


def hook_sets(*, trace: Path | None = None, kill_after: tuple[int, Path] | None = None,
              pause_after: tuple[int, Path] | None = None, await_preemption: tuple[int, Path] | None = None) -> str:
    """The ``train.hooks=[...]`` config override that installs these hooks in another process."""
    specs = []
    if trace is not None:
        specs.append(f"tests.hooks:trace={trace}")
    if kill_after is not None:
        specs.append(f"tests.hooks:kill_after_step={kill_after[0]}:{kill_after[1]}")
    if pause_after is not None:
        specs.append(f"tests.hooks:pause_after_step={pause_after[0]}:{pause_after[1]}")
    if await_preemption is not None:
        specs.append(f"tests.hooks:await_preemption_after_step={await_preemption[0]}:{await_preemption[1]}")
    return "train.hooks=" + json.dumps(specs)  # a JSON list of plain strings is a TOML array


def wait_for_ranks(marks: Path, ranks: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until ``ranks`` ranks wait in a ``pause_after_step``/``await_preemption_after_step`` hook's DIR; fails
    with the run's log if it ended first."""
    deadline = time.monotonic() + timeout
    while len(list(marks.glob("rank*"))) < ranks:
        tail = f"\n{log.read_text(errors='replace')[-3000:]}" if log.exists() else ""
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {ranks} ranks waited:{tail}"
        assert time.monotonic() < deadline, f"{ranks} ranks did not wait within {timeout} s:{tail}"
        time.sleep(0.2)


def read_trace(directory: Path) -> dict[int, list[dict]]:
    """Every rank's trace records: {rank: [record, ...]} (empty before the first report)."""
    out: dict[int, list[dict]] = {}
    for f in sorted(directory.glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def trace_records(directory: Path, rank: int = 0) -> list[dict]:
    """One rank's trace records (empty before its first report)."""
    return read_trace(directory).get(rank, [])


def batches_by_step(recs: list[dict]) -> dict[int, str]:
    """{step: batch digest}; a step trained twice (after a restart) keeps its last record: what the run kept."""
    out: dict[int, str] = {}
    for r in recs:
        out.update({int(k): v for k, v in r["batches"].items()})
    return out

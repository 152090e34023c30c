"""The training loop shared by ``--local`` and every Ray Train worker, and the local runner.

``training_loop`` drives steps, validation, grids and checkpoints; where results go
is a ``Sink``: ``LocalSink`` writes into ``--out``; the Ray sink (``ray_worker.py``)
hands them to ``ray.train.report``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from stylegen import storage
from stylegen.checkpoint import list_checkpoints
from stylegen.config import Config, to_dict
from stylegen.flops import count_flops, default_peak_flops, mfu
from stylegen.train.step import TrainState, checkpoint_state, train_step, unwrap, validate

log = logging.getLogger(__name__)
# Test/debug hooks (environment, read once per loop; off when unset):
TRACE_ENV = "STYLEGEN_TRACE_DIR"  # every rank appends each report to DIR/rank<R>.jsonl (pid, step, hashes)
FAULT_ENV = "STYLEGEN_FAULT_KILL_AT_STEP"  # "N:FLAG": after step N, SIGKILL this process if it can delete FLAG (once)


class Sink(Protocol):
    def report(self, state: TrainState, metrics: dict[str, float], checkpoint: bool, grid_index: int | None,
               val_pairs: tuple) -> None: ...


@dataclass
class LoopContext:
    """Per-process facts the loop needs besides the config."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    metrics: object | None = None  # stylegen.metrics.TrainMetrics
    stop_requested: list = field(default_factory=lambda: [False])  # set by SIGTERM (one process only)
    # Asked at report steps only, which every rank reaches together, so it may be a collective:
    # "checkpoint" = write one now and go on (a node is being reclaimed), "stop" = write one and
    # return (the run was asked to stop), None = carry on. Under Ray: ray_worker.interrupt_poll.
    poll: Callable[[], str | None] | None = None


def install_sigterm(ctx: LoopContext) -> None:
    """SIGTERM (preemption) asks the loop to write a checkpoint and return."""
    def handler(signum, frame):  # noqa: ARG001
        log.warning("SIGTERM: writing a checkpoint before exit")
        ctx.stop_requested[0] = True
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some Ray worker setups)
        pass


def param_checksum(module: torch.nn.Module) -> float:
    """Sum of all parameters in float64: equal on every DDP rank when they are in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in unwrap(module).parameters()))


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
    """``STYLEGEN_TRACE_DIR`` hook: one JSON line per report and rank, for tests and debugging (ranks'
    own facts that ``ray.train.report`` does not keep: pid, first batch, exact parameter digest)."""

    def __init__(self, rank: int, world: int, start_step: int):
        d = os.environ.get(TRACE_ENV)
        self.path = Path(d) / f"rank{rank}.jsonl" if d else None
        self.base = {"rank": rank, "world": world, "pid": os.getpid(), "start_step": start_step}
        self.first_batch = ""
        self.batches: dict[str, str] = {}  # step -> digest of its batch, since the last report
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def batch(self, step: int, content: torch.Tensor, style: torch.Tensor) -> None:
        """``step``: the step this batch trains (1-based)."""
        if self.path is not None:
            digest = batch_digest(content, style)
            self.first_batch = self.first_batch or digest
            self.batches[str(step)] = digest

    def report(self, state: TrainState, metrics: dict, checkpoint: bool) -> None:
        if self.path is None:
            return
        rec = {**self.base, **metrics, "first_batch": self.first_batch, "checkpoint": checkpoint,
               "params_digest": params_digest(state.generator), "time": time.time(), "batches": self.batches,
               "data": state.data}
        self.batches = {}
        with open(self.path, "a") as f:  # one short line per append: readable while the run goes on
            f.write(json.dumps(rec) + "\n")


def fault_kill_step() -> tuple[int, Path] | None:
    """``STYLEGEN_FAULT_KILL_AT_STEP=N:FLAG`` (tests only): the step to die after and the once-flag file."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    n, _, flag = spec.partition(":")
    return int(n), Path(flag)


def maybe_die(fault: tuple[int, Path] | None, step: int) -> None:
    """SIGKILL this process after ``step`` == N, once: whoever deletes the flag file first dies."""
    if fault is None or step != fault[0]:
        return
    try:
        fault[1].unlink()
    except FileNotFoundError:
        return
    log.warning("fault injection (%s): SIGKILL pid %d after step %d", FAULT_ENV, os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


def training_loop(cfg: Config, state: TrainState, vgg: torch.nn.Module, ctx: LoopContext, sink: Sink) -> dict:
    """Run until ``cfg.train.steps``; returns the last reported metrics."""
    from tqdm import tqdm

    from stylegen.data.loader import build_loader, load_pairs

    tc = cfg.train
    val_c, val_s = load_pairs(cfg.data, tc.val_pairs, storage_cfg=cfg.storage)
    val_cache: dict = {}  # the fixed pairs' VGG features, computed at the first report only
    batch = cfg.data.batch_size
    last: dict[str, float] = {}
    bar = tqdm(total=tc.steps, initial=state.step, disable=not ctx.progress, unit="step", dynamic_ncols=True)
    resume, epoch = resume_point(cfg, state, ctx)
    resumed: dict[str, float] = {}
    wait_sum = step_sum = 0.0
    t_img, n_img = time.perf_counter(), 0
    step_flops = 0  # counted at the first step
    peak = tc.peak_flops or default_peak_flops(ctx.device, tc.threads)
    skipped_before = 0  # corrupt samples/shards skipped in earlier epochs
    trace = Trace(ctx.rank, ctx.world_size, state.step)
    fault = fault_kill_step()
    while state.step < tc.steps:
        t_seek = time.perf_counter()
        loader = build_loader(cfg.data, split="train", rank=ctx.rank, world_size=ctx.world_size, epoch_seed=epoch,
                              storage_cfg=cfg.storage, resume=resume)
        t_wait = time.perf_counter()
        for content, style in loader:
            t0 = time.perf_counter()
            wait = t0 - t_wait
            if resume is not None:  # the first batch of a resumed stream: the seek is done
                resumed = {"data_resume_epoch": resume.epoch, "data_resume_batch": resume.batch,
                           "data_seek_s": t0 - t_seek}
                log.info("rank %d: data stream resumed at epoch %d, batch %d (seek %.2f s)", ctx.rank, resume.epoch,
                         resume.batch, t0 - t_seek)
                if ctx.metrics is not None:
                    ctx.metrics.data_resumed(resume.epoch, resume.batch, t0 - t_seek)
                resume = None
            trace.batch(state.step + 1, content, style)
            def step_once():
                return train_step(state, vgg, content, style, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                                  total_steps=tc.steps, device=ctx.device, amp=tc.amp, cpu_bf16=tc.cpu_bf16)
            if step_flops:
                terms = step_once()
            else:  # the first step of this process is counted once (FLOPs do not change between steps)
                terms, step_flops = count_flops(step_once)
                log.info("rank %d: %.3g FLOPs per training step (%.3g per sample)", ctx.rank, step_flops,
                         step_flops / len(content))
            dur = time.perf_counter() - t0
            wait_sum += wait
            step_sum += dur + wait
            n_img += len(content)
            if ctx.metrics is not None:
                ctx.metrics.step(dur + wait, len(content), wait, terms)
            bar.update(1)
            step = state.step
            maybe_die(fault, step)
            final = step >= tc.steps or ctx.stop_requested[0]
            ckpt = step % tc.checkpoint_every == 0 or final
            grid = step // tc.sample_every if (step % tc.sample_every == 0 or final) else None
            report = step % tc.report_every == 0 or ckpt or grid is not None
            event = ctx.poll() if report and not final and ctx.poll is not None else None
            if event == "stop":
                log.warning("rank %d: stop requested at step %d: writing a checkpoint, then stopping", ctx.rank, step)
                ctx.stop_requested[0] = final = ckpt = True
            elif event == "checkpoint" and not ckpt:
                log.warning("rank %d: preemption announced at step %d: writing a checkpoint now", ctx.rank, step)
                ckpt = True
            if report:
                state.data = gather_data_state(loader.state(), ctx.world_size).to_dict()
                val = validate(state.generator, vgg, val_c, val_s, ctx.device, cache=val_cache)
                now = time.perf_counter()
                last = {**{f"loss_{k}": v for k, v in terms.items()}, **val, "step": step,
                        "epoch": epoch, "img_per_s": n_img * ctx.world_size / max(now - t_img, 1e-9),
                        # per worker: this rank's steps since the last report x the FLOPs of one
                        "flops_per_s": step_flops * n_img / batch / max(now - t_img, 1e-9),
                        "data_wait_frac": wait_sum / max(step_sum, 1e-9),
                        "data_skipped": skipped_before + loader.skipped,
                        "param_checksum": param_checksum(state.generator), **resumed}
                last["mfu"] = mfu(last["flops_per_s"], peak)
                if ctx.metrics is not None:
                    ctx.metrics.throughput(last["flops_per_s"], last["mfu"])
                t_img, n_img, wait_sum, step_sum = now, 0, 0.0, 0.0
                if ctx.metrics is not None:
                    ctx.metrics.val(val["val_score"])
                bar.set_postfix(loss=f"{terms['total']:.3g}", val=f"{val['val_score']:.3f}",
                                img_s=f"{last['img_per_s']:.0f}")
                sink.report(state, last, ckpt, grid, (val_c, val_s))
                trace.report(state, last, ckpt)  # after the sink: a traced checkpoint step is saved
            if final:
                break
            t_wait = time.perf_counter()
        skipped_before += loader.skipped
        if ctx.stop_requested[0] or state.step >= tc.steps:
            break
        resume, epoch = None, epoch + 1
    bar.close()
    return last


def resume_point(cfg: Config, state: TrainState, ctx: LoopContext):
    """``(DataState to resume from | None, epoch)`` for a state restored from a checkpoint.

    The saved position is used when it was saved with the same number of ranks and DataLoader
    workers. Otherwise the split of shards over ranks/workers differs and the epoch restarts from
    its first batch with the new split: at most the ``batch x world x batch_size`` samples this
    epoch had consumed are seen twice, none is skipped. A checkpoint without a position (older
    stylegen) resumes at the epoch its step falls in, from that epoch's first batch.
    """
    from stylegen.data.loader import DataState

    saved = DataState.from_dict(state.data)
    if saved is None:
        return None, state.step // cfg.data.steps_per_epoch
    workers = max(cfg.data.num_workers, 1)
    if (saved.world, saved.workers) != (ctx.world_size, workers):
        log.warning("data position saved with %d rank(s) x %d loader worker(s), now %d x %d: epoch %d restarts "
                    "from its first batch with the new split (at most %d samples of it are seen twice)",
                    saved.world, saved.workers, ctx.world_size, workers, saved.epoch,
                    saved.batch * saved.world * cfg.data.batch_size)
        return None, saved.epoch
    return saved, saved.epoch


def gather_data_state(mine, world: int):
    """Every rank's stream positions in one DataState (a collective under DDP: report steps only)."""
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        rows: list = [None] * world
        torch.distributed.all_gather_object(rows, mine.positions[0])
        mine.positions = rows
    return mine


def grid_tensors(state: TrainState, val_pairs: tuple, device: torch.device):
    """(content, style, output) float tensors for a result grid of the fixed pairs."""
    from stylegen.train.step import to_float

    c, s = to_float(val_pairs[0], device), to_float(val_pairs[1], device)
    g = unwrap(state.generator)
    was = g.training
    g.eval()
    with torch.no_grad():
        out = g(c, s)
    g.train(was)
    return c, s, out


class LocalSink:
    """Checkpoints to ``out/checkpoints/step_XXXXXXXX/checkpoint.pt`` (newest K kept), grids to ``out/samples``."""

    def __init__(self, cfg: Config, out: Path, metrics=None):
        self.cfg, self.out, self.metrics = cfg, out, metrics
        self.cfg_dict = to_dict(cfg)

    def report(self, state, metrics, checkpoint, grid_index, val_pairs):
        from stylegen.checkpoint import save_checkpoint
        from stylegen.grids import save_grid

        log.debug("step %d %s", state.step, metrics)
        if grid_index is not None:
            device = next(unwrap(state.generator).parameters()).device
            try:
                save_grid(self.out / "samples" / f"epoch_{grid_index:04d}.png", *grid_tensors(state, val_pairs, device))
            except OSError as e:  # full disk, file-size limit: as for checkpoints (the atomic write left nothing)
                raise storage_error(self.out, e) from None
        if checkpoint:
            t0 = time.perf_counter()
            try:
                path = save_checkpoint(self.out / "checkpoints" / f"step_{state.step:08d}" / "checkpoint.pt",
                                       checkpoint_state(state, self.cfg_dict, metrics))
                storage.write_bytes(self.out / "metrics.json", json.dumps(metrics, indent=2).encode())
            except OSError as e:  # read-only, full or vanished storage: one clear line, not a traceback
                raise storage_error(self.out, e) from None
            if self.metrics is not None:
                self.metrics.checkpoint_saved(time.perf_counter() - t0)
            prune_checkpoints(self.out / "checkpoints", self.cfg.train.keep_checkpoints)
            log.info("checkpoint %s", path)


def storage_error(out: Path, e: OSError):
    from stylegen.errors import UserError

    what, fix = storage.describe_write_error(e)  # e.g. ('EFBIG: File too large', 'raise the file-size limit ...')
    return UserError(f"cannot write to the output directory {str(out)!r} ({what}); {fix} or choose another --out, "
                     "then rerun: training resumes from the last checkpoint")


def check_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, when ``out`` cannot be written."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-probe-", dir=out):
            pass
    except OSError as e:
        raise storage_error(out, e) from None


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_good_checkpoint(ckpt_root: Path) -> dict | None:
    """Newest checkpoint that loads; a corrupt one is skipped with a warning (falls back to the previous)."""
    from stylegen.checkpoint import load_checkpoint
    from stylegen.errors import UserError

    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return load_checkpoint(path)
        except UserError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
    return None


def run_local(cfg: Config, out: Path, *, progress: bool = True, metrics_backend: str | None = None) -> dict:
    """``stylegen train --local``: one process; resumes from ``out`` when it holds checkpoints."""
    from stylegen.features import build_features
    from stylegen.metrics import TrainMetrics
    from stylegen.train.step import build_state, pick_device, restore_state

    check_writable(out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    state = build_state(cfg, device)
    ckpt = latest_good_checkpoint(out / "checkpoints")
    if ckpt is not None:
        restore_state(state, ckpt)
        log.info("resuming from step %d in %s", state.step, out)
    vgg = build_features(cfg.features).to(device)
    backend = metrics_backend or ("prometheus" if cfg.metrics.enabled else "none")
    metrics = TrainMetrics.create(backend, run=out.name, rank=0, host=cfg.metrics.host, port=cfg.metrics.port)
    if backend == "prometheus":
        log.info("metrics at %s", metrics.url)
    ctx = LoopContext(device=device, progress=progress, metrics=metrics)
    install_sigterm(ctx)
    try:
        last = training_loop(cfg, state, vgg, ctx, LocalSink(cfg, out, metrics))
        # a finished run rerun: nothing left to train, its last checkpoint's metrics are the result
        return last or (dict(ckpt.get("metrics") or {}) if ckpt is not None else {})
    finally:
        metrics.close()

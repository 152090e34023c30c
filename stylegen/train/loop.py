"""The training loop shared by ``--local`` and every Ray Train worker, and the local runner.

``training_loop`` drives steps, validation, grids and checkpoints; where results go
is a ``Sink``: ``LocalSink`` writes into ``--out``; the Ray sink (``ray_worker.py``)
hands them to ``ray.train.report``. ``LoopContext.hooks`` see every step (``StepEvent``):
tests record what each rank trained on and inject faults through them.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
from tqdm import tqdm

from stylegen import storage
from stylegen.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from stylegen.config import Config, to_dict
from stylegen.data.loader import DataState, build_loader, load_pairs
from stylegen.errors import UserError
from stylegen.features import build_features
from stylegen.flops import count_flops, default_peak_flops, mfu
from stylegen.grids import save_grid
from stylegen.images import to_float
from stylegen.models import eval_mode, unwrap
from stylegen.metrics import TrainMetrics
from stylegen.train.step import (TrainState, build_state, checkpoint_state, compiled, cpu_bf16_for, init_generator,
                                 pick_device, restore_state, train_step, validate)

log = logging.getLogger(__name__)


class Sink(Protocol):
    def report(self, state: TrainState, metrics: dict[str, float], checkpoint: bool, grid_index: int | None,
               val_pairs: tuple) -> None: ...


@dataclass(frozen=True, kw_only=True)
class StepEvent:
    """What a hook sees, in the training process: once per optimisation step (``phase="trained"``,
    with the uint8 batch it trained on) and once more on a report step, after the sink took the
    report (``phase="reported"``, with its metrics; ``checkpoint``: a checkpoint went with them)."""

    phase: Literal["trained", "reported"]
    state: TrainState  # state.step: the step just trained
    rank: int
    world_size: int
    start_step: int  # the step this process started (or resumed) from
    content: torch.Tensor  # (B, 3, H, W) uint8
    style: torch.Tensor  # (B, 3, H, W) uint8
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: bool = False


Hook = Callable[[StepEvent], None]


def load_hooks(specs: list[str]) -> tuple[Hook, ...]:
    """``train.hooks`` -> hooks: ``"pkg.module:factory"`` or ``"pkg.module:factory=ARG"`` imports the
    module in this process and calls ``factory(ARG)`` ("" without one) for the hook."""
    hooks = []
    for spec in specs:
        target, _, arg = spec.partition("=")
        module, _, name = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise UserError(f"train.hooks: cannot import {module!r} ({e}): the module must be importable in the "
                            "training process (on PYTHONPATH, e.g. run from the repo root with PYTHONPATH=.; under "
                            "Ray, inside the job's working_dir)") from None
        except AttributeError:
            raise UserError(f"train.hooks: module {module!r} has no {name!r}: use 'pkg.module:factory' with a "
                            "factory defined in that module") from None
        hooks.append(factory(arg))
    return tuple(hooks)


@dataclass
class LoopContext:
    """Per-process facts the loop needs besides the config."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    progress: bool = True  # a tqdm bar (a terminal)
    # one INFO line per report instead: under Ray a bar streams to the driver as one line per update
    report_lines: bool = False
    metrics: TrainMetrics | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set by SIGTERM (one process only)
    # Asked at report steps only, which every rank reaches together, so it may be a collective:
    # "checkpoint" = write one now and go on (a node is being reclaimed), "stop" = write one and
    # return (the run was asked to stop), None = carry on. Under Ray: ray_worker.interrupt_poll.
    poll: Callable[[], str | None] | None = None
    hooks: tuple[Hook, ...] = ()  # called with every StepEvent (tests; train.hooks)


def install_sigterm(ctx: LoopContext) -> None:
    """SIGTERM (preemption) asks the loop to write a checkpoint and return."""
    def handler(signum, frame):  # noqa: ARG001
        log.warning("SIGTERM: writing a checkpoint before exit")
        ctx.stop.set()
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some Ray worker setups)
        pass


def param_checksum(module: torch.nn.Module) -> float:
    """Sum of all parameters in float64: equal on every DDP rank when they are in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in unwrap(module).parameters()))


@dataclass
class ThroughputMeter:
    """The loop's clocks: data wait and compute per step, and the rates of the window since the last report.

    A step's data wait runs from ``wait_for_data`` (the loader asked for the next batch) to
    ``start_step``; its compute from there to ``stop_step``. The window (images per second)
    runs from one report to the next, reports included.
    """

    window_start: float = field(default_factory=time.perf_counter)
    images: int = 0  # this rank's, since window_start
    wait_s: float = 0.0  # data wait, since window_start
    busy_s: float = 0.0  # data wait + compute, since window_start
    waiting_since: float = 0.0
    step_started: float = 0.0
    step_wait_s: float = 0.0

    def wait_for_data(self) -> None:
        self.waiting_since = time.perf_counter()

    def start_step(self) -> None:
        self.step_started = time.perf_counter()
        self.step_wait_s = self.step_started - self.waiting_since

    def stop_step(self, images: int) -> tuple[float, float]:
        """``(seconds of the step including its data wait, data wait)``."""
        compute = time.perf_counter() - self.step_started
        self.wait_s += self.step_wait_s
        self.busy_s += compute + self.step_wait_s
        self.images += images
        return compute + self.step_wait_s, self.step_wait_s

    def window(self, world_size: int, step_flops: float, batch: int) -> dict[str, float]:
        """The window's rates (then a new window starts): img/s of all ranks, FLOP/s of this rank
        (its steps x the FLOPs of one), and the share of step time spent waiting for data."""
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        rates = {"img_per_s": self.images * world_size / elapsed,
                 "flops_per_s": step_flops * self.images / batch / elapsed,
                 "data_wait_frac": self.wait_s / max(self.busy_s, 1e-9)}
        self.window_start, self.images, self.wait_s, self.busy_s = now, 0, 0.0, 0.0
        return rates


def training_loop(cfg: Config, state: TrainState, vgg: torch.nn.Module, ctx: LoopContext, sink: Sink) -> dict:
    """Run until ``cfg.train.steps``; returns the last reported metrics."""
    tc = cfg.train
    val_c, val_s = load_pairs(cfg.data, tc.val_pairs, storage_cfg=cfg.storage)
    val_cache: dict = {}  # the fixed pairs' VGG features, computed at the first report only
    last: dict[str, float] = {}
    bar = tqdm(total=tc.steps, initial=state.step, disable=not ctx.progress, unit="step", dynamic_ncols=True)
    resume, epoch = resume_point(cfg, state, ctx)
    resumed: dict[str, float] = {}
    meter = ThroughputMeter()
    step_flops = 0  # counted at the first step
    peak = tc.peak_flops or default_peak_flops(ctx.device, tc.threads)
    cpu_bf16 = cpu_bf16_for(tc.cpu_bf16, ctx.device)
    skipped_before = 0  # corrupt samples/shards skipped in earlier epochs
    start_step = state.step
    t_start = time.perf_counter()

    def emit(phase: str, content: torch.Tensor, style: torch.Tensor, **extra) -> None:
        for hook in ctx.hooks:
            hook(StepEvent(phase=phase, state=state, rank=ctx.rank, world_size=ctx.world_size, start_step=start_step,
                           content=content, style=style, **extra))

    while state.step < tc.steps:
        t_seek = time.perf_counter()
        loader = build_loader(cfg.data, split="train", rank=ctx.rank, world_size=ctx.world_size, epoch_seed=epoch,
                              storage_cfg=cfg.storage, resume=resume)
        meter.wait_for_data()
        for content, style in loader:
            meter.start_step()
            if resume is not None:  # the first batch of a resumed stream: the seek is done
                seek = meter.step_started - t_seek
                resumed = {"data_resume_epoch": resume.epoch, "data_resume_batch": resume.batch, "data_seek_s": seek}
                log.info("rank %d: data stream resumed at epoch %d, batch %d (seek %.2f s)", ctx.rank, resume.epoch,
                         resume.batch, seek)
                if ctx.metrics is not None:
                    ctx.metrics.data_resumed(resume.epoch, resume.batch, seek)
                resume = None
            def step_once():
                return train_step(state, vgg, content, style, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                                  total_steps=tc.steps, device=ctx.device, amp=tc.amp, cpu_bf16=cpu_bf16)
            if step_flops:
                terms = step_once()
            else:  # the first step of this process is counted once (FLOPs do not change between steps)
                terms, step_flops = count_flops(step_once)
                log.log(logging.INFO if ctx.rank == 0 else logging.DEBUG, "rank %d: %.3g FLOPs per training step "
                        "(%.3g per sample)", ctx.rank, step_flops, step_flops / len(content))
            step_s, wait_s = meter.stop_step(len(content))
            if ctx.metrics is not None:
                ctx.metrics.step(step_s, len(content), wait_s, terms)
            bar.update(1)
            step = state.step
            emit("trained", content, style)
            final = step >= tc.steps or ctx.stop.is_set()
            ckpt = step % tc.checkpoint_every == 0 or final
            grid = step // tc.sample_every if (step % tc.sample_every == 0 or final) else None
            report = step % tc.report_every == 0 or ckpt or grid is not None
            event = ctx.poll() if report and not final and ctx.poll is not None else None
            if event == "stop":
                log.warning("rank %d: stop requested at step %d: writing a checkpoint, then stopping", ctx.rank, step)
                ctx.stop.set()
                final = ckpt = True
            elif event == "checkpoint" and not ckpt:
                log.warning("rank %d: preemption announced at step %d: writing a checkpoint now", ctx.rank, step)
                ckpt = True
            if report:
                state.data = gather_data_state(loader.state(), ctx.world_size).to_dict()
                val = validate(state.generator, vgg, val_c, val_s, ctx.device, cache=val_cache, rank=ctx.rank,
                               world_size=ctx.world_size)
                rates = meter.window(ctx.world_size, step_flops, cfg.data.batch_size)
                last = {**{f"loss_{k}": v for k, v in terms.items()}, **val, "step": step, "epoch": epoch, **rates,
                        "data_skipped": skipped_before + loader.skipped,
                        "param_checksum": param_checksum(state.generator), **resumed}
                last["mfu"] = mfu(last["flops_per_s"], peak)
                if ctx.metrics is not None:
                    ctx.metrics.throughput(last["flops_per_s"], last["mfu"])
                    ctx.metrics.val(val["val_score"])
                bar.set_postfix(loss=f"{terms['total']:.3g}", val=f"{val['val_score']:.3f}",
                                img_s=f"{last['img_per_s']:.0f}")
                if ctx.report_lines:
                    eta = (tc.steps - step) * (time.perf_counter() - t_start) / max(1, step - start_step)
                    log.info("step %d/%d  loss %.3g  val_score %.4f  %.0f img/s  eta %d:%02d", step, tc.steps,
                             terms["total"], val["val_score"], last["img_per_s"], eta // 60, eta % 60)
                sink.report(state, last, ckpt, grid, (val_c, val_s))
                emit("reported", content, style, metrics=last, checkpoint=ckpt)  # after the sink: a checkpoint is saved
            if final:
                break
            meter.wait_for_data()
        skipped_before += loader.skipped
        if ctx.stop.is_set() or state.step >= tc.steps:
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


def grid_tensors(state: TrainState, val_pairs: tuple):
    """(content, style, output) float tensors for a result grid of the fixed pairs, on the generator's device."""
    g = unwrap(state.generator)
    device = next(g.parameters()).device
    c, s = to_float(val_pairs[0], device), to_float(val_pairs[1], device)
    with eval_mode(g), torch.no_grad():
        out = g(c, s)
    return c, s, out


class LocalSink:
    """Checkpoints to ``out/checkpoints/step_XXXXXXXX/checkpoint.pt`` (newest K kept), grids to ``out/samples``."""

    def __init__(self, cfg: Config, out: Path, metrics: TrainMetrics | None = None):
        self.out, self.metrics = out, metrics
        self.keep = cfg.train.keep_checkpoints
        self.cfg_dict = to_dict(cfg)

    def report(self, state, metrics, checkpoint, grid_index, val_pairs):
        log.debug("step %d %s", state.step, metrics)
        if grid_index is not None:
            try:
                save_grid(self.out / "samples" / f"epoch_{grid_index:04d}.png", *grid_tensors(state, val_pairs))
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
            prune_checkpoints(self.out / "checkpoints", self.keep)
            log.info("checkpoint %s", path)


def storage_error(out: Path, e: OSError) -> UserError:
    what, fix = storage.describe_write_error(e)  # e.g. ('EFBIG: File too large', 'raise the file-size limit ...')
    return UserError(f"cannot write to the output directory {str(out)!r} ({what}); {fix} or choose another --out, "
                     "then rerun: training resumes from the last checkpoint")


def check_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, when ``out`` cannot be written."""
    try:
        storage.probe_writable(out)
    except OSError as e:
        raise storage_error(out, e) from None


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_good_checkpoint(ckpt_root: Path) -> dict | None:
    """Newest checkpoint that loads; a corrupt one is skipped with a warning (falls back to the previous)."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return load_checkpoint(path)
        except UserError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
    return None


def run_local(cfg: Config, out: Path, *, progress: bool = True, metrics_backend: str | None = None,
              hooks: tuple[Hook, ...] = (), stop: threading.Event | None = None) -> dict:
    """``stylegen train --local``: one process; resumes from ``out`` when it holds checkpoints.

    ``hooks`` (in-process callers such as tests) run besides those ``train.hooks`` names. ``stop``
    is set by SIGTERM (the run then checkpoints and returns early): the caller can tell the two apart."""
    check_writable(out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    state = build_state(cfg, device)
    ckpt = latest_good_checkpoint(out / "checkpoints")
    if ckpt is not None:
        restore_state(state, ckpt)
        log.info("resuming from step %d in %s", state.step, out)
    elif cfg.train.init:
        log.info("fine-tuning from %s (train.init)", init_generator(state.generator, cfg.train.init))
    vgg = compiled(build_features(cfg.features).to(device), cfg.train)
    backend = metrics_backend or ("prometheus" if cfg.metrics.enabled else "none")
    metrics = TrainMetrics.create(backend, run=out.name, rank=0, host=cfg.metrics.host, port=cfg.metrics.port)
    if backend == "prometheus":
        log.info("metrics at %s", metrics.url)
    ctx = LoopContext(device=device, progress=progress, metrics=metrics, hooks=(*load_hooks(cfg.train.hooks), *hooks),
                      stop=stop or threading.Event())
    install_sigterm(ctx)
    try:
        last = training_loop(cfg, state, vgg, ctx, LocalSink(cfg, out, metrics))
        # a finished run rerun: nothing left to train, its last checkpoint's metrics are the result
        return last or (dict(ckpt.get("metrics") or {}) if ckpt is not None else {})
    finally:
        metrics.close()

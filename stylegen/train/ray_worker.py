"""Ray Train (V2) integration: the per-worker function and the TorchTrainer that runs it.

The worker function is the local loop plus three Ray calls: ``prepare_model`` (DDP,
gloo on CPU / NCCL on GPU), ``get_checkpoint`` (resume) and ``report`` (metrics and
rank 0's checkpoint). Global batch = ``data.batch_size`` x workers; we keep the LR
as configured (Adam is insensitive to the batch size over the small range we scale;
for large worker counts scale ``optim.lr`` by sqrt(workers) and add warm-up, see README).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stylegen.checkpoint import STEP_DIR, load_checkpoint, save_checkpoint
from stylegen.config import Config, from_dict, to_dict
from stylegen.errors import UserError
from stylegen.features import build_features
from stylegen.grids import save_grid
from stylegen.metrics import TrainMetrics
from stylegen.raycluster import loopback_local_ray
from stylegen.raylogs import drop_ray_chatter, verbose
from stylegen.storage import ENDPOINT_ENV, ray_storage
from stylegen.storage import absolute as storage_absolute, join as storage_join
from stylegen.train.loop import LoopContext, grid_tensors, load_hooks, training_loop
from stylegen.train.step import build_state, checkpoint_state, compiled, init_generator, restore_state, with_init_resolved

log = logging.getLogger(__name__)


# Train V2's controller takes one report per poll (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default)
# from a 1-slot queue: a report made sooner after the previous one waits until the next poll.
POLL_ENV, DEFAULT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0
SLOW_REPORT_S = 1.0  # a metrics-only report that waits longer than this is worth one warning


def slow_report_hint(waited_s: float, since_last_s: float, poll_s: float, report_every: int) -> str | None:
    """The warning for a metrics-only ``ray.train.report`` that blocked ``waited_s`` seconds, made
    ``since_last_s`` after the previous report returned; None when it was quick or not Train's poll."""
    if waited_s < SLOW_REPORT_S or since_last_s >= poll_s:
        return None
    return (f"ray.train.report waited {waited_s:.1f} s: reports came {since_last_s:.1f} s apart, closer than "
            f"Train's controller takes them ({POLL_ENV}={poll_s:g} s), so training stalls at every report; "
            f"raise train.report_every (now {report_every}) until reports are over {poll_s:g} s apart")


class RaySink:
    """Every rank reports (``report`` is a barrier); only rank 0 attaches a checkpoint."""

    def __init__(self, cfg: Config, rank: int, run_dir: Path | None, metrics: TrainMetrics | None = None):
        self.rank, self.run_dir, self.metrics = rank, run_dir, metrics
        self.cfg_dict = to_dict(cfg)
        self.report_every = cfg.train.report_every
        self.poll_s = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
        self.last_report = time.perf_counter()
        self.warned = False  # one warning per run: the cause does not change between reports

    def report(self, state, metrics, checkpoint, grid_index, val_pairs):
        import ray.train

        if not checkpoint or self.rank != 0:
            t0 = time.perf_counter()
            since_last = t0 - self.last_report
            ray.train.report(metrics, checkpoint=None)
            self.last_report = time.perf_counter()
            hint = slow_report_hint(self.last_report - t0, since_last, self.poll_s, self.report_every)
            if hint and self.rank == 0 and not self.warned:
                self.warned = True
                log.warning("%s", hint)
            return
        with tempfile.TemporaryDirectory(prefix="stylegen-ckpt-") as tmp:
            t0 = time.perf_counter()
            save_checkpoint(Path(tmp) / "checkpoint.pt", checkpoint_state(state, self.cfg_dict, metrics))
            if grid_index is not None:
                tensors = grid_tensors(state, val_pairs)
                save_grid(Path(tmp) / f"epoch_{grid_index:04d}.png", *tensors)
                if self.run_dir is not None:  # local storage: also beside the run, like --local
                    save_grid(self.run_dir / "samples" / f"epoch_{grid_index:04d}.png", *tensors)
            # step-named dirs let a restarted worker find a checkpoint Ray had not registered yet
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{state.step:08d}")
            self.last_report = time.perf_counter()
            if self.metrics is not None:
                self.metrics.checkpoint_saved(time.perf_counter() - t0)


STOP_NAMESPACE = "stylegen-stop"  # Ray's internal KV (in the GCS): a run's stop request, keyed by the run's uuid


def request_stop(key: str) -> None:
    """Ask run ``key``'s rank 0 to checkpoint at its next report and stop (the driver, on SIGTERM).

    A key in Ray's internal KV (a GCS call; ``ray.experimental.internal_kv``, the store Ray's own
    libraries keep such state in), not an actor: a named flag actor cost a Ray worker process per run.
    """
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, b"1", namespace=STOP_NAMESPACE)


def stop_requested(key: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=STOP_NAMESPACE) is not None


def clear_stop(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=STOP_NAMESPACE)


def interrupt_poll(rank: int, stop_key: str | None):
    """The loop's report-step poll under Ray: one answer that every rank agrees on.

    "stop": the driver got SIGTERM (``ray job stop``, a scheduler's preemption of the driver) ->
    rank 0 checkpoints and every rank returns. "checkpoint": Ray is draining a node this run
    uses (spot reclaim through the autoscaler / KubeRay; ``ray.train.get_preemption_info``) ->
    one just-in-time checkpoint, then training goes on until Ray restarts the group elsewhere.
    Both calls are collectives, which is why the loop asks only at report steps.
    """
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    announced = threading.Event()  # the preemption was answered with its one checkpoint

    def poll() -> str | None:
        stop = False
        if rank == 0 and stop_key:
            try:
                stop = stop_requested(stop_key)
            except Exception as e:  # the GCS is unreachable right now: ask again at the next report
                log.debug("stop request %s unreadable: %s", stop_key, e)
        if broadcast_from_rank_zero(stop):
            return "stop"
        if ray.train.get_preemption_info() is not None and not announced.is_set():
            announced.set()
            return "checkpoint"
        return None

    return poll


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"cfg": to_dict(cfg), "run": name, "trial": trial_id, "run_dir": path|None,
    "stop": the run's stop-request key|None}``."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = from_dict(config["cfg"])
    if not config.get("verbose"):
        quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = ray.train.torch.get_device()
    state = build_state(cfg, device)
    ckpt = find_resume_checkpoint()
    restarted = ckpt is not None
    if ckpt is not None:
        restore_state(state, ckpt)
        log.info("rank %d resuming from step %d", rank, state.step)
    elif cfg.train.init:  # every rank loads it; DDP would broadcast rank 0's weights anyway
        path = init_generator(state.generator, cfg.train.init)
        if rank == 0:
            log.info("fine-tuning from %s (train.init)", path)
    if world > 1:  # every rank must restore the same checkpoint (they list the same storage)
        steps = torch.tensor([state.step, -state.step], dtype=torch.int64)
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
        if int(steps[0]) != -int(steps[1]):
            raise RuntimeError(f"ranks resumed from different steps ({-int(steps[1])}..{int(steps[0])})")
    # DDP after the restore: every rank loads the same weights, DDP broadcasts rank 0's anyway.
    state.generator = ray.train.torch.prepare_model(state.generator)
    if state.discriminator is not None:
        state.discriminator = ray.train.torch.prepare_model(state.discriminator)
    vgg = compiled(build_features(cfg.features).to(device), cfg.train)
    metrics = TrainMetrics.create("ray" if cfg.metrics.enabled else "none", run=config["run"], rank=rank,
                                  trial=config.get("trial", ""))
    if restarted:
        metrics.worker_restart()
    run_dir = Path(config["run_dir"]) if config.get("run_dir") and rank == 0 else None
    # No SIGTERM handler here: Train V2 runs this function in a thread, and a stop seen by one rank
    # alone would leave the others waiting in the next all-reduce. Stops go through the agreed poll.
    loop_ctx = LoopContext(device=device, rank=rank, world_size=world, metrics=metrics,
                           progress=False, report_lines=rank == 0 and config.get("progress", True),
                           poll=interrupt_poll(rank, config.get("stop")), hooks=load_hooks(cfg.train.hooks))
    try:
        training_loop(cfg, state, vgg, loop_ctx, RaySink(cfg, rank, run_dir, metrics))
    finally:
        metrics.close()


def quiet_train_reports() -> None:
    """Ray Train logs every report of every rank (the whole metrics dict) and every checkpoint at
    INFO, streamed to the driver: at WARNING unless ``stylegen -v``. (Ray names one of those
    loggers by its module's file path.)"""
    from ray.train.v2._internal.execution import context, storage as train_storage

    for name in (context.__file__, train_storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def find_resume_checkpoint() -> dict | None:
    """The newest loadable checkpoint of this run, or None for a fresh start.

    Tried newest first: the run directory's ``step_XXXXXXXX`` checkpoint dirs, then the checkpoint Ray
    registered. Ray registers a reported checkpoint only when its controller next polls the workers
    (every ~2 s): a worker killed just after a report would otherwise resume one interval further back.
    A corrupt or half-uploaded checkpoint is skipped with a warning (the previous one is used).
    """
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    storage = ray.train.get_context().get_storage()
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    try:
        infos = fs.get_file_info(FileSelector(root, allow_not_found=True))
    except OSError as e:
        log.warning("cannot list %s for checkpoints: %s", root, e)
        infos = []
    names = sorted((i.base_name for i in infos if i.type == FileType.Directory and STEP_DIR.match(i.base_name)),
                   reverse=True)
    candidates = [ray.train.Checkpoint(path=f"{root}/{n}", filesystem=fs) for n in names]
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append(registered)
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as d:
                return load_checkpoint(Path(d) / "checkpoint.pt")
        except UserError as e:
            log.warning("skipping checkpoint %s: %s", checkpoint.path, e)
    return None


def build_trainer(cfg: Config, *, name: str, storage: str, trial: str = "", callbacks: list | None = None,
                  stop_key: str | None = None, progress: bool = True):
    """A TorchTrainer for ``cfg`` (workers/resources from ``cfg.ray``); same name + storage resumes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    rc = cfg.ray
    use_gpu = rc.gpus_per_worker > 0
    resources = {"CPU": rc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = rc.gpus_per_worker
    storage_path, storage_fs = ray_storage(storage, cfg.storage)
    run_dir = None if storage_fs else str(Path(storage_path) / name)
    show_ray = verbose()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run": name, "trial": trial, "run_dir": run_dir,
                           "stop": stop_key, "progress": progress,
                           "verbose": show_ray},
        scaling_config=ray.train.ScalingConfig(num_workers=rc.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                         checkpoint_score_attribute="val_score",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or None,
            # the controller's and workers' ray.train INFO lines (resources, worker group, DDP wrapping): -v
            logging_config=ray.train.LoggingConfig(log_level="INFO" if show_ray else "WARNING"),
        ),
    )


def ensure_ray(address: str, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS); else start a local Ray on 127.0.0.1 (token auth on by default).

    A local Ray gets a ``trial_slot`` resource: Tune trial drivers hold one instead of a CPU. When this
    process has not imported Ray yet (the CLI), every listener of that Ray is on 127.0.0.1
    (``loopback_local_ray``), as with ``cluster/local-up.sh`` and ``stylegen serve``.
    """
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        loopback_local_ray()
    import ray

    if ray.is_initialized():
        return
    # workers must import this package the same way the driver does
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                    os.environ.get("PYTHONPATH", "")]))}}
    if os.environ.get(ENDPOINT_ENV):  # the S3-compatible endpoint the user chose (never credentials)
        env["env_vars"][ENDPOINT_ENV] = os.environ[ENDPOINT_ENV]
    try:
        if address:
            ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, resources={"trial_slot": 64}, runtime_env=env, _node_ip_address="127.0.0.1",
                     logging_level=logging.WARNING)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {address!r} ({str(e).splitlines()[0][:120]}); "
                        "check --address / RAY_ADDRESS and that the cluster is up") from None
    if not verbose():  # -v shows Ray's own lines too
        drop_ray_chatter()


def failed_exception(error: BaseException) -> BaseException:
    """The exception behind a Train V2 failure: the first failed worker's, or the controller's."""
    import ray.train

    if isinstance(error, ray.train.WorkerGroupError) and error.worker_failures:
        return next(iter(error.worker_failures.values()))
    if isinstance(error, ray.train.ControllerError):
        return error.controller_failure
    return error


def failure_reason(error: BaseException) -> str:
    """One line from a Train V2 failure: the first failed worker's (or the controller's) exception message."""
    inner = failed_exception(error)
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return (lines[-1] if lines else type(inner).__name__)[:300]


@contextmanager
def stop_on_sigterm(stop_key: str) -> Iterator[threading.Event]:
    """While the run is fitted: SIGTERM to the driver requests run ``stop_key``'s stop and sets the yielded event.

    The handler only sets an event (it runs inside ``ray.get``); a thread makes the Ray call. The
    previous handler is restored afterwards. A no-op outside the main thread (e.g. a Tune trial).
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def forward() -> None:
        requested.wait()
        log.warning("SIGTERM: asking the workers to checkpoint at their next report and stop")
        request_stop(stop_key)

    def handler(signum, frame) -> None:  # noqa: ARG001
        requested.set()

    threading.Thread(target=forward, name="stylegen-sigterm", daemon=True).start()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(cfg: Config, *, name: str, storage: str, address: str = "", progress: bool = True):
    """``stylegen train`` without --local: run the TorchTrainer; returns (Result, stopped_by_sigterm).

    Train V2's ``fit`` raises when the run fails (after ``train.max_failures`` restarts): that becomes
    one UserError line; Ray has already logged the full traceback. SIGTERM to this process makes
    rank 0 checkpoint at the next report step and the run return early (rerun to resume).
    """
    import uuid

    # before Ray starts: a wrong train.init fails here, absolute for every worker; a resumed run ignores it
    cfg = with_init_resolved(cfg, storage_join(storage_absolute(storage), name))
    ensure_ray(address)  # first: it imports Ray (a local Ray's listeners on loopback, see its doc)
    import ray
    import ray.train

    stop_key = f"{name}-{uuid.uuid4().hex[:12]}"
    try:
        with stop_on_sigterm(stop_key) as stopped:
            result = build_trainer(cfg, name=name, storage=storage, stop_key=stop_key, progress=progress).fit()
        return result, stopped.is_set()
    except ray.train.TrainingFailedError as e:
        reason = failure_reason(e)
        clear_stop(stop_key)
        # Ray streams the failed workers' tracebacks to this process asynchronously; disconnecting
        # now ends that stream, so the one error line below is the last thing printed.
        ray.shutdown()
        raise UserError(f"training run {name!r} failed: {reason}; fix the cause and rerun with the same "
                        "--name and --storage to resume from the last checkpoint") from None
    finally:
        if ray.is_initialized():
            clear_stop(stop_key)

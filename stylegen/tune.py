"""``stylegen tune``: a Ray Tune sweep over the loss weights, each trial a Ray Train DDP run.

Train V2 cannot be wrapped as ``Tuner(TorchTrainer(...))``: each trial is a function
trainable that builds and fits its own ``TorchTrainer`` and forwards its reports to
Tune with ``TuneReportCallback``. ASHA stops trials on ``val_score`` (trial-independent:
normalised content + style losses on fixed pairs, see ``train/step.validate``) with
training steps as the time attribute. Trials hold one unit of a custom ``trial_slot``
resource and no CPU, so on a small machine the trials' Train workers always find the
CPUs they need (no deadlock), and ``max_concurrent_trials`` caps the sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stylegen.best import print_best, write_sweep_report
from stylegen.storage import absolute, check_access, is_remote, join, local_path, ray_storage, read_bytes, write_bytes
from stylegen.config import Config, check_name, from_dict, load_config, to_dict, validate_space, with_overrides
from stylegen.config_cli import add_config_arguments, flag_overrides
from stylegen.errors import UserError
from stylegen.raylogs import verbose

log = logging.getLogger(__name__)
TRIAL_RESOURCE = "trial_slot"
AIR_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--name", help="sweep name (default: ray.name + '-sweep')")
    p.add_argument("--samples", type=int, help="trials (tune.samples)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="tune.scheduler")
    p.add_argument("--max-concurrent", type=int, help="tune.max_concurrent")
    p.add_argument("--workers-per-trial", type=int, help="tune.workers_per_trial")
    p.add_argument("--storage", help="sweep storage (ray.storage)")
    p.add_argument("--address", help="Ray cluster address (ray.address)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (errored trials restart)")
    p.add_argument("--trust-storage", action="store_true",
                   help="with --resume from object storage (s3://, gs://): trust whoever can write the sweep's "
                        "prefix (resuming unpickles Tune's saved state from it; see README 'Security')")


def search_space(space: dict) -> dict:
    """{'loss.style': {'loguniform': [1, 100]}} -> Tune distributions keyed by the dotted config key."""
    from ray import tune

    makers = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
              "randint": lambda a: tune.randint(*map(int, a)), "choice": tune.choice, "grid": tune.grid_search}
    validate_space(space)  # a space that cannot produce valid values of its keys fails here, not in every trial
    return {key: makers[kind](args) for key, dist in space.items() for kind, args in dist.items()}


def trial_config(base: dict, params: dict) -> Config:
    """The trial's full Config: the sweep's base config with the sampled 'section.key' values applied."""
    return with_overrides(from_dict(base), {k: v for k, v in params.items() if "." in k})


def run_trial(params: dict, base: dict | None = None, train_storage: str = "") -> None:
    """Function trainable: one Ray Train DDP run whose reports reach Tune.

    ``params`` holds only the sampled keys (what Tune prints and stores per trial); the
    base config and the Train storage come through ``tune.with_parameters``. The run is
    fitted in a child task whose env names this cluster (RAY_ADDRESS): Train's
    PlacementGroupCleaner, which frees the workers' CPUs when ASHA kills a trial, finds
    the cluster through the State API, and with no address it gives up as soon as a
    second Ray instance runs on the machine (seen here: leaked placement groups, the
    next trials waiting for CPUs forever).
    """
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    callback = TuneReportCallback()  # must be built in the Tune session; it is only a queue handle
    env = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    fit = ray.remote(num_cpus=0, max_retries=0)(fit_trial).options(runtime_env=env)
    error = ray.get(fit.remote(base, params, train_storage, trial_id, callback))
    if error is not None:
        raise TrialFailed(error)


class TrialFailed(RuntimeError):
    """A trial's Train run failed; the message is the run's own error (its last line is the reason)."""


def fit_trial(base: dict, params: dict, train_storage: str, trial_id: str, callback) -> str | None:
    """Build and fit the trial's TorchTrainer; None, or the failure as one line (the worker's own exception)."""
    import ray.train

    from stylegen.train.ray_worker import build_trainer  # lazy: torch; not for `stylegen --help`

    cfg = trial_config(base, params)
    trainer = build_trainer(cfg, name=f"trial-{trial_id}", storage=train_storage, trial=trial_id, callbacks=[callback],
                            progress=False)  # the sweep logs one line per trial report (trial_logger)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # V2 raises once train.max_failures restarts are spent
        return named_reason(e)
    return None if result.error is None else named_reason(result.error)


def named_reason(error: BaseException) -> str:
    """'FloatingPointError: non-finite ...': the failed worker's exception type in front of its message."""
    from stylegen.train.ray_worker import failed_exception, failure_reason  # lazy: torch; not for `stylegen --help`

    reason, inner = failure_reason(error), failed_exception(error)
    name = type(getattr(inner, "cause", None) or inner).__name__  # RayTaskError keeps the user's error as .cause
    return reason if reason.startswith(name) else f"{name}: {reason}"


def tune_overrides(args: argparse.Namespace) -> list[str]:
    return flag_overrides(args, [("samples", "tune.samples"), ("scheduler", "tune.scheduler"),
                                 ("max_concurrent", "tune.max_concurrent"), ("workers_per_trial", "tune.workers_per_trial"),
                                 ("storage", "ray.storage"), ("address", "ray.address")])


def trial_bundle() -> dict:
    """The trial driver's own resources: a trial_slot when the cluster has them, else a sliver of CPU."""
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        return {"CPU": 0, TRIAL_RESOURCE: 1}
    log.warning("cluster has no %r resource (see cluster/ configs); trials take %g CPU each",
                TRIAL_RESOURCE, DRIVER_CPU)
    return {"CPU": DRIVER_CPU}


DRIVER_CPU = 0.01  # a trial driver's CPU when the cluster has no trial_slot resource


def max_trials(cpus: float, per_trial: float, driver: float, requested: int, gpus: float = 0.0,
               gpus_per_trial: float = 0.0) -> int:
    """Trials whose drivers *and* Train workers all fit at once (0 = not even one).

    A running trial holds ``driver`` CPUs for its whole life and needs ``per_trial`` more
    for its workers; if k trials' drivers started but only k-1 worker groups fit, the
    last one waits forever. So k may be at most cpus // (driver + per_trial).
    """
    fits = int((cpus + 1e-9) // (per_trial + driver)) if per_trial + driver > 0 else requested
    if gpus_per_trial > 0:
        fits = min(fits, int((gpus + 1e-9) // gpus_per_trial))
    return min(requested, fits)


def concurrency(cfg: Config, driver: float) -> int:
    """max_concurrent, capped so every running trial's driver and Train workers fit the cluster (no deadlock).

    Counts the cluster's total CPUs/GPUs: other jobs holding some of them, or an autoscaler
    that would add nodes, are not seen here (lower tune.max_concurrent yourself then).
    """
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    w = cfg.tune.workers_per_trial
    per_trial, gpus_per_trial = w * cfg.ray.cpus_per_worker, w * cfg.ray.gpus_per_worker
    n = max_trials(cpus, per_trial, driver, cfg.tune.max_concurrent, gpus, gpus_per_trial)
    if n < 1:
        raise UserError(f"one trial needs {per_trial + driver:g} CPUs and {gpus_per_trial:g} GPUs "
                        f"(tune.workers_per_trial x ray.cpus_per_worker / ray.gpus_per_worker, plus its driver) "
                        f"but the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower them")
    if n < cfg.tune.max_concurrent:
        log.warning("tune.max_concurrent=%d lowered to %d: that is how many trials' workers fit the cluster",
                    cfg.tune.max_concurrent, n)
    return n


SWEEP_CONFIG = "sweep_config.json"


def first_difference(a, b, prefix: str = "") -> str | None:
    """The first dotted key where two nested config dicts differ (None if equal).

    Only keys both hold are compared: a field added (or dropped) by another stylegen
    version since the sweep started does not block its resume.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) & set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def check_resume_config(sweep_dir: str | Path, base: dict) -> None:
    """A resumed sweep must train its remaining trials with the config it started with."""
    try:
        saved = json.loads(read_bytes(join(sweep_dir, SWEEP_CONFIG)).decode("utf-8"))["base"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError) as e:  # half-written or foreign (UnicodeDecodeError is a ValueError)
        raise UserError(f"--resume: {SWEEP_CONFIG} in {str(sweep_dir)!r} is not a sweep config "
                        f"({type(e).__name__}: {e}); restore it, or start a new sweep with another --name") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {SWEEP_CONFIG} in {str(sweep_dir)!r} is not a sweep config ('base' is not a "
                        f"table); restore it, or start a new sweep with another --name")
    diff = first_difference(saved, base)
    if diff is not None:
        raise UserError(f"--resume: {diff} differs from the config the sweep started with ({SWEEP_CONFIG} in "
                        f"{str(sweep_dir)!r}); resume with the same --config/--set")


def check_resume_trust(sweep_dir: str | Path, trust_storage: bool = False) -> None:
    """Refuse to resume a sweep whose saved state someone else could have written.

    ``Tuner.restore`` unpickles the sweep's state (``tuner.pkl``, the cloudpickled trials in
    ``experiment_state-*.json``, the searcher's state, trials' pickled errors): whoever can write
    those files runs code in this driver. A local sweep must therefore be yours: the sweep dir and
    everything in it owned by you and not writable by group or others. Object storage has no owner
    to check, so resuming from it needs ``--trust-storage`` (you vouch for everyone with write
    access to the prefix).
    """
    if is_remote(sweep_dir):
        if not trust_storage:
            raise UserError(f"--resume from {sweep_dir} unpickles Tune's saved state (tuner.pkl) from object storage: "
                            f"anyone with write access to that prefix could plant code that runs here; pass "
                            f"--trust-storage if only you and people you trust can write there")
        log.warning("--trust-storage: resuming %s trusts everyone who can write to it", sweep_dir)
        return
    root = local_path(sweep_dir)
    if not root.exists():
        return  # nothing to unpickle; the caller says there is no sweep to resume
    me, fix = os.geteuid(), f"chmod -R go-w {shlex.quote(str(root))}"
    seen: set[tuple[int, int]] = set()
    todo = [root]
    while todo:  # the sweep tree, following symlinks (as Tune would), each directory once
        path = todo.pop()
        try:
            st = path.stat()
        except OSError:
            continue  # a dangling link: nothing there to read
        if st.st_uid != me:
            raise UserError(f"--resume: {path} is owned by uid {st.st_uid}, not you (uid {me}): resuming unpickles "
                            f"this sweep's files, so their owner could run code as you; resume as that user, or "
                            f"start a new sweep in a directory of your own")
        if st.st_mode & 0o022:
            raise UserError(f"--resume: {path} is writable by group/others (mode {st.st_mode & 0o7777:04o}): "
                            f"resuming unpickles this sweep's files, so anyone who can write there could run code "
                            f"as you; check nothing was planted, then run: {fix}")
        if path.is_dir() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            todo.extend(sorted(path.iterdir()))


def trial_line(event: str, trial_id: str, result: dict | None, max_steps: int, params: dict | None = None) -> str:
    """One line per trial event, e.g. 'trial 00001 step 40/60 val_score 0.8123' (what the sweep shows
    instead of Tune's status tables, which `stylegen -v tune` keeps)."""
    line = f"trial {trial_id.rsplit('_', 1)[-1]} {event}"
    if params:
        line += " " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    if result and "step" in result:
        line += f" step {result['step']}/{max_steps}"
        if isinstance(result.get("val_score"), (int, float)):
            line += f" val_score {result['val_score']:.4f}"
    return line


def trial_logger(max_steps: int):
    """A Tune callback logging ``trial_line`` at each trial's start, report, end and error."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ARG002
            log.info("%s", trial_line("started", trial.trial_id, None, max_steps, trial.config))

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ARG002
            log.info("%s", trial_line("at", trial.trial_id, result, max_steps))

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ARG002
            last = trial.last_result or {}
            early = last.get("step", max_steps) < max_steps
            log.info("%s", trial_line("stopped early (scheduler) at" if early else "finished at", trial.trial_id,
                                      last, max_steps))

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ARG002
            log.warning("%s", trial_line("failed (see trials.parquet's stop_reason) at", trial.trial_id,
                                         trial.last_result, max_steps))

    return TrialLines()


def build_tuner(cfg: Config, sweep: str, storage: str, resume: bool, trust_storage: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    tc = cfg.tune
    if not tc.space:
        raise UserError("tune.space is empty; add e.g. [tune.space] \"loss.style\" = { loguniform = [1.0, 100.0] }")
    trial_cfg = with_overrides(cfg, {"ray.workers": tc.workers_per_trial})
    base = to_dict(trial_cfg)
    location = join(storage, sweep)  # not Path(): it would mangle the '//' of s3://b/p
    bundle = trial_bundle()
    show_ray = verbose()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, train_storage=join(location, "trial_runs")),
        tune.PlacementGroupFactory([bundle]))
    ray_path, fs = ray_storage(storage, cfg.storage)
    ray_location = f"{ray_path}/{sweep}"
    if resume:
        check_resume_trust(location, trust_storage)  # before anything is read from the sweep
        if not tune.Tuner.can_restore(ray_location, storage_filesystem=fs):
            raise UserError(f"no sweep to resume at {location}; run without --resume to start it")
        check_resume_config(location, base)
        # audited-unpickle: the sweep passed check_resume_trust (README "Security", resuming a sweep)
        return tune.Tuner.restore(ray_location, trainable=trainable, resume_errored=True, resume_unfinished=True,
                                  storage_filesystem=fs)
    if tune.Tuner.can_restore(ray_location, storage_filesystem=fs):
        raise UserError(f"a sweep named {sweep!r} already exists in {storage}; pass --resume to continue it "
                        f"or --name for a new one")
    scheduler = (ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=tc.grace_period,
                               reduction_factor=tc.reduction_factor)
                 if tc.scheduler == "asha" else FIFOScheduler())
    n = concurrency(trial_cfg, bundle.get("CPU", 0.0))
    write_bytes(join(location, SWEEP_CONFIG),
                json.dumps({"sweep": sweep, "base": base, "space": tc.space}, indent=1).encode(), cfg.storage)
    return tune.Tuner(
        trainable,
        param_space=search_space(tc.space),
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, scheduler=scheduler, num_samples=tc.samples,
                                    # seeded sampling: the same config samples the same trials
                                    search_alg=BasicVariantGenerator(max_concurrent=n, random_state=tc.seed)),
        run_config=tune.RunConfig(name=sweep, storage_path=ray_path, storage_filesystem=fs,
                                  # Tune's status tables with -v; else one line per trial event
                                  verbose=None if show_ray else 0, callbacks=None if show_ray else [trial_logger(cfg.train.steps)]),
    )


@contextmanager
def quiet_tune_header(quiet: bool) -> Iterator[None]:
    """Without -v: no "Configuration for experiment" box, "View detailed results" and TensorBoard lines.

    Tune 2.60's output engine prints them even at ``verbose=0`` (``tune/tune.py``: a reporter exists
    for every AirVerbosity); its legacy engine (``RAY_AIR_NEW_OUTPUT=0``, read when ``fit`` starts)
    prints nothing at ``verbose=0``. Our trial_logger lines are logging, untouched by either.
    """
    if not quiet or os.environ.get(AIR_NEW_OUTPUT) is not None:  # the user's own choice wins
        yield
        return
    os.environ[AIR_NEW_OUTPUT] = "0"
    try:
        yield
    finally:
        os.environ.pop(AIR_NEW_OUTPUT, None)


def run_sweep(cfg: Config, *, sweep: str, resume: bool = False, trust_storage: bool = False):
    """Run (or resume) the sweep; returns the ResultGrid. Writes the sweep report into the sweep dir."""
    from stylegen.train.ray_worker import ensure_ray  # lazy: torch; not for `stylegen --help`
    from stylegen.train.step import with_init_resolved  # lazy: torch

    cfg = with_init_resolved(cfg)  # trials run in their own working dirs: an absolute path, checked once here
    storage = absolute(cfg.ray.storage)
    if is_remote(storage):
        check_access(storage, cfg.storage, write=True, what="--storage")
    ensure_ray(cfg.ray.address)
    tuner = build_tuner(cfg, sweep, storage, resume, trust_storage)
    with quiet_tune_header(not verbose()):
        results = tuner.fit()
    if not is_remote(storage):  # the report (parquet + plot) is for local sweeps; `best` reads both kinds
        write_sweep_report(Path(storage) / sweep, metric=cfg.tune.metric, mode=cfg.tune.mode)
    return results


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, *tune_overrides(args)])
    sweep = check_name(args.name or f"{cfg.ray.name}-sweep", "sweep name (--name)")
    results = run_sweep(cfg, sweep=sweep, resume=args.resume, trust_storage=args.trust_storage)
    errors = results.num_errors
    unfinished = len(results) - errors - results.num_terminated
    print(f"sweep {sweep}: {len(results)} trials, {errors} errored" + (f", {unfinished} unfinished" if unfinished else ""))
    if unfinished:  # Ctrl-C / SIGTERM: Tune saved its state
        print("sweep interrupted: continue it with the same command plus --resume")
    where = join(cfg.ray.storage, sweep) if is_remote(cfg.ray.storage) else local_path(cfg.ray.storage) / sweep
    try:
        print_best(where, metric=cfg.tune.metric, mode=cfg.tune.mode)
    except UserError as e:
        log.warning("%s", e)
    if unfinished:
        return 130
    return 0 if errors < len(results) else 1

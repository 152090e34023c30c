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
import logging
from pathlib import Path

from stylegen.config import Config, from_dict, to_dict, with_overrides
from stylegen.config_cli import add_config_arguments
from stylegen.errors import UserError

log = logging.getLogger(__name__)
TRIAL_RESOURCE = "trial_slot"


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


def search_space(space: dict) -> dict:
    """{'loss.style': {'loguniform': [1, 100]}} -> Tune distributions keyed by the dotted config key."""
    from ray import tune

    makers = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
              "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    return {key: makers[kind](args) for key, dist in space.items() for kind, args in dist.items()}


def trial_config(config: dict) -> Config:
    """The trial's full Config: the base config with the sampled 'section.key' values applied."""
    return with_overrides(from_dict(config["base"]), {k: v for k, v in config.items() if "." in k})


def run_trial(config: dict) -> None:
    """Function trainable: one Ray Train DDP run whose reports reach Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from stylegen.train.ray_worker import build_trainer

    cfg = trial_config(config)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, name=f"trial-{trial_id}", storage=config["train_storage"], trial=trial_id,
                            callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error


def tune_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("samples", "tune.samples"), ("scheduler", "tune.scheduler"), ("max_concurrent", "tune.max_concurrent"),
             ("workers_per_trial", "tune.workers_per_trial"), ("storage", "ray.storage"), ("address", "ray.address")]
    out = []
    for attr, key in pairs:
        v = getattr(args, attr, None)
        if v is not None:
            out.append(f"{key}={v!r}" if isinstance(v, str) else f"{key}={v}")
    return out


def trial_bundle() -> dict:
    """The trial driver's own resources: a trial_slot when the cluster has them, else a sliver of CPU."""
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        return {"CPU": 0, TRIAL_RESOURCE: 1}
    log.warning("cluster has no %r resource (see cluster/ configs); trials take 0.01 CPU each", TRIAL_RESOURCE)
    return {"CPU": 0.01}


def concurrency(cfg: Config) -> int:
    """max_concurrent, capped so every running trial's Train workers fit the cluster's CPUs (no deadlock)."""
    import ray

    per_trial = cfg.tune.workers_per_trial * max(cfg.ray.cpus_per_worker, 1e-9)
    fits = int(ray.cluster_resources().get("CPU", 1) // per_trial)
    if fits < 1:
        raise UserError(f"one trial needs {per_trial:g} CPUs (tune.workers_per_trial x ray.cpus_per_worker) "
                        f"but the cluster has {ray.cluster_resources().get('CPU', 0):g}; lower them")
    if fits < cfg.tune.max_concurrent:
        log.warning("tune.max_concurrent=%d lowered to %d: that is how many trials' workers fit the CPUs",
                    cfg.tune.max_concurrent, fits)
    return min(cfg.tune.max_concurrent, fits)


def build_tuner(cfg: Config, sweep: str, storage: str, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    if not tc.space:
        raise UserError("tune.space is empty; add e.g. [tune.space] \"loss.style\" = { loguniform = [1.0, 100.0] }")
    trial_cfg = with_overrides(cfg, {"ray.workers": tc.workers_per_trial})
    trainable = tune.with_resources(run_trial, tune.PlacementGroupFactory([trial_bundle()]))
    path = Path(storage) / sweep
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise UserError(f"no sweep to resume at {path}; run without --resume to start it")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True, resume_unfinished=True)
    scheduler = (ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=tc.grace_period,
                               reduction_factor=tc.reduction_factor)
                 if tc.scheduler == "asha" else FIFOScheduler())
    param_space = {"base": to_dict(trial_cfg), "train_storage": str(path / "trial_runs"), **search_space(tc.space)}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, scheduler=scheduler,
                                    num_samples=tc.samples, max_concurrent_trials=concurrency(trial_cfg)),
        run_config=tune.RunConfig(name=sweep, storage_path=str(Path(storage).resolve())),
    )


def run_sweep(cfg: Config, *, sweep: str, resume: bool = False):
    """Run (or resume) the sweep; returns the ResultGrid. Writes the sweep report into the sweep dir."""
    from stylegen.experiments import write_sweep_report
    from stylegen.train.ray_worker import ensure_ray, is_local_path

    storage = cfg.ray.storage
    if is_local_path(storage):
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
    ensure_ray(cfg.ray.address)
    results = build_tuner(cfg, sweep, storage, resume).fit()
    if is_local_path(storage):
        write_sweep_report(Path(storage) / sweep, metric=cfg.tune.metric, mode=cfg.tune.mode)
    return results


def run(args: argparse.Namespace) -> int:
    from stylegen.config import load_config
    from stylegen.experiments import print_best

    cfg = load_config(args.config, [*args.overrides, *tune_overrides(args)])
    sweep = args.name or f"{cfg.ray.name}-sweep"
    results = run_sweep(cfg, sweep=sweep, resume=args.resume)
    errors = [r for r in results if r.error]
    print(f"sweep {sweep}: {len(results)} trials, {len(errors)} errored")
    if "://" not in cfg.ray.storage:
        print_best(Path(cfg.ray.storage) / sweep, metric=cfg.tune.metric, mode=cfg.tune.mode, top=len(results))
    return 0 if len(errors) < len(results) else 1

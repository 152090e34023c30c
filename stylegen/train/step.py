"""One optimisation step, validation and the training state. No Ray here.

The same functions run in the local loop (``loop.py``) and in every Ray Train
worker (``ray_worker.py``); DDP wrapping happens outside, so ``TrainState`` may hold
either bare modules or ``DistributedDataParallel`` wrappers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stylegen.checkpoint import state_dict_mismatch
from stylegen.config import Config, LossConfig, OptimConfig, TrainConfig
from stylegen.errors import UserError
from stylegen.losses import d_loss, loss_terms, pixel_l1, target_features, weighted_total
from stylegen.models import unwrap
from stylegen.models.discriminator import Discriminator
from stylegen.models.generator import VGG_LAYER, build_generator
from stylegen.objective import generator_loss_sums, rows_from_sums, score_generator

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    generator: nn.Module
    discriminator: nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    step: int = 0
    data: dict | None = None  # the data position (stylegen.data.loader.DataState.to_dict()) after `step`
    # Speed levers of train_step (same math; benchmarks/bench_model.py measures each). The defaults are the
    # step as it was before them; build_state turns them on from the config.
    channels_last: bool = False  # NHWC batches, generator and VGG (oneDNN's and cuDNN's native layout)
    batched_vgg: bool = False    # one no-grad VGG pass over content | style for the loss's targets


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is visible; use train.device = 'auto' or 'cpu'")
    return torch.device(name)


def build_state(cfg: Config, device: torch.device) -> TrainState:
    """Generator (+ discriminator when loss.adversarial > 0) and their Adam optimisers."""
    torch.manual_seed(cfg.train.seed)
    g = build_generator(cfg).to(device)
    d = Discriminator().to(device) if cfg.loss.adversarial > 0 else None
    # Not on CUDA: on an H200 the bf16 step ran 1.20x faster without (reflection padding and the
    # NHWC<->NCHW copies around it cost more than cuDNN gains; benchmarks/gpu_check.py, docs/quality.md).
    channels_last = device.type == "cpu" and cfg.train.cpu_channels_last
    if channels_last:
        g = g.to(memory_format=torch.channels_last)
    if hasattr(g, "batch_encoder"):
        g.batch_encoder = True  # one encoder pass over content | style (models/generator.py)
    g = compiled(g, cfg.train)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=cfg.optim.lr, betas=betas)
    # The discriminator's Adam follows DCGAN's betas (0.5, 0.999): it must track a moving target.
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.optim.d_lr, betas=(0.5, 0.999)) if d is not None else None
    return TrainState(g, d, opt_g, opt_d, 0, channels_last=channels_last, batched_vgg=True)


def compiled(module: nn.Module, train: TrainConfig) -> nn.Module:
    """``torch.compile(module)`` when ``train.compile`` (the generator before DDP wraps it, the loss VGG);
    ``models.unwrap`` reaches the module inside for state dicts."""
    return torch.compile(module, dynamic=False) if train.compile else module


def lr_factor(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Multiplier on the base LR at ``step``: linear warm-up, then constant or cosine to 0."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def to_float(batch_u8: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] on device; the copy moves 4x fewer bytes than float."""
    x = batch_u8.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512 on x86, with AVX512-BF16/AMX native; BF16 on Arm).
    Without them (an AVX2-only CPU) torch runs bf16 convolutions in slow reference code: the shipped recipe's
    step took 25 s against 2.2 s in float32 on a 2-core AVX2 machine."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: keep the configured choice
        return True


def cpu_bf16_for(requested: bool, device: torch.device, native: Callable[[], bool] | None = None) -> bool:
    """``train.cpu_bf16`` as a run can use it: False, with one warning, on a CPU without bf16 kernels
    (``native``: the probe, ``native_cpu_bf16`` by default)."""
    if not requested or device.type != "cpu":
        return requested
    if (native or native_cpu_bf16)():
        return True
    log.warning("train.cpu_bf16: this CPU has no bf16 kernels (torch: %s, no AVX512/AMX), where bf16 autocast "
                "runs ~10x slower than float32; training in float32 instead. Set train.cpu_bf16 = false to "
                "silence this", torch.backends.cpu.get_cpu_capability())
    return False


def autocast_for(device: torch.device, amp: bool, cpu_bf16: bool = False):
    """bf16 autocast on CUDA when ``amp``, on CPU when ``cpu_bf16``; otherwise a no-op context."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def train_step(state: TrainState, vgg: nn.Module, content_u8: torch.Tensor, style_u8: torch.Tensor, *,
               loss_cfg: LossConfig, optim_cfg: OptimConfig, total_steps: int, device: torch.device,
               amp: bool = True, cpu_bf16: bool = False) -> dict[str, float]:
    """One generator step (and one discriminator step when it is on). Returns float terms + 'total'."""
    channels_last = state.channels_last
    if channels_last:
        vgg_channels_last(vgg)
    content = to_float(content_u8, device, channels_last)  # (B, 3, H, W)
    style = to_float(style_u8, device, channels_last)      # (B, 3, H, W)
    factor = lr_factor(state.step, total_steps, optim_cfg)
    for group in state.opt_g.param_groups:
        group["lr"] = optim_cfg.lr * factor

    state.generator.train()
    with autocast_for(device, amp, cpu_bf16):
        identity = loss_cfg.identity > 0
        # the loss's target features, computed once; a generator that reads VGG features reuses them
        content_feats, style_feats = target_features(vgg, content, style, loss_cfg, batched=state.batched_vgg)
        reads_vgg = getattr(unwrap(state.generator), "vgg", None) is not None  # model.vgg_adain
        if identity:
            # One forward for both (one DDP forward per backward): (B + k, 3, H, W) -> stylized | G(c, c)
            # for the first k = identity_samples(...) contents of the batch
            k = identity_samples(len(content), loss_cfg.identity_fraction)
            both = _pair_features(content_feats, style_feats, k) if reads_vgg else None
            out, out_id = state.generator(torch.cat([content, content[:k]]), torch.cat([style, content[:k]]),
                                          vgg_feats=both).split([len(content), k])
        else:
            out = state.generator(content, style, vgg_feats=(content_feats, style_feats))  # (B, 3, H, W)
        fake_logits = None
        if state.discriminator is not None:
            # G's adversarial term goes through the bare D: its grads are zeroed before
            # D's own step, and skipping the DDP wrapper keeps D's all-reduce to D's step.
            d_bare = unwrap(state.discriminator)
            d_bare.requires_grad_(False)
            fake_logits = d_bare(out)
            d_bare.requires_grad_(True)
        terms = loss_terms(out, content, style, vgg, loss_cfg, fake_logits=fake_logits,
                           content_feats=content_feats, style_feats=style_feats, gram=loss_cfg.gram > 0)
        if identity:
            # stylize(c, c) must give c back: the original project's "poor reconstruction" fix
            terms["identity"] = pixel_l1(out_id, content[:k])
        total = weighted_total(terms, loss_cfg)
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite generator loss at step {state.step}: "
                                 + ", ".join(f"{k}={v.item():.3g}" for k, v in terms.items())
                                 + "; lower optim.lr or the loss weights")
    state.opt_g.zero_grad(set_to_none=True)
    total.backward()
    if optim_cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.generator.parameters(), optim_cfg.grad_clip)
    state.opt_g.step()

    result = {k: float(v.detach()) for k, v in terms.items()}
    result["total"] = float(total.detach())
    if state.discriminator is not None and state.opt_d is not None:
        with autocast_for(device, amp, cpu_bf16):
            real = state.discriminator(style)          # real = style images
            fake = state.discriminator(out.detach())   # fake = generator outputs
            dl = d_loss(real, fake)
        state.opt_d.zero_grad(set_to_none=True)
        dl.backward()
        state.opt_d.step()
        result["discriminator"] = float(dl.detach())
    state.step += 1
    return result


def vgg_channels_last(vgg: nn.Module) -> None:
    """Put the frozen VGG's weights in channels_last, once (idempotent, in place): with NCHW weights
    oneDNN reorders NHWC inputs back to its blocked layout at every conv, which was slower than NCHW."""
    w = next(vgg.parameters(), None)
    if w is not None and w.dim() == 4 and not w.is_contiguous(memory_format=torch.channels_last):
        vgg.to(memory_format=torch.channels_last)


def identity_samples(batch: int, fraction: float) -> int:
    """How many of a batch's contents the identity term trains: ceil(fraction · batch), at least 1."""
    return max(1, min(batch, math.ceil(fraction * batch - 1e-9)))


def _pair_features(content_feats: dict, style_feats: dict, k: int) -> tuple[dict, dict] | None:
    """The generator's VGG layer for the identity-batched inputs (content | content[:k], style |
    content[:k]); None when a feature dict lacks it or a style of another size makes it uncatable."""
    c, s = content_feats.get(VGG_LAYER), style_feats.get(VGG_LAYER)
    if c is None or s is None or c.shape[1:] != s.shape[1:]:
        return None
    return {VGG_LAYER: torch.cat([c, c[:k]])}, {VGG_LAYER: torch.cat([s, c[:k]])}


def validate(generator: nn.Module, vgg: nn.Module, content_u8: torch.Tensor, style_u8: torch.Tensor,
             device: torch.device, batch: int = 16, cache: dict | None = None,
             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Trial-independent validation on fixed pairs; no config weights are involved.

    content_n = content loss / content loss of copying the style image,
    style_n   = mean/std style loss / style loss of returning the content image,
    val_score = content_n + style_n (both trivial answers score 1.0; lower is better).
    Same code as ``stylegen eval`` (``stylegen.objective``).

    ``world_size`` > 1 (a DDP group; every rank calls this): rank r scores pairs r, r + world_size, ...
    and the loss sums are all-reduced, so every rank returns the whole set's figures (equal to
    one process's up to float summation order) at 1/world_size of the work.
    """
    if world_size > 1 and torch.distributed.is_initialized():
        sums = generator_loss_sums(generator, vgg, content_u8[rank::world_size], style_u8[rank::world_size],
                                   device, batch=batch, cache=cache)
        keys = [(row, k) for row in sorted(sums) for k in sorted(sums[row])]
        flat = torch.tensor([sums[row][k] for row, k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(flat)
        for (row, k), v in zip(keys, flat.tolist(), strict=True):
            sums[row][k] = v
        row = rows_from_sums(sums, len(content_u8))["model"]
    else:
        row = score_generator(generator, vgg, content_u8, style_u8, device, batch=batch, cache=cache)
    return {"val_content": row["content"], "val_style": row["style"], "val_content_n": row["content_n"],
            "val_style_n": row["style_n"], "val_score": row["objective_n"]}


def init_source(init: str) -> str:
    """``train.init`` -> the checkpoint file it names, absolute (a worker's working dir is not the
    driver's) or a URL; 'pretrained' = the model shipped in the package. UserError when missing."""
    from stylegen import storage
    from stylegen.checkpoint import resolve_checkpoint_path
    from stylegen.loading import shipped_checkpoint

    if init == "pretrained":
        return str(shipped_checkpoint())
    try:
        path = resolve_checkpoint_path(init)
    except UserError as e:
        raise UserError(f"train.init: {e}") from None
    return path if storage.is_remote(path) else str(Path(path).resolve())


def with_init_resolved(cfg: Config, run_dir: str = "") -> Config:
    """``cfg`` with ``train.init`` resolved by ``init_source`` and checked against the model config
    (the driver's check before any worker starts); unchanged when it is ''. When ``run_dir`` (the
    run's storage dir) already holds a checkpoint the run resumes from it: train.init is dropped
    unread (it may be gone by now)."""
    if not cfg.train.init:
        return cfg
    if run_dir:
        from stylegen.checkpoint import resolve_checkpoint_path

        try:
            resolve_checkpoint_path(run_dir)
        except UserError:
            pass  # no checkpoint yet: a new run, which starts from train.init
        else:
            return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init=""))
    source = init_source(cfg.train.init)
    init_generator(build_generator(cfg), source)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init=source))


def init_generator(generator: nn.Module, source: str) -> str:
    """Load the generator weights of checkpoint ``source`` (``train.init``) into ``generator`` (a fresh
    run's, maybe DDP-wrapped): a fine-tuning run starts there at step 0 with its own optimiser,
    schedule and data position. Returns the file read."""
    from stylegen.checkpoint import load_checkpoint

    path = init_source(source)
    ckpt = load_checkpoint(path)
    weights = ckpt.get("generator")
    g = unwrap(generator)
    problem = state_dict_mismatch(g.state_dict(), weights) if isinstance(weights, dict) else "no generator weights"
    if problem:
        model = (ckpt.get("config") or {}).get("model") or {}
        keys = ", ".join(f"model.{k}={v!r}" for k, v in model.items() if k in ("fusion", "channels", "res_blocks",
                                                                                 "adain_levels", "vgg_adain"))
        raise UserError(f"train.init {source!r} does not fit this run's model ({problem}); set the model keys as "
                        f"that checkpoint's ({keys or 'its config is missing'}) or drop train.init")
    g.load_state_dict(weights)
    return path


def checkpoint_state(state: TrainState, cfg_dict: dict, metrics: dict[str, float]) -> dict:
    """What goes into checkpoint.pt (plain tensors and scalars only)."""
    return {
        "step": state.step,
        "config": cfg_dict,
        "generator": unwrap(state.generator).state_dict(),
        "discriminator": unwrap(state.discriminator).state_dict() if state.discriminator is not None else None,
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict() if state.opt_d is not None else None,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "data": state.data,
        "saved_at": time.time(),
    }


def restore_state(state: TrainState, ckpt: dict) -> None:
    """Load a checkpoint dict into state (models may be DDP-wrapped); another model's checkpoint is a UserError."""
    g = unwrap(state.generator)
    problem = state_dict_mismatch(g.state_dict(), ckpt["generator"])
    if problem:
        raise UserError(f"the checkpoint to resume from was saved from another model config ({problem}); "
                        "use another output dir / run name, or that checkpoint's config")
    g.load_state_dict(ckpt["generator"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    if state.discriminator is not None and ckpt.get("discriminator") is not None:
        unwrap(state.discriminator).load_state_dict(ckpt["discriminator"])
        if state.opt_d is not None and ckpt.get("opt_d") is not None:
            state.opt_d.load_state_dict(ckpt["opt_d"])
    state.step = int(ckpt["step"])
    state.data = ckpt.get("data")  # None in checkpoints from before data positions were saved

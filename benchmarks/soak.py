"""Soak: a long local training run at tiny sizes, its memory and open files sampled over time.

    python benchmarks/soak.py [--steps 5000 | --minutes 10] [--interval 2] [--warmup 0.2]

Runs ``stylegen train --local`` (32x32 images, channels 8, 1 res block, batch 4, random VGG, checkpoints and
result grids every 250 steps, a new loader every 100-step epoch, the /metrics endpoint up) in a
subprocess and samples its RSS (``/proc/PID/status`` VmRSS) and open file descriptors
(``/proc/PID/fd``) every ``--interval`` s. ``--minutes`` ends the run with SIGTERM (preemption: the
loop checkpoints and exits). The first ``--warmup`` fraction of the run (allocator, first
checkpoint, caches) is not judged. Prints:

    soak_rss: start=<MB after warm-up> end=<MB> growth=<MB> max=<MB> slope=<MB/min> (<MB per 1000 steps>)
    soak_fds: start=<n after warm-up> end=<n> max=<n> slope=<fds/min>
    soak_steps: steps=<n> seconds=<s> steps_per_s=<x>
    soak_rss_end_vs_start: ours=<end MB> baseline=<start MB> ratio=<end/start>

The baseline of the ratio line is the same process's RSS right after warm-up: flat memory is 1.00.

Measured (2 shared CPUs, load 4-7, ``--minutes 12 --interval 3``): 2985 steps in 724 s (4.1 steps/s,
11 checkpoints + grids, 29 loader epochs); RSS after warm-up 517.1 -> 518.8 MB (+1.6 MB, range
506.7-539.8 MB, slope -0.12 MB/min), ratio 1.003; fds 6 -> 6 (max 7). Memory and fds flat.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 32x32 images: the random VGG19 (up to relu4_1) is most of a step's cost, a quarter of it at 64x64
TINY = {"model.channels": 8, "model.res_blocks": 1, "features.weights": '"random"', "data.batch_size": 4,
        "data.image_size": 32,
        "train.checkpoint_every": 250, "train.sample_every": 250, "train.report_every": 50,
        "train.keep_checkpoints": 2, "train.threads": 1, "metrics.port": 0}


@dataclass
class Sample:
    t: float  # seconds since start
    rss_mb: float
    fds: int
    step: int  # last checkpointed step (metrics.json), -1 before the first


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    returncode: int | None = None
    stopped: bool = False  # SIGTERMed after --minutes: a clean stop exits 143 (stylegen.train.cli.EXIT_STOPPED)
    seconds: float = 0.0
    steps: int = 0
    stderr_tail: str = ""

    @property
    def clean_exit(self) -> bool:
        return self.returncode == (128 + signal.SIGTERM if self.stopped else 0)

    def judged(self, warmup: float) -> list[Sample]:
        """Samples after the first ``warmup`` fraction of the run."""
        t0 = self.seconds * warmup
        return [s for s in self.samples if s.t >= t0]


def sample(pid: int) -> tuple[float, int] | None:
    """(VmRSS in MB, open file descriptors) of a live process; None once it is exiting (no VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        rss = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return (rss[0] / 1024.0, fds) if rss and rss[0] > 0 else None


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0.0 for fewer than 2 points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _step(out: Path) -> int:
    try:
        return int(json.loads((out / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def run_soak(*, steps: int = 5000, minutes: float | None = None, interval: float = 2.0, out: Path | None = None,
             overrides: dict | None = None) -> SoakResult:
    """Train tiny for ``steps`` (or until ``minutes`` pass: then SIGTERM) while sampling RSS and fds."""
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="stylegen-soak-")
        out = Path(tmp.name) / "run"
    sets = {**TINY, "train.steps": steps if minutes is None else 100_000_000, **(overrides or {})}
    argv = [sys.executable, "-m", "stylegen.cli", "train", "--local", "--out", str(out), "--no-progress"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    res = SoakResult()
    with tempfile.TemporaryFile() as errf:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf, env=env)
        try:
            stopping = False
            while proc.poll() is None:
                try:
                    got = sample(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                if got is not None:
                    res.samples.append(Sample(time.monotonic() - t0, *got, _step(out)))
                if minutes is not None and not stopping and time.monotonic() - t0 > minutes * 60:
                    proc.send_signal(signal.SIGTERM)  # preemption: checkpoint, then exit
                    stopping = res.stopped = True
                time.sleep(interval)
            res.returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        res.seconds = time.monotonic() - t0
        res.steps = _step(out)
        errf.seek(0)
        res.stderr_tail = errf.read().decode(errors="replace")[-3000:]
    if tmp is not None:
        tmp.cleanup()
    return res


def summary(res: SoakResult, warmup: float = 0.2) -> dict[str, float]:
    """Figures over the judged (post-warm-up) samples."""
    js = res.judged(warmup)
    if len(js) < 2:
        raise RuntimeError(f"too few samples after warm-up ({len(js)}); run longer")
    ts = [s.t for s in js]
    rss_slope = slope(ts, [s.rss_mb for s in js]) * 60  # MB/min
    steps_per_s = res.steps / max(res.seconds, 1e-9) if res.steps > 0 else 0.0
    return {"rss_start": js[0].rss_mb, "rss_end": js[-1].rss_mb, "rss_growth": js[-1].rss_mb - js[0].rss_mb,
            "rss_max": max(s.rss_mb for s in js), "rss_slope_mb_min": rss_slope,
            "rss_slope_mb_per_1k_steps": rss_slope / 60 / steps_per_s * 1000 if steps_per_s else float("nan"),
            "fds_start": js[0].fds, "fds_end": js[-1].fds, "fds_max": max(s.fds for s in js),
            "fds_min": min(s.fds for s in js), "fds_slope_min": slope(ts, [s.fds for s in js]) * 60,
            "rss_first": res.samples[0].rss_mb, "fds_first": res.samples[0].fds,
            "steps": res.steps, "seconds": res.seconds, "steps_per_s": steps_per_s, "samples": len(js)}


def format_summary(s: dict[str, float]) -> str:
    return "\n".join([
        f"soak_rss: start={s['rss_start']:.1f}MB end={s['rss_end']:.1f}MB growth={s['rss_growth']:+.1f}MB "
        f"max={s['rss_max']:.1f}MB slope={s['rss_slope_mb_min']:+.2f}MB/min "
        f"({s['rss_slope_mb_per_1k_steps']:+.2f}MB per 1000 steps)",
        f"soak_fds: start={s['fds_start']} end={s['fds_end']} min={s['fds_min']} max={s['fds_max']} "
        f"slope={s['fds_slope_min']:+.3f}/min",
        f"soak_steps: steps={s['steps']} seconds={s['seconds']:.0f} steps_per_s={s['steps_per_s']:.1f} "
        f"judged_samples={s['samples']} (first sample: rss={s['rss_first']:.1f}MB fds={s['fds_first']})",
        f"soak_rss_end_vs_start: ours={s['rss_end']:.1f} baseline={s['rss_start']:.1f} "
        f"ratio={s['rss_end'] / s['rss_start']:.3f}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000, help="training steps (default 5000)")
    p.add_argument("--minutes", type=float, default=None, help="run for this long instead, then SIGTERM")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples (default 2)")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run not judged (default 0.2)")
    p.add_argument("--csv", type=Path, help="also write every sample as CSV (t, rss_mb, fds, step)")
    args = p.parse_args(argv)
    res = run_soak(steps=args.steps, minutes=args.minutes, interval=args.interval)
    if not res.clean_exit:
        print(f"soak: training exited {res.returncode}\n{res.stderr_tail}", file=sys.stderr)
        return 1
    if args.csv:
        args.csv.write_text("t,rss_mb,fds,step\n" + "".join(f"{s.t:.1f},{s.rss_mb:.2f},{s.fds},{s.step}\n"
                                                            for s in res.samples))
    print(format_summary(summary(res, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

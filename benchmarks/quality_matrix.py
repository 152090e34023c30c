"""Issue 9's experiment matrix: train each config of ``jobs/configs/quality/`` with
``stylegen train --local`` and score it with ``stylegen eval`` on the same 16 held-out pairs.

    python benchmarks/quality_matrix.py                 # every config, 2 at a time (1 thread each)
    python benchmarks/quality_matrix.py base concat -j 1

Resumable: a row whose ``eval.json`` exists is read, not retrained (an interrupted run resumes
from its newest checkpoint). Prints one markdown table row per config for docs/quality.md.
Rows compare at equal steps; the AdaIN reference's equal-wall-clock row comes from
``benchmarks/adain_reference.py train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs" / "quality"
log = logging.getLogger("quality_matrix")


def run_one(name: str, out_root: Path, pairs: int, configs: Path = CONFIGS) -> dict:
    """Train (resuming) and evaluate one config; returns its eval.json plus train seconds."""
    out = out_root / name
    result_path = out / "eval.json"
    if not result_path.exists():
        cfg = configs / f"{name}.toml"
        t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "ab") as logf:
            subprocess.run([sys.executable, "-m", "stylegen", "train", "--local", "--config", str(cfg),
                            "--out", str(out), "--no-progress", "--set", "metrics.enabled=false"],
                           check=True, stdout=logf, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        subprocess.run([sys.executable, "-m", "stylegen", "eval", "--checkpoint", str(out), "--pairs", str(pairs),
                        "--gatys-steps", "0", "--json", str(result_path)], check=True, stdout=subprocess.DEVNULL)
        (out / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    result = json.loads(result_path.read_text())
    seconds_file = out / "train_seconds.txt"
    result["train_seconds"] = float(seconds_file.read_text()) if seconds_file.exists() else None
    metrics_file = out / "metrics.json"  # the run's last report: val_score on the val images
    result["val_score"] = json.loads(metrics_file.read_text()).get("val_score") if metrics_file.exists() else None
    return result


def table_row(name: str, r: dict) -> str:
    m = r["rows"]["model"]
    minutes = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-"
    val = f"{r['val_score']:.3f}" if r.get("val_score") is not None else "-"
    return (f"| {name} | {val} | {m['objective_n']:.3f} | {m['content_n']:.3f} | "
            f"{m['style_n']:.3f} | {m['psnr']:.1f} | {m['img_s']:.0f} | {minutes} |")


def newest_grid(run: Path) -> Path:
    grids = sorted((run / "samples").glob("epoch_*.png"))
    if not grids:
        raise SystemExit(f"no result grid in {run / 'samples'}")
    return grids[-1]


def montage(runs: dict[str, Path], out: Path, size: int = 64, pad: int = 2) -> Path:
    """One image from the runs' newest result grids (all on the same fixed val pairs): columns
    content | style | each run's output, in the order given (stylegen.grids layout: pad 2)."""
    import numpy as np
    from PIL import Image

    from stylegen.grids import grid_array

    def column(path: Path, j: int) -> np.ndarray:
        a = np.asarray(Image.open(path).convert("RGB"))
        n = (a.shape[0] - pad) // (size + pad)
        x = pad + j * (size + pad)
        return np.stack([a[pad + i * (size + pad):pad + i * (size + pad) + size, x:x + size] for i in range(n)])

    first = newest_grid(next(iter(runs.values())))
    cols = [column(first, 0), column(first, 1)] + [column(newest_grid(r), 2) for r in runs.values()]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(cols, pad)).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="config names (default: all in jobs/configs/quality)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="configs trained at once (default 2)")
    p.add_argument("--configs", type=Path, default=CONFIGS, help=f"folder of row configs (default {CONFIGS})")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--montage", type=Path, help="also write content | style | each run's output as one PNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = args.names or sorted(c.stem for c in args.configs.glob("*.toml"))
    missing = [n for n in names if not (args.configs / f"{n}.toml").exists()]
    if missing:
        p.error(f"no such config(s) in {args.configs}: {', '.join(missing)}")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(names, pool.map(lambda n: run_one(n, args.out, args.pairs, args.configs), names)))
    print("| run | val_score | objective_n | content_n | style_n | PSNR dB | img/s | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(table_row(name, r))
    if args.montage:
        print(montage({n: args.out / n for n in names}, args.montage))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the whole system end to end on the embedded data, on CPU.

shards -> 2-worker Ray Train DDP run -> Tune sweep (ASHA) -> best -> export ->
stylize -> eval, printing where every result is. One Ray instance serves all steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from stylegen.cli import main as cli
from stylegen.data.embedded import ensure_embedded, skimage_data_dir
from stylegen.images import cover_crop, load_rgb, save_png, to_uint8_tensor
from stylegen.metrics import ray_node_metrics_url

log = logging.getLogger("stylegen.demo")
ROOT = Path(__file__).resolve().parents[1]


class Phases:
    """Numbered phases, each announced with its command and closed with its wall time."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.times = total, 0, {}

    def run(self, title: str, argv: list[str]) -> None:
        self.n += 1
        print(f"\n=== [{self.n}/{self.total}] {title}\n$ stylegen {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = cli(argv)
        self.times[title] = time.perf_counter() - t0
        if rc != 0:
            print(f"demo: step '{title}' failed with exit code {rc}", file=sys.stderr)
            raise SystemExit(rc)
        print(f"--- {title}: {self.times[title]:.0f} s", flush=True)


# The demo's budget (< 6 min on 2 cores): a short DDP run and a small sweep at batch 4 per worker,
# eval without the Gatys optimisation (2 min alone). Each phase shows the system working; the shipped
# model (stylegen/assets/pretrained.pt, 51 min of training) shows the quality: its rows and the Gatys
# row on the same held-out pairs come from docs/pretrained-v3-eval.json (tests/test_pretrained.py checks
# that it is the shipped model's record).
DEMO_TRAIN = ["--set", "train.steps=40", "--set", "data.batch_size=4", "--set", "train.checkpoint_every=20",
              "--set", "train.sample_every=20", "--set", "train.report_every=10"]
DEMO_TUNE = ["--set", "train.steps=30", "--set", "data.batch_size=4", "--set", "train.checkpoint_every=15",
             "--set", "train.sample_every=30", "--set", "train.report_every=10", "--set", "tune.grace_period=10"]
QUICK = ["--set", "train.steps=20", "--set", "data.batch_size=2", "--set", "train.checkpoint_every=10",
         "--set", "train.sample_every=20", "--set", "train.report_every=10", "--set", "tune.grace_period=10"]
SHIPPED_EVAL = "docs/pretrained-v3-eval.json"  # the shipped model and Gatys on the default eval pairs
SUMMARY_COLUMNS = ("content_n", "style_n", "objective_n", "psnr")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer steps (used by the tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray's and Ray Train's own INFO logs too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    verbose = ["-v"] if args.verbose else []

    print("=== embedded data -> WebDataset shards", flush=True)
    shards = ensure_embedded()
    phases = Phases(total=7)
    for name, d in (("content", shards.content_dir), ("style", shards.style_dir)):
        phases.run(f"verify the {name} shards", [*verbose, "shard", "verify", str(d)])

    demo_cfg = str(ROOT / "jobs" / "configs" / "demo.toml")
    tune_cfg = str(ROOT / "jobs" / "configs" / "tune.toml")
    storage = str(out / "ray")
    phases.run("train: 2 Ray Train workers (DDP) on CPU",
               [*verbose, "train", "--config", demo_cfg, "--storage", storage, "--name", "demo-train",
                *(QUICK if args.quick else DEMO_TRAIN)])
    resume = ["--resume"] if (Path(storage) / "demo-sweep").exists() else []  # a second `make demo`
    phases.run("tune: ASHA sweep over the loss weights",
               [*verbose, "tune", "--config", tune_cfg, "--storage", storage, "--name", "demo-sweep", *resume,
                *(QUICK if args.quick else DEMO_TUNE)])
    export = out / "best"
    phases.run("best trial, exported", [*verbose, "best", str(Path(storage) / "demo-sweep"), "--export", str(export)])
    example = out / "stylized.png"
    content, style = example_images(out)
    phases.run("stylize an example with the best checkpoint",
               [*verbose, "stylize", "--checkpoint", str(export), "--content", str(content), "--style", str(style),
                "--out", str(example)])
    pairs = str((shipped_eval() or {}).get("pairs", 16))
    phases.run("eval on the held-out pairs: the sweep's best vs identity / style copy",
               [*verbose, "eval", "--checkpoint", str(export), "--pairs", pairs, "--gatys-steps", "0",
                "--json", str(out / "eval.json")])
    print_metrics_help()
    end_ray_output()
    print(summary(out, storage, export, example, content, style, time.perf_counter() - t0))
    return 0


def end_ray_output() -> None:
    """Disconnect from the demo's Ray before the summary. Ray forwards the workers' lines to this
    process asynchronously, and a late one (a trial's rank-0 line) once printed after the summary;
    ``ray.shutdown`` ends that stream, so the summary is the last thing printed."""
    import ray  # heavy: imported where it is used (the phases above have imported it already)

    if ray.is_initialized():
        ray.shutdown()


def shipped_eval() -> dict | None:
    """The shipped model's eval JSON (docs/; absent outside a checkout of the repository)."""
    path = ROOT / SHIPPED_EVAL
    return json.loads(path.read_text()) if path.is_file() else None


def summary(out: Path, storage: str, export: Path, example: Path, content: Path, style: Path, seconds: float) -> str:
    """Where every result is, and the eval table: the demo's best trial beside the shipped model and Gatys
    on the same held-out pairs (SHIPPED_EVAL)."""
    rows = json.loads((out / "eval.json").read_text())["rows"]
    table = {"demo's best trial (minutes of training)": rows["model"]}
    shipped = shipped_eval()
    if shipped is not None:
        ref = shipped["rows"]
        table["shipped model (51 min of training)"] = ref["model"]
        if "gatys" in ref:
            table[f"{ref['gatys']['label']}, per image"] = ref["gatys"]
    table.update({r["label"]: r for k, r in rows.items() if k in ("identity", "style_copy")})
    width = max(map(len, table))
    lines = [f"{'':<{width}}  " + "".join(f"{c:>12}" for c in SUMMARY_COLUMNS)]
    for label, r in table.items():
        cells = (r.get(c) for c in SUMMARY_COLUMNS)
        lines.append(f"{label:<{width}}  " + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in cells))
    return f"""
=== results ({seconds / 60:.1f} min)
train run:       {storage}/demo-train   (checkpoints, samples/epoch_XXXX.png grids)
sweep:           {storage}/demo-sweep   (trials.parquet, sweep.png)
best checkpoint: {export}
stylized:        {example}  (content {content.name}, style {style.name})
eval table:      {out / 'eval.json'}  (held-out pairs; lower *_n is better, 1.0 = returning the content)

{chr(10).join(lines)}
"""


def print_metrics_help() -> None:
    """Where this Ray node's metrics are scraped, and how to open Prometheus."""
    import shutil

    import ray

    url = ray_node_metrics_url() if ray.is_initialized() else ""
    print("\n=== metrics")
    print(f"Ray workers' stylegen_* metrics (prefixed ray_ until Prometheus relabels them): {url or 'Ray not running'}")
    print("discovery file for Prometheus: /tmp/ray/prom_metrics_service_discovery.json")
    if shutil.which("prometheus"):
        print("Prometheus is installed: `make prometheus`, then open http://127.0.0.1:9090 "
              "(try rate(stylegen_train_samples_total[1m]); the demo's Ray stops when it exits, "
              "so run it beside a live `stylegen train`)")
    else:
        print("Prometheus is not installed: `apt-get install prometheus`, then `make prometheus` "
              "and open http://127.0.0.1:9090")


def example_images(out: Path, content: str = "chelsea.png", style: str = "gravel.png") -> tuple[Path, Path]:
    """A content photo and a style texture from the embedded image files, as 128x128 PNGs."""
    paths = []
    for name in (content, style):
        target = out / f"example_{Path(name).stem}.png"
        save_png(target, to_uint8_tensor(cover_crop(load_rgb(skimage_data_dir() / name), (128, 128))))
        paths.append(target)
    return paths[0], paths[1]


if __name__ == "__main__":
    sys.exit(main())

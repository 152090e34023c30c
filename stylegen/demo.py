"""``make demo``: the whole system end to end on the embedded data, on CPU.

shards -> 2-worker Ray Train DDP run -> Tune sweep (ASHA) -> best -> export ->
stylize -> eval, printing where every result is. One Ray instance serves all steps.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stylegen.cli import main as cli

log = logging.getLogger("stylegen.demo")
ROOT = Path(__file__).resolve().parents[1]


def step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ stylegen {' '.join(argv)}", flush=True)
    rc = cli(argv)
    if rc != 0:
        print(f"demo: step '{title}' failed with exit code {rc}", file=sys.stderr)
        raise SystemExit(rc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer steps (used by the tests)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from stylegen.data.embedded import ensure_embedded

    print("=== embedded data -> WebDataset shards", flush=True)
    shards = ensure_embedded()
    for name, d in (("content", shards.content_dir), ("style", shards.style_dir)):
        step(f"verify {name} shards", ["shard", "verify", str(d)])

    demo_cfg = str(ROOT / "jobs" / "configs" / "demo.toml")
    tune_cfg = str(ROOT / "jobs" / "configs" / "tune.toml")
    quick = ["--set", "train.steps=40", "--set", "train.checkpoint_every=20", "--set", "train.sample_every=20",
             "--set", "train.report_every=10"] if args.quick else []
    storage = str(out / "ray")
    step("train: 2 Ray Train workers (DDP) on CPU",
         ["train", "--config", demo_cfg, "--storage", storage, "--name", "demo-train", "--no-progress", *quick])
    resume = ["--resume"] if (Path(storage) / "demo-sweep").exists() else []  # a second `make demo`
    step("tune: ASHA sweep over the loss weights",
         ["tune", "--config", tune_cfg, "--storage", storage, "--name", "demo-sweep", *resume, *quick])
    export = out / "best"
    step("best trial, exported", ["best", str(Path(storage) / "demo-sweep"), "--export", str(export)])
    example = out / "stylized.png"
    content, style = example_images(out)
    step("stylize an example with the best checkpoint",
         ["stylize", "--checkpoint", str(export), "--content", str(content), "--style", str(style), "--out", str(example)])
    step("eval against identity / style copy / Gatys",
         ["eval", "--checkpoint", str(export), "--pairs", "16", "--json", str(out / "eval.json")])
    print_metrics_help()
    print(f"""
=== results
train run:       {storage}/demo-train   (checkpoints, samples/epoch_XXXX.png grids)
sweep:           {storage}/demo-sweep   (trials.parquet, sweep.png)
best checkpoint: {export}
stylized:        {example}  (content {content.name}, style {style.name})
eval table:      {out / 'eval.json'}
""")
    return 0


def print_metrics_help() -> None:
    """Where this Ray node's metrics are scraped, and how to open Prometheus."""
    import shutil

    import ray

    from stylegen.metrics import ray_node_metrics_url

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
    from stylegen.data.embedded import skimage_data_dir
    from stylegen.images import cover_crop, load_rgb, save_png, to_uint8_tensor

    paths = []
    for name in (content, style):
        target = out / f"example_{Path(name).stem}.png"
        save_png(target, to_uint8_tensor(cover_crop(load_rgb(skimage_data_dir() / name), (128, 128))))
        paths.append(target)
    return paths[0], paths[1]


if __name__ == "__main__":
    sys.exit(main())

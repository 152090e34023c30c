"""``stylegen best``: read finished (or running) sweeps and train runs offline.

Reads the files Tune and Train write (no cluster, no ``Tuner.restore``, no torch
import): ``experiment_state-*.json`` for trial status and parameters, each trial's
``result.json`` for its reports, and each trial's Train run
``checkpoint_manager_snapshot.json`` for its checkpoints and their metrics.
A trial's ``val_score`` is its best checkpointed score: that is the checkpoint
``--export`` hands to ``stylize``/``eval``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stylegen import storage
from stylegen.errors import UserError

log = logging.getLogger(__name__)
SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict = field(default_factory=dict)
    steps: int = 0
    val_score: float = math.nan           # best checkpointed score (what --export gives)
    last_val_score: float = math.nan
    val_content_n: float = math.nan
    val_style_n: float = math.nan
    stop_reason: str = ""
    checkpoint: str | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep directory, a sweep name under --storage, or a single train run directory")
    p.add_argument("--storage", default="runs/ray", help="where sweep names are looked up (ray.storage)")
    p.add_argument("--metric", default="val_score", help="metric to rank by (default val_score)")
    p.add_argument("--mode", choices=["min", "max"], default="min")
    p.add_argument("--top", type=int, default=1, help="print a ranked table of the best K trials")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--export", metavar="DIR", help="copy the best checkpoint + its resolved config into DIR")


# ----------------------------------------------------------------------------- reading

def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {str(path)!r} is unreadable or corrupt ({type(e).__name__}); "
                        "the sweep may still be writing it: retry, or check the directory") from None


def _snapshot_checkpoints(run_dir: Path) -> list[tuple[Path, dict]]:
    """(checkpoint dir, metrics) of a Train V2 run dir, from Train's own snapshot."""
    snap = run_dir / SNAPSHOT
    if not snap.is_file():
        return []
    data = _read_json(snap, "checkpoint snapshot")
    out = []
    for item in data.get("checkpoint_results", []):
        path = run_dir / item["checkpoint_dir_name"]
        if (path / "checkpoint.pt").is_file():
            out.append((path, item.get("metrics", {})))
    return out


def _better(a: float, b: float, mode: str) -> bool:
    if math.isnan(b):
        return not math.isnan(a)
    return (a < b) if mode == "min" else (a > b)


def _best_of(items: list[tuple[Path, dict]], metric: str, mode: str) -> tuple[Path | None, dict]:
    best: tuple[Path | None, dict] = (None, {})
    for path, m in items:
        v = float(m.get(metric, math.nan))
        if _better(v, float(best[1].get(metric, math.nan)), mode):
            best = (path, m)
    return best


def _read_results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                continue
    return rows


def load_sweep(path: Path, metric: str = "val_score", mode: str = "min") -> tuple[list[TrialRow], bool]:
    """All trials of a sweep dir and whether the sweep is still running."""
    states = sorted(glob.glob(str(path / "experiment_state-*.json")))
    if not states:
        raise UserError(f"{str(path)!r} holds no Tune sweep (no experiment_state-*.json) and no train run "
                        f"({SNAPSHOT}); pass a sweep directory written by `stylegen tune`")
    state = _read_json(Path(states[-1]), "sweep state")
    if not isinstance(state, dict) or not isinstance(state.get("trial_data", []), list):
        raise UserError(f"sweep state {states[-1]!r} is corrupt (not a Tune experiment state)")
    sweep_cfg = _read_json(path / "sweep_config.json", "sweep config") if (path / "sweep_config.json").is_file() else {}
    rows, running = [], False
    for item in state.get("trial_data", []):
        try:
            trial_json, runtime_json = item
            trial = json.loads(trial_json)
            runtime = json.loads(runtime_json)
            tid, status = str(trial["trial_id"]), str(trial.get("status", "?"))
        except (TypeError, ValueError, KeyError):
            raise UserError(f"sweep state {states[-1]!r} is corrupt (a trial entry is not a Tune trial)") from None
        running |= status in ("RUNNING", "PENDING", "PAUSED")
        trial_dirs = glob.glob(str(path / f"*_{tid}_*"))
        results = _read_results(Path(trial_dirs[0])) if trial_dirs else []
        last = results[-1] if results else (runtime.get("last_result") or {})
        base = sweep_cfg.get("base") or last.get("config", {}).get("base", {})  # older sweeps: base in the config
        max_steps = base.get("train", {}).get("steps")
        ckpts = _snapshot_checkpoints(path / "trial_runs" / f"trial-{tid}")
        best_path, best_metrics = _best_of(ckpts, metric, mode)
        row = TrialRow(trial_id=tid, status=status, params=trial.get("evaluated_params", {}),
                       # a trial resumed after its run had finished reports nothing new: its Train
                       # checkpoints know the step it reached
                       steps=max([int(last.get("step", 0) or 0), *(int(m.get("step", 0) or 0) for _, m in ckpts)]),
                       val_score=float(best_metrics.get(metric, math.nan)),
                       last_val_score=float(last.get(metric, math.nan)),
                       val_content_n=float(best_metrics.get("val_content_n", math.nan)),
                       val_style_n=float(best_metrics.get("val_style_n", math.nan)),
                       checkpoint=str(best_path) if best_path else None)
        if status == "ERROR":
            err = next(iter(glob.glob(str(Path(trial_dirs[0]) / "error.txt"))), None) if trial_dirs else None
            text = Path(err).read_text(errors="replace").strip().splitlines() if err else []
            reason = next((ln for ln in reversed(text) if ln.strip()), "unknown error")
            row.stop_reason = f"errored: {reason.strip()[:200]}"
        elif status in ("RUNNING", "PENDING", "PAUSED"):
            row.stop_reason = status.lower()
        elif max_steps is not None and row.steps >= max_steps:
            row.stop_reason = "completed"
        else:
            row.stop_reason = "stopped early (scheduler)"
        rows.append(row)
    return rows, running


def load_run(path: Path, metric: str, mode: str) -> list[TrialRow]:
    """A single train run dir (Ray: checkpoint snapshot; --local: checkpoints/step_*)."""
    items = _snapshot_checkpoints(path)
    if not items and (path / "checkpoints").is_dir():
        metrics_file = path / "metrics.json"
        m = _read_json(metrics_file, "run metrics") if metrics_file.is_file() else {}
        from stylegen.train.loop import list_checkpoints

        steps = list_checkpoints(path / "checkpoints")
        if steps:
            items = [(steps[-1], m)]
    best_path, m = _best_of(items, metric, mode)
    if best_path is None:
        raise UserError(f"train run {str(path)!r} has no checkpoint yet")
    return [TrialRow(trial_id=path.name, status="TERMINATED", steps=int(m.get("step", 0)),
                     val_score=float(m.get(metric, math.nan)), last_val_score=float(m.get(metric, math.nan)),
                     val_content_n=float(m.get("val_content_n", math.nan)),
                     val_style_n=float(m.get("val_style_n", math.nan)),
                     stop_reason="train run", checkpoint=str(best_path))]


METADATA_SUFFIXES = (".json", ".txt", ".toml")


def mirror_metadata(url: str, dest: Path) -> int:
    """Copy the small files of a sweep/run on object storage (state, results, snapshots, error.txt)
    into ``dest``, and an empty stand-in for each ``checkpoint.pt`` (its presence is what the readers
    check; the weights stay remote). Returns the number of files fetched."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        urls = storage.list_files(url, "*", recursive=True)
    except OSError as e:
        raise UserError(f"sweep {storage.explain(e, url)}") from None
    if not urls:
        raise UserError(f"sweep or run {url!r} not found (no objects under it); pass the URL `stylegen tune` printed")
    root = url.rstrip("/") + "/"
    wanted = [u for u in urls if u.endswith(METADATA_SUFFIXES)]
    for u in urls:
        if storage.name(u) == "checkpoint.pt":
            target = dest / u[len(root):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()

    def fetch(u: str) -> None:
        storage.download(u, dest / u[len(root):])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, wanted))
    return len(wanted)


def _remote_rows(rows: list[TrialRow], local: Path, url: str) -> list[TrialRow]:
    """Point the checkpoints of rows read from a local mirror back at their objects."""
    for r in rows:
        if r.checkpoint:
            r.checkpoint = storage.join(url, Path(r.checkpoint).relative_to(local).as_posix())
    return rows


def resolve(sweep: str, storage_root: str) -> Path | str:
    """A local sweep/run dir, or the URL of one on object storage (``--storage s3://...`` + name, or a URL)."""
    if storage.is_remote(sweep):
        return sweep.rstrip("/")
    if storage.is_remote(storage_root) and not Path(sweep).exists():
        return storage.join(storage_root, sweep)
    p = Path(sweep)
    if not p.exists() and not p.is_absolute():
        p = Path(storage_root) / sweep
    if not p.exists():
        raise UserError(f"sweep or run {sweep!r} not found (looked at {sweep!r} and {str(Path(storage_root) / sweep)!r}); "
                        "pass the directory `stylegen tune` printed")
    if not p.is_dir():
        raise UserError(f"{str(p)!r} is not a directory; pass a sweep or train run directory")
    return p


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Trials with a checkpointed score, best first (errored trials never rank)."""
    usable = [r for r in rows if not r.status == "ERROR" and r.checkpoint and not math.isnan(r.val_score)]
    return sorted(usable, key=lambda r: r.val_score if mode == "min" else -r.val_score)


def read_any(path: Path, metric: str, mode: str) -> tuple[list[TrialRow], bool]:
    if (path / SNAPSHOT).is_file() or (path / "checkpoints").is_dir():
        return load_run(path, metric, mode), False
    return load_sweep(path, metric, mode)


# ----------------------------------------------------------------------------- output

def format_table(rows: list[TrialRow]) -> str:
    keys = sorted({k for r in rows for k in r.params})
    head = ["trial", *keys, "steps", "val_score", "content_n", "style_n", "stop_reason"]
    lines = [head]
    for r in rows:
        lines.append([r.trial_id, *(f"{r.params.get(k, float('nan')):.4g}" if isinstance(r.params.get(k), (int, float))
                                     else str(r.params.get(k, "")) for k in keys),
                      str(r.steps), f"{r.val_score:.4f}", f"{r.val_content_n:.3f}", f"{r.val_style_n:.3f}", r.stop_reason])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def read_location(path: Path | str, metric: str, mode: str) -> tuple[list[TrialRow], bool]:
    """``read_any`` for a local dir or, through a metadata mirror in a temp dir, an object-store URL."""
    if not storage.is_remote(path):
        return read_any(Path(path), metric, mode)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stylegen-best-") as tmp:
        local = Path(tmp) / storage.name(str(path))
        n = mirror_metadata(str(path), local)
        log.debug("read %d metadata files of %s", n, path)
        rows, running = read_any(local, metric, mode)
        return _remote_rows(rows, local, str(path)), running


def print_best(path: Path | str, *, metric: str = "val_score", mode: str = "min", top: int = 1,
               as_json: bool = False) -> TrialRow:
    rows, running = read_location(path, metric, mode)
    order = ranked(rows, mode)
    if not order:
        raise UserError(f"no trial in {str(path)!r} has a checkpoint with {metric!r} yet"
                        + (" (sweep still running)" if running else "; all trials errored or stopped before a checkpoint"))
    best = order[0]
    if as_json:
        print(json.dumps({"best": asdict(best), "running": running, "top": [asdict(r) for r in order[:top]]}, indent=2))
        return best
    tag = " (sweep still running or interrupted: best so far)" if running else ""
    print(f"best trial {best.trial_id}{tag}: {metric}={best.val_score:.4f} "
          f"(content_n={best.val_content_n:.3f}, style_n={best.val_style_n:.3f}) after {best.steps} steps")
    for k, v in best.params.items():
        print(f"  {k} = {v}")
    print(f"  checkpoint: {best.checkpoint}")
    if top > 1:
        print(format_table(order[:top]))
    return best


def export(best: TrialRow, out: Path) -> Path:
    """DIR/checkpoint.pt + DIR/config.toml (+ best.json); usable by stylize/eval as --checkpoint DIR."""
    from stylegen.checkpoint import load_checkpoint_bytes
    from stylegen.config import from_dict, to_toml

    src = storage.join(best.checkpoint, "checkpoint.pt")
    try:
        data = storage.read_bytes(src)
    except OSError as e:
        raise UserError(f"best checkpoint {storage.explain(e, src)}") from None
    state = load_checkpoint_bytes(data, src)  # refuse to export something that would not load
    storage.write_bytes(out / "checkpoint.pt", data)
    storage.write_bytes(out / "config.toml", to_toml(from_dict(state["config"])).encode())
    storage.write_bytes(out / "best.json", json.dumps(asdict(best), indent=2).encode())
    return out


def write_sweep_report(sweep_dir: Path, *, metric: str = "val_score", mode: str = "min") -> tuple[Path, Path]:
    """trials.parquet + sweep.png (val_score vs style weight; content_n vs style_n, best marked)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.parquet as pq


    rows, _ = load_sweep(sweep_dir, metric, mode)
    cols = {k: [asdict(r)[k] for r in rows] for k in ("trial_id", "status", "steps", "val_score", "last_val_score",
                                                       "val_content_n", "val_style_n", "stop_reason", "checkpoint")}
    for key in sorted({k for r in rows for k in r.params}):
        cols[key] = [r.params.get(key) for r in rows]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf)
    storage.write_bytes(sweep_dir / "trials.parquet", buf.getvalue().to_pybytes())

    order = ranked(rows, mode)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    style_w = [r.params.get("loss.style", math.nan) for r in rows]
    a.scatter(style_w, [r.val_score for r in rows], c=["tab:red" if r.status == "ERROR" else "tab:blue" for r in rows])
    a.set_xscale("log")
    a.set_xlabel("loss.style")
    a.set_ylabel(metric)
    a.set_title("val_score vs style weight")
    b.scatter([r.val_content_n for r in rows], [r.val_style_n for r in rows], c="tab:blue", label="trials")
    if order:
        b.scatter([order[0].val_content_n], [order[0].val_style_n], c="tab:red", marker="*", s=200, label="best")
    b.set_xlabel("content_n (content loss / style-copy's)")
    b.set_ylabel("style_n (style loss / identity's)")
    b.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    storage.write_bytes(sweep_dir / "sweep.png", png.getvalue())
    print(format_table(rows))
    return sweep_dir / "trials.parquet", sweep_dir / "sweep.png"


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top {args.top}: expected a positive number of trials")
    path = resolve(args.sweep, args.storage)
    if storage.is_remote(path):
        storage.check_access(str(path), what="sweep")
    best = print_best(path, metric=args.metric, mode=args.mode, top=args.top, as_json=args.json)
    if args.export:
        out = export(best, Path(args.export))
        if not args.json:
            print(f"exported to {out} (use: stylegen stylize --checkpoint {out} ...)")
    return 0

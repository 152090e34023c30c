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
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stylegen import storage
from stylegen.checkpoint import list_checkpoints, load_checkpoint_bytes, resolve_checkpoint_path
from stylegen.config import from_dict, to_toml
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


def _malformed(path: Path | str, what: str, detail: str) -> UserError:
    return UserError(f"{what} {str(path)!r} is malformed ({detail}; not what Tune/Train write); the sweep may still "
                     "be writing it: retry, or check the directory")


def _plain_name(name: object) -> bool:
    """A single path component (no '/', no '..'): names read from a sweep's files stay inside the sweep."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _num(v: object) -> float:
    """A reported metric as float; nan for anything that is not a number (a string, a list, null)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _step(v: object) -> int:
    f = _num(v)
    return int(f) if math.isfinite(f) else 0


def _dict(v: object) -> dict:
    return v if isinstance(v, dict) else {}


def _snapshot_checkpoints(run_dir: Path) -> list[tuple[Path, dict]]:
    """(checkpoint dir, metrics) of a Train V2 run dir, from Train's own snapshot."""
    snap = run_dir / SNAPSHOT
    if not snap.is_file():
        return []
    data = _read_json(snap, "checkpoint snapshot")
    results = data.get("checkpoint_results", []) if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise _malformed(snap, "checkpoint snapshot", "no list of checkpoint_results")
    out = []
    for item in results:
        name = item.get("checkpoint_dir_name") if isinstance(item, dict) else None
        metrics = item.get("metrics", {}) if isinstance(item, dict) else None
        if not _plain_name(name) or not isinstance(metrics, dict):
            raise _malformed(snap, "checkpoint snapshot", f"a checkpoint entry is {str(item)[:60]!r}")
        path = run_dir / name
        if (path / "checkpoint.pt").is_file():
            out.append((path, metrics))
    return out


def _better(a: float, b: float, mode: str) -> bool:
    if math.isnan(b):
        return not math.isnan(a)
    return (a < b) if mode == "min" else (a > b)


def _best_of(items: list[tuple[Path, dict]], metric: str, mode: str) -> tuple[Path | None, dict]:
    best: tuple[Path | None, dict] = (None, {})
    for path, m in items:
        v = _num(m.get(metric))
        if _better(v, _num(best[1].get(metric)), mode):
            best = (path, m)
    return best


def _read_results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if isinstance(row, dict):  # a report is a dict; anything else is not one
                rows.append(row)
    return rows


def load_sweep(path: Path, metric: str = "val_score", mode: str = "min") -> tuple[list[TrialRow], bool]:
    """All trials of a sweep dir and whether the sweep is still running."""
    root = glob.escape(str(path))  # a sweep dir named like 'sweep[1]' is a path, not a pattern
    states = sorted(glob.glob(os.path.join(root, "experiment_state-*.json")))
    if not states:
        raise UserError(f"{str(path)!r} holds no Tune sweep (no experiment_state-*.json) and no train run "
                        f"({SNAPSHOT}); pass a sweep directory written by `stylegen tune`")
    state = _read_json(Path(states[-1]), "sweep state")
    if not isinstance(state, dict) or not isinstance(state.get("trial_data", []), list):
        raise UserError(f"sweep state {states[-1]!r} is corrupt (not a Tune experiment state)")
    sweep_cfg = _read_json(path / "sweep_config.json", "sweep config") if (path / "sweep_config.json").is_file() else {}
    if not isinstance(sweep_cfg, dict):
        raise _malformed(path / "sweep_config.json", "sweep config", "not a JSON object")
    rows, running = [], False
    for item in state.get("trial_data", []):
        try:
            trial_json, runtime_json = item
            trial = json.loads(trial_json)
            runtime = json.loads(runtime_json)
            tid, status = str(trial["trial_id"]), str(trial.get("status", "?"))
            if not isinstance(runtime, dict) or not _plain_name(tid):
                raise ValueError(tid)
        except (TypeError, ValueError, KeyError, AttributeError):
            raise UserError(f"sweep state {states[-1]!r} is corrupt (a trial entry is not a Tune trial)") from None
        running |= status in ("RUNNING", "PENDING", "PAUSED")
        trial_dirs = sorted(glob.glob(os.path.join(root, f"*_{glob.escape(tid)}_*")))
        results = _read_results(Path(trial_dirs[0])) if trial_dirs else []
        last = results[-1] if results else _dict(runtime.get("last_result"))
        # older sweeps: base in the config
        base = _dict(sweep_cfg.get("base") or _dict(last.get("config")).get("base"))
        max_steps = _num(_dict(base.get("train")).get("steps"))
        ckpts = _snapshot_checkpoints(path / "trial_runs" / f"trial-{tid}")
        best_path, best_metrics = _best_of(ckpts, metric, mode)
        row = TrialRow(trial_id=tid, status=status, params=_dict(trial.get("evaluated_params")),
                       # a trial resumed after its run had finished reports nothing new: its Train
                       # checkpoints know the step it reached
                       steps=max([_step(last.get("step")), *(_step(m.get("step")) for _, m in ckpts)]),
                       val_score=_num(best_metrics.get(metric)),
                       last_val_score=_num(last.get(metric)),
                       val_content_n=_num(best_metrics.get("val_content_n")),
                       val_style_n=_num(best_metrics.get("val_style_n")),
                       checkpoint=str(best_path) if best_path else None)
        if status == "ERROR":
            err = Path(trial_dirs[0]) / "error.txt" if trial_dirs else None
            text = err.read_text(errors="replace").strip().splitlines() if err and err.is_file() else []
            reason = next((ln for ln in reversed(text) if ln.strip()), "unknown error")
            row.stop_reason = f"errored: {reason.strip()[:200]}"
        elif status in ("RUNNING", "PENDING", "PAUSED"):
            row.stop_reason = status.lower()
        elif not math.isnan(max_steps) and row.steps >= max_steps:
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
        if not isinstance(m, dict):
            raise _malformed(metrics_file, "run metrics", "not a JSON object")

        steps = list_checkpoints(path / "checkpoints")
        if steps:
            items = [(steps[-1], m)]
    best_path, m = _best_of(items, metric, mode)
    if best_path is None:
        raise UserError(f"train run {str(path)!r} has no checkpoint yet")
    return [TrialRow(trial_id=path.name, status="TERMINATED", steps=_step(m.get("step")),
                     val_score=_num(m.get(metric)), last_val_score=_num(m.get(metric)),
                     val_content_n=_num(m.get("val_content_n")),
                     val_style_n=_num(m.get("val_style_n")),
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

def score_cell(r: TrialRow) -> str:
    """The table's val_score: the best checkpointed one; a trial stopped before its first checkpoint shows
    its last reported score instead, marked, since it has nothing to export."""
    if not math.isnan(r.val_score):
        return f"{r.val_score:.4f}"
    return "-" if math.isnan(r.last_val_score) else f"({r.last_val_score:.4f}, no ckpt)"


def format_table(rows: list[TrialRow]) -> str:
    keys = sorted({k for r in rows for k in r.params})
    head = ["trial", *keys, "steps", "val_score", "content_n", "style_n", "stop_reason"]
    lines = [head]
    for r in rows:
        lines.append([r.trial_id, *(f"{r.params.get(k, float('nan')):.4g}" if isinstance(r.params.get(k), (int, float))
                                     else str(r.params.get(k, "")) for k in keys),
                      str(r.steps), score_cell(r), *("-" if math.isnan(x) else f"{x:.3f}" for x in (r.val_content_n, r.val_style_n)),
                      r.stop_reason])
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


def is_sweep(path: str | Path) -> bool:
    """A Tune sweep dir (it holds ``experiment_state-*.json``), local or on object storage."""
    if storage.is_remote(path):
        try:
            return bool(storage.list_files(str(path), "experiment_state-*.json"))
        except OSError:
            return False  # resolve_checkpoint_path names the problem
    p = Path(path)
    return p.is_dir() and any(p.glob("experiment_state-*.json"))


def resolve_model(path: str | Path) -> tuple[str, str]:
    """What a user's ``--checkpoint`` names, as (checkpoint file path/URL, trial id or ""): a checkpoint
    file, a dir holding one, a run dir (its newest: ``resolve_checkpoint_path``), or a Tune sweep dir
    (its best checkpoint by val_score, as ``stylegen best`` picks it); local or ``s3://``."""
    if not is_sweep(path):
        return resolve_checkpoint_path(path), ""
    order = ranked(read_location(path, "val_score", "min")[0], "min")
    if not order:
        raise UserError(f"sweep {str(path)!r} has no trial with a checkpointed val_score yet; "
                        "wait for a checkpoint or pass --checkpoint CKPT")
    log.info("sweep %s: best trial %s (val_score %.4f)", path, order[0].trial_id, order[0].val_score)
    return resolve_checkpoint_path(order[0].checkpoint), order[0].trial_id


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


EXPORT_FILES = ("best.json", "config.toml", "checkpoint.pt")  # in the order export writes them


def check_export_target(out: str) -> None:
    """Refuse, before any work, an --export that is a file, lies under one, or is a non-empty directory
    that is not an earlier export (export overwrites only its own three files)."""
    if storage.is_remote(out):
        return
    p = storage.local_path(out)
    blocker = next((a for a in [p, *p.parents] if a.exists() or a.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == p else f"is under a file ({str(blocker)!r})"
        raise UserError(f"--export {out!r} {where}; pass a new or empty directory (or an earlier export)")
    if blocker != p:
        return  # created by the export
    try:
        names = [n for n in os.listdir(p) if not n.startswith(".")]
    except OSError as e:
        raise UserError(f"--export {out!r} cannot be listed ({e.strerror or type(e).__name__}); "
                        "pass a writable directory") from None
    foreign = sorted(n for n in names if n not in EXPORT_FILES)
    if not foreign and "checkpoint.pt" in names and "best.json" not in names:
        foreign = ["checkpoint.pt (without best.json)"]  # export writes best.json first: not one of ours
    if foreign:
        raise UserError(f"--export {out!r} is not empty and not an earlier export (it holds {foreign[0]}); "
                        "pass a new or empty directory: nothing in it is overwritten")


def export(best: TrialRow, out: str | Path) -> str:
    """DIR/checkpoint.pt + DIR/config.toml (+ best.json); usable by stylize/eval as --checkpoint DIR.

    Each file is written atomically (a private temp file renamed into place, file and directory
    fsync'd: :func:`storage.write_bytes`); best.json first, so that a directory holding a
    checkpoint.pt without it was not written here (see :func:`check_export_target`)."""
    out = str(out)
    check_export_target(out)
    src = storage.join(best.checkpoint, "checkpoint.pt")
    try:
        data = storage.read_bytes(src)
    except OSError as e:
        raise UserError(f"best checkpoint {storage.explain(e, src)}") from None
    state = load_checkpoint_bytes(data, src)  # refuse to export something that would not load
    files = {"best.json": json.dumps(asdict(best), indent=2).encode(),
             "config.toml": to_toml(from_dict(state["config"])).encode(), "checkpoint.pt": data}
    for name, payload in files.items():
        try:
            storage.write_bytes(storage.join(out, name), payload)
        except OSError as e:
            if storage.is_remote(out) and e.errno is None:
                raise UserError(f"--export {storage.explain(e, out)}") from None
            what, fix = storage.describe_write_error(e)
            raise UserError(f"cannot write --export {out!r} ({what}); {fix} or pass another directory") from None
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
    if args.export:
        check_export_target(args.export)  # before reading the sweep, not after
    path = resolve(args.sweep, args.storage)
    if storage.is_remote(path):
        storage.check_access(str(path), what="sweep")
    best = print_best(path, metric=args.metric, mode=args.mode, top=args.top, as_json=args.json)
    if args.export:
        out = export(best, args.export)
        if not args.json:
            print(f"exported to {out} (use: stylegen stylize --checkpoint {out} ...)")
    return 0

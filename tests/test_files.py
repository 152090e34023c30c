"""Files stylegen writes (issue 19): modes follow the umask, renames are made durable (directory fsync).

Every output goes through ``storage.write_bytes`` (a private ``mkstemp`` temp file renamed into place);
mkstemp creates 0600, so without ``_honour_umask`` a team reading shared storage could not read
checkpoints, shards, manifests, images or exports. Each kind of output is produced here by the
code path that really writes it (a tiny local training run, a shard run, stylize, eval, best --export).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylegen.cli import main
from tiny import MODEL, cli_sets

TINY_SETS = [*MODEL, "data.batch_size=2", "train.threads=1", "train.val_pairs=2", "metrics.enabled=false", "train.steps=2"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _images(d: Path, n: int) -> Path:
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_every_kind_of_output_follows_the_umask(tmp_path, umask, capsys):
    want = 0o666 & ~umask  # 0644 under 022, 0640 under 027: what open() would give
    files: list[Path] = []
    # shards, manifest.parquet, skipped.parquet
    src = _images(tmp_path / "src", 4)
    (src / "notes.txt").write_text("skipped: not an image\n")
    assert main(["shard", str(src), "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress",
                 "--val-fraction", "0"]) == 0
    files += [*(tmp_path / "shards").glob("*.tar"), tmp_path / "shards" / "manifest.parquet",
              tmp_path / "shards" / "skipped.parquet"]
    # checkpoints, metrics.json and result grids of a local training run
    run = tmp_path / "run"
    sets = cli_sets(TINY_SETS)
    assert main(["train", "--local", "--out", str(run), *sets, "--no-progress"]) == 0
    files += [*run.glob("checkpoints/step_*/checkpoint.pt"), run / "metrics.json", *run.glob("samples/*.png")]
    # a stylized image and the stylize metrics textfile
    out_png, prom = tmp_path / "styl" / "o.png", tmp_path / "styl" / "stylize.prom"
    assert main(["stylize", "--checkpoint", str(run), "--content", str(src / "0.png"), "--style", str(src / "1.png"),
                 "--out", str(out_png), "--metrics-textfile", str(prom)]) == 0
    files += [out_png, prom]
    # eval --json
    ej = tmp_path / "eval" / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--pairs", "1", "--gatys-steps", "0", "--features", "random",
                 "--json", str(ej)]) == 0
    files.append(ej)
    # best --export of the run
    exp = tmp_path / "export"
    assert main(["best", str(run), "--export", str(exp)]) == 0
    files += [exp / "checkpoint.pt", exp / "config.toml", exp / "best.json"]
    capsys.readouterr()
    kinds = {"tar", "parquet", "pt", "json", "png", "prom", "toml"}
    assert {f.suffix.lstrip(".") for f in files} == kinds and all(f.is_file() for f in files)
    assert {str(f.relative_to(tmp_path)): oct(_mode(f)) for f in files} == {
        str(f.relative_to(tmp_path)): oct(want) for f in files}


def test_checkpoint_manifest_and_export_writes_fsync_their_directory(tmp_path, monkeypatch):
    """After the rename, the directory is fsync'd: without it a crash can lose the new name (the data
    was fsync'd, the entry pointing at it was not). Shards skip both syncs on purpose (rebuilt on resume)."""
    from stylegen.checkpoint import save_checkpoint
    from stylegen.data import shardio

    synced_dirs: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_dirs.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(tmp_path / "ck" / "step_00000001", {"step": 1})
    assert synced_dirs == [str(tmp_path / "ck" / "step_00000001")]
    shardio.write_manifest(tmp_path / "sh", [], {"complete": True})
    assert synced_dirs[-1] == str(tmp_path / "sh")
    n = len(synced_dirs)
    shardio.write_shard_file(tmp_path / "sh" / "train-000000.tar", b"\0" * 1024)
    assert len(synced_dirs) == n  # no fsync for shards
    from stylegen.best import TrialRow, export

    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"step": 1, "config": {}, "metrics": {}})
    n = len(synced_dirs)
    export(TrialRow(trial_id="t", status="TERMINATED", checkpoint=str(tmp_path / "run")), tmp_path / "exp")
    assert synced_dirs[n:] == [str(tmp_path / "exp")] * 3
    assert json.loads((tmp_path / "exp" / "best.json").read_text())["trial_id"] == "t"


def test_write_bytes_never_replaces_a_fifo_device_or_socket(tmp_path):
    """The atomic rename would put a regular file where a FIFO (or, as root, /dev/null) was: refused,
    EEXIST with the fix "pass another path", and no temp file left beside it."""
    import errno

    from stylegen import storage

    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as e:
        storage.write_bytes(fifo, b"PNG")
    assert e.value.errno == errno.EEXIST and storage.describe_write_error(e.value)[1] == "pass another path"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["out.png"]

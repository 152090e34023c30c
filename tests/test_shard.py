"""`stylegen shard`: every source kind, bad inputs, determinism, resume, verify, CLI errors."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stylegen.cli import main
from stylegen.data import shardio
from stylegen.data.shard import ShardParams, build_shards, verify

RAW = ShardParams(encoding="raw", shard_size=8, val_fraction=0.0)


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def all_samples(out: Path) -> dict[str, dict]:
    """key -> {'img': (64,64,3) array, 'json': dict, 'split': str} over every shard in the manifest."""
    rows, _ = shardio.read_manifest(out)
    res = {}
    for r in rows:
        for name, data in members(out / r["file"]).items():
            key, ext = name.split(".", 1)
            d = res.setdefault(key, {"split": r["split"]})
            if ext == "json":
                d["json"] = json.loads(data)
            elif ext == "rgb8":
                d["img"] = np.frombuffer(data, np.uint8).reshape(64, 64, 3)
            else:
                d["img"] = np.asarray(Image.open(io.BytesIO(data)))
    return res


def save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def gradient(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (base + np.stack([xx, yy, xx + yy], -1) * (seed % 5 + 1)) % 256
    return Image.fromarray(arr.astype(np.uint8))


def imagenet64_npz(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, n)
    data = hwc.transpose(0, 3, 1, 2).reshape(n, 12288)  # channel-planar, as ImageNet64
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=data, labels=labels)
    return hwc, labels


def test_npz_round_trip_exact_imagenet64_format(tmp_path):
    train_hwc, train_lab = imagenet64_npz(tmp_path / "src" / "train_data_batch_1.npz", 20, 0)
    val_hwc, val_lab = imagenet64_npz(tmp_path / "src" / "val_data.npz", 6, 1)
    s = build_shards([str(tmp_path / "src")], tmp_path / "out", RAW, workers=1, progress=False)
    assert s.samples == {"train": 20, "val": 6} and s.shards == {"train": 3, "val": 1}
    got = all_samples(tmp_path / "out")
    assert len(got) == 26
    for d in got.values():
        src, row = d["json"]["source"].split("#")
        hwc, lab = (train_hwc, train_lab) if "train_data" in src else (val_hwc, val_lab)
        assert d["split"] == ("train" if "train_data" in src else "val")
        np.testing.assert_array_equal(d["img"], hwc[int(row)])
        assert d["json"]["label"] == lab[int(row)]
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert set(rows[0]) == {"file", "split", "samples", "bytes", "sha256", "encoding"}
    assert all(r["encoding"] == "raw" and r["file"] in ("train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                        "val-000000.tar") for r in rows)


def test_kaggle_layout_and_windows_path_via_cli(tmp_path, capsys):
    data = tmp_path / "Data"
    for i in range(7):
        save(data / "train_64x64" / "train_64x64" / f"{i:05d}.png", gradient(64, 64, i))
    for i in range(3):
        save(data / "valid_64x64" / "valid_64x64" / f"{i:05d}.png", gradient(64, 64, 100 + i))
    assert main(["shard", str(data), "--out", str(tmp_path / "o"), "--workers", "1", "--val-fraction", "0"]) == 0
    line = capsys.readouterr().out
    assert "sharded 10 samples" in line and "train 7" in line and "val 3" in line
    # the original project's Windows-style path is accepted
    win = str(data) + "\\train_64x64\\train_64x64"
    assert main(["shard", win, "--out", str(tmp_path / "w"), "--workers", "2", "--val-fraction", "0"]) == 0
    got = all_samples(tmp_path / "w")
    assert len(got) == 7 and all(d["json"]["source"].startswith("train_64x64/") for d in got.values())
    originals = {np.asarray(gradient(64, 64, i)).tobytes() for i in range(7)}
    assert {np.ascontiguousarray(d["img"]).tobytes() for d in got.values()} == originals  # 64x64 png is lossless


def test_odd_modes_resized_and_converted(tmp_path):
    src = tmp_path / "src"
    save(src / "gray.png", Image.new("L", (100, 80), 77))
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([10, 20, 30] * 256)
    save(src / "palette.png", pal)
    rgba = Image.new("RGBA", (70, 70), (255, 0, 0, 0))  # fully transparent -> white
    save(src / "rgba.png", rgba)
    save(src / "cmyk.jpg", Image.new("CMYK", (64, 64), (0, 0, 0, 0)), quality=95)
    save(src / "deep.png", Image.fromarray(np.full((64, 64), 65535, np.uint16)))
    save(src / "la.png", Image.new("LA", (64, 64), (0, 255)))
    save(src / "small.bmp", gradient(40, 50, 3))  # between half and full size: upscaled
    s = build_shards([str(src)], tmp_path / "o", RAW, workers=1, progress=False)
    assert s.samples["train"] == 7 and not s.skipped
    by = {Path(d["json"]["source"]).name: d["img"] for d in all_samples(tmp_path / "o").values()}
    assert all(a.shape == (64, 64, 3) for a in by.values())
    assert (by["gray.png"] == 77).all()
    assert (by["palette.png"] == [10, 20, 30]).all()
    assert (by["rgba.png"] == 255).all()
    assert (by["cmyk.jpg"] > 240).all()
    assert (by["deep.png"] == 255).all()
    assert (by["la.png"] == 0).all()


def make_bad_inputs(src: Path) -> dict[str, str]:
    """file name -> expected reason prefix."""
    save(src / "good.png", gradient(64, 64, 0))
    good = (src / "good.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "text.jpg").write_text("this is not a jpeg")
    (src / "empty.png").write_bytes(b"")
    save(src / "tiny.png", gradient(20, 20, 1))
    (src / "notes.txt").write_text("hello")
    np.savez(src / "wrongkeys.npz", images=np.zeros((2, 12288), np.uint8))
    np.savez(src / "wrongshape.npz", data=np.zeros((2, 1000), np.uint8), labels=np.ones(2))
    np.savez(src / "badlabels.npz", data=np.zeros((2, 12288), np.uint8), labels=np.ones(5))
    (src / "notzip.npz").write_bytes(b"garbage")
    os.symlink(src / "does-not-exist.png", src / "dangling.png")
    save(src / "bomb.png", Image.new("L", (400, 400), 0))
    return {"truncated.png": "corrupt or truncated image", "text.jpg": "not an image", "empty.png": "empty file",
            "tiny.png": "too small", "notes.txt": "not an image", "wrongkeys.npz": "npz without key 'data'",
            "wrongshape.npz": "npz 'data' has shape", "badlabels.npz": "npz 'labels' has shape",
            "notzip.npz": "not an npz file", "dangling.png": "unreadable", "bomb.png": "decompression bomb"}


def test_each_bad_input_skipped_with_reason(tmp_path):
    expected = make_bad_inputs(tmp_path / "src")
    p = ShardParams(encoding="png", shard_size=4, val_fraction=0.0, max_pixels=100_000)
    s = build_shards([str(tmp_path / "src")], tmp_path / "o", p, workers=1, progress=False)
    assert s.samples == {"train": 1}  # the good image survives
    reasons = {Path(r["path"]).name: r["reason"] for r in pq.read_table(tmp_path / "o" / "skipped.parquet").to_pylist()}
    assert set(reasons) == set(expected)
    for name, prefix in expected.items():
        assert reasons[name].startswith(prefix), (name, reasons[name])
    assert "skipped 11 inputs" in s.line()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["shard", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and err.startswith("stylegen shard: error:")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_text("x")
    (tmp_path / "bad" / "b.png").write_bytes(b"")
    assert main(["shard", str(tmp_path / "bad"), "--out", str(tmp_path / "o"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no usable images" in err and "skipped.parquet" in err
    save(tmp_path / "ok" / "a.png", gradient(64, 64, 0))
    (tmp_path / "file").write_text("x")
    assert main(["shard", str(tmp_path / "ok"), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write to output" in err
    assert main(["shard", str(tmp_path / "ok")]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for i in range(12):
        save(tmp_path / "src" / f"{i}.jpg", gradient(120, 90, i), quality=90)
    p = ShardParams(encoding="png", shard_size=10, crops=3, val_fraction=0.2, seed=5)
    build_shards([str(tmp_path / "src")], tmp_path / "a", p, workers=2, progress=False)
    build_shards([str(tmp_path / "src")], tmp_path / "b", p, workers=1, progress=False)
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    build_shards([str(tmp_path / "src")], tmp_path / "c", ShardParams(**{**p.__dict__, "seed": 6}), workers=1,
                 progress=False)
    a = {f.name: f.read_bytes() for f in (tmp_path / "a").glob("*.tar")}
    c = {f.name: f.read_bytes() for f in (tmp_path / "c").glob("*.tar")}
    assert a != c


def test_resume_keeps_good_shards_and_rebuilds_the_rest(tmp_path):
    for i in range(40):
        save(tmp_path / "src" / f"{i:03d}.png", gradient(64, 64, i))
    p = ShardParams(encoding="png", shard_size=5, val_fraction=0.0)
    ref = build_shards([str(tmp_path / "src")], tmp_path / "ref", p, workers=1, progress=False)
    out = tmp_path / "out"
    build_shards([str(tmp_path / "src")], out, p, workers=1, progress=False)
    # simulate a run killed mid-way: manifest lists only some shards, one listed shard lost, one corrupted,
    # a temp file of an interrupted write left behind
    rows, meta = shardio.read_manifest(out)
    meta["complete"] = False
    shardio.write_manifest(out, rows[:5], meta)
    (out / "train-000001.tar").unlink()
    data = bytearray((out / "train-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "train-000002.tar").write_bytes(bytes(data))
    (out / ".train-000006.tar.abc.tmp").write_bytes(b"partial")
    s = build_shards([str(tmp_path / "src")], out, p, workers=1, progress=False)
    assert s.kept == 3 and s.samples == ref.samples == {"train": 40}
    for f in (tmp_path / "ref").glob("*.tar"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert sorted(x.name for x in out.iterdir()) == sorted(x.name for x in (tmp_path / "ref").iterdir())
    assert len({k for k in all_samples(out)}) == 40  # no duplicates, none missing
    assert verify(out)[2] == []


@pytest.mark.slow  # trains or kills real subprocesses: not in make test-fast
def test_resume_after_real_kill(tmp_path):
    for i in range(300):
        save(tmp_path / "src" / f"{i:03d}.png", gradient(96, 96, i))
    cmd = [sys.executable, "-m", "stylegen.cli", "shard", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
           "--shard-size", "4", "--workers", "1", "--no-progress", "--val-fraction", "0", "--crops-per-image", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (tmp_path / "o" / "manifest.parquet").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill: make it longer"
    partial = len(shardio.read_manifest(tmp_path / "o")[0])
    assert 0 < partial < 600
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"kept {partial} existing shards" in done.stdout
    assert len(all_samples(tmp_path / "o")) == 2400
    assert verify(tmp_path / "o")[2] == []


def test_verify_catches_one_flipped_byte(tmp_path, capsys):
    imagenet64_npz(tmp_path / "train_data_batch_1.npz", 10, 0)
    assert main(["shard", str(tmp_path / "train_data_batch_1.npz"), "--out", str(tmp_path / "o"),
                 "--encoding", "raw", "--shard-size", "5", "--val-fraction", "0", "--workers", "1"]) == 0
    assert main(["shard", "verify", str(tmp_path / "o")]) == 0
    assert "verified 2 shards, 10 samples" in capsys.readouterr().out
    f = tmp_path / "o" / "train-000001.tar"
    data = bytearray(f.read_bytes())
    data[3000] ^= 0x01  # inside a raw payload: only the checksum can see it
    f.write_bytes(bytes(data))
    assert main(["shard", "verify", str(tmp_path / "o")]) == 2
    cap = capsys.readouterr()
    assert "train-000001.tar: sha256" in cap.out and "1 of 2 shards" in cap.err


@pytest.mark.parametrize("crops", [1, 4])
def test_random_crops_of_large_image(tmp_path, crops):
    save(tmp_path / "big.jpg", gradient(300, 200, 7), quality=90)
    s = build_shards([str(tmp_path / "big.jpg")], tmp_path / "o", ShardParams(encoding="raw", crops=crops,
                                                                              val_fraction=0.0), workers=1,
                     progress=False)
    got = all_samples(tmp_path / "o")
    assert s.samples["train"] == crops == len(got)
    assert len({d["img"].tobytes() for d in got.values()}) == crops  # distinct crops


# ----------------------------------------------------------------------------- issue 19: files, bad inputs

def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_foreign_out_dir_is_refused_and_nothing_in_it_touched(tmp_path, capsys):
    save(tmp_path / "src" / "a.png", gradient(64, 64, 0))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"someone else's shard")  # named like ours, no manifest
    (foreign / "notes.txt").write_text("keep me\n")
    before = _tree(foreign)
    assert main(["shard", str(tmp_path / "src"), "--out", str(foreign), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stylegen shard: error: --out") and "no manifest.parquet" in err[0]
    assert _tree(foreign) == before
    # hidden files (.DS_Store, a probe) do not make a directory foreign
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"x")
    assert main(["shard", str(tmp_path / "src"), "--out", str(tmp_path / "hidden"), "--workers", "1",
                 "--no-progress"]) == 0


def test_rerun_with_other_inputs_deletes_only_shards_its_manifest_named(tmp_path):
    for i in range(12):
        save(tmp_path / "src" / f"{i:02d}.png", gradient(64, 64, i))
    out = tmp_path / "o"
    p = ShardParams(encoding="raw", shard_size=4, val_fraction=0.0)
    build_shards([str(tmp_path / "src")], out, p, workers=1, progress=False)
    assert sorted(f.name for f in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    (out / "train-000007.tar").write_bytes(b"not ours: never listed in a manifest")
    (out / "README").write_text("not ours either\n")
    for i in range(4, 12):  # other inputs: 4 images -> 1 shard; shards 1 and 2 of the first run are stale
        (tmp_path / "src" / f"{i:02d}.png").unlink()
    build_shards([str(tmp_path / "src")], out, p, workers=1, progress=False)
    assert sorted(f.name for f in out.glob("*.tar")) == ["train-000000.tar", "train-000007.tar"]
    assert (out / "README").read_text() == "not ours either\n"


@pytest.mark.timeout(60)  # a FIFO that is read blocks forever
def test_fifo_and_device_inputs_are_skipped_and_reported(tmp_path, capsys):
    save(tmp_path / "src" / "a.png", gradient(64, 64, 0))
    os.mkfifo(tmp_path / "src" / "pipe.png")
    os.mkfifo(tmp_path / "lone.png")
    out = tmp_path / "o"
    # (a device: /dev/null, not /dev/zero, whose read would eat memory on a regression)
    argv = ["shard", str(tmp_path / "src"), str(tmp_path / "lone.png"), "/dev/null", "--out", str(out),
            "--workers", "1", "--no-progress", "--val-fraction", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "sharded 1 samples" in capsys.readouterr().out
    reasons = {r["path"]: r["reason"] for r in pq.read_table(out / "skipped.parquet").to_pylist()}
    assert reasons[str(tmp_path / "src" / "pipe.png")].startswith("not a regular file (a FIFO)")
    assert reasons[str(tmp_path / "lone.png")].startswith("not a regular file (a FIFO)")
    assert reasons["/dev/null"].startswith("not a regular file (a character device)")


def test_corrupt_npz_body_and_non_integer_labels_are_skipped_with_reasons(tmp_path):
    src = tmp_path / "src"
    good_hwc, _ = imagenet64_npz(src / "good.npz", 3, 0)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 12288), dtype=np.uint8)
    np.savez(src / "floatlabels.npz", data=data, labels=np.array([1.5, 2.0, 3.7, 4.0]))
    np.savez(src / "strlabels.npz", data=data, labels=np.array(["cat", "dog", "cow", "pig"]))
    np.savez_compressed(src / "crc.npz", data=data, labels=np.arange(4))
    raw = bytearray((src / "crc.npz").read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside data.npy's body: its header (read at discovery) stays fine
    (src / "crc.npz").write_bytes(bytes(raw))
    from stylegen.data.sources import inspect_npz

    assert inspect_npz(src / "crc.npz", "crc.npz").rows == 4  # the header check alone cannot see it
    out = tmp_path / "o"
    s = build_shards([str(src)], out, RAW, workers=1, progress=False)
    assert s.samples == {"train": 3}
    got = sorted(v["img"].tobytes() for v in all_samples(out).values())
    assert got == sorted(im.tobytes() for im in good_hwc)  # only the good npz's rows, nothing truncated
    reasons = {Path(r["path"]).name: r["reason"] for r in pq.read_table(out / "skipped.parquet").to_pylist()}
    assert reasons["floatlabels.npz"].startswith("npz 'labels' has dtype float64, expected integer")
    assert reasons["strlabels.npz"].startswith("npz 'labels' has dtype <U3, expected integer")
    assert reasons["crc.npz"].startswith("corrupt npz data (")
    assert verify(out)[2] == []


def _file_size_limit(limit: int):
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored), as a full disk fails with ENOSPC."""
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow  # trains or kills real subprocesses: not in make test-fast
@pytest.mark.parametrize("workers", ["1", "2"])
def test_file_size_limit_during_shard_is_one_line_and_leaves_no_partial_file(tmp_path, workers):
    for i in range(24):
        save(tmp_path / "src" / f"{i:02d}.png", gradient(64, 64, i))
    out = tmp_path / "o"
    # raw shards of 8 samples are ~100 KB: every shard write fails at the 64 KB limit (the manifest would fit)
    cmd = [sys.executable, "-m", "stylegen.cli", "shard", str(tmp_path / "src"), "--out", str(out), "--encoding", "raw",
           "--shard-size", "8", "--val-fraction", "0", "--workers", workers, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_file_size_limit(64_000))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr[-2000:]
    assert errors[0].startswith("stylegen shard: error: cannot write to output directory")
    assert "EFBIG" in errors[0] and "ulimit -f" in errors[0] and "rerun" in errors[0]
    assert not list(out.glob("*.tar")) and not list(out.glob(".*"))  # no shard, no temp file
    rows, meta = shardio.read_manifest(out)  # the manifest says what finished (nothing) and that it is incomplete
    assert rows == [] and meta["complete"] is False
    # with the limit lifted, the same command finishes
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert verify(out)[2] == [] and len(all_samples(out)) == 24

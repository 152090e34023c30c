"""The bad-input corpus (issue 8, item 3): one table of bad inputs run through the real CLI entry.

Every row asserts: exit code 2, exactly one ``stylegen CMD: error: ...`` line on stderr naming
the problem (a distinctive substring), nothing on stdout, and no output left behind: every
file under the case's working dir and the shared inputs dir is byte-identical afterwards
(no new, changed or ``*.tmp`` files; empty directories are not outputs). Rows run in-process
(``stylegen.cli.main``) except the few marked ``proc``, which go through ``python -m stylegen.cli``.

Argparse-level rows (``usage=True``: a flag whose *type* is wrong) are one line as well and
point at ``--help``.

Decisions documented here (not bad inputs):
- an animated GIF is accepted by ``stylize`` and ``shard``: the first frame is used
  (``test_animated_gif_uses_first_frame``);
- ``shard`` with only unusable inputs writes ``skipped.parquet`` (and an empty manifest) on
  purpose: the error line points at it. No shard tar is written.

Not here: a *wrong token against a real Ray cluster* and a token-auth submit (tests/test_submit.py,
marked ``ray``); here a loopback HTTP server answers 401/403 like Ray's job API does.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylegen.checkpoint import save_checkpoint
from stylegen.cli import main
from stylegen.config import Config, ModelConfig, to_dict
from stylegen.models.generator import Generator
from tiny import MODEL, cli_sets

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
TINY = [*cli_sets(MODEL), "--set", "metrics.enabled=false", "--set", "train.steps=2", "--set", "data.batch_size=2", "--no-progress"]
MARKER = "PAYLOAD_RAN"  # the pickle payload would `touch` this file in the inputs dir


# ----------------------------------------------------------------------------- inputs (built once)

def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _bomb_png(side: int) -> bytes:
    """A ~70-byte PNG whose header claims side x side RGB pixels."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


class _Payload:
    """Unpickling this would run ``os.system('touch MARKER')``."""

    def __init__(self, marker: Path) -> None:
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _fake_sweep(root: Path, *, snapshot: object = None, sweep_config: object = None, results: str | None = None,
                runtime: str = '{"last_result": {}}', checkpoint: bool = False) -> Path:
    """A one-trial sweep dir as Tune + Train V2 write it, with any of its files replaced by what is given
    (an object is written as JSON, a str as is)."""
    tid = "t_00000"
    root.mkdir(parents=True)
    trial = json.dumps({"trial_id": tid, "status": "TERMINATED", "evaluated_params": {"loss.style": 1.0}})
    (root / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [[trial, runtime]]}))
    tdir = root / f"run_trial_{tid}_0_loss_style=1.0"
    tdir.mkdir()
    (tdir / "result.json").write_text(results if results is not None else '{"step": 1, "val_score": 1.0}\n')
    if sweep_config is not None:
        (root / "sweep_config.json").write_text(sweep_config if isinstance(sweep_config, str) else json.dumps(sweep_config))
    run = root / "trial_runs" / f"trial-{tid}"
    run.mkdir(parents=True)
    if checkpoint:
        _tiny_checkpoint(run / "step_00000001" / "checkpoint.pt")
    else:
        (run / "step_00000001").mkdir()
        (run / "step_00000001" / "checkpoint.pt").write_bytes(b"x")  # `best` checks its presence only
    if snapshot is None:
        snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "step_00000001",
                                            "metrics": {"step": 1, "val_score": 1.0}}]}
    (run / "checkpoint_manager_snapshot.json").write_text(snapshot if isinstance(snapshot, str) else json.dumps(snapshot))
    return root


def _tiny_checkpoint(path: Path, config_channels: int = 8, weight_channels: int = 8) -> Path:
    cfg = Config()
    cfg.model = ModelConfig(channels=config_channels, res_blocks=1)
    weights = Generator(ModelConfig(channels=weight_channels, res_blocks=1)).state_dict()
    return save_checkpoint(path, {"step": 1, "config": to_dict(cfg), "generator": weights, "discriminator": None,
                                  "opt_g": {}, "opt_d": None, "metrics": {}})


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "content.png")
    Image.fromarray(img[::-1]).save(d / "style.png")
    Image.fromarray(img[:1, :1]).save(d / "one.png")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("this is a text file, not a PNG\n")
    (d / "trunc.png").write_bytes((d / "content.png").read_bytes()[:300])
    (d / "bomb.png").write_bytes(_bomb_png(30_000))
    (d / "a_file").write_text("a regular file where a directory is expected\n")
    (d / "emptydir").mkdir()
    np.savez(d / "dtype.npz", data=np.zeros((4, 12288), np.float32), labels=np.ones(4, np.int64))
    np.savez(d / "keys.npz", images=np.zeros((4, 12288), np.uint8))
    np.savez(d / "shape.npz", data=np.zeros((4, 100), np.uint8), labels=np.ones(4, np.int64))
    (d / "zip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(d / "floatlabels.npz", data=np.zeros((4, 12288), np.uint8), labels=np.array([1.5, 2.0, 3.7, 4.0]))
    np.savez_compressed(d / "crc.npz", data=rng.integers(0, 256, (4, 12288), dtype=np.uint8), labels=np.arange(4))
    raw = bytearray((d / "crc.npz").read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside data.npy's body: the headers stay fine
    (d / "crc.npz").write_bytes(bytes(raw))
    os.mkfifo(d / "fifo.png")
    (d / "sweep_[o]k").mkdir()  # empty; as a glob pattern it would match sweep_ok
    (d / "foreign").mkdir()
    (d / "foreign" / "notes.txt").write_text("somebody else's directory\n")
    _fake_sweep(d / "sweep_ok", checkpoint=True)
    _fake_sweep(d / "sweep_cfg_list", sweep_config="[]")
    _fake_sweep(d / "sweep_snap_list", snapshot=[])
    _fake_sweep(d / "sweep_snap_noname", snapshot={"checkpoint_results": [{"metrics": {"val_score": 1.0}}]})
    _fake_sweep(d / "sweep_snap_escape", snapshot={"checkpoint_results": [
        {"checkpoint_dir_name": "../../sweep_ok/trial_runs/trial-t_00000/step_00000001", "metrics": {"val_score": 0.1}}]})
    _fake_sweep(d / "sweep_snap_torn", snapshot='{"checkpoint_results": [{"checkpoint_dir_name": "step_0')
    _fake_sweep(d / "sweep_metric_text", snapshot={"checkpoint_results": [
        {"checkpoint_dir_name": "step_00000001", "metrics": {"step": "one", "val_score": "low"}}]})
    _fake_sweep(d / "sweep_result_list", results="[1, 2]\n", snapshot={"checkpoint_results": []})
    _fake_sweep(d / "sweep_runtime_list", runtime="[1]", results="", snapshot={"checkpoint_results": []})
    _tiny_checkpoint(d / "ckpt" / "checkpoint.pt")
    _tiny_checkpoint(d / "misfit.pt", config_channels=16, weight_channels=8)
    torch.save(Generator(ModelConfig(channels=8, res_blocks=1)).state_dict(), d / "bare.pt")
    (d / "random.pt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "text.pt").write_text("step = 1\nweights = lots\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "payload").mkdir()
    torch.save({"format": "stylegen-checkpoint-v1", "generator": _Payload(d / MARKER)},
               d / "payload" / "checkpoint.pt")
    (d / "nockpt").mkdir()
    other = d / "other_run" / "checkpoints" / "step_00000001"
    _tiny_checkpoint(other / "checkpoint.pt", config_channels=16, weight_channels=16)
    cfgs = {
        "wrongtype.toml": '[data]\nbatch_size = "big"\n',
        "unknownkey.toml": "[model]\nchanels = 8\n",
        "unknownsection.toml": "[modle]\nchannels = 8\n",
        "notatable.toml": "data = 3\n",
        "negative.toml": "[data]\nbatch_size = -4\n",
        "huge.toml": "[train]\nsteps = 99999999999999999999999\n",
        "hugeint.toml": "[train]\ncheckpoint_every = 99999999999999999999\n",
        "hugeseed.toml": "[tune]\nseed = 4294967296\n",
        "slashname.toml": '[ray]\nname = "a/b"\n',
        "invalid.toml": "[data\nbatch_size = 4\n",
        "tiny.toml": f'[train]\nsteps = 2\n[ray]\nname = "tiny"\nstorage = "{d / "ray"}"\n',
    }
    for name, text in cfgs.items():
        (d / name).write_text(text)
    (d / "binary.toml").write_bytes(b"\xff\xfe\x00\x01 not utf-8")
    (d / "token").write_text("")
    return d


class _FakeJobServer(http.server.BaseHTTPRequestHandler):
    """Answers like Ray's job API with token auth: 401 without a token, 403 with a wrong one."""

    def do_GET(self):  # noqa: N802
        self.send_response(403 if self.headers.get("Authorization") else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server() -> str:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJobServer)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    argv: Callable[[Path, Path, str], list[str]]  # (inputs dir, work dir, fake server url) -> argv
    needle: str  # must appear in the error line
    env: dict[str, str] = field(default_factory=dict)  # {"HOME": "<work>"} -> the work dir
    usage: bool = False  # argparse error: usage block before the error line
    allow_new: tuple[str, ...] = ()  # files a failed run may write on purpose (relative to the work dir)
    proc: bool = False  # through `python -m stylegen.cli`


def _stylize(ckpt: str | None = None, content: str = "content.png", style: str = "style.png", out: str | None = None,
             extra: tuple[str, ...] = ()):
    def argv(i: Path, w: Path, u: str) -> list[str]:
        a = ["stylize", "--checkpoint", str(i / (ckpt or "ckpt")), "--content", str(i / content),
             "--style", str(i / style), "--out", out.format(i=i, w=w) if out else str(w / "out" / "o.png")]
        return a + [x.replace("<inputs>", str(i)) for x in extra]
    return argv


def _shard(src: str, *extra: str, out: str = "{w}/out"):
    return lambda i, w, u: ["shard", str(i / src), "--out", out.format(i=i, w=w), "--workers", "1", *extra]


def _eval(*extra: str, ckpt: str = "ckpt"):
    return lambda i, w, u: ["eval", "--checkpoint", str(i / ckpt), "--pairs", "2", "--gatys-steps", "0",
                            "--features", "random", "--json", str(w / "out" / "eval.json"), *extra]


def _config(*a: str):
    return lambda i, w, u: ["config", "show", *[x.format(i=i, w=w) for x in a]]


def _show(*a: str):
    """``config show`` with arguments taken as they are (TOML inline tables hold braces)."""
    return lambda i, w, u: ["config", "show", *a]


def _submit(*a: str, address: str = "http://127.0.0.1:1"):
    return lambda i, w, u: ["submit", "train", "--address", address.format(u=u), "--timeout", "5",
                            *[x.format(i=i, w=w) for x in a]]


def _tsdb_file(d: Path) -> str:
    """A Prometheus data dir whose tsdb is a regular file (Prometheus could not open its storage)."""
    d.mkdir(parents=True)
    (d / "tsdb").write_text("not a directory\n")
    return str(d)


def _copy(src: Path, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


NO_TOKEN = {"HOME": "<work>"}
CASES: dict[str, Case] = {
    # --- configs: wrong types, unknown keys/sections, negative and huge values, broken files
    "config: wrong type in file": Case(_config("--config", "{i}/wrongtype.toml"), "data.batch_size: expected int"),
    "config: wrong type via --set (train)": Case(
        lambda i, w, u: ["train", "--local", "--out", str(w / "out"), *TINY, "--set", "train.steps=true"],
        "train.steps: expected int"),
    "config: unknown key": Case(_config("--config", "{i}/unknownkey.toml"), "unknown config key 'model.chanels'"),
    "config: unknown section": Case(_config("--config", "{i}/unknownsection.toml"), "unknown config section [modle]"),
    "config: section not a table": Case(_config("--config", "{i}/notatable.toml"), "[data] must be a table"),
    "config: negative size (train)": Case(
        lambda i, w, u: ["train", "--local", "--out", str(w / "out"), *TINY, "--set", "data.image_size=-64"],
        "data.image_size: -64 is out of range"),
    "config: negative batch (tune)": Case(lambda i, w, u: ["tune", "--config", str(i / "negative.toml")],
                                          "data.batch_size: -4 is out of range"),
    "config: huge integer": Case(_config("--config", "{i}/huge.toml"), "train.steps: 99999999999999999999999 is out"),
    "config: huge float": Case(_config("--set", "train.steps=1e400"), "train.steps: expected int, got inf"),
    "config: NaN": Case(_config("--set", "optim.lr=nan"), "optim.lr: nan is not a finite number"),
    "config: value not a choice": Case(_config("--set", "model.fusion=sum"), "'sum' is not one of"),
    "config: port out of range": Case(_config("--set", "metrics.port=70000"), "metrics.port: 70000 is out of range"),
    "config: --set without =": Case(_config("--set", "train.steps"), "expected section.key=value"),
    "config: bad search space (tune)": Case(
        lambda i, w, u: ["tune", "--set", 'tune.space={ "loss.style" = { loguniform = [0, 1] } }'],
        "loguniform needs low > 0"),
    "config: invalid TOML (process)": Case(
        lambda i, w, u: ["train", "--local", "--config", str(i / "invalid.toml"), "--out", str(w / "out")],
        "is not valid TOML", proc=True),
    "config: not UTF-8": Case(_config("--config", "{i}/binary.toml"), "is not valid TOML"),
    "config: missing file": Case(_config("--config", "{i}/nope.toml"), "nope.toml' not found"),
    "config: a directory as file": Case(_config("--config", "{i}/emptydir"), "is a directory; pass a TOML file"),
    # --- configs: numbers too large for their type, seeds numpy/torch refuse, names that escape the storage
    "config: int too large for int64 in a file": Case(_config("--config", "{i}/hugeint.toml"),
                                                       "train.checkpoint_every: 99999999999999999999 is out of range"),
    "config: int too large for int64 via --set": Case(
        _config("--set", "optim.warmup_steps=1e19"),
        "optim.warmup_steps: 10000000000000000000 is out of range; expected <= 9223372036854775807"),
    "config: seed >= 2**32 in a file (tune)": Case(lambda i, w, u: ["tune", "--config", str(i / "hugeseed.toml")],
                                                   "tune.seed: 4294967296 is out of range; expected <= 4294967295"),
    "config: seed >= 2**64 via --set (train)": Case(
        lambda i, w, u: ["train", "--local", "--out", str(w / "out"), *TINY, "--set", "train.seed=18446744073709551616"],
        "train.seed: 18446744073709551616 is out of range"),
    "config: negative seed": Case(_config("--set", "data.seed=-1"), "data.seed: -1 is out of range"),
    "config: loguniform on an int key": Case(
        _show("--set", 'tune.space={ "train.steps" = { loguniform = [10, 100] } }'),
        "tune.space.train.steps: loguniform samples floats but train.steps is int"),
    "config: uniform on an int key (tune)": Case(
        lambda i, w, u: ["tune", "--set", 'tune.space={ "model.res_blocks" = { uniform = [1, 3] } }'],
        "uniform samples floats but model.res_blocks is int"),
    "config: randint on a string key": Case(
        _show("--set", 'tune.space={ "model.fusion" = { randint = [0, 2] } }'), "randint samples integers"),
    "config: randint of non-integers": Case(
        _show("--set", 'tune.space={ "train.steps" = { randint = [1.5, 10] } }'), "randint needs integer"),
    "config: choice of strings for a float key": Case(
        _show("--set", 'tune.space={ "loss.style" = { choice = ["low", "high"] } }'),
        "loss.style: expected float, got 'low'"),
    "config: ray.name with '/' in a file": Case(_config("--config", "{i}/slashname.toml"), "ray.name: 'a/b': use 1-64"),
    "train: --name '..'": Case(lambda i, w, u: ["train", "--name", "..", *TINY], "ray.name: '..': use 1-64"),
    "train: --name with '/' (local)": Case(
        lambda i, w, u: ["train", "--local", "--out", str(w / "out"), "--name", "../../escape", *TINY],
        "ray.name: '../../escape'"),
    "tune: --name escaping the storage": Case(lambda i, w, u: ["tune", "--name", "x/../../y"],
                                              "sweep name (--name) 'x/../../y': use 1-64"),
    "tune: default sweep name from a bad ray.name": Case(lambda i, w, u: ["tune", "--set", 'ray.name=".hidden"'],
                                                         "ray.name: '.hidden'"),
    "submit: --name '..'": Case(_submit("--config", "{i}/tiny.toml", "--name", ".."), "'..': use 1-64",
                                env={"RAY_AUTH_TOKEN": "a" * 64}),
    # --- missing / odd paths
    "shard: missing source dir": Case(_shard("no_such_dir"), "does not exist"),
    "shard: empty source dir": Case(_shard("emptydir"), "no files found",
                                    allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: --out under a regular file": Case(_shard("content.png", out="{i}/a_file/out"),
                                              "cannot write to output directory"),
    "shard: --out in /proc": Case(_shard("content.png", out="/proc/stylegen-no-such-dir"),
                                  "cannot write to output directory"),
    "shard: --size huge": Case(_shard("content.png", "--size", "100000"), "--size 100000 is out of range"),
    "shard: --shard-size 0": Case(_shard("content.png", "--shard-size", "0"), "--shard-size 0 is out of range"),
    "shard verify: not a shard dir": Case(lambda i, w, u: ["shard", "verify", str(i / "emptydir")],
                                          "has no manifest.parquet"),
    "stylize: missing content": Case(_stylize(content="nope.png"), "not found"),
    "stylize: content is a directory": Case(_stylize(content="emptydir"), "is not a file"),
    "stylize: --out under a regular file": Case(_stylize(out="{i}/a_file/o.png"), "is a file"),
    "stylize: --out in /proc": Case(_stylize(out="/proc/stylegen-no-such-dir/o.png"),
                                    "cannot create output directory"),
    "eval: --json under a regular file": Case(lambda i, w, u: [*_eval()(i, w, u)[:-1], str(i / "a_file" / "e.json")],
                                              "is under a file"),
    "eval: --json is a directory": Case(lambda i, w, u: [*_eval()(i, w, u)[:-1], str(i / "emptydir")],
                                        "is a directory"),
    "eval: missing shards": Case(_eval("--content-shards", "/no/such/shards"), "does not exist"),
    "eval: missing VGG weights": Case(lambda i, w, u: [*_eval()(i, w, u), "--features", str(i / "nope.pt")],
                                      "features.weights: file"),
    "best: missing dir": Case(lambda i, w, u: ["best", str(w / "no_sweep")], "not found"),
    "best: empty dir": Case(lambda i, w, u: ["best", str(i / "emptydir")], "holds no Tune sweep"),
    "best: a file": Case(lambda i, w, u: ["best", str(i / "content.png")], "is not a directory"),
    "train: missing shards": Case(lambda i, w, u: ["train", "--local", "--out", str(w / "out"), *TINY,
                                                   "--set", 'data.content=["/no/such/shards"]'], "does not exist"),
    # --- images: corrupt, empty, enormous, 1x1, text named .png
    "stylize: corrupt (truncated) PNG": Case(_stylize(style="trunc.png"), "corrupt or truncated"),
    "stylize: empty image": Case(_stylize(content="empty.png"), "empty (0 bytes)"),
    "stylize: decompression bomb 30000x30000": Case(_stylize(style="bomb.png"), "decompression bomb"),
    "stylize: 1x1 content": Case(_stylize(content="one.png"), "1x1, too small"),
    "stylize: 1x1 style": Case(_stylize(style="one.png"), "1x1, too small"),
    "stylize: text file named .png": Case(_stylize(content="notes.png"), "not an image"),
    "shard: only a truncated PNG": Case(_shard("trunc.png"), "corrupt or truncated image",
                                        allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: only an empty PNG": Case(_shard("empty.png"), "empty file",
                                     allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: only a decompression bomb": Case(_shard("bomb.png"), "decompression bomb",
                                             allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: only a 1x1 image": Case(_shard("one.png"), "too small",
                                    allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: only a text file named .png": Case(_shard("notes.png"), "not an image",
                                               allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    # --- npz: wrong dtype / keys / shape, not a zip
    "shard: npz wrong dtype": Case(_shard("dtype.npz"), "dtype float32, expected uint8",
                                   allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: npz wrong keys": Case(_shard("keys.npz"), "without key 'data'",
                                  allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: npz wrong shape": Case(_shard("shape.npz"), "'data' has shape",
                                   allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: npz not a zip": Case(_shard("zip.npz"), "not an npz file",
                                 allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: npz whose data is corrupt (header fine)": Case(_shard("crc.npz"), "corrupt npz data",
                                                          allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: npz with float labels": Case(_shard("floatlabels.npz"), "npz 'labels' has dtype float64",
                                         allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    # --- inputs that are not regular files; an --out this tool did not write
    "shard: a FIFO": Case(_shard("fifo.png"), "1 not a regular file",
                          allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "shard: a character device": Case(lambda i, w, u: ["shard", "/dev/null", "--out", str(w / "out"), "--workers", "1"],
                                      "1 not a regular file",
                                      allow_new=("out/manifest.parquet", "out/skipped.parquet")),
    "stylize: a FIFO as content": Case(_stylize(content="fifo.png"), "is not a file"),
    "stylize: a character device as style": Case(_stylize(style="/dev/zero"), "is not a file"),
    "stylize: a FIFO as checkpoint": Case(_stylize(ckpt="fifo.png"), "is not a regular file"),
    "eval: a character device as checkpoint": Case(_eval(ckpt="/dev/zero"), "is not a regular file"),
    "stylize: --out a FIFO (never replaced)": Case(_stylize(out="{i}/fifo.png"), "not a regular file"),
    "stylize: --metrics-textfile a FIFO": Case(_stylize(extra=("--metrics-textfile", "<inputs>/fifo.png")),
                                               "is not a regular file"),
    "eval: --json a FIFO": Case(lambda i, w, u: [*_eval()(i, w, u)[:-1], str(i / "fifo.png")], "not a regular file"),
    "config: a FIFO as --config": Case(_config("--config", "{i}/fifo.png"), "is not a regular file"),
    "shard: --out a foreign non-empty dir": Case(_shard("content.png", out="{i}/foreign"),
                                                 "holds no manifest.parquet"),
    # --- sweeps read by `best`: malformed or half-written Tune/Train files; exports onto what is not ours
    "best: sweep_config.json not an object": Case(lambda i, w, u: ["best", str(i / "sweep_cfg_list")],
                                                  "sweep_config.json' is malformed"),
    "best: snapshot not an object": Case(lambda i, w, u: ["best", str(i / "sweep_snap_list")],
                                         "checkpoint_manager_snapshot.json' is malformed"),
    "best: snapshot entry without a dir name": Case(lambda i, w, u: ["best", str(i / "sweep_snap_noname")],
                                                    "checkpoint_manager_snapshot.json' is malformed"),
    "best: snapshot entry outside the run": Case(lambda i, w, u: ["best", str(i / "sweep_snap_escape")],
                                                 "checkpoint_manager_snapshot.json' is malformed"),
    "best: half-written snapshot": Case(lambda i, w, u: ["best", str(i / "sweep_snap_torn")], "unreadable or corrupt"),
    "best: metrics that are not numbers": Case(lambda i, w, u: ["best", str(i / "sweep_metric_text")],
                                               "has a checkpoint with 'val_score'"),
    "best: result line not an object": Case(lambda i, w, u: ["best", str(i / "sweep_result_list")],
                                            "has a checkpoint with 'val_score'"),
    "best: trial runtime not an object": Case(lambda i, w, u: ["best", str(i / "sweep_runtime_list")],
                                              "a trial entry is not a Tune trial"),
    "best: sweep path with glob characters": Case(lambda i, w, u: ["best", str(i / "sweep_[o]k")],
                                                  "holds no Tune sweep"),
    "best: --export onto a file": Case(lambda i, w, u: ["best", str(i / "sweep_ok"), "--export", str(i / "a_file")],
                                       "is a file; pass a new or empty directory"),
    "best: --export under a file": Case(
        lambda i, w, u: ["best", str(i / "sweep_ok"), "--export", str(i / "a_file" / "exp")], "is under a file"),
    "best: --export into a foreign dir": Case(
        lambda i, w, u: ["best", str(i / "sweep_ok"), "--export", str(i / "foreign")], "not an earlier export"),
    # --- side outputs that cannot be written: refused before the main output is written
    "stylize: --metrics-textfile under a regular file": Case(
        _stylize(extra=("--metrics-textfile", "<inputs>/a_file/m.prom")), "--metrics-textfile"),
    "stylize: --metrics-textfile is a directory": Case(
        _stylize(extra=("--metrics-textfile", "<inputs>/emptydir")), "is a directory"),
    "prometheus: --data-dir under a regular file": Case(
        lambda i, w, u: ["prometheus", "--data-dir", str(i / "a_file" / "prom"), "--port", "1"], "--data-dir"),
    "prometheus: tsdb in --data-dir is a file (process)": Case(
        lambda i, w, u: ["prometheus", "--data-dir", _tsdb_file(w / "prom"), "--port", "1"], "tsdb' is not a directory",
        proc=True),
    # --- checkpoints: another model, not a checkpoint, empty, pickle payload
    "stylize: checkpoint of another model config": Case(_stylize(ckpt="misfit.pt"), "do not fit its model config"),
    "stylize: random bytes as checkpoint": Case(_stylize(ckpt="random.pt"), "corrupt or not a checkpoint"),
    "stylize: text file as checkpoint": Case(_stylize(ckpt="text.pt"), "corrupt or not a checkpoint"),
    "stylize: empty checkpoint": Case(_stylize(ckpt="empty.pt"), "corrupt or not a checkpoint"),
    "stylize: bare state dict": Case(_stylize(ckpt="bare.pt"), "not a stylegen checkpoint"),
    "stylize: dir without checkpoint.pt": Case(_stylize(ckpt="nockpt"), "not found"),
    "stylize: pickle payload (os.system) (process)": Case(_stylize(ckpt="payload"), "posix.system", proc=True),
    "eval: pickle payload (os.system)": Case(_eval(ckpt="payload"), "refused by the safe loader"),
    "eval: random bytes as checkpoint": Case(_eval(ckpt="random.pt"), "corrupt or not a checkpoint"),
    "train: resume from another model's checkpoint": Case(
        lambda i, w, u: ["train", "--local", "--out", _copy(i / "other_run", w / "run"), *TINY],
        "saved from another model config"),
    "train: train.hooks module not importable": Case(
        lambda i, w, u: ["train", "--local", "--out", str(w / "out"), *TINY, "--set", 'train.hooks=["no_such_pkg.m:f"]'],
        "train.hooks: cannot import 'no_such_pkg.m'"),
    "train: train.hooks factory missing": Case(
        lambda i, w, u: ["train", "--local", "--out", str(w / "out"), *TINY, "--set", 'train.hooks=["stylegen.errors:nope"]'],
        "train.hooks: module 'stylegen.errors' has no 'nope'"),
    "train: --out under a regular file": Case(
        lambda i, w, u: ["train", "--local", "--out", str(i / "a_file" / "run"), *TINY], "cannot write"),
    # --- flag values
    "stylize: --alpha 1.5": Case(_stylize(extra=("--alpha", "1.5")), "--alpha 1.5: must be in [0, 1]", usage=True),
    "stylize: --alpha nan": Case(_stylize(extra=("--alpha", "nan")), "--alpha nan: must be in [0, 1]", usage=True),
    "stylize: --size 63": Case(_stylize(extra=("--size", "63")), "must be a multiple of 4", usage=True),
    "stylize: --size 100000": Case(_stylize(extra=("--size", "100000")), "between 16 and 4096", usage=True),
    "eval: --pairs 0": Case(_eval("--pairs", "0"), "--pairs 0: must be between 1"),
    "eval: --pairs 1000000000": Case(_eval("--pairs", "1000000000"), "must be between 1 and 10,000"),
    "eval: --pairs abc": Case(_eval("--pairs", "abc"), "argument --pairs: invalid int value", usage=True),
    "eval: --gatys-lr 0": Case(_eval("--gatys-lr", "0"), "--gatys-lr 0.0: must be > 0"),
    "best: --top 0": Case(lambda i, w, u: ["best", str(i / "emptydir"), "--top", "0"], "--top 0"),
    "prometheus: --port 0": Case(lambda i, w, u: ["prometheus", "--port", "0"], "--port 0 is out of range"),
    # --- submit: unreachable, bad config, no token, wrong token
    "submit: unreachable 127.0.0.1:1": Case(_submit("--config", "{i}/tiny.toml"), "cannot reach the Ray job server",
                                            env={"RAY_AUTH_TOKEN": "a" * 64}),
    "submit: bad config": Case(_submit("--config", "{i}/tiny.toml", "--set", "train.steps=-1"),
                               "train.steps: -1 is out of range", env={"RAY_AUTH_TOKEN": "a" * 64}),
    "submit: no token": Case(_submit("--config", "{i}/tiny.toml"), "no Ray auth token", env=NO_TOKEN),
    "submit: token file missing": Case(_submit("--config", "{i}/tiny.toml"), "cannot be read",
                                       env={**NO_TOKEN, "RAY_AUTH_TOKEN_PATH": "/no/such/token"}),
    "submit: token file empty": Case(_submit("--config", "{i}/tiny.toml"), "is empty",
                                     env={**NO_TOKEN, "RAY_AUTH_TOKEN_PATH": "<inputs>/token"}),
    "submit: wrong token (HTTP 403)": Case(_submit("--config", "{i}/tiny.toml", address="{u}"), "wrong token",
                                           env={**NO_TOKEN, "RAY_AUTH_TOKEN": "wrong" * 8}),
    "submit: --no-token to an auth cluster (HTTP 401)": Case(
        _submit("--config", "{i}/tiny.toml", "--no-token", address="{u}"), "requires a token", env=NO_TOKEN),
    "submit: Ray client address": Case(_submit("--config", "{i}/tiny.toml", "--no-token",
                                               address="ray://127.0.0.1:10001"), "not a Ray client/GCS address"),
    "submit: --timeout 0": Case(lambda i, w, u: [*_submit("--config", str(i / "tiny.toml"))(i, w, u), "--timeout", "0"],
                                "--timeout 0"),
}

# Known bugs in modules other engineers are editing (reported, not fixed here); strict: an
# XPASS means the fix landed and the mark should go.
XFAIL: dict[str, str] = {}


def test_table_counts_at_least_30_cases():
    assert len(set(CASES) - set(XFAIL)) >= 30


def _params() -> list:
    return [pytest.param(name, id=name, marks=[pytest.mark.xfail(reason=XFAIL[name], strict=True)] if name in XFAIL
                         else []) for name in CASES]


def _snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under roots (directories themselves are not outputs)."""
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(case: Case, argv: list[str], work: Path, env: dict[str, str], capsys) -> tuple[int, str, str]:
    if case.proc:
        proc = subprocess.run([sys.executable, "-m", "stylegen.cli", *argv], cwd=work, capture_output=True,
                              text=True, timeout=120,
                              env={**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
        return proc.returncode, proc.stdout, proc.stderr
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", _params())
def test_bad_input(name, inp, server, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    monkeypatch.chdir(work)  # relative defaults (runs/, stylized/) land here
    for var in RAY_ENV:
        monkeypatch.delenv(var, raising=False)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.replace("<work>", str(work / "home")).replace("<inputs>", str(inp)))
    argv = case.argv(inp, work, server)
    before = _snapshot(inp, work)

    rc, out, err = _run(case, argv, work, dict(os.environ), capsys)

    cmd = argv[0]
    lines = err.strip().splitlines()
    if case.usage:  # argparse-level errors are one line too (cli.OneLineParser), pointing at --help
        assert lines and lines[-1].endswith(f"(see stylegen {cmd} --help)"), err
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"stylegen {cmd}: error: "), err
    assert case.needle in lines[0], lines[0]
    assert out == "", out
    after = _snapshot(inp, work)
    new = {str(work / a) for a in case.allow_new}
    assert {k: v for k, v in after.items() if k not in new} == before, "a file was written, changed or left behind"
    assert not [p for p in after if p.endswith(".tmp")]
    assert not (inp / MARKER).exists(), "the pickle payload ran"
    if case.allow_new:  # shard's skipped-input report: complete and naming the input
        import pyarrow.parquet as pq

        rows = pq.read_table(work / "out" / "skipped.parquet").to_pylist()
        assert all(r["reason"] for r in rows) and not list((work / "out").glob("*.tar"))


def test_animated_gif_uses_first_frame(inp, tmp_path, capsys):
    """Not a bad input: stylize (and shard) take the first frame of an animated GIF."""
    frames = [Image.fromarray(np.full((40, 40, 3), v, np.uint8)) for v in (30, 200, 90)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = tmp_path / "o.png"
    assert main(["stylize", "--checkpoint", str(inp / "ckpt"), "--content", str(gif), "--style",
                 str(inp / "style.png"), "--out", str(out)]) == 0
    assert out.is_file()
    from stylegen.images import load_rgb

    assert np.asarray(load_rgb(gif)).mean() == pytest.approx(30, abs=1)  # frame 0, not 1 or 2

"""Security checks (issue 8, item 4).

- local ``/metrics`` endpoints, ``stylegen prometheus`` and a local Ray's dashboard bind 127.0.0.1 by
  default, and a new local Ray has token auth on;
- a local ``/metrics`` bound beyond loopback logs one warning that it is unauthenticated;
- the Ray that ``stylegen train``/``tune`` start without ``--address`` requires its token and listens
  where README's in-process table says, port by port: observed on a real ``stylegen train`` run in
  tests/test_s3_ray.py (the loopback cluster of ``local-up.sh``: tests/test_local_cluster.py);
- checkpoints load with ``weights_only=True``: a pickle payload is refused and never runs; every
  deserialiser in ``stylegen/``, ``jobs/`` and ``benchmarks/`` is a safe one (static check, import
  aliases resolved), except the one audited ``Tuner.restore`` of ``tune --resume``, which runs only
  on a sweep dir that only you can write (or object storage with ``--trust-storage``): a planted
  ``tuner.pkl`` never runs otherwise;
- no shell command is built from user input: no ``shell=True``, ``os.system``, ``os.popen``,
  ``os.exec*``/``os.spawn*``, ``eval``/``exec``, and subprocesses get argument lists (static check);
- a token in the environment never reaches a local run's checkpoints, metrics.json, result grids,
  logs (debug on) or its ``/metrics`` exposition.

Covered elsewhere, not repeated here:
- ``stylegen submit`` refuses to send without a token unless ``--no-token``:
  tests/test_submit.py::test_missing_token_is_refused_before_contacting, and the rows "submit: no
  token", "--no-token to an auth cluster (HTTP 401)", "wrong token (HTTP 403)" in tests/test_bad_inputs.py;
- the token never in a submitted job's command, environment, metadata or logs (debug logging):
  tests/test_submit.py::test_submit_wait_tiny_job_succeeds_without_leaking_token (``ray``);
- the one shell string we hand over, a Ray job entrypoint (Ray's API runs it through a shell), is
  built with ``shlex.join``: tests/test_submit.py::test_entrypoint_quotes_every_argument.
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from listeners import accepts, other_address
from stylegen.checkpoint import load_checkpoint
from stylegen.config import Config, load_config
from stylegen.errors import UserError
from stylegen.raycluster import LOOPBACK_ENV
from tiny import MODEL, cli_sets

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stylegen"


CANARY = "canary-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"  # a fake Ray token


# ----------------------------------------------------------------------------- loopback by default

def test_metrics_endpoint_binds_loopback_by_default(monkeypatch):
    from stylegen.metrics import TrainMetrics

    monkeypatch.setenv("RAY_AUTH_TOKEN", CANARY)
    m = TrainMetrics.create("prometheus", run="sec", rank=0, port=0)  # host not given: the default
    try:
        url = m.url
        assert url.startswith("http://127.0.0.1:"), url
        port = int(url.split(":")[2].split("/")[0])
        assert m._sink._server.socket.getsockname()[0] == "127.0.0.1"  # the bound socket itself
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
        assert b"stylegen_train_samples_total" in body and CANARY.encode() not in body
        other = other_address()
        if other is not None:  # the same port on the machine's other address: nothing listens
            assert not accepts(other, port)
    finally:
        m.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_non_loopback_metrics_bind_warns_once(caplog, host):
    from stylegen.metrics import TrainMetrics

    caplog.set_level(logging.WARNING)
    try:
        m = TrainMetrics.create("prometheus", run="sec", rank=0, host=host, port=0)
    except UserError as e:  # no IPv6 here
        pytest.skip(str(e))
    m.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert warnings[0].name == "stylegen.metrics" and "\n" not in line
    assert "unauthenticated" in line and host in line and "metrics.host=127.0.0.1" in line
    caplog.clear()
    for loopback in ("127.0.0.1", "localhost"):  # loopback: no warning
        TrainMetrics.create("prometheus", run="sec", rank=0, host=loopback, port=0).close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.slow  # a 1-step training run: not in make test-fast
def test_metrics_host_0000_in_a_local_run_warns(tmp_path, caplog):
    """The config path: ``stylegen train --local --set metrics.host=0.0.0.0`` serves /metrics off
    loopback and says so once (the warning above, reached through cfg.metrics.host)."""
    from stylegen.cli import main

    sets = [*MODEL, "data.batch_size=2",
            "train.steps=1", "train.val_pairs=2", "train.threads=1", "metrics.host=0.0.0.0", "metrics.port=0"]
    caplog.set_level(logging.WARNING)
    assert main(["train", "--local", "--out", str(tmp_path / "run"), "--no-progress",
                 *cli_sets(sets)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "stylegen.metrics" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "unauthenticated" in lines[0] and "0.0.0.0" in lines[0], lines


def test_configs_and_prometheus_bind_loopback():
    from stylegen.prom import prometheus_argv

    assert Config().metrics.host == "127.0.0.1"
    for f in sorted((ROOT / "jobs" / "configs").glob("*.toml")):
        assert load_config(f).metrics.host == "127.0.0.1", f
    argv = prometheus_argv("prometheus", Path("p.yml"), Path("data"), port=9090)
    assert "--web.listen-address=127.0.0.1:9090" in argv


def test_local_ray_is_loopback_with_token_auth(monkeypatch):
    """``ensure_ray`` without an address starts Ray on 127.0.0.1 with Ray's defaults for the dashboard
    (127.0.0.1) and auth (token on for a new local cluster): checked on the arguments, Ray not started.
    That those defaults really turn auth on: the training run of tests/test_s3_ray.py (``ray``)."""
    import inspect

    import ray

    from stylegen.train import ray_worker

    default_dashboard_host = inspect.signature(ray.init).parameters["dashboard_host"].default
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    ray_worker.ensure_ray("")
    # Ray was imported before (here): too late for the loopback variable, so this process's env is left alone
    assert LOOPBACK_ENV not in os.environ
    ((args, kw),) = calls
    assert not args and "address" not in kw
    assert kw["_node_ip_address"] == "127.0.0.1"
    assert kw.get("dashboard_host", default_dashboard_host) == "127.0.0.1"
    assert kw.get("include_dashboard") in (None, True)  # DESIGN: Train V2 needs the dashboard
    assert "_system_config" not in kw or "AUTH_MODE" not in kw["_system_config"]
    env_vars = kw.get("runtime_env", {}).get("env_vars", {})
    assert "RAY_AUTH_MODE" not in env_vars and "RAY_AUTH_MODE" not in os.environ


# ----------------------------------------------------------------------------- checkpoints

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_pickle_payload_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": "stylegen-checkpoint-v1", "step": 1, "generator": _Payload(marker)}, evil)
    with pytest.raises(UserError) as e:
        load_checkpoint(evil)
    assert "weights_only=True" in str(e.value) and "system" in str(e.value)
    assert not marker.exists()
    # the same bytes through the plain unpickler would run it: the payload is real
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- tune --resume

def _planted_sweep(storage: Path, marker: Path, name: str = "sw") -> Path:
    """A sweep dir as Tune leaves it, whose tuner.pkl runs ``touch marker`` when unpickled."""
    import pickle

    sweep = storage / name
    sweep.mkdir(parents=True)
    (sweep / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (sweep / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (sweep / "trial_runs").mkdir()
    for p in (storage, sweep, sweep / "trial_runs"):
        p.chmod(0o755)
    for p in sweep.glob("*.*"):
        p.chmod(0o644)
    return sweep


def _tuner_inputs(monkeypatch):
    """build_tuner's config and its Ray-cluster look-up replaced (nothing here starts Ray)."""
    from ray import tune

    import stylegen.tune as sg_tune

    restored = []
    monkeypatch.setattr(sg_tune, "trial_bundle", lambda: {"CPU": 0.01})
    monkeypatch.setattr(tune.Tuner, "restore", classmethod(lambda cls, path, **kw: restored.append(path) or "tuner"))
    return sg_tune, load_config(ROOT / "jobs" / "configs" / "tune.toml"), restored


@pytest.mark.parametrize("loosen", ["sweep dir 0777", "tuner.pkl 0666", "nested dir 0775", "owner"])
def test_resume_refuses_a_sweep_others_could_write(tmp_path, monkeypatch, loosen):
    """``tune --resume`` unpickles tuner.pkl (and Tune's other state files): a local sweep is resumed
    only if it and everything in it is yours and writable only by you; the planted payload never runs."""
    from stylegen.tune import check_resume_trust

    marker = tmp_path / "PAYLOAD_RAN"
    sweep = _planted_sweep(tmp_path / "storage", marker)
    check_resume_trust(sweep)  # yours, 0755/0644: fine
    target = {"sweep dir 0777": sweep, "tuner.pkl 0666": sweep / "tuner.pkl",
              "nested dir 0775": sweep / "trial_runs", "owner": sweep / "tuner.pkl"}[loosen]
    if loosen == "owner":
        if os.geteuid() == 0:
            os.chown(target, 65534, 65534)  # nobody
        else:
            monkeypatch.setattr(os, "geteuid", lambda real=os.geteuid(): real + 1)
    else:
        target.chmod(int(loosen.split()[-1], 8))
    with pytest.raises(UserError) as e:
        check_resume_trust(sweep)
    line = str(e.value)
    assert "\n" not in line and str(target) in line and "--resume" in line
    if loosen == "owner":
        assert "owned by uid" in line and "not you" in line
    else:
        assert "writable by group/others" in line and f"chmod -R go-w {sweep}" in line
    # build_tuner refuses before Tuner.restore (or anything else) reads the sweep
    sg_tune, cfg, restored = _tuner_inputs(monkeypatch)
    with pytest.raises(UserError, match="--resume"):
        sg_tune.build_tuner(cfg, "sw", str(tmp_path / "storage"), resume=True)
    assert restored == [] and not marker.exists()


def test_resume_of_your_own_sweep_reaches_restore(tmp_path, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    _planted_sweep(tmp_path / "storage", marker)
    sg_tune, cfg, restored = _tuner_inputs(monkeypatch)
    assert sg_tune.build_tuner(cfg, "sw", str(tmp_path / "storage"), resume=True) == "tuner"
    assert restored == [str((tmp_path / "storage" / "sw").resolve())]


def test_resume_from_object_storage_needs_trust_storage(tmp_path, monkeypatch):
    """No owner to check in a bucket: resuming needs --trust-storage, and without it nothing is read."""
    import stylegen.tune as sg_tune

    sg_tune_mod, cfg, restored = _tuner_inputs(monkeypatch)
    reads = []
    monkeypatch.setattr(sg_tune, "ray_storage", lambda url, c=None: (url.split("://", 1)[1], None))
    monkeypatch.setattr(sg_tune, "read_bytes", lambda *a, **k: reads.append(a) or b'{"base": {}}')
    from ray import tune
    monkeypatch.setattr(tune.Tuner, "can_restore", classmethod(lambda cls, *a, **k: reads.append(a) or True))
    with pytest.raises(UserError) as e:
        sg_tune.build_tuner(cfg, "sw", "s3://team-bucket/sweeps", resume=True)
    line = str(e.value)
    assert "s3://team-bucket/sweeps/sw" in line and "--trust-storage" in line and "write access" in line
    assert reads == [] and restored == []
    sg_tune.build_tuner(cfg, "sw", "s3://team-bucket/sweeps", resume=True, trust_storage=True)
    assert restored == ["team-bucket/sweeps/sw"]
    for bad in (b"{", b'{"sweep": "sw"}', b'{"base": 3}', b"\xff"):  # half-written / foreign sweep_config.json
        monkeypatch.setattr(sg_tune, "read_bytes", lambda *a, **k: bad)
        with pytest.raises(UserError, match="sweep_config.json in 's3://team-bucket/sweeps/sw' is not a sweep config"):
            sg_tune.build_tuner(cfg, "sw", "s3://team-bucket/sweeps", resume=True, trust_storage=True)
    # the flag exists on the CLI
    proc = subprocess.run([sys.executable, "-m", "stylegen.cli", "tune", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert "--trust-storage" in proc.stdout


# ----------------------------------------------------------------------------- static checks

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py")) \
        + sorted((ROOT / "benchmarks").rglob("*.py"))  # benchmarks read checkpoints and run subprocesses too
    assert len(files) > 20
    return files


# Calls that would run a shell or code built from a string. Nothing is allow-listed: the one
# shell string we produce is a Ray job entrypoint (submit.build_entrypoint, shlex.join of the argv).
ALLOW: dict[str, str] = {}


def shell_findings(src: str, rel: str) -> list[str]:
    bad = []
    for call, name in _calls(ast.parse(src, filename=rel)):
        where = f"{rel}:{call.lineno} {name}"
        if name in ("os.system", "os.popen", "eval", "exec", "commands.getoutput") \
                or name.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
            bad.append(where)
        if name.startswith("subprocess.") or name.split(".")[-1] in ("Popen", "check_output", "check_call"):
            shell = _kw(call, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                bad.append(where + " shell=...")
            cmd = call.args[0] if call.args else _kw(call, "args")
            if isinstance(cmd, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                bad.append(where + " with a command string (pass an argument list)")
    return [b for b in bad if b.split(" ")[0] not in ALLOW]


# Modules whose load functions unpickle (code runs on load), matched on any component of the
# import-resolved dotted name: `ray.cloudpickle.loads`, `p.loads` after `import pickle as p`, ...
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
PICKLE_LOADERS = {"load", "loads", "Unpickler", "open", "_load", "_loads"}
# The one call site allowed to unpickle carries this marker on its line or the line above, and
# must sit after check_resume_trust in the same function (tests below).
AUDITED = "# audited-unpickle:"
AUDITED_SITES = {("stylegen/tune.py", "ray.tune.Tuner.restore")}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from imports and plain assignments
    (``import pickle as p``, ``from ray.tune import Tuner as T``, ``m = importlib.import_module("pickle")``,
    ``f = p.loads``). Flow-insensitive: a name bound anywhere in the file counts everywhere."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for _ in range(3):  # chains of assignments: x = pickle; y = x.loads
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = _resolve(node.value, aliases)
                if value is not None:
                    for t in targets:
                        if isinstance(t, ast.Name):
                            aliases[t.id] = value
    return aliases


def _resolve(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The dotted name an expression refers to, through aliases, getattr(x, "name") and
    __import__/importlib.import_module("name"); None if it is not a (resolvable) name."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    if isinstance(node, ast.Call) and node.args:
        func = _resolve(node.func, aliases)
        arg = node.args[1] if func == "getattr" and len(node.args) >= 2 else node.args[0]
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            return None
        if func == "getattr":
            base = _resolve(node.args[0], aliases)
            return None if base is None else f"{base}.{arg.value}"
        if func in ("__import__", "importlib.import_module"):
            return arg.value
    return None


def _unpickles(name: str) -> bool:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in PICKLE_LOADERS and any(p in PICKLE_MODULES for p in parts[:-1]):
        return True
    if parts[-1] == "read_pickle":  # pandas
        return True
    # Tuner.restore / a Trainer's restore unpickle the saved experiment; ExperimentAnalysis reads
    # cloudpickled trial state
    return (len(parts) >= 2 and parts[-1] == "restore" and parts[-2].endswith(("Tuner", "Trainer"))) \
        or parts[-1] == "ExperimentAnalysis"


def deserialiser_findings(src: str, rel: str, *, with_audited: bool = False):
    """Unsafe deserialisers in ``src``: ``"rel:line name"`` strings. With ``with_audited``, a pair
    (findings, audited) where audited lists the ``(rel, line, name)`` excused by the AUDITED marker."""
    tree = ast.parse(src, filename=rel)
    aliases = _aliases(tree)
    lines = src.splitlines()
    found: dict[tuple[int, int, str], str] = {}  # (line, column, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _resolve(node.func, aliases) or ""
            where = f"{rel}:{node.lineno} {name}"
            if name == "torch.load":
                w = _kw(node, "weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found[(node.lineno, node.col_offset, name)] = where + " without weights_only=True"
            elif name == "numpy.load":
                a = _kw(node, "allow_pickle")
                if not (isinstance(a, ast.Constant) and a.value is False):
                    found[(node.lineno, node.col_offset, name)] = where + " without allow_pickle=False"
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.load_all"):
                found[(node.lineno, node.col_offset, name)] = where
        if isinstance(node, (ast.Name, ast.Attribute, ast.Call)) and not isinstance(getattr(node, "ctx", None),
                                                                                     (ast.Store, ast.Del)):
            name = _resolve(node, aliases)
            if name and _unpickles(name):  # referenced, called or not (f = pickle.loads; f(b))
                found.setdefault((node.lineno, node.col_offset, name), f"{rel}:{node.lineno} {name}")
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "*" for a in node.names) \
                and set(node.module.split(".")) & PICKLE_MODULES:
            found[(node.lineno, node.col_offset, node.module)] = f"{rel}:{node.lineno} from {node.module} import *"
        if isinstance(node, ast.ImportFrom) and node.module:  # from pickle import loads
            for a in node.names:
                if _unpickles(f"{node.module}.{a.name}"):
                    found.setdefault((node.lineno, node.col_offset, f"{node.module}.{a.name}"),
                                     f"{rel}:{node.lineno} {node.module}.{a.name}")
    bad, audited = [], []
    for (line, _, name), where in sorted(found.items()):
        marked = any(AUDITED in lines[i - 1] for i in (line, line - 1) if 0 < i <= len(lines))
        (audited.append((rel, line, name)) if marked else bad.append(where))
    return (bad, audited) if with_audited else bad


BAD_SNIPPET = """
import os, pickle, subprocess, torch, yaml, numpy as np
subprocess.run(f"convert {user_path} out.png", shell=True)
subprocess.Popen("ls " + user_dir)
os.system(cmd); os.popen(cmd); eval(expr)
torch.load(path); torch.load(path, weights_only=False); np.load(path); pickle.loads(b); yaml.load(text)
subprocess.run(["ls", user_dir])  # fine
torch.load(path, weights_only=True); np.load(path, allow_pickle=False); yaml.safe_load(text)  # fine
"""

ALIASED_SNIPPET = """
import importlib, json
import pickle as p
import ray.cloudpickle as cp
from ray import cloudpickle, tune
from ray.tune import Tuner as T
from pickle import loads as L
import pandas as pd
p.load(fh)
cp.loads(b)
cloudpickle.loads(b)
L(b)
T.restore(path, trainable=fn)
tune.Tuner.restore(path, trainable=fn)
f = p.loads
m = importlib.import_module("pickle"); m.Unpickler(fh)
getattr(p, "loads")(b)
__import__("dill").load(fh)
pd.read_pickle(path)
import cloudpickle as cpk; cpk.load(fh)
getattr(tune.Tuner, "restore")(path, trainable=fn)
json.loads(text); cp.dumps(obj); T(trainable); tune.Tuner.can_restore(path)  # fine
r = tune.Tuner.restore(path, trainable=fn)  # audited-unpickle: planted, excused
"""


def test_checkers_catch_a_bad_snippet():
    assert len(shell_findings(BAD_SNIPPET, "x.py")) == 6  # shell=True with an f-string counts twice
    assert len(deserialiser_findings(BAD_SNIPPET, "x.py")) == 5


def test_deserialiser_check_resolves_aliases():
    bad, audited = deserialiser_findings(ALIASED_SNIPPET, "x.py", with_audited=True)
    got = {(int(b.split(" ")[0].split(":")[1]), b.split(" ")[1]) for b in bad}
    assert got == {(7, "pickle.loads"), (9, "pickle.load"), (10, "ray.cloudpickle.loads"),
                   (11, "ray.cloudpickle.loads"), (12, "pickle.loads"), (13, "ray.tune.Tuner.restore"),
                   (14, "ray.tune.Tuner.restore"), (15, "pickle.loads"), (16, "pickle.Unpickler"),
                   (17, "pickle.loads"), (18, "dill.load"), (19, "pandas.read_pickle"),
                   (20, "cloudpickle.load"), (21, "ray.tune.Tuner.restore")}, sorted(got)
    assert audited == [("x.py", 23, "ray.tune.Tuner.restore")]


def test_audited_restore_is_gated_by_the_trust_check():
    """The one allowed unpickler is tune --resume's Tuner.restore, after check_resume_trust; without
    its marker the checker reports it (the allow-list is what admits it, not a blind spot)."""
    src = (PACKAGE / "tune.py").read_text()
    bad, audited = deserialiser_findings(src, "stylegen/tune.py", with_audited=True)
    assert bad == [] and [(r, n) for r, _, n in audited] == sorted(AUDITED_SITES)
    [(_, line, _)] = audited
    assert deserialiser_findings(src.replace(AUDITED, "# note:"), "stylegen/tune.py") \
        == [f"stylegen/tune.py:{line} ray.tune.Tuner.restore"]
    tree = ast.parse(src)
    [func] = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.lineno <= line <= f.end_lineno
              and f.name == "build_tuner"]
    gates = [c.lineno for c, name in _calls(func) if name == "check_resume_trust"]
    assert gates and min(gates) < line


def test_no_shell_commands_or_code_from_strings():
    bad = [b for f in _sources() for b in shell_findings(f.read_text(), str(f.relative_to(ROOT)))]
    assert bad == []


def test_only_safe_deserialisers():
    bad, audited = [], []
    for f in _sources():
        b, a = deserialiser_findings(f.read_text(), str(f.relative_to(ROOT)), with_audited=True)
        bad += b
        audited += a
    assert bad == []
    assert {(rel, name) for rel, _, name in audited} == AUDITED_SITES and len(audited) == len(AUDITED_SITES)
    markers = [f for f in _sources() for ln in f.read_text().splitlines() if AUDITED in ln]
    assert len(markers) == len(AUDITED_SITES), markers  # no stray marker waiting to excuse a new call


# ----------------------------------------------------------------------------- secrets

@pytest.mark.slow  # trains or kills real subprocesses: not in make test-fast
def test_token_canary_never_in_run_outputs_or_logs(tmp_path):
    """A local training run with a Ray token in its environment (and in ~/.ray/auth_token), debug
    logging on and the /metrics endpoint up: the token appears in no file the run writes, nor its output."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(CANARY + "-file\n")
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_TOKEN": CANARY, "RAY_AUTH_MODE": "token", "HOME": str(home),
           "STYLEGEN_CACHE": os.environ.get("STYLEGEN_CACHE", str(Path.home() / ".cache" / "stylegen")),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "stylegen.cli", "-v", "train", "--local", "--out", str(out), "--no-progress",
         *cli_sets(MODEL),
         "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.sample_every=2",
         "--set", "train.report_every=2", "--set", "data.batch_size=2", "--set", "metrics.port=0"],
        env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".pt", ".json", ".png"} <= kinds, kinds  # checkpoints, metrics.json, result grids
    assert b"metrics at http://127.0.0.1:" in proc.stderr  # the endpoint was up, logs were captured
    for needle in (CANARY.encode(), CANARY[:16].encode()):
        assert needle not in proc.stdout and needle not in proc.stderr
        for p in files:
            assert needle not in p.read_bytes(), p
    state = load_checkpoint(sorted(out.glob("checkpoints/*/checkpoint.pt"))[-1])
    assert CANARY not in repr(state["config"]) and CANARY not in repr(state.get("metrics"))

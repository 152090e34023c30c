"""Security checks (issue 8, item 4).

- local ``/metrics`` endpoints, ``stylegen prometheus`` and a local Ray bind 127.0.0.1 by default, and a
  new local Ray has token auth on;
- checkpoints load with ``weights_only=True``: a pickle payload is refused and never runs; every
  deserialiser in ``stylegen/`` is a safe one (static check);
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
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from stylegen.checkpoint import load_checkpoint
from stylegen.config import Config, load_config
from stylegen.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stylegen"


CANARY = "canary-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"  # a fake Ray token


# ----------------------------------------------------------------------------- loopback by default

def _other_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (a UDP connect sends no packet)."""
    candidates = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    return next((a for a in candidates if not a.startswith("127.") and a != "0.0.0.0"), None)


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
        other = _other_address()
        if other is not None:  # the same port on the machine's other address: nothing listens
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        m.close()


def test_configs_and_prometheus_bind_loopback():
    from stylegen.prom import prometheus_argv

    assert Config().metrics.host == "127.0.0.1"
    for f in sorted((ROOT / "jobs" / "configs").glob("*.toml")):
        assert load_config(f).metrics.host == "127.0.0.1", f
    argv = prometheus_argv("prometheus", Path("p.yml"), Path("data"), port=9090)
    assert "--web.listen-address=127.0.0.1:9090" in argv


def test_local_ray_is_loopback_with_token_auth(monkeypatch):
    """``ensure_ray`` without an address starts Ray on 127.0.0.1 with Ray's defaults for the dashboard
    (127.0.0.1) and auth (token on for a new local cluster): checked on the arguments, Ray not started."""
    import inspect

    import ray
    import ray._private.worker

    from stylegen.train import ray_worker

    default_dashboard_host = inspect.signature(ray.init).parameters["dashboard_host"].default
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    ray_worker.ensure_ray("")
    ((args, kw),) = calls
    assert not args and "address" not in kw
    assert kw["_node_ip_address"] == "127.0.0.1"
    assert kw.get("dashboard_host", default_dashboard_host) == "127.0.0.1"
    assert kw.get("include_dashboard") in (None, True)  # DESIGN: Train V2 needs the dashboard
    assert "_system_config" not in kw or "AUTH_MODE" not in kw["_system_config"]
    env_vars = kw.get("runtime_env", {}).get("env_vars", {})
    assert "RAY_AUTH_MODE" not in env_vars and "RAY_AUTH_MODE" not in os.environ
    # Ray 2.60's ray.init: a new local cluster turns token auth on unless RAY_AUTH_MODE says otherwise
    assert "enable_token_auth_by_default()" in inspect.getsource(ray._private.worker.init)


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


# ----------------------------------------------------------------------------- static checks

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py"))
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


def deserialiser_findings(src: str, rel: str) -> list[str]:
    bad = []
    for call, name in _calls(ast.parse(src, filename=rel)):
        where = f"{rel}:{call.lineno} {name}"
        if name == "torch.load":
            w = _kw(call, "weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                bad.append(where + " without weights_only=True")
        elif name in ("np.load", "numpy.load"):
            a = _kw(call, "allow_pickle")
            if not (isinstance(a, ast.Constant) and a.value is False):
                bad.append(where + " without allow_pickle=False")
        elif name in ("pickle.load", "pickle.loads", "marshal.loads", "shelve.open", "dill.load",
                      "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            bad.append(where)
    return bad


BAD_SNIPPET = """
import os, pickle, subprocess, torch, yaml, numpy as np
subprocess.run(f"convert {user_path} out.png", shell=True)
subprocess.Popen("ls " + user_dir)
os.system(cmd); os.popen(cmd); eval(expr)
torch.load(path); torch.load(path, weights_only=False); np.load(path); pickle.loads(b); yaml.load(text)
subprocess.run(["ls", user_dir])  # fine
torch.load(path, weights_only=True); np.load(path, allow_pickle=False); yaml.safe_load(text)  # fine
"""


def test_checkers_catch_a_bad_snippet():
    assert len(shell_findings(BAD_SNIPPET, "x.py")) == 6  # shell=True with an f-string counts twice
    assert len(deserialiser_findings(BAD_SNIPPET, "x.py")) == 5


def test_no_shell_commands_or_code_from_strings():
    bad = [b for f in _sources() for b in shell_findings(f.read_text(), str(f.relative_to(ROOT)))]
    assert bad == []


def test_only_safe_deserialisers():
    bad = [b for f in _sources() for b in deserialiser_findings(f.read_text(), str(f.relative_to(ROOT)))]
    assert bad == []


# ----------------------------------------------------------------------------- secrets

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
         "--set", "model.channels=8", "--set", "model.res_blocks=1", "--set", "features.weights=random",
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

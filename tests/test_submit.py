"""``stylegen submit``: local checks (config, name, token, address) and, marked ``ray``,
submissions to a token-auth local cluster this module starts and stops by PID."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from stylegen import raycluster, submit
from stylegen.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
STYLEGEN = [sys.executable, "-m", "stylegen.cli"]
TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No token anywhere unless given: HOME points at an empty dir (no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARS}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*STYLEGEN, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stylegen submit: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text("[train]\nsteps = 2\n[ray]\nname = \"tiny\"\n")
    return p


# ----------------------------------------------------------------------------- pure parts

def test_submission_id_is_readable_and_utc():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert submit.make_submission_id("train", "demo", now) == "stylegen-train-demo-20260102T030405Z"


def test_entrypoint_quotes_every_argument():
    args = ["--storage", "/tmp/a b; rm -rf ~", "--workers", "$(id)"]
    cmd = submit.build_entrypoint("python", "train", "demo", args)
    assert shlex.split(cmd) == ["python", "jobs/train.py", "--config", submit.CONFIG_IN_JOB, "--name", "demo", *args]
    assert shlex.split(submit.build_entrypoint("python", "tune", "x", []))[1] == "jobs/tune.py"


def test_name_must_be_safe(tiny_config):
    with pytest.raises(UserError, match="run name"):
        submit.resolve_job_config(str(tiny_config), [], "a b;c")
    text, name = submit.resolve_job_config(str(tiny_config), ["train.steps=3"], "ok-1")
    assert name == "ok-1" and 'name = "ok-1"' in text and "steps = 3" in text


def test_find_token_follows_rays_order(tmp_path):
    f = tmp_path / "tok"
    f.write_text(" filetoken\n")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("hometoken")
    env = {"RAY_AUTH_TOKEN": "envtoken", "RAY_AUTH_TOKEN_PATH": str(f)}
    assert raycluster.find_token(env, tmp_path)[0] == "envtoken"
    assert raycluster.find_token({"RAY_AUTH_TOKEN_PATH": str(f)}, tmp_path)[0] == "filetoken"
    assert raycluster.find_token({}, tmp_path)[0] == "hometoken"
    assert raycluster.find_token({}, tmp_path / "nohome") is None
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):  # set but missing: an error, as in Ray
        raycluster.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)


def test_token_file_is_private_and_kept(tmp_path):
    p = tmp_path / "d" / "auth_token"
    assert raycluster.ensure_token_file(p)
    token = p.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not raycluster.ensure_token_file(p) and p.read_text() == token


def test_address_resolution():
    assert raycluster.resolve_job_address("127.0.0.1:8275", {}) == "http://127.0.0.1:8275"
    assert raycluster.resolve_job_address(None, {"RAY_ADDRESS": "http://h:1/"}) == "http://h:1"
    assert raycluster.resolve_job_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:2", "RAY_ADDRESS": "http://b:3"}) \
        == "http://a:2"
    for bad in ("ray://h:10001", "http://h"):
        with pytest.raises(UserError, match="--address"):
            raycluster.resolve_job_address(bad, {})
    with pytest.raises(UserError, match="no cluster address"):
        raycluster.resolve_job_address(None, {})


def test_staged_upload_is_an_allow_list(tmp_path):
    with submit.staged_project("[train]\nsteps = 2\n") as stage:
        names = {p.relative_to(stage).parts[0] for p in stage.rglob("*")}
        assert (stage / "jobs" / "train.py").is_file() and (stage / "stylegen" / "cli.py").is_file()
        assert (stage / submit.CONFIG_IN_JOB).read_text() == "[train]\nsteps = 2\n"
        assert names <= {"stylegen", "jobs", "pyproject.toml", "_submit"}
        assert not list(stage.rglob("__pycache__")) and not list(stage.rglob("auth_token"))
    assert not stage.exists()


# ----------------------------------------------------------------------------- CLI, no cluster

def test_bad_config_fails_before_contacting_anything(tmp_path, tiny_config):
    # the address is unreachable and there is no token: the config error must come first
    proc = run_cli(["submit", "train", "--address", "http://127.0.0.1:9", "--config", str(tiny_config),
                    "--set", "train.steps=-1"], clean_env(tmp_path))
    assert proc.returncode == 2 and "train.steps" in error_line(proc) and proc.stdout == ""
    proc = run_cli(["submit", "train", "--address", "http://127.0.0.1:9", "--config", str(tmp_path / "nope.toml")],
                   clean_env(tmp_path))
    assert proc.returncode == 2 and "not found" in error_line(proc)


def test_missing_token_is_refused_before_contacting(tmp_path, tiny_config):
    proc = run_cli(["submit", "train", "--address", "http://127.0.0.1:9", "--config", str(tiny_config)],
                   clean_env(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    line = error_line(proc)
    assert "no Ray auth token" in line and "--no-token" in line and "reach" not in line


def test_unreachable_address_is_one_line_and_fast(tmp_path, tiny_config):
    t0 = time.monotonic()
    proc = run_cli(["submit", "train", "--address", f"http://127.0.0.1:{raycluster.free_port()}",
                    "--config", str(tiny_config), "--timeout", "3"], clean_env(tmp_path, RAY_AUTH_TOKEN="x" * 64))
    assert proc.returncode == 2 and "cannot reach the Ray job server" in error_line(proc)
    assert time.monotonic() - t0 < 20
    assert "x" * 64 not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- against a local cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    c = raycluster.start_local_cluster(state, port=raycluster.free_port(), dashboard_port=raycluster.free_port(),
                                       num_cpus=2)
    try:
        yield c
    finally:
        stopped = raycluster.stop_local_cluster(state)
        assert stopped == [c.head_pid]


def job_infos(c: raycluster.LocalCluster) -> list[dict]:
    token = Path(c.token_path).read_text().strip()
    req = urllib.request.Request(f"{c.dashboard_url}/api/jobs/", headers=raycluster.auth_headers(token))
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@pytest.mark.ray
@pytest.mark.slow
def test_submit_refusals_against_token_cluster(cluster, tmp_path, tiny_config):
    base = ["submit", "train", "--address", cluster.dashboard_url, "--config", str(tiny_config)]
    # no token anywhere -> refused locally
    proc = run_cli(base, clean_env(tmp_path))
    assert proc.returncode == 2 and "no Ray auth token" in error_line(proc)
    # told there is no auth, but there is -> the server's 401 as one line
    proc = run_cli([*base, "--no-token"], clean_env(tmp_path))
    assert proc.returncode == 2 and "requires a token" in error_line(proc)
    # wrong token -> the server's 403 as one line, the wrong token not echoed
    proc = run_cli(["-v", *base], clean_env(tmp_path, RAY_AUTH_TOKEN="0" * 64))  # debug logging on
    assert proc.returncode == 2 and "rejected the token" in error_line(proc)
    assert "0" * 64 not in proc.stdout + proc.stderr
    assert job_infos(cluster) == []  # nothing was submitted


@pytest.mark.ray
@pytest.mark.slow
def test_submit_wait_tiny_job_succeeds_without_leaking_token(cluster, tmp_path):
    token = Path(cluster.token_path).read_text().strip()
    out = tmp_path / "out"
    env = clean_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.token_path, RAY_ADDRESS="http://127.0.0.1:9")
    proc = run_cli(["-v", "submit", "train", "--address", cluster.dashboard_url, "--config", "jobs/configs/demo.toml",
                    "--set", "train.steps=2", "--set", f"train.out={out}", "--name", "tiny",
                    "--job-args=--local --no-progress", "--wait"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.splitlines()[0]
    assert sid.startswith("stylegen-train-tiny-") and f"ray job logs {sid}" in proc.stdout
    assert "SUCCEEDED" in proc.stderr
    assert list(out.glob("checkpoints/*/checkpoint.pt")), "the job did not train"
    assert token not in proc.stdout + proc.stderr
    [info] = [j for j in job_infos(cluster) if j["submission_id"] == sid]
    assert info["status"] == "SUCCEEDED" and info["metadata"]["stylegen_name"] == "tiny"
    assert token not in json.dumps(info)  # not in entrypoint, metadata or runtime_env


@pytest.mark.ray
@pytest.mark.slow
def test_submit_wait_reports_failed_job(cluster, tmp_path, tiny_config):
    env = clean_env(tmp_path, RAY_AUTH_TOKEN=Path(cluster.token_path).read_text().strip())
    proc = run_cli(["submit", "train", "--address", cluster.dashboard_url, "--config", str(tiny_config),
                    "--name", "fails", "--job-args=--no-such-flag", "--wait"], env, timeout=300)
    assert proc.returncode == 1
    assert "ended FAILED" in proc.stderr.splitlines()[-1]


"""``stylegen submit``: local checks (config, name, token, address) and, marked ``ray``,
submissions to a token-auth local cluster this module starts and stops by PID."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from s3server import refusing_port
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
    f.chmod(0o600)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("hometoken")
    (tmp_path / ".ray" / "auth_token").chmod(0o600)
    env = {"RAY_AUTH_TOKEN": "envtoken", "RAY_AUTH_TOKEN_PATH": str(f)}
    assert raycluster.find_token(env, tmp_path)[0] == "envtoken"
    assert raycluster.find_token({"RAY_AUTH_TOKEN_PATH": str(f)}, tmp_path)[0] == "filetoken"
    assert raycluster.find_token({}, tmp_path)[0] == "hometoken"
    assert raycluster.find_token({}, tmp_path / "nohome") is None
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):  # set but missing: an error, as in Ray
        raycluster.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620], ids=lambda m: f"{m:04o}")
def test_find_token_refuses_a_token_file_open_to_others(tmp_path, mode):
    """A token file group/others can read is refused, one line with the fix: for RAY_AUTH_TOKEN_PATH and for
    ~/.ray/auth_token (Ray writes that one with the umask's mode, 0644 under umask 022)."""
    f = tmp_path / "tok"
    f.write_text("filetoken\n")
    (tmp_path / ".ray").mkdir()
    home_tok = tmp_path / ".ray" / "auth_token"
    home_tok.write_text("hometoken")
    for path, env in ((f, {"RAY_AUTH_TOKEN_PATH": str(f)}), (home_tok, {})):
        path.chmod(mode)
        with pytest.raises(UserError) as e:
            raycluster.find_token(env, tmp_path)
        line = str(e.value)
        assert "\n" not in line and f"chmod 600 {path}" in line and f"{mode:04o}" in line
        assert "filetoken" not in line and "hometoken" not in line
        path.chmod(0o600)
        assert raycluster.find_token(env, tmp_path)[1].endswith(str(path) + ("" if env == {} else ")"))
    assert raycluster.find_token({"RAY_AUTH_TOKEN": "envtoken", "RAY_AUTH_TOKEN_PATH": str(f)}, tmp_path)[0] \
        == "envtoken"  # the variable wins, the file is not consulted


def test_submit_refuses_a_loose_default_token_file(tmp_path, tiny_config):
    """`stylegen submit` with Ray's own ~/.ray/auth_token at 0644: one line, exit 2, nothing contacted."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    tok = home / ".ray" / "auth_token"
    tok.write_text("t" * 64)
    tok.chmod(0o644)
    proc = run_cli(["submit", "train", "--address", "http://127.0.0.1:9", "--config", str(tiny_config)],
                   clean_env(home))
    assert proc.returncode == 2 and proc.stdout == ""
    line = error_line(proc)
    assert f"chmod 600 {tok}" in line and "reach" not in line and "t" * 64 not in proc.stderr


def test_token_file_is_private_and_kept(tmp_path):
    p = tmp_path / "d" / "auth_token"
    assert raycluster.ensure_token_file(p)
    token = p.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not raycluster.ensure_token_file(p) and p.read_text() == token


def test_reused_token_file_is_tightened_to_0600(tmp_path, caplog):
    p = tmp_path / "auth_token"
    p.write_text("existing-token\n")
    p.chmod(0o644)
    assert not raycluster.ensure_token_file(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and p.read_text() == "existing-token\n"
    assert any("tightened to 0600" in r.getMessage() and "existing-token" not in r.getMessage()
               for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_loose_token_file_of_another_user_is_refused(tmp_path):
    p = tmp_path / "auth_token"
    p.write_text("theirs\n")
    p.chmod(0o644)
    os.chown(p, 65534, 65534)
    with pytest.raises(UserError, match=r"owned by uid 65534.*chmod 600"):
        raycluster.ensure_token_file(p)


def test_local_up_reports_the_token_files_real_mode(tmp_path, monkeypatch, capsys):
    """`local-up.sh --token-path F` with an existing 0644 F: F ends 0600 and the message says what F has."""
    tok = tmp_path / "given_token"
    tok.write_text("given\n")
    tok.chmod(0o644)

    def fake_start(state_dir, *, token_path=None, **kw):  # the token handling of start_local_cluster, no Ray
        path = Path(token_path).resolve()
        raycluster.ensure_token_file(path)
        return raycluster.LocalCluster(str(state_dir), 1, None, 6390, 8275, str(path), str(tmp_path))

    monkeypatch.setattr(raycluster, "start_local_cluster", fake_start)
    assert raycluster.main(["up", "--state-dir", str(tmp_path / "state"), "--token-path", str(tok)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(tok.stat().st_mode) == 0o600
    assert f"token file (mode 0600, not printed here): {tok}" in out and "given" not in out.replace("given_token", "")


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


def _project_copy(dest: Path) -> Path:
    """A copy of what submit may upload from this checkout (stylegen/, jobs/, pyproject.toml)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for d in ("stylegen", "jobs"):
        shutil.copytree(ROOT / d, dest / d, ignore=ignore, symlinks=True)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_upload_skips_dotfiles_and_symlinks_out_of_the_allow_list(tmp_path, monkeypatch, caplog):
    """Planted in a copy of the project: jobs/.env, a dot-dir, a symlink to a file outside the tree, a
    symlinked dir outside, a symlink to the local cluster's token inside the tree, a non-source file.
    None is staged; a symlink to an allow-listed file inside the tree is staged as a plain copy."""
    proj = _project_copy(tmp_path / "proj")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("SECRET = 'outside-secret'\n")
    (proj / "runs" / "cluster").mkdir(parents=True)
    (proj / "runs" / "cluster" / "auth_token").write_text("token-secret")
    planted = {
        "jobs/.env": "AWS_SECRET_ACCESS_KEY=env-secret\n",
        "jobs/configs/.local.toml": "secret = 'dot-toml-secret'\n",
        "jobs/.cache/x.py": "SECRET = 'dotdir-secret'\n",
        "stylegen/.env": "env-secret-2\n",
        "jobs/notes.txt": "notes-secret\n",
    }
    for rel, text in planted.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(text)
    (proj / "jobs" / "leak.py").symlink_to(outside / "secret.py")
    (proj / "jobs" / "linked").symlink_to(outside, target_is_directory=True)
    (proj / "jobs" / "configs" / "token.toml").symlink_to(proj / "runs" / "cluster" / "auth_token")
    (proj / "jobs" / "alias.py").symlink_to(proj / "jobs" / "train.py")
    monkeypatch.setattr(submit, "project_root", lambda: proj)
    caplog.set_level("WARNING")
    with submit.staged_project("[train]\nsteps = 2\n") as stage:
        staged = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
        assert not [p for p in stage.rglob("*") if p.is_symlink()]
        contents = b"".join((stage / p).read_bytes() for p in staged if not p.endswith(".pt"))
        assert (stage / "jobs" / "alias.py").read_bytes() == (proj / "jobs" / "train.py").read_bytes()
    for rel in [*planted, "jobs/leak.py", "jobs/configs/token.toml", "runs/cluster/auth_token"]:
        assert rel not in staged, rel
    assert not [p for p in staged if p.startswith("jobs/linked") or any(s.startswith(".") for s in p.split("/"))]
    for secret in (b"outside-secret", b"token-secret", b"env-secret", b"dotdir-secret", b"notes-secret"):
        assert secret not in contents, secret
    assert {"jobs/train.py", "jobs/tune.py", "stylegen/cli.py", "stylegen/assets/pretrained.json",
            "pyproject.toml", submit.CONFIG_IN_JOB} <= staged
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "jobs/leak.py" in warned and "jobs/linked" in warned and "jobs/configs/token.toml" in warned
    # everything staged (but the config) is a .py/.toml under stylegen/ or jobs/, an asset, or pyproject.toml
    assert all(submit.upload_allowed(Path(p)) for p in staged - {submit.CONFIG_IN_JOB})


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
    with refusing_port() as port:
        proc = run_cli(["submit", "train", "--address", f"http://127.0.0.1:{port}", "--config", str(tiny_config),
                        "--timeout", "3"], clean_env(tmp_path, RAY_AUTH_TOKEN="x" * 64))
    assert proc.returncode == 2 and "cannot reach the Ray job server" in error_line(proc)
    assert time.monotonic() - t0 < 20
    assert "x" * 64 not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- against a local cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    c = raycluster.start_local_cluster(state, port=raycluster.free_port(), dashboard_port=raycluster.free_port(),
                                       num_cpus=2, timeout=240)  # a busy 2-core box: the head once took > 90 s
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



@pytest.mark.ray
@pytest.mark.slow
def test_submit_serve_deploys_an_app_that_answers_on_the_cluster(cluster, tmp_path):
    """`submit serve --wait`: the job (`stylegen serve --detach`) ends SUCCEEDED and leaves the Serve app on
    the cluster; POST /stylize to the node answers a PNG, with the bearer token whose hash alone went into the
    job. The module cluster's teardown stops the app with it."""
    from test_serve import CONTENT, STYLE, decode_png, post

    port = raycluster.free_port()
    token_file = tmp_path / "serve-token"
    token_file.write_text("s3cret-serve-token-for-the-test\n")
    token_file.chmod(0o600)
    env = clean_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.token_path)
    proc = run_cli(["submit", "serve", "--address", cluster.dashboard_url, "--http-port", str(port),
                    "--serve-token-file", str(token_file), "--wait"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.splitlines()[0]
    assert sid.startswith("stylegen-serve-")
    [info] = [j for j in job_infos(cluster) if j["submission_id"] == sid]
    assert info["status"] == "SUCCEEDED" and "s3cret" not in json.dumps(info)
    base = f"http://127.0.0.1:{port}"
    assert post(base, {"content": CONTENT, "style": STYLE}, token=None).status_code == 401
    r = post(base, {"content": CONTENT, "style": STYLE}, token="s3cret-serve-token-for-the-test")
    assert r.status_code == 200, r.text
    assert decode_png(r.content).shape == (64, 64, 3)

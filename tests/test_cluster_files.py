"""Cluster definitions parse, validate and point at files that exist; the local cluster scripts
start a token-auth cluster on free ports and stop exactly the processes they started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from stylegen import raycluster
from stylegen.config import load_config

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws-gpu.yaml"
KUBE = [ROOT / "cluster" / "kuberay" / "raycluster.yaml", ROOT / "cluster" / "kuberay" / "rayjob-train.yaml"]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
ALL = [AWS, *KUBE, DOCKERFILE, ROOT / "cluster" / "local-up.sh", ROOT / "cluster" / "local-down.sh"]
REPO_PATH = re.compile(r"(?<![\w/.-])(?:/app/)?((?:cluster|infra|jobs|stylegen|tests)/[\w./-]*\w)")


def referenced_paths(text: str) -> set[str]:
    return {m.group(1) for m in REPO_PATH.finditer(text)}


def test_every_referenced_repo_path_exists():
    seen = set()
    for f in ALL:
        refs = referenced_paths(f.read_text())
        missing = [r for r in refs if not (ROOT / r).exists()]
        assert not missing, f"{f.relative_to(ROOT)} references missing {missing}"
        seen |= refs
    # the references the deployment depends on are among them (the regex is not vacuous)
    assert {"infra/Dockerfile", "jobs/configs/imagenet64-8gpu.toml", "jobs/train.py"} <= seen


def test_referenced_configs_are_valid():
    for ref in {r for f in ALL for r in referenced_paths(f.read_text()) if r.endswith(".toml")}:
        cfg = load_config(ROOT / ref)
        assert cfg.ray.gpus_per_worker >= 0


def test_aws_config_passes_rays_schema_and_turns_auth_on():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS.read_text())
    validate_config(prepare_config(yaml.safe_load(AWS.read_text())))  # raises on unknown/missing fields
    head_cmd = " ".join(raw["head_start_ray_commands"])
    worker_cmd = " ".join(raw["worker_start_ray_commands"])
    for cmd in (head_cmd, worker_cmd):
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token" in cmd
    assert "--dashboard-host=127.0.0.1" in head_cmd
    assert "/home/ray/.ray/auth_token" in raw["file_mounts"]
    gpu = raw["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith(("g5.", "g6.", "p4", "p5"))
    assert not re.search(r"[0-9a-f]{64}", AWS.read_text()), "a token must never be in the file"


def _ray_containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        pods.append(doc["spec"]["submitterPodTemplate"])
    return [c for p in pods for c in p["spec"]["containers"]]


@pytest.mark.parametrize("path", KUBE, ids=lambda p: p.name)
def test_kuberay_auth_from_secret_and_gpu_workers(path):
    import ray

    [doc] = list(yaml.safe_load_all(path.read_text()))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    for c in _ray_containers(doc):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert "value" not in env["RAY_AUTH_TOKEN"], "the token must come from the Secret, not the file"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "stylegen-ray-auth", "key": "auth_token"}
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in spec["workerGroupSpecs"]]
    assert gpus and all(int(g) >= 1 for g in gpus)
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python /app/jobs/train.py")
        assert "s3://" in doc["spec"]["entrypoint"]


def test_dockerfile_is_consistent_with_the_project():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    first_from = next(i for i, ln in enumerate(lines) if ln.startswith("FROM"))
    assert any(ln.startswith("ARG BASE_IMAGE=") for ln in lines[:first_from])
    assert lines[first_from] == "FROM ${BASE_IMAGE}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in lines
    for ln in lines:
        if ln.startswith("COPY"):
            *sources, _dest = ln.split()[1:]
            for s in sources:
                if not any(ch in s for ch in "*?["):  # globs are optional by design (README.md*)
                    assert (ROOT / s).exists(), f"COPY source {s} missing"
    assert [ln for ln in lines if ln.startswith("USER")][-1] != "USER root"
    ignore = (ROOT / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] != "!" and "**" in ignore, "context must default to excluded (.venv, runs/ with tokens)"


# ----------------------------------------------------------------------------- local scripts

def _get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers=raycluster.auth_headers(token))
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.ray
@pytest.mark.slow
def test_local_up_down_scripts_start_token_cluster_and_stop_only_it(tmp_path):
    state = tmp_path / "state"
    port, dash = raycluster.free_port(), raycluster.free_port()
    # a bystander that looks like Ray by name: a name-based stop (`ray stop`, pkill) would hit it
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "ray", "start", "--head"],
                             start_new_session=True)
    up = subprocess.run([str(ROOT / "cluster" / "local-up.sh"), "--state-dir", str(state), "--port", str(port),
                         "--dashboard-port", str(dash), "--workers-node"],
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        c = raycluster.read_state(state)
        token = Path(c.token_path).read_text().strip()
        assert Path(c.token_path).parent == state and stat.S_IMODE(Path(c.token_path).stat().st_mode) == 0o600
        assert f"http://127.0.0.1:{dash}" in up.stdout and c.token_path in up.stdout
        assert token not in up.stdout + up.stderr
        assert int((state / "head.pid").read_text()) == c.head_pid and c.worker_pid is not None

        base = f"http://127.0.0.1:{dash}"
        with urllib.request.urlopen(f"{base}/api/authentication_mode", timeout=5) as r:
            assert json.load(r)["authentication_mode"] == "token"
        assert _get(f"{base}/api/version") == 401
        assert _get(f"{base}/api/version", "0" * 64) == 403
        assert _get(f"{base}/api/version", token) == 200
        from ray._private.services import get_node_ip_address

        ip = get_node_ip_address()
        if not ip.startswith("127."):  # the dashboard/job API is loopback only
            with pytest.raises(OSError), socket.create_connection((ip, dash), timeout=3):
                pass

        again = subprocess.run([str(ROOT / "cluster" / "local-up.sh"), "--state-dir", str(state)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "already running" in again.stderr

        groups = [c.head_pid, c.worker_pid]
        assert all(raycluster.group_alive(g) for g in groups)
    finally:
        down = subprocess.run([str(ROOT / "cluster" / "local-down.sh"), "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=120)
    try:
        assert down.returncode == 0, down.stderr
        assert f"{c.worker_pid}, {c.head_pid}" in down.stdout
        deadline = time.monotonic() + 10
        while any(raycluster.group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(raycluster.group_alive(g) for g in groups), "processes of the cluster survived local-down"
        assert decoy.poll() is None, "local-down stopped a process it did not start"
        assert not (state / "cluster.json").exists() and not Path(c.temp_dir).exists()
        gone = subprocess.run([str(ROOT / "cluster" / "local-down.sh"), "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode == 2 and "no local cluster state" in gone.stderr
    finally:
        os.killpg(decoy.pid, signal.SIGKILL)
        decoy.wait()

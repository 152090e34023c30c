"""Cluster definitions parse, validate (Ray's `ray up` schema, KubeRay's CRD schemas) and point at
files that exist. (What the local cluster scripts start, listen on and stop: tests/test_local_cluster.py.)"""

from __future__ import annotations

import argparse
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

from s3server import refusing_port
from stylegen import raycluster
from stylegen.config import load_config

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws-gpu.yaml"
KUBE = [ROOT / "cluster" / "kuberay" / n for n in ("raycluster.yaml", "rayjob-train.yaml", "common.yaml")]
CRD_SCHEMAS = ROOT / "tests" / "data" / "kuberay"  # copies of ../shared/kuberay-crd-schemas (see its README)
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


def test_aws_nodes_reach_s3_through_an_instance_role_and_the_job_stores_there():
    raw = yaml.safe_load(AWS.read_text())
    for name, node_type in raw["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert re.fullmatch(r"arn:aws:iam::[\w-]+:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")), name
    assert not re.search(r"AWS_(SECRET_)?ACCESS_KEY|aws_access_key_id", AWS.read_text(), re.I)
    configs = {r for r in referenced_paths(AWS.read_text()) if r.endswith(".toml")}
    assert configs, "the file names the job config it runs"
    for ref in configs:
        cfg = load_config(ROOT / ref)
        assert cfg.ray.storage.startswith("s3://"), (ref, cfg.ray.storage)
        assert cfg.data.content and all(c.startswith("s3://") for c in cfg.data.content + cfg.data.style), ref


# ----------------------------------------------------------------------------- KubeRay

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_pods(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _ray_containers(doc: dict) -> list[dict]:
    pods = _ray_pods(doc)
    if doc["kind"] == "RayJob":
        pods = pods + [doc["spec"]["submitterPodTemplate"]]
    return [c for p in pods for c in p["spec"]["containers"]]


RAY_DOCS = [(path, i) for path in KUBE for i, d in enumerate(_docs(path)) if d["kind"] in ("RayCluster", "RayJob")]


def _strict(schema):
    """Close every object schema that lists its properties: the API server's strict field validation
    (kubectl's default) rejects unknown fields, while plain JSON Schema would let a typo through."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: _strict(sub) for name, sub in v.items()} if k == "properties" else _strict(v))
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    import jsonschema

    out = {}
    for f in sorted(CRD_SCHEMAS.glob("kuberay-*.json")):
        crd = json.loads(f.read_text())
        jsonschema.Draft7Validator.check_schema(crd["schema"])
        out[crd["kind"]] = jsonschema.Draft7Validator(_strict(crd["schema"]))
    assert set(out) == {"RayCluster", "RayJob"}, f"schemas in {CRD_SCHEMAS}: {sorted(out)}"
    return out


def crd_errors(validators, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validators[doc["kind"]].iter_errors(doc)]


def check_token_auth(doc: dict) -> None:
    """authOptions turns token auth on with our Secret (KubeRay >= 1.6.0 reads secretName); no Ray
    container carries a token of its own."""
    auth = _cluster_spec(doc).get("authOptions")
    assert auth == {"mode": "token", "secretName": "stylegen-ray-auth"}, f"{doc['kind']} authOptions: {auth}"
    for c in _ray_containers(doc):
        for e in c.get("env", []):
            assert not (e["name"].startswith("RAY_AUTH") and "value" in e and e["name"] != "RAY_AUTH_MODE"), c["name"]


def test_kuberay_crd_schemas_are_the_shared_copies():
    shared = ROOT.parent / "shared" / "kuberay-crd-schemas"
    if not shared.is_dir():
        pytest.skip("no ../shared here (a clean clone): the repo's copies are used")
    for f in CRD_SCHEMAS.glob("kuberay-*.json"):
        assert f.read_bytes() == (shared / f.name).read_bytes(), f"{f.name} differs from {shared}"


@pytest.mark.parametrize("path,index", RAY_DOCS, ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_kuberay_documents_pass_the_crd_schema_with_token_auth(path, index, crd_validators):
    import ray

    doc = _docs(path)[index]
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(crd_validators, doc) == []
    check_token_auth(doc)
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    major, minor = map(int, spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "KubeRay's token auth needs rayVersion >= 2.52"
    text = path.read_text()
    assert "KubeRay operator >= 1.6.0" in text and "2.52" in text, "say which KubeRay and Ray it needs"
    assert not re.search(r"[0-9a-f]{64}", text), "a token must never be in the file"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in spec["workerGroupSpecs"]]
    assert gpus and all(int(g) >= 1 for g in gpus)
    for pod in _ray_pods(doc):
        assert pod["metadata"]["labels"]["stylegen.io/role"] == "ray-node"  # what the NetworkPolicy admits
        assert pod["spec"]["serviceAccountName"] == "stylegen-s3"            # IRSA: S3 without keys
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_kuberay_schema_check_rejects_bad_documents(crd_validators):
    import copy

    for path, index in RAY_DOCS:
        doc = _docs(path)[index]
        spec_path = ["spec", "rayClusterSpec"] if doc["kind"] == "RayJob" else ["spec"]

        def mutated(change):
            d = copy.deepcopy(doc)
            spec = d
            for k in spec_path:
                spec = spec[k]
            change(spec)
            return d

        typo = mutated(lambda s: s.update(authOption=s.pop("authOptions")))  # a misspelt field
        assert any("authOption" in e for e in crd_errors(crd_validators, typo)), path.name
        with pytest.raises(AssertionError):
            check_token_auth(typo)
        gone = mutated(lambda s: s.pop("authOptions"))  # valid for KubeRay, but auth is off
        assert crd_errors(crd_validators, gone) == []
        with pytest.raises(AssertionError):
            check_token_auth(gone)
        bad_mode = mutated(lambda s: s["authOptions"].update(mode="Token"))
        assert any("authOptions.mode" in e for e in crd_errors(crd_validators, bad_mode)), path.name
        deep = mutated(lambda s: s["headGroupSpec"]["template"]["spec"].update(serviceAcountName="x"))
        assert crd_errors(crd_validators, deep), "unknown fields deep in the pod template are caught too"


def test_kuberay_rayjob_trains_from_s3_shards_into_s3_storage():
    import shlex

    from stylegen.train.cli import add_arguments

    [job] = [d for d in _docs(KUBE[1]) if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/jobs/train.py"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(argv[2:])
    assert args.storage.startswith("s3://") and args.name
    cfg = load_config(ROOT / args.config.removeprefix("/app/"), args.overrides)
    assert cfg.data.content and all(u.startswith("s3://") for u in cfg.data.content + cfg.data.style)
    assert job["spec"]["submitterPodTemplate"]["metadata"]["labels"]["stylegen.io/role"] == "ray-submitter"


def test_kuberay_common_has_the_irsa_account_and_a_network_policy_that_fits_the_pods():
    docs = {d["kind"]: d for d in _docs(KUBE[2])}
    sa = docs["ServiceAccount"]
    assert sa["metadata"]["name"] == "stylegen-s3"
    assert re.fullmatch(r"arn:aws:iam::[\w-]+:role/[\w+=,.@-]+", sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    pol = docs["NetworkPolicy"]
    assert pol["apiVersion"] == "networking.k8s.io/v1" and pol["spec"]["policyTypes"] == ["Ingress"]
    ray_node = {"stylegen.io/role": "ray-node"}
    assert pol["spec"]["podSelector"] == {"matchLabels": ray_node}
    admitted: dict[str, set] = {}  # who -> ports (None = every port)
    for rule in pol["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]} if "ports" in rule else None
        assert all(p.get("protocol", "TCP") == "TCP" for p in rule.get("ports", []))
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: label selectors only"
            assert peer["podSelector"]["matchLabels"], "a peer without a pod selector admits whole namespaces"
            who = next(iter(peer["podSelector"]["matchLabels"].values()))
            admitted[who] = ports
    assert admitted == {"ray-node": None, "ray-submitter": {8265}, "kuberay-operator": {8265},
                        "prometheus": {8080, 44217, 44227}}
    # GCS, client server, and every other Ray port: Ray pods only
    assert all(6379 not in (p or set()) and 10001 not in (p or set()) for w, p in admitted.items() if w != "ray-node")


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


# ----------------------------------------------------------------------------- local cluster start

def test_cluster_ports_are_distinct_and_below_the_kernels_ephemeral_range():
    """Ports handed to Ray come from below the range where the kernel picks ports for other processes'
    port-0 binds and outgoing connections (which once took the head's dashboard-agent port between our
    pick and Ray's bind), and never twice for one cluster."""
    low, _ = raycluster.ephemeral_range()
    taken: set[int] = set()
    ports = [raycluster.free_port(taken) for _ in range(60)]
    assert len(set(ports)) == 60 and taken == set(ports)
    assert all(raycluster.LOW_PORT <= p < low for p in ports), ports
    with socket.socket() as s:  # each was free when picked
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_or_already_taken_is_never_picked(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        in_use = busy.getsockname()[1]
        draws = iter([in_use, 20001, 20001, 20002])  # in_use: any port; the draw is scripted

        class Scripted:
            def randrange(self, a, b):
                return next(draws)

        monkeypatch.setattr(raycluster.random, "SystemRandom", Scripted)
        monkeypatch.setattr(raycluster, "ephemeral_range", lambda: (60000, 60999))  # in_use counts as below it
        taken: set[int] = set()
        assert raycluster.free_port(taken) == 20001  # in_use was drawn first: it is listening
        assert raycluster.free_port(taken) == 20002  # 20001 again: this cluster already has it
    # too narrow a range below the ephemeral one: the kernel picks, still never a taken port
    monkeypatch.setattr(raycluster, "ephemeral_range", lambda: (raycluster.LOW_PORT + 10, 60999))
    assert raycluster.free_port(taken) not in {20001, 20002}


def test_kill_group_ends_a_child_and_what_it_started_and_tolerates_a_gone_group():
    from stylegen.procs import kill_group, pid_alive

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "print(c.pid, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(parent.stdout.readline())
    kill_group(parent.pid)
    assert parent.wait(timeout=10) == -9
    deadline = time.monotonic() + 10
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(grandchild)  # the whole group, not only the process we started
    kill_group(parent.pid)  # nothing left: no error


def test_waiting_for_a_worker_node_stops_when_its_ray_start_has_exited(tmp_path):
    """A worker node whose `ray start` died (Ray's 30 s raylet registration limit on a loaded machine)
    never joins: the wait fails at once, naming its log, instead of waiting out the timeout."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    log = tmp_path / "worker.log"
    t0 = time.monotonic()
    with refusing_port() as port, pytest.raises(raycluster.UserError, match=f"exited before it joined; see {log}"):
        raycluster._wait_nodes(f"http://127.0.0.1:{port}", "token", 2, 60, gone.pid, log)
    assert time.monotonic() - t0 < 10


def test_a_node_that_hit_rays_registration_limit_is_started_again_once(tmp_path, monkeypatch):
    """`ray start` exits when its raylet has not registered within Ray's hard-coded 30 s (a loaded
    machine): that failure, and only that one, gets one more start; a second one is raised."""
    log = tmp_path / "head.log"
    log.write_text("Exception: The current node timed out during startup. This could happen because ...\n")
    assert isinstance(raycluster._exited("the head", log), raycluster.NodeStartFailed)
    log.write_text("ValueError: Failed to bind to 127.0.0.1:6379: address already in use\n")
    other = raycluster._exited("the head", log)
    assert isinstance(other, raycluster.UserError) and not isinstance(other, raycluster.NodeStartFailed)
    assert str(other) == f"the head's ray start exited before it joined; see {log}"

    calls = []

    def start(failures):
        def once(*args):
            calls.append(args)
            if failures:
                raise failures.pop(0)
            return "cluster"
        return once

    monkeypatch.setattr(raycluster, "_start_once", start([raycluster.NodeStartFailed("the head's ray start exited")]))
    assert raycluster.start_local_cluster(tmp_path / "a") == "cluster" and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(raycluster, "_start_once", start([raycluster.UserError("port in use")]))
    with pytest.raises(raycluster.UserError, match="port in use"):
        raycluster.start_local_cluster(tmp_path / "b")
    assert len(calls) == 1  # not a registration timeout: not started again
    calls.clear()
    monkeypatch.setattr(raycluster, "_start_once", start([raycluster.NodeStartFailed("1st"),
                                                         raycluster.NodeStartFailed("2nd")]))
    with pytest.raises(raycluster.NodeStartFailed, match="2nd"):
        raycluster.start_local_cluster(tmp_path / "c")
    assert len(calls) == 2


def test_readme_cluster_runbook_commands_parse_and_their_configs_load():
    """Every `stylegen ...` line of README's runbook is a valid command line (flags that exist), and
    each --config with its --set overrides loads: the runbook cannot drift from the CLI."""
    import shlex

    from stylegen.cli import build_parser

    text = (ROOT / "README.md").read_text()
    block = text.split("### Runbook", 1)[1].split("```", 2)[1]
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(ln.split(" #", 1)[0]) for ln in lines if ln.startswith("stylegen ")]
    assert {c[1] for c in commands} >= {"shard", "submit", "best", "stylize", "eval"}, commands
    for argv in commands:
        try:
            args = build_parser(argv[1]).parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"README runbook: {shlex.join(argv)} does not parse")
        if getattr(args, "config", None):
            cfg = load_config(ROOT / args.config, args.overrides)
            assert all(u.startswith("s3://BUCKET/") for u in cfg.data.content + cfg.data.style), shlex.join(argv)
            assert cfg.ray.storage.startswith("s3://BUCKET/"), shlex.join(argv)

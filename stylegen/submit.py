"""``stylegen submit {train|tune} --address http://HOST:8265 --config F [--set ...] [--name N] [--wait]``.

``stylegen submit serve --address URL [--checkpoint CKPT] [--http-host H] [--http-port P]
[--serve-token-file F]`` deploys ``stylegen serve`` on the cluster the same way: a job (same
upload allow-list, same token checks) whose entrypoint is ``python -m stylegen serve --detach``;
the Serve app outlives the job. Its bearer token never leaves this machine: only its SHA-256
is in the entrypoint (``--token-sha256``), which is all the replicas compare against.

Everything that can be checked before talking to the cluster is checked first: the
config is resolved and validated locally, the name is checked, and a token must be
found (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) unless
``--no-token`` says the cluster has no auth. Then one authenticated request with a
short timeout tells an unreachable address, a missing token (401) and a wrong token
(403) apart, each as one line. Only then is the job submitted.

What is uploaded is an allow-list, staged in a temp dir: the ``*.py`` and ``*.toml`` files under
``stylegen/`` and ``jobs/``, ``stylegen/assets/*``, ``pyproject.toml`` and the resolved config as
``_submit/config.toml`` — never dot-files (``jobs/.env``), symlinks leading off the allow-list,
``.venv``, ``runs/`` (which holds the local cluster's token), ``.git`` or caches. The token only
travels in the HTTP ``Authorization`` header: it is not in the entrypoint, the
runtime_env or the job metadata, and nothing here prints or logs it. The job's own
Ray calls authenticate with the cluster's token from the head node's environment.

The entrypoint runs ``<python> jobs/<kind>.py --config _submit/config.toml ...`` through
the head node's shell; ``--python`` defaults to ``python`` from the cluster's PATH (the
image's python on a real cluster; ``cluster/local-up.sh`` puts the venv first on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from stylegen.config import check_name, load_config, to_toml
from stylegen.config_cli import add_config_arguments
from stylegen.errors import UserError
from stylegen.preflight import parse_result
from stylegen.raycluster import auth_headers, find_token, resolve_job_address
from stylegen.raylogs import verbose
from stylegen.serve import check_bind, find_serve_token, token_digest

log = logging.getLogger(__name__)

KINDS = ("train", "tune", "serve")
CONFIG_IN_JOB = "_submit/config.toml"
# The upload allow-list (see upload_allowed): *.py and *.toml under UPLOAD_DIRS, the package's
# assets (pyproject.toml's package-data) and the top-level files named here.
UPLOAD_DIRS = ("stylegen", "jobs")
UPLOAD_SUFFIXES = (".py", ".toml")
UPLOAD_ASSETS = ("stylegen", "assets")
UPLOAD_TOP = ("pyproject.toml",)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="which job: train (jobs/train.py), tune (jobs/tune.py) or serve "
                                               "(stylegen serve, left running on the cluster)")
    p.add_argument("--address", default=None, metavar="URL",
                   help="job server of the head: http://HOST:8265 (default $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)")
    add_config_arguments(p)
    p.add_argument("--name", default=None, help="run name (default: ray.name of the config); part of the submission id")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its final status")
    p.add_argument("--no-token", action="store_true",
                   help="send no auth token: only for a cluster started without token auth")
    p.add_argument("--python", default="python", metavar="EXE",
                   help="python on the head node that runs the entrypoint (default: 'python' from the cluster's PATH)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="connect/answer timeout in seconds (default 10)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the check that every node reaches the storage and shards (a short job of its own)")
    p.add_argument("--job-args", default="", metavar="'ARGS'",
                   help="extra arguments for the job's command as one string, written with '=' "
                        "(e.g. --job-args='--workers 4 --storage s3://b/p')")
    g = p.add_argument_group("serve", "only for `submit serve`")
    g.add_argument("--checkpoint", metavar="CKPT|SWEEP",
                   help="what to serve, as the cluster sees it: s3://... or a path on the cluster "
                        "(default: the shipped model)")
    g.add_argument("--http-host", default="127.0.0.1",
                   help="where Serve listens on the cluster's nodes (default 127.0.0.1; others need a token)")
    g.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP port (default 8000)")
    g.add_argument("--serve-token-file", metavar="F",
                   help="file (mode 0600) holding the bearer token POST /stylize will need (or $STYLEGEN_SERVE_TOKEN)")
    g.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")


def reach_job_server(args: argparse.Namespace) -> tuple[str, dict]:
    """The job server's address and auth headers (the cluster's Ray token unless --no-token), checked
    to answer before anything is uploaded."""
    address = resolve_job_address(args.address)
    token = None
    if not args.no_token:
        found = find_token()
        if found is None:
            raise UserError("no Ray auth token: set RAY_AUTH_TOKEN_PATH to the cluster's token file (or RAY_AUTH_TOKEN, "
                            "or put it in ~/.ray/auth_token); pass --no-token only if the cluster has no auth")
        token, source = found
        log.debug("using the Ray auth token from %s", source)
    headers = auth_headers(token)
    check_job_server(address, headers, args.timeout, token_given=token is not None)
    return address, headers


def run(args: argparse.Namespace) -> int:
    if args.kind == "serve":
        return run_serve(args)
    cfg_text, name = resolve_job_config(args.config, args.overrides, args.name)
    job_args = split_job_args(args.job_args)
    if not 0 < args.timeout <= 600:
        raise UserError(f"--timeout {args.timeout:g}: expected seconds in (0, 600]")
    if "--storage" not in " ".join(job_args):
        warn_if_relative_storage(cfg_text)
    address, headers = reach_job_server(args)

    submission_id = make_submission_id(args.kind, name)
    entrypoint = build_entrypoint(args.python, args.kind, name, job_args)
    metadata = {"stylegen_kind": args.kind, "stylegen_name": name, "stylegen_config": Path(args.config).name,
                "submitted_by": "stylegen submit"}
    with staged_project(cfg_text) as working_dir:
        client = _client(address, headers)
        if not verbose():  # Ray's SDK narrates each upload at INFO/WARNING; -v shows it
            # (after the client exists: importing Ray's SDK re-applies Ray's logging config)
            for logger_name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
                logging.getLogger(logger_name).setLevel(logging.ERROR)
        if not args.no_preflight:
            preflight(client, working_dir, args.python, storage_arg(job_args), name, timeout=300)
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
                              runtime_env={"working_dir": str(working_dir), "env_vars": {"PYTHONUNBUFFERED": "1"}})
        except Exception as e:  # the SDK raises RuntimeError / AuthenticationError / requests errors
            raise UserError(f"submitting to {address} failed: {_one_line(e)}") from None

    q = shlex.quote
    print(submission_id)
    print(f"  status: ray job status {q(submission_id)} --address {q(address)}")
    print(f"  logs:   ray job logs {q(submission_id)} --address {q(address)} --follow")
    print(f"  stop:   ray job stop {q(submission_id)} --address {q(address)}")
    if not args.no_token:
        print("  (the ray CLI sends the token only with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN[_PATH] set)")
    sys.stdout.flush()
    return wait_for_job(client, submission_id) if args.wait else 0


def serve_entrypoint(args: argparse.Namespace, job_args: list[str]) -> tuple[str, str]:
    """(entrypoint, name) of a ``submit serve`` job, checked locally first: the bind needs a token off loopback,
    and only the token's SHA-256 goes into the command line."""
    name = check_name(args.name or "serve", "run name")
    if not 1 <= args.http_port <= 65535 or args.replicas < 1:
        raise UserError("--http-port must be in 1-65535 and --replicas >= 1")
    token = find_serve_token(None, args.serve_token_file)
    check_bind(args.http_host, token)
    if args.checkpoint and "://" not in args.checkpoint and not args.checkpoint.startswith("/"):
        raise UserError(f"--checkpoint {args.checkpoint!r} is relative: the cluster cannot see this machine's files; "
                        "pass s3://... or an absolute path on the cluster (or nothing: the shipped model)")
    argv = [args.python, "-m", "stylegen", "serve", "--detach", "--host", args.http_host,
            "--port", str(args.http_port), "--replicas", str(args.replicas)]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    if token is not None:
        argv += ["--token-sha256", token_digest(token)]
    return shlex.join([*argv, *job_args]), name


def run_serve(args: argparse.Namespace) -> int:
    """``submit serve``: the same checks and upload as train/tune, no config and no preflight."""
    if not 0 < args.timeout <= 600:
        raise UserError(f"--timeout {args.timeout:g}: expected seconds in (0, 600]")
    entrypoint, name = serve_entrypoint(args, split_job_args(args.job_args))
    address, headers = reach_job_server(args)
    submission_id = make_submission_id("serve", name)
    with staged_project("# stylegen submit serve: no training config\n") as working_dir:
        client = _client(address, headers)
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                              metadata={"stylegen_kind": "serve", "stylegen_name": name,
                                        "submitted_by": "stylegen submit"},
                              runtime_env={"working_dir": str(working_dir), "env_vars": {"PYTHONUNBUFFERED": "1"}})
        except Exception as e:
            raise UserError(f"submitting to {address} failed: {_one_line(e)}") from None
    print(submission_id)
    print(f"  the app listens on {args.http_host}:{args.http_port} of the cluster's nodes once the job has SUCCEEDED")
    print(f"  logs: ray job logs {shlex.quote(submission_id)} --address {shlex.quote(address)}")
    sys.stdout.flush()
    return wait_for_job(client, submission_id) if args.wait else 0


# ----------------------------------------------------------------------------- pure parts

def resolve_job_config(config: str | None, overrides: list[str], name: str | None) -> tuple[str, str]:
    """Validate the config locally and return (resolved TOML with ray.name set, run name)."""
    if not config:
        raise UserError("--config is required: the TOML the job trains with (e.g. jobs/configs/demo.toml)")
    cfg = load_config(config, overrides)
    if name is not None:  # the config's rule (load_config checked ray.name with it already)
        cfg.ray.name = check_name(name, "run name")
    return to_toml(cfg), cfg.ray.name


def warn_if_relative_storage(cfg_text: str) -> None:
    """A relative ray.storage lands in the job's temporary working dir on the head."""
    import tomllib

    storage = tomllib.loads(cfg_text)["ray"]["storage"]
    if "://" not in storage and not storage.startswith("/"):
        log.warning("ray.storage=%r is relative: on the cluster it lands in the job's temporary working dir; "
                    "pass --set ray.storage=s3://bucket/prefix (or a shared absolute path) to keep the run", storage)


def split_job_args(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"--job-args {text!r}: {e}; quote it like a shell command line") from None


def make_submission_id(kind: str, name: str, now: datetime | None = None) -> str:
    """``stylegen-<kind>-<name>-<UTC yyyymmddThhmmssZ>``: readable and unique per second."""
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"stylegen-{kind}-{name}-{stamp}"


def build_entrypoint(python: str, kind: str, name: str, job_args: list[str]) -> str:
    """The shell command the head runs; every part is quoted (no shell built from raw input)."""
    argv = [python, f"jobs/{kind}.py", "--config", CONFIG_IN_JOB]
    if kind == "train":
        argv += ["--name", name]
    return shlex.join([*argv, *job_args])


def project_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "jobs" / "train.py").is_file():
        raise UserError(f"no jobs/ beside the stylegen package in {root}: run stylegen submit from a source checkout")
    return root


def upload_allowed(rel: Path) -> bool:
    """Whether a project-relative path is on the upload allow-list; dot-files never are."""
    parts = rel.parts
    if not parts or any(part.startswith(".") or part == "__pycache__" for part in parts):
        return False
    if len(parts) == 1:
        return parts[0] in UPLOAD_TOP
    if parts[0] not in UPLOAD_DIRS:
        return False
    return rel.suffix in UPLOAD_SUFFIXES or (len(parts) == 3 and parts[:2] == UPLOAD_ASSETS)


def upload_files(root: Path) -> list[Path]:
    """Project-relative paths of the files ``submit`` uploads: allow-listed regular files under
    ``UPLOAD_DIRS`` plus ``UPLOAD_TOP``. Dot-files and dot-dirs are never visited; a symlink is
    taken (as a copy of its target) only when it resolves to an allow-listed file inside ``root``,
    otherwise it is skipped with a warning; symlinked directories are not followed."""
    root = root.resolve()
    found: list[Path] = []

    def consider(path: Path) -> None:
        rel = path.relative_to(root)
        if not upload_allowed(rel):
            return
        if path.is_symlink():
            target = path.resolve()
            if not (target.is_relative_to(root) and target.is_file() and upload_allowed(target.relative_to(root))):
                log.warning("not uploading %s: a symlink to %s, outside the upload allow-list", rel, target)
                return
        elif not path.is_file():  # FIFOs, devices, sockets
            return
        found.append(rel)

    for top in UPLOAD_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / top):  # does not descend into symlinked dirs
            here = Path(dirpath)
            for d in list(dirnames):
                if d.startswith(".") or d == "__pycache__" or d.endswith(".egg-info"):
                    dirnames.remove(d)
                elif (here / d).is_symlink():
                    dirnames.remove(d)
                    log.warning("not uploading %s: a symlinked directory", (here / d).relative_to(root))
            dirnames.sort()
            for f in sorted(filenames):
                consider(here / f)
    for name in UPLOAD_TOP:
        if (root / name).exists() or (root / name).is_symlink():
            consider(root / name)
    return found


@contextlib.contextmanager
def staged_project(config_toml: str) -> Iterator[Path]:
    """A temp dir with the allow-listed project files (``upload_files``) and the resolved config."""
    root = project_root()
    with tempfile.TemporaryDirectory(prefix="stylegen-submit-") as tmp:
        stage = Path(tmp) / "project"
        stage.mkdir()
        for rel in upload_files(root):
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, stage / rel)  # contents only (a vetted symlink's target)
        (stage / CONFIG_IN_JOB).parent.mkdir()
        (stage / CONFIG_IN_JOB).write_text(config_toml, encoding="utf-8")
        yield stage


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def storage_arg(job_args: list[str]) -> str | None:
    """The ``--storage`` a job's own arguments set (it overrides ray.storage), if any."""
    for i, a in enumerate(job_args):
        if a.startswith("--storage="):
            return a.split("=", 1)[1]
        if a == "--storage" and i + 1 < len(job_args):
            return job_args[i + 1]
    return None


# ----------------------------------------------------------------------------- cluster calls

def preflight(client, working_dir: Path, python: str, storage: str | None, name: str, timeout: float) -> dict:
    """Run ``stylegen.preflight`` as a job on the cluster (one tiny task per node); raise UserError
    naming the first problem when a node cannot reach the storage or the shards."""
    import time

    argv = [python, "-m", "stylegen.preflight", "--config", CONFIG_IN_JOB]
    if storage:
        argv += ["--storage", storage]
    job_id = f"{make_submission_id('preflight', name)}-{os.urandom(3).hex()}"
    try:
        client.submit_job(entrypoint=shlex.join(argv), submission_id=job_id,
                          runtime_env={"working_dir": str(working_dir)}, metadata={"submitted_by": "stylegen submit"})
        deadline = time.monotonic() + timeout
        while (status := str(client.get_job_status(job_id)).rsplit(".", 1)[-1]) not in TERMINAL:
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise UserError(f"the preflight job {job_id} did not finish within {timeout:.0f} s; "
                                "check the cluster, or pass --no-preflight")
            time.sleep(0.5)
        logs = client.get_job_logs(job_id)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"the preflight job on the cluster failed to run: {_one_line(e)}") from None
    result = parse_result(logs)
    if result is None:
        last = next((ln for ln in reversed(logs.splitlines()) if ln.strip()), status)
        raise UserError(f"the preflight job ended {status} without a result ({_one_line(Exception(last))}); "
                        "pass --no-preflight to skip it")
    if result["problems"]:
        more = len(result["problems"]) - 1
        raise UserError(f"preflight on {result['nodes']} node(s): {result['problems'][0]}"
                        + (f" (and {more} more problem(s))" if more else ""))
    log.info("preflight: %d node(s) reach the storage and the shards", result["nodes"])
    return result


def check_job_server(address: str, headers: dict[str, str], timeout: float, *, token_given: bool) -> str:
    """One authenticated GET of /api/version; returns the cluster's Ray version or raises UserError."""
    import ray
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=timeout)
    except requests.exceptions.Timeout:
        raise UserError(f"the Ray job server at {address} did not answer within {timeout:g} s; check the address "
                        f"and that the cluster (or your SSH tunnel) is up") from None
    except requests.exceptions.RequestException as e:
        raise UserError(f"cannot reach the Ray job server at {address} ({type(e).__name__}); check the address/port "
                        f"and that the cluster (or your SSH tunnel) is up") from None
    if r.status_code == 401:
        raise UserError(f"the cluster at {address} requires a token and none was sent; drop --no-token and set "
                        f"RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token")
    if r.status_code == 403:
        which = "the token" if token_given else "the request"
        raise UserError(f"the cluster at {address} rejected {which} (HTTP 403: wrong token); set RAY_AUTH_TOKEN_PATH "
                        f"(or RAY_AUTH_TOKEN) to this cluster's token")
    if r.status_code == 404:
        raise UserError(f"{address} answered but has no Ray job API (HTTP 404); pass the head's dashboard port "
                        f"(Ray's default is 8265)")
    try:
        r.raise_for_status()
        version = str(r.json()["ray_version"])
    except (requests.exceptions.HTTPError, ValueError, KeyError, TypeError):
        raise UserError(f"{address} is not a Ray job server (HTTP {r.status_code} on /api/version)") from None
    if version != ray.__version__:
        log.warning("cluster runs Ray %s, this client %s: keep them equal", version, ray.__version__)
    return version


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address: hide them."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str, headers: dict[str, str]):
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            return JobSubmissionClient(address, headers=dict(headers))
    except Exception as e:
        raise UserError(f"connecting to the job server at {address} failed: {_one_line(e)}") from None


def wait_for_job(client, submission_id: str, poll: float = 1.0) -> int:
    """Stream the job's logs to stdout until it ends; 0 if it SUCCEEDED, 1 otherwise."""
    import time

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except Exception as e:  # the log stream broke: fall back to polling the status
            log.warning("log stream ended early (%s); polling the job status", _one_line(e))
        while (status := str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]) not in TERMINAL:
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"stylegen submit: stopped following; the job keeps running (ray job stop {submission_id})",
              file=sys.stderr)
        raise
    except Exception as e:
        raise UserError(f"following job {submission_id} failed: {_one_line(e)}") from None
    if status == "SUCCEEDED":
        print(f"job {submission_id}: SUCCEEDED", file=sys.stderr)
        return 0
    message = client.get_job_info(submission_id).message or ""
    print(f"stylegen submit: job {submission_id} ended {status}: {_one_line(Exception(message))}", file=sys.stderr)
    return 1

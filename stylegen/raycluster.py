"""Ray cluster helpers: token lookup, job-server address, and a local token-auth cluster.

Token rules follow Ray 2.60 (read from ``ray/_private/authentication`` and checked
against ``AuthenticationTokenLoader``): the token comes from ``RAY_AUTH_TOKEN``, else
the file named by ``RAY_AUTH_TOKEN_PATH`` (an error if set but unreadable), else
``~/.ray/auth_token``; surrounding whitespace is ignored. A head started with
``RAY_AUTH_MODE=token`` requires it on the dashboard/job API (401 without a token, 403
with a wrong one) and on every gRPC call.

The local cluster is ``ray start --block`` run in the background: ``ray start`` makes
itself a process-group leader and its reaper tears the group down when it dies, so
stopping the PID in our PID file (signalling its group) stops exactly what we started.
Never ``ray stop``: it stops every Ray on the machine, including other people's.

Loopback only. Ray 2.60 binds GCS, raylet, object manager, core workers (C++ gRPC), the
dashboard agent, the client server and the metrics endpoints to 127.0.0.1 only when the
node's IP *is* 127.0.0.1; otherwise they listen on every interface. ``ray start
--node-ip-address 127.0.0.1`` does not get there on Linux: ``resolve_ip_for_localhost``
rewrites a loopback address to the routable one. Ray keeps loopback only where
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its macOS/Windows default), so every process of
the cluster, and every process that connects to its GCS, runs with it (``cluster_env``).
That variable also makes the ``ray start`` CLI refuse a worker node, so the worker node's
``ray start`` runs through ``_ray_start_loopback``. README "Ports and listeners" lists
what is left (measured by tests/test_local_cluster.py).

``python -m stylegen.raycluster up|down|status`` backs ``cluster/local-up.sh`` and
``cluster/local-down.sh``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from stylegen.errors import UserError
from stylegen.procs import kill_group, pid_alive

log = logging.getLogger(__name__)
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
# "0": Ray resolves this node's IP to 127.0.0.1 (its macOS/Windows behaviour); see the module doc.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_IP = "127.0.0.1"
STATE_FILE = "cluster.json"
DEFAULT_STATE_DIR = "runs/cluster"
DEFAULT_PORT = 6390            # Ray's default is 6379
DEFAULT_DASHBOARD_PORT = 8275  # Ray's default is 8265


# ----------------------------------------------------------------------------- token

def find_token(env: dict[str, str] | None = None, home: Path | None = None) -> tuple[str, str] | None:
    """(token, where it came from) in Ray's order, or None. Never logs the token.

    A token file open to group or others is refused (UserError naming ``chmod 600 PATH``):
    whoever can read it can run code on the cluster. Ray itself writes ``~/.ray/auth_token``
    with the umask's mode (0644 under umask 022), so that file is checked too.
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"{TOKEN_PATH_ENV}={str(path)!r} cannot be read ({e.strerror}); "
                            f"point it at the cluster's token file or unset it") from None
        if not token:
            raise UserError(f"{TOKEN_PATH_ENV}={str(path)!r} is empty; point it at the cluster's token file")
        check_token_file_mode(path)
        return token, f"${TOKEN_PATH_ENV} ({path})"
    path = (home or Path.home()) / ".ray" / "auth_token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not token:
        return None
    check_token_file_mode(path)
    return token, str(path)


def check_token_file_mode(path: Path) -> None:
    """Refuse a token file that group or others may read or write (one line, with the fix)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserError(f"token file {str(path)!r} is open to group/others (mode {mode:04o}): anyone who can read "
                        f"it can run code on the cluster; run: chmod 600 {shlex.quote(str(path))}")


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def ensure_token_file(path: Path) -> bool:
    """Create a 256-bit token file (mode 0600, atomic) if missing; True if created.

    An existing token file is reused at mode 0600: one we own is tightened (with a warning)
    if group or others had access; one owned by someone else that is open to others is refused.
    """
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        st = path.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            if st.st_uid != os.geteuid():
                raise UserError(f"token file {str(path)!r} is open to group/others (mode {mode:04o}) and owned by "
                                f"uid {st.st_uid}, not you: its owner must run chmod 600 {shlex.quote(str(path))}, "
                                f"or pass another --token-path")
            os.chmod(path, 0o600)
            log.warning("token file %s was open to group/others (mode %04o): tightened to 0600", path, mode)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- address

def resolve_job_address(address: str | None, env: dict[str, str] | None = None) -> str:
    """The job server URL: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    env = os.environ if env is None else env
    addr = (address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or "").strip()
    if not addr:
        raise UserError("no cluster address: pass --address http://HOST:8265 (the head's dashboard/job port) "
                        "or set RAY_API_SERVER_ADDRESS")
    if "://" not in addr:
        addr = f"http://{addr}"
    u = urlparse(addr)
    if u.scheme not in ("http", "https") or not u.hostname or u.port is None:
        raise UserError(f"--address {addr!r}: expected http://HOST:PORT of the head's job server "
                        f"(e.g. http://127.0.0.1:8265), not a Ray client/GCS address")
    return addr.rstrip("/")


# ----------------------------------------------------------------------------- local cluster

@dataclass
class LocalCluster:
    state_dir: str
    head_pid: int
    worker_pid: int | None
    port: int
    dashboard_port: int
    token_path: str
    temp_dir: str
    ports: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> listener -> port we chose
    worker_temp_dir: str = ""  # the worker node's own scratch dir: no node shares a local dir with another

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# free_port picks from LOW_PORT up to the kernel's ephemeral range: above Ray's own worker-port range
# (10002-19999, which every Ray on the machine binds explicitly).
LOW_PORT = 20000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for port-0 binds and outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(taken: set[int] | None = None) -> int:
    """A loopback port nothing listens on now, for a listener we hand to Ray.

    Picked at random between Ray's worker ports and the kernel's ephemeral range: there neither a Ray
    worker nor another process's port-0 bind or outgoing connection takes it in the seconds before Ray
    binds it (one clean-clone run lost the head's dashboard-agent port that way; job submission then
    failed with "No available agent"). Never one in ``taken``, and added to it, so one cluster's ports
    are distinct. A kernel-chosen port where the range below the ephemeral one is too small.
    """
    taken = set() if taken is None else taken
    low, _ = ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200 if low - LOW_PORT >= 1000 else 0):
        port = rng.randrange(LOW_PORT, low)
        if port not in taken and _bindable(port):
            taken.add(port)
            return port
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def loopback_local_ray() -> None:
    """In a process about to start its own local Ray (``ray.init`` without an address): set
    ``LOOPBACK_ENV=0`` unless it is set, so every listener of that Ray is on 127.0.0.1 (module doc).
    Ray reads the variable once, at ``import ray``: where Ray is already imported this changes nothing,
    and this process's environment is left alone."""
    if "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def cluster_env(token_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes: token auth on, token from our file, venv first on PATH,
    node IP 127.0.0.1.

    Jobs inherit it: their entrypoint's ``python`` is this venv's, and their drivers
    find the token without it ever being sent in a job. A process that connects to the
    GCS (``ray.init(address=...)``, ``stylegen train --address 127.0.0.1:PORT``) needs it
    too: without ``LOOPBACK_ENV=0`` Ray turns 127.0.0.1 into the routable IP, where
    nothing listens. ``GLOO_SOCKET_IFNAME=lo`` keeps DDP's gloo pairs on loopback even
    where the hostname resolves to a routable address.
    """
    env = dict(os.environ if base is None else base)
    for k in (TOKEN_ENV, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    env[AUTH_MODE_ENV] = "token"
    env[TOKEN_PATH_ENV] = str(token_path)
    env[LOOPBACK_ENV] = "0"
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _ray_bin() -> str:
    path = Path(sys.executable).parent / "ray"
    return str(path) if path.exists() else (shutil.which("ray") or "ray")


NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def _node_ports(taken: set[int]) -> dict[str, int]:
    """Per-node ports Ray would otherwise take from fixed defaults shared by every cluster here."""
    return {flag: free_port(taken) for flag in NODE_PORT_FLAGS}


def _flags(ports: dict[str, int]) -> list[str]:
    return [a for flag, port in ports.items() for a in (f"--{flag}", str(port))]


def _ray_start_loopback(argv: list[str]) -> int:
    """``ray start ARGV`` for a worker node on 127.0.0.1 (``python -m stylegen.raycluster _ray-start``).

    With ``LOOPBACK_ENV=0`` Ray resolves this node to 127.0.0.1, but its CLI then refuses
    a non-head node ("Multi-node Ray clusters are not supported on Windows and OSX").
    Only the CLI module's view of that flag is changed: node IP resolution in
    ``ray._private.services`` still reads the real constant (False, so loopback), and so
    does every process Ray starts from here.
    """
    import types

    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as ray_scripts

    if getattr(ray_scripts, "ray_constants", None) is not ray_constants:
        print("stylegen.raycluster: this Ray's `ray start` has no ray_constants to adjust; "
              "start the cluster without --workers-node", file=sys.stderr)
        return 2

    class _Constants(types.ModuleType):
        def __getattr__(self, name: str):
            return getattr(ray_constants, name)

    view = _Constants("ray_constants_for_ray_start")
    view.ENABLE_RAY_CLUSTER = True
    ray_scripts.ray_constants = view
    sys.argv = ["ray", "start", *argv]
    return ray_scripts.main()


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def _wait_http(url: str, token_path: Path, pid: int, timeout: float, log: Path) -> None:
    """Wait until the job server answers an authenticated request."""
    req = urllib.request.Request(url, headers=auth_headers(token_path.read_text().strip()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise _exited("the head", log)
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise UserError(f"Ray did not answer on {url} within {timeout:.0f} s; see {log}")


class NodeStartFailed(UserError):
    """A node's ``ray start`` gave up waiting for its raylet to register with the GCS: worth one more start."""


REGISTRATION_TIMEOUT = "timed out during startup"  # what `ray start` says when that limit has passed


def _exited(what: str, log: Path) -> UserError:
    """The error for a node whose ``ray start`` has exited: NodeStartFailed when its log says Ray's
    registration limit passed, else a UserError (a port in use, a bad flag: starting again would not help)."""
    try:
        tail = log.read_text(errors="replace")[-4000:]
    except OSError:
        tail = ""
    kind = NodeStartFailed if REGISTRATION_TIMEOUT in tail else UserError
    return kind(f"{what}'s ray start exited before it joined; see {log}")


def _wait_nodes(dashboard_url: str, token: str, n: int, timeout: float, pid: int, log: Path,
                what: str = "the worker node") -> None:
    """Wait until n nodes are alive (the job server answers before a node's raylet has registered).

    pid is the joining node's `ray start --block`: when it exits (for one, Ray's own 30 s limit for a
    raylet to register with its GCS, hard-coded in ray/_private/node.py, passes on a loaded machine)
    the node will never join, so this fails then instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(f"{dashboard_url}/nodes?view=summary", headers=auth_headers(token))
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise _exited(what, log)
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                summary = json.load(r)["data"]["summary"]
            if sum(1 for s in summary if s.get("raylet", {}).get("state") == "ALIVE") >= n and pid_alive(pid):
                return
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise UserError(f"{what} did not join within {timeout:.0f} s")


def start_local_cluster(state_dir: str | Path = DEFAULT_STATE_DIR, *, port: int = DEFAULT_PORT,
                        dashboard_port: int = DEFAULT_DASHBOARD_PORT, worker_node: bool = False,
                        num_cpus: int | None = None, worker_cpus: int = 1, token_path: str | Path | None = None,
                        object_store_mb: int = 256, timeout: float = 90.0, attempts: int = 2) -> LocalCluster:
    """Start a token-auth head (+ optional worker node) on 127.0.0.1; state in state_dir/cluster.json.

    Returns once every node's raylet has registered. A node whose ``ray start`` exited first (Ray's
    hard-coded 30 s registration limit, on a loaded machine) is started over: everything stopped,
    then up to ``attempts`` starts in all.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE_FILE).exists():
        old = read_state(state)
        if pid_alive(old.head_pid):
            raise UserError(f"a cluster from {state} is already running (pid {old.head_pid}, "
                            f"{old.dashboard_url}); stop it with cluster/local-down.sh --state-dir {state}")
    tok = Path(token_path).resolve() if token_path else state / "auth_token"
    ensure_token_file(tok)
    args = (state, tok, port, dashboard_port, worker_node, num_cpus, worker_cpus, object_store_mb, timeout)
    for _ in range(attempts - 1):
        try:
            return _start_once(*args)
        except NodeStartFailed as e:
            log.warning("%s (a loaded machine?); starting the cluster once more", e)
    return _start_once(*args)


def _start_once(state: Path, tok: Path, port: int, dashboard_port: int, worker_node: bool, num_cpus: int | None,
                worker_cpus: int, object_store_mb: int, timeout: float) -> LocalCluster:
    """One try of ``start_local_cluster``: what it started is stopped again if it fails."""
    env = cluster_env(tok)
    # Our own short temp dir: the default /tmp/ray holds the 'current cluster' pointer other
    # people's ray.init(address="auto") reads, and socket paths must stay < 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="sg-ray-", dir="/tmp")
    log = state / "head.log"
    taken = {port, dashboard_port}
    head_ports = {"port": port, "dashboard-port": dashboard_port, "ray-client-server-port": free_port(taken),
                  **_node_ports(taken)}
    # The head's autoscaler and dashboard serve their own /metrics on fixed ports (44217,
    # 44227) unless told otherwise: a second cluster here would silently lose them.
    metric_ports = {"AUTOSCALER_METRIC_PORT": free_port(taken), "DASHBOARD_METRIC_PORT": free_port(taken)}
    head = [_ray_bin(), "start", "--head", "--block", "--node-ip-address", LOOPBACK_IP,
            "--dashboard-host", LOOPBACK_IP, "--include-dashboard", "true", *_flags(head_ports),
            "--temp-dir", temp_dir, "--disable-usage-stats", "--object-store-memory", str(object_store_mb * 2**20)]
    if num_cpus is not None:
        head += ["--num-cpus", str(num_cpus)]
    # A SIGTERM'd `ray start` drains its node first (up to 30 s); the head's raylet never
    # finishes that drain, so local-down would wait out _stop_group's timeout and SIGKILL it.
    # A worker node keeps Ray's default drain.
    head_env = {**env, **{k: str(v) for k, v in metric_ports.items()}, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    cluster = LocalCluster(str(state), _spawn(head, head_env, log), None, port, dashboard_port, str(tok), temp_dir,
                           ports={"head": {**head_ports, **metric_ports}})
    _write_state(cluster)
    try:
        _wait_http(f"{cluster.dashboard_url}/api/version", tok, cluster.head_pid, timeout, log)
        _wait_nodes(cluster.dashboard_url, tok.read_text().strip(), 1, timeout, cluster.head_pid, log, "the head")
        if worker_node:
            wlog = state / "worker.log"
            worker_ports = _node_ports(taken)
            cluster.worker_temp_dir = tempfile.mkdtemp(prefix="sg-rayw-", dir="/tmp")
            cmd = [sys.executable, "-m", "stylegen.raycluster", "_ray-start", "--block", "--temp-dir",
                   cluster.worker_temp_dir,
                   "--address", cluster.gcs_address, "--node-ip-address", LOOPBACK_IP, *_flags(worker_ports),
                   "--num-cpus", str(worker_cpus), "--object-store-memory", str(object_store_mb * 2**20),
                   "--disable-usage-stats"]
            cluster.worker_pid = _spawn(cmd, env, wlog)
            cluster.ports["worker"] = worker_ports
            _write_state(cluster)
            _wait_nodes(cluster.dashboard_url, tok.read_text().strip(), 2, timeout, cluster.worker_pid, wlog)
    except BaseException:
        stop_local_cluster(state)
        raise
    return cluster


def _write_state(c: LocalCluster) -> None:
    path = Path(c.state_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(c), indent=2))
    os.replace(tmp, path)
    for name, pid in (("head.pid", c.head_pid), ("worker.pid", c.worker_pid)):
        if pid is not None:
            (Path(c.state_dir) / name).write_text(f"{pid}\n")


def read_state(state_dir: str | Path) -> LocalCluster:
    path = Path(state_dir) / STATE_FILE
    try:
        return LocalCluster(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(f"no local cluster state in {state_dir} ({STATE_FILE} missing); "
                        f"start one with cluster/local-up.sh") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a cluster state file ({e}); remove it") from None


def _is_our_ray(pid: int) -> bool:
    """PID still runs `ray start` (guards against a recycled PID) and leads its own group."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ray_start = (any(a.endswith(b"ray") for a in cmd) and b"start" in cmd) or b"_ray-start" in cmd
        return ray_start and os.getpgid(pid) == pid
    except (OSError, ProcessLookupError):
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(pid: int, timeout: float) -> bool:
    """Stop the `ray start --block` at pid and its process group; True if it was ours.

    SIGTERM goes to `ray start` alone: it drains the node and stops its children while
    GCS is still up (signalling the whole group at once makes the drain wait for a dead
    GCS). Whatever is left of the group after `timeout` gets SIGKILL.
    """
    if not _is_our_ray(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    kill_group(pid)
    return True


def stop_local_cluster(state_dir: str | Path = DEFAULT_STATE_DIR, timeout: float = 15.0) -> list[int]:
    """Stop the worker node then the head recorded in state_dir; returns the PIDs stopped."""
    c = read_state(state_dir)
    stopped = [pid for pid in (c.worker_pid, c.head_pid) if pid is not None and _stop_group(pid, timeout)]
    for d in (c.temp_dir, c.worker_temp_dir):
        if d:
            shutil.rmtree(d, ignore_errors=True)
    for name in (STATE_FILE, "head.pid", "worker.pid"):
        (Path(state_dir) / name).unlink(missing_ok=True)
    return stopped


# ----------------------------------------------------------------------------- CLI for cluster/*.sh

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ray-start"]:  # internal: the worker node's `ray start` (see _ray_start_loopback)
        return _ray_start_loopback(argv[1:])
    p = argparse.ArgumentParser(prog="stylegen.raycluster", description="local token-auth Ray cluster on 127.0.0.1")
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up")
    up.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"GCS port (default {DEFAULT_PORT})")
    up.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                    help=f"dashboard/job API port (default {DEFAULT_DASHBOARD_PORT})")
    up.add_argument("--workers-node", action="store_true", help="also start a worker node")
    up.add_argument("--num-cpus", type=int, default=None, help="head CPUs (default: all)")
    up.add_argument("--token-path", default=None, help="token file (default STATE_DIR/auth_token; created if missing)")
    for name in ("down", "status"):
        sub.add_parser(name).add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            c = start_local_cluster(args.state_dir, port=args.port, dashboard_port=args.dashboard_port,
                                    worker_node=args.workers_node, num_cpus=args.num_cpus, token_path=args.token_path)
            print(f"Ray cluster up (token auth on): head pid {c.head_pid}"
                  + (f", worker node pid {c.worker_pid}" if c.worker_pid else ""))
            print(f"  dashboard / job API: {c.dashboard_url}; GCS {c.gcs_address} (token-protected gRPC); "
                  f"every Ray listener on 127.0.0.1 (README: Ports and listeners)")
            mode = stat.S_IMODE(os.stat(c.token_path).st_mode)  # what the file has, not what we meant it to have
            print(f"  token file (mode {mode:04o}, not printed here): {c.token_path}   read it with: cat {c.token_path}")
            print(f"  use it:  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={c.token_path} {LOOPBACK_ENV}=0")
            print(f"           ({LOOPBACK_ENV}=0 lets ray.init / `stylegen train --address {c.gcs_address}` "
                  f"reach the loopback-only GCS; `stylegen submit` does not need it)")
            print(f"  submit:  stylegen submit train --address {c.dashboard_url} --config jobs/configs/demo.toml --wait")
            print(f"  stop:    cluster/local-down.sh --state-dir {c.state_dir}")
        elif args.action == "down":
            pids = stop_local_cluster(args.state_dir)
            print(f"stopped {', '.join(map(str, pids)) or 'nothing (processes already gone)'}")
        else:
            c = read_state(args.state_dir)
            print(json.dumps({**asdict(c), "head_alive": pid_alive(c.head_pid),
                              "worker_alive": c.worker_pid is not None and pid_alive(c.worker_pid)}, indent=2))
    except UserError as e:
        print(f"stylegen.raycluster {args.action}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures and the suite's no-hang rules. Ray tests are marked ``ray``; all run in CI.

No test may leave a thread or a Ray session behind (``_no_leaked_threads_or_ray``): a Train ``fit``
left in a background thread once held Ray's connect lock, and the next module's ``ray.init`` hung
for good. Ray tests get pytest-timeout's ``thread`` method (``pytest_collection_modifyitems``): the
default ``signal`` method fires only when the main thread runs Python bytecode again, not while it
is blocked inside C/C++ code (Ray's); the thread method dumps every stack and ends the pytest process.

One Ray for the tests that can share it: the ``local_ray`` fixture. Its users run one after another
(``pytest_collection_modifyitems``: last in a plain run; under ``make test``'s two xdist workers each
worker takes whole files, ``--dist loadfile``, and runs its share of those files on its own local
Ray). The first of a run of users starts it and it is shut down right after the last
(``pytest_runtest_teardown``), so no other test ever meets it. Tests that must own a cluster (kill nodes, need other resources or their own temp dir) start
their own.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
import traceback

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Train V2's controller polls its workers every 2 s, and a worker's ray.train.report blocks until the
# previous report was polled (a 1-slot queue, ray/train/v2/_internal/execution/worker_group/worker.py):
# the tiny runs here report every ~0.5 s, so the poll paced them. 0.25 s took a 20-step 2-worker fit
# from 28-31 s to 20-24 s (quiet machine). Ray propagates it from a driver to its controller and workers
# (ENV_VARS_TO_PROPAGATE); every Ray and driver the tests start inherits it. No test relies on the 2 s
# pacing (the drained-node test of tests/test_local_cluster.py holds its ranks at the step the drain
# must land on instead).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Train V2 starts a node-drain watcher actor per run (1.3 CPU-s each here, ~20 runs in the suite);
# only tests/test_local_cluster.py drains a node, and that test turns the watcher back on for its run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

RAY_TIMEOUT_S = 600.0  # ray tests without a timeout marker of their own (the global default is in pyproject)
THREAD_JOIN_GRACE_S = 3.0  # a thread the test asked to stop may still be finishing its last loop

# The Python threads Ray 2.60's driver runs while connected, all ended by ray.shutdown():
# "ray_print_logs" and "ray_listen_error_messages" (ray/_private/worker.py), "PythonGCThread"
# (ray/_private/gc_collect_manager.py, started by the core worker in _raylet).
RAY_DRIVER_THREADS = ("ray_print_logs", "ray_listen_error_messages", "PythonGCThread")
# Process-wide singletons a library starts once and keeps until the interpreter exits:
# - "tqdm_monitor": tqdm's TMonitor, started by the first progress bar of the process (even a
#   disabled one), restarted only if dead, stopped by tqdm's atexit hook; it holds nothing of a test.
PROCESS_SINGLETON_THREADS = frozenset({"tqdm_monitor"})


SHARED_RAY = "local_ray"  # the fixture whose users share one Ray session


class LocalRay:
    """The shared local Ray: what ``stylegen train``/``tune`` start without ``--address`` (``ensure_ray``:
    2 CPUs, the trial_slot resource, token auth, 127.0.0.1), in this process."""

    def address(self) -> str:
        """Its GCS address; started if it is not running (first use, or after a test shut Ray down)."""
        import ray

        from stylegen.train.ray_worker import ensure_ray

        ensure_ray("", num_cpus=2)
        return ray.get_runtime_context().gcs_address

    def client_env(self) -> dict[str, str]:
        """The environment of a driver subprocess on it (``stylegen train|tune --address``): token auth as
        Ray's init set it up here (the token in Ray's default path), and RAY_ADDRESS, which Train's
        placement-group cleaner needs with several Rays on one machine."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.address()}


@pytest.fixture(scope="session")
def local_ray():
    """The shared local Ray (see the module doc); started now, shut down after its last user."""
    shared = LocalRay()
    shared.address()
    yield shared
    if _ray_initialized():
        _shutdown_ray()


def _file(item) -> str:
    return item.nodeid.split("::")[0]


def _heavy_tests(items) -> collections.Counter:
    """{file: its tests marked ray or slow}: the files that take minutes, handed out first under xdist
    (longest first, so none of them starts last and alone)."""
    return collections.Counter(_file(i) for i in items if i.get_closest_marker("ray") or i.get_closest_marker("slow"))


def _uses_shared_ray(item) -> bool:
    return item is not None and SHARED_RAY in getattr(item, "fixturenames", ())


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    """A plain run: the users of ``local_ray`` last, one after another on one Ray session. Under
    ``make test``'s ``-n 2 --dist loadfile --no-loadscope-reorder``, pytest-xdist hands out whole files
    (a module fixture, such as a Serve app, is built once; tests/test_xdist.py says why not
    ``loadgroup``) in this order: the files with the most ``ray``/``slow`` tests first (xdist's own
    order, most tests first, left the minutes-long Ray files to the end). Tests marked ``ray`` keep
    their timeout (marker, else RAY_TIMEOUT_S) but with the thread method."""
    if hasattr(config, "workerinput"):  # an xdist worker: --dist loadfile hands out files in this order
        heavy = _heavy_tests(items)
        items.sort(key=lambda item: -heavy[_file(item)])  # stable: each file stays in one piece
    else:
        shared = [item for item in items if _uses_shared_ray(item)]
        items[:] = [item for item in items if not _uses_shared_ray(item)] + shared
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("ray") is None:
            continue
        own = item.get_closest_marker("timeout")
        timeout = RAY_TIMEOUT_S
        if own is not None:
            timeout = own.kwargs.get("timeout", own.args[0] if own.args else RAY_TIMEOUT_S)
        item.add_marker(pytest.mark.timeout(timeout, method="thread"), append=False)  # first = closest


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import Ray here: most tests do not need it
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def _ignored(t: threading.Thread, ray_up: bool) -> bool:
    """Threads that may outlive a test on purpose: PROCESS_SINGLETON_THREADS, and Ray's driver
    threads while Ray is still up (they belong to the session, which the Ray checks account for:
    a module fixture's session ends at the module boundary, a test's own is a failure)."""
    return t.name in PROCESS_SINGLETON_THREADS or (ray_up and t.name in RAY_DRIVER_THREADS)


def _describe(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    out = []
    for t in threads:
        frame = frames.get(t.ident)
        where = "".join(traceback.format_stack(frame, limit=4)).rstrip() if frame is not None else "  (no frame)"
        out.append(f"{t.name!r} (daemon={t.daemon}, target={getattr(t, '_target', None)!r}):\n{where}")
    return "\n".join(out)


@pytest.fixture(autouse=True)
def _no_leaked_threads_or_ray(request):
    """Fail (after cleaning up) a test that leaves a new thread running or Ray initialized.

    Ray initialized *before* the test was set up by a module fixture (module fixtures are set up
    before function ones) and is that fixture's to shut down; Ray initialized only *after* the test
    is this test's leak: it is shut down here and the test fails. Costs two thread listings a test.
    """
    before = set(threading.enumerate())
    ray_before = _ray_initialized()
    yield
    problems = []
    ray_after = _ray_initialized()

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive() and not _ignored(t, ray_after)]

    deadline = time.monotonic() + THREAD_JOIN_GRACE_S
    for t in leaked():
        t.join(max(0.0, deadline - time.monotonic()))
    left = leaked()
    if left:
        problems.append(f"{len(left)} thread(s) started by the test still ran after a {THREAD_JOIN_GRACE_S:.0f} s "
                        f"grace; stop and join them in the test:\n{_describe(left)}")
    if ray_after and not ray_before and SHARED_RAY not in request.fixturenames:  # local_ray: the hook's to end
        problems.append("Ray is still initialized: shut it down in the test (try/finally), or share one "
                        "session through a module-scoped fixture")
        _shutdown_ray()  # also ends threads waiting in ray.get (they raise SystemExit)
        for t in left:
            t.join(1.0)
    if problems:
        pytest.fail(f"{request.node.nodeid} left things behind:\n- " + "\n- ".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a module's fixtures are torn down (last test of the module), Ray must be down too; the
    shared ``local_ray`` session ends after its last user and lives on only into the next one."""
    result = yield
    if _uses_shared_ray(item):
        if _uses_shared_ray(nextitem):
            return result
        if _ray_initialized():
            _shutdown_ray()
    module = item.getparent(pytest.Module)
    if (nextitem is None or nextitem.getparent(pytest.Module) is not module) and _ray_initialized():
        _shutdown_ray()
        pytest.fail(f"Ray is still initialized after the fixtures of {module.nodeid if module else item.nodeid} "
                    "were torn down: the fixture that started it must shut it down", pytrace=False)
    return result

"""Ray's own chatter, kept out of a driver's output unless -v.

Ray forwards every worker's stdout/stderr to the driver (``log_to_driver``), so Python logging
levels do not reach the lines that Ray's actors and raylet print about themselves. Three of them
appear in every run and ask nothing of the user (measured on Ray 2.60 in ``make demo``):

- ``core_worker.cc: Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the
  object store and max_restarts > 0``: Ray Train's own actor (``ray.remote(max_restarts=-1)`` in
  ``ray/train/v2/_internal/callbacks/preemption_callback.py``), ray-project/ray#53727;
- the raylet's ``N PYTHON worker processes have been started on node ...``: a Tune trial's driver,
  its Train controller and two workers start at once on a 2-CPU node;
- ``(PlacementGroupCleaner) Detected that the Ray Train controller actor ... is dead. Cleaning up
  placement group``: Train V2 cleaning up after each run, as designed.

And one block that appears in some sweeps: when the scheduler stops a trial, Tune ends its
``fit_trial`` process while that process waits in ``ray.get`` on its Train run; Ray's C++ check
``raylet_ipc_client_->NotifyWorkerUnblocked() Status not OK: IOError: Broken pipe``
(``memory_store.cc``) then fails in the dying process and prints itself with a ~45-line stack trace
(in 1 of the 2 unfiltered ``make demo`` runs of session 13, after "trial ... stopped early
(scheduler)"; earlier sessions saw it too). That line and
the stack frames that follow it from the same process are dropped; any other check failure or
trace is printed.

``drop_ray_chatter`` wraps the two ways those lines reach this process so that exactly these lines
are dropped and everything else (our ranks' progress, any real warning, error or traceback) is
printed as Ray prints it: the forwarding handler ``ray.init`` installs ("ray_print_logs", worker
output; ``ray.shutdown`` removes it by that name, as before) and ``print_to_stdstream``, which the
driver's error listener calls for the raylet's pushed warnings (``listen_error_messages`` in
``ray/_private/worker.py`` looks it up in that module at each call).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable


def verbose() -> bool:
    """``-v`` is on: the CLI set the root logger to DEBUG. Ray's and Tune's own output is shown then."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


RAY_CHATTER = (
    re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"),
    re.compile(r"PYTHON worker processes have been started on node"),
    re.compile(r"Detected that the Ray Train controller actor \S+ is dead\. Cleaning up placement group"),
)
HANDLER = "ray_print_logs"  # the name ray.init gives its forwarding handler (ray/_private/worker.py)
FILTERED = "drops_ray_chatter"  # marks a wrapped handler: drop_ray_chatter never wraps twice


# a stopped trial's process failing Ray's check on its way out (module doc), and its trace's lines
STOPPED_TRIAL_CHECK = re.compile(r"memory_store\.cc:\d+: .*Check failed: raylet_ipc_client_->NotifyWorkerUnblocked\(\) "
                                 r"Status not OK: IOError: Broken pipe")
STACK_TRACE = re.compile(r"^(\*\*\* StackTrace Information \*\*\*|\S+\([^)]*\) \[0x[0-9a-f]+\].*|\s*)$")


def is_ray_chatter(line: str) -> bool:
    """True for a forwarded line that is one of RAY_CHATTER."""
    return any(p.search(line) for p in RAY_CHATTER)


def without_chatter(data: dict, in_trace: set | None = None) -> dict | None:
    """A forwarded batch (``{"pid": ..., "lines": [...], ...}``) without the chatter; None when nothing
    is left. ``in_trace``: the pids whose STOPPED_TRIAL_CHECK trace is being dropped, kept across
    batches by the caller (a trace may arrive in more than one); updated here."""
    in_trace = set() if in_trace is None else in_trace
    pid, lines = data.get("pid"), []
    for line in data.get("lines", ()):
        if STOPPED_TRIAL_CHECK.search(line):
            in_trace.add(pid)
            continue
        if pid in in_trace:
            if STACK_TRACE.match(line):
                continue
            in_trace.discard(pid)  # the trace is over: this line is the process's own again
        if not is_ray_chatter(line):
            lines.append(line)
    return {**data, "lines": lines} if lines else None


def filtered(forward: Callable[..., None]) -> Callable[..., None]:
    """``forward(batch, ...)`` that never sees the chatter (the same function if it is already so)."""
    if getattr(forward, FILTERED, False):
        return forward
    in_trace: set = set()  # pids inside a dropped trace, across this handler's batches

    def handler(data: dict, *args, **kwargs) -> None:
        kept = without_chatter(data, in_trace)
        if kept is not None:
            forward(kept, *args, **kwargs)

    setattr(handler, FILTERED, True)
    return handler


def drop_ray_chatter() -> bool:
    """Filter what Ray forwards to this driver (after ``ray.init``); False when Ray's private pieces are
    not as expected (then nothing changes: the output stays complete)."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not callable(getattr(ray_worker, "print_to_stdstream", None)):
        return False
    ray_worker.print_to_stdstream = filtered(ray_worker.print_to_stdstream)
    with dispatcher._lock:
        dispatcher.handlers = [(name, filtered(h) if name == HANDLER else h) for name, h in dispatcher.handlers]
        return any(name == HANDLER for name, _ in dispatcher.handlers)

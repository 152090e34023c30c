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


def is_ray_chatter(line: str) -> bool:
    """True for a forwarded line that is one of RAY_CHATTER."""
    return any(p.search(line) for p in RAY_CHATTER)


def without_chatter(data: dict) -> dict | None:
    """A forwarded batch (``{"lines": [...], ...}``) without the chatter; None when nothing is left."""
    lines = [line for line in data.get("lines", ()) if not is_ray_chatter(line)]
    return {**data, "lines": lines} if lines else None


def filtered(forward: Callable[..., None]) -> Callable[..., None]:
    """``forward(batch, ...)`` that never sees the chatter (the same function if it is already so)."""
    if getattr(forward, FILTERED, False):
        return forward

    def handler(data: dict, *args, **kwargs) -> None:
        kept = without_chatter(data)
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

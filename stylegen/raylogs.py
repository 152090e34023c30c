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

``drop_ray_chatter`` wraps Ray's forwarding handler ("ray_print_logs") in this process so that it
drops exactly these lines and passes everything else (our ranks' progress, any real warning or
traceback) as Ray prints it. ``ray.shutdown`` removes the handler by that name, as before.
"""

from __future__ import annotations

import re

RAY_CHATTER = (
    re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"),
    re.compile(r"PYTHON worker processes have been started on node"),
    re.compile(r"Detected that the Ray Train controller actor \S+ is dead\. Cleaning up placement group"),
)
HANDLER = "ray_print_logs"  # the name ray.init gives its forwarding handler (ray/_private/worker.py)


def is_ray_chatter(line: str) -> bool:
    """True for a forwarded line that is one of RAY_CHATTER."""
    return any(p.search(line) for p in RAY_CHATTER)


def without_chatter(data: dict) -> dict | None:
    """A forwarded batch (``{"lines": [...], ...}``) without the chatter; None when nothing is left."""
    lines = [line for line in data.get("lines", ()) if not is_ray_chatter(line)]
    return {**data, "lines": lines} if lines else None


def drop_ray_chatter() -> bool:
    """Filter Ray's forwarded worker output in this process (after ``ray.init``); False when Ray's
    private dispatcher is not as expected (then nothing changes: the output stays complete)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        named = [h for h in dispatcher.handlers if h[0] == HANDLER]
        if len(named) != 1 or getattr(named[0][1], "drops_ray_chatter", False):
            return bool(named)
        forward = named[0][1]

        def handler(data: dict) -> None:
            kept = without_chatter(data)
            if kept is not None:
                forward(kept)

        handler.drops_ray_chatter = True
        dispatcher.handlers = [(HANDLER, handler) if h[0] == HANDLER else h for h in dispatcher.handlers]
    return True

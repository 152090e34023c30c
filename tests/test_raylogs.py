"""Ray's own chatter (stylegen/raylogs.py): the three known lines and a stopped trial's check-failure
trace go, everything else stays."""

import logging

from stylegen.raylogs import HANDLER, is_ray_chatter, verbose, without_chatter

# as Ray 2.60 forwarded them to `make demo`'s driver (tmp/cc-demo.log, session 8)
CHATTER = [
    "[2026-11-30 09:06:45,154 E 13215 13345] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: '090f043faaa4753b6384d08601000000' has constructor arguments in the object store and max_restarts > 0",
    "WARNING: 8 PYTHON worker processes have been started on node: 2a48324b with address: 192.0.2.2, which is 4x "
    "the maximum expected startup concurrency (2).",
    "Detected that the Ray Train controller actor (25cd909c20a17c213918ed9201000000) is dead. Cleaning up placement "
    "group = [PlacementGroupID(91a6802f37d479f6275501c51a6401000000)] created by this run.",
]
KEPT = [
    "rank 0: 6.65e+10 FLOPs per training step (1.66e+10 per sample)",
    "step 10/40  loss 1.08  val_score 0.9450  5 img/s  eta 0:44",
    "core_worker.cc:2465: Actor with class name: 'Learner' and ID: 'x' has constructor arguments in the object store",
    "Traceback (most recent call last):",
    "WARNING: the worker ran out of memory",
]


def test_the_three_known_lines_are_chatter_and_nothing_else_is():
    assert all(is_ray_chatter(line) for line in CHATTER)
    assert not any(is_ray_chatter(line) for line in KEPT)


def test_a_batch_keeps_its_other_lines_and_fields_and_an_all_chatter_batch_is_dropped():
    batch = {"pid": 13484, "actor_name": "RayTrainWorker", "is_err": True, "lines": [CHATTER[0], KEPT[1], CHATTER[2]]}
    assert without_chatter(batch) == {**batch, "lines": [KEPT[1]]}
    assert without_chatter({**batch, "lines": CHATTER}) is None


# a stopped trial's fit_trial process failing Ray's check on its way out, as `make demo` showed it
# (session 13; 44 frames in all, these are one of each shape)
STOPPED_TRIAL = [
    "[2026-11-30 23:17:21,450 C 31307 31307] memory_store.cc:383:  An unexpected system state has occurred. You "
    "have likely discovered a bug in Ray. Please report this issue at https://github.com/ray-project/ray/issues and "
    "we'll work with you to fix it. Check failed: raylet_ipc_client_->NotifyWorkerUnblocked() Status not OK: "
    "IOError: Broken pipe ",
    "*** StackTrace Information ***",
    "/venv/lib/python3.11/site-packages/ray/_raylet.so(+0x1812b9a) [0x7f9b84e12b9a] ray::operator<<()",
    "/venv/lib/python3.11/site-packages/ray/_raylet.so(_ZN3ray6RayLogD1Ev+0x469) [0x7f9b84e151c9] ray::RayLog::~RayLog()",
    "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0(PyObject_Vectorcall+0x33) [0x7f9b85f58ba3] PyObject_Vectorcall",
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f9b85c4524a]",
    "ray::fit_trial(_start+0x21) [0x563ae6dde081] _start",
    "",
]


def test_a_stopped_trials_check_failure_and_its_trace_go_even_across_batches():
    assert without_chatter({"pid": 7, "lines": STOPPED_TRIAL}) is None
    in_trace: set = set()  # what the installed handler keeps between batches
    assert without_chatter({"pid": 7, "lines": STOPPED_TRIAL[:3]}, in_trace) is None
    other = {"pid": 8, "lines": [KEPT[1]]}  # another process meanwhile: untouched
    assert without_chatter(other, in_trace) == other
    after = without_chatter({"pid": 7, "lines": [*STOPPED_TRIAL[3:], KEPT[3], STOPPED_TRIAL[2]]}, in_trace)
    assert after == {"pid": 7, "lines": [KEPT[3], STOPPED_TRIAL[2]]}  # after the trace, every line is kept again
    assert in_trace == set()


def test_any_other_check_failure_keeps_its_trace():
    other = [STOPPED_TRIAL[0].replace("NotifyWorkerUnblocked()", "PinObjectIDs()"), *STOPPED_TRIAL[1:]]
    assert without_chatter({"pid": 7, "lines": other}) == {"pid": 7, "lines": other}
    orphan = STOPPED_TRIAL[1:]  # frames without the check's line before them
    assert without_chatter({"pid": 7, "lines": orphan}) == {"pid": 7, "lines": orphan}


def test_the_handler_wrapped_is_the_one_ray_init_installs():
    import inspect

    import ray._private.worker as ray_worker

    assert f'"{HANDLER}"' in inspect.getsource(ray_worker.connect)  # renamed in a new Ray: filtering would stop


def test_drop_ray_chatter_wraps_both_paths_once(monkeypatch, capsys):
    """Worker output (the dispatcher's handler) and the raylet's pushed warnings (print_to_stdstream,
    called by the driver's error listener) both lose the chatter and keep the rest."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from stylegen.raylogs import drop_ray_chatter

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    printed: list[list[str]] = []
    dispatcher.add_handler(HANDLER, lambda data: printed.append(data["lines"]))  # what ray.init adds
    try:
        assert drop_ray_chatter() and drop_ray_chatter()  # the second call does not wrap twice
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [CHATTER[1], KEPT[0]]})
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [CHATTER[0]]})
        dispatcher.emit({"pid": 2, "is_err": True, "lines": STOPPED_TRIAL[:4]})  # a trace in two batches
        dispatcher.emit({"pid": 2, "is_err": True, "lines": [*STOPPED_TRIAL[4:], KEPT[2]]})
        assert printed == [[KEPT[0]], [KEPT[2]]]
    finally:
        dispatcher.remove_handler(HANDLER)  # what ray.shutdown does
    assert not [h for h in dispatcher.handlers if h[0] == HANDLER]

    capsys.readouterr()
    for line in (CHATTER[1], KEPT[4]):  # as listen_error_messages calls it
        ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert KEPT[4] in out and "PYTHON worker processes" not in out


def test_verbose_is_the_root_logger_at_debug():
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert not verbose()
        root.setLevel(logging.DEBUG)  # what `stylegen -v` sets
        assert verbose()
    finally:
        root.setLevel(level)

"""The Ray sink's hint for reports that come faster than Train's controller takes them (no Ray started:
``ray.train.report`` is replaced by a stand-in that blocks like the controller's 1-slot queue).

Measured with Ray 2.60 (2 workers, docs/quality.md, issue 18): a metrics-only report 0.3 s after the
previous one waited 1.7 s (median), one 3 s after it 4.5 ms.
"""

from __future__ import annotations

import logging
import time

import pytest
import ray.train

from stylegen.train import ray_worker
from stylegen.train.ray_worker import POLL_ENV, RaySink, slow_report_hint
from tiny import tiny_cfg


def test_the_hint_names_the_wait_the_spacing_the_poll_and_the_setting_to_raise():
    hint = slow_report_hint(1.7, 0.3, 2.0, 5)
    assert hint == (f"ray.train.report waited 1.7 s: reports came 0.3 s apart, closer than Train's controller "
                    f"takes them ({POLL_ENV}=2 s), so training stalls at every report; raise train.report_every "
                    "(now 5) until reports are over 2 s apart")


@pytest.mark.parametrize("waited, since_last", [(0.9, 0.3), (1.7, 2.0), (3.0, 5.0)],
                         ids=["quick-report", "spaced-as-the-poll", "slow-for-another-reason"])
def test_no_hint_for_a_quick_report_or_one_spaced_at_least_a_poll_apart(waited, since_last):
    assert slow_report_hint(waited, since_last, 2.0, 5) is None


class BlockingReport:
    """``ray.train.report`` as Train's controller makes it behave: a report sooner than ``poll_s`` after
    the previous one returned waits for the next poll."""

    def __init__(self, poll_s: float):
        self.poll_s, self.last = poll_s, 0.0

    def __call__(self, metrics, checkpoint=None):
        wait = self.poll_s - (time.perf_counter() - self.last)
        if wait > 0:
            time.sleep(wait)
        self.last = time.perf_counter()


@pytest.mark.parametrize("rank, warnings", [(0, 1), (1, 0)])
def test_back_to_back_reports_warn_once_on_rank_0(monkeypatch, caplog, rank, warnings):
    monkeypatch.setenv(POLL_ENV, "0.3")
    monkeypatch.setattr(ray_worker, "SLOW_REPORT_S", 0.1)  # the stand-in's waits are 0.3 s, not 2 s
    monkeypatch.setattr(ray.train, "report", BlockingReport(0.3))
    sink = RaySink(tiny_cfg("train.report_every=2"), rank, None)
    with caplog.at_level(logging.WARNING, logger=ray_worker.__name__):
        for _ in range(3):
            sink.report(None, {"loss": 1.0}, False, None, None)
    hints = [r.getMessage() for r in caplog.records if "ray.train.report waited" in r.getMessage()]
    assert len(hints) == warnings, hints
    if warnings:
        assert "raise train.report_every (now 2)" in hints[0] and f"{POLL_ENV}=0.3 s" in hints[0]


def test_a_slow_report_spaced_beyond_the_poll_does_not_warn(monkeypatch, caplog):
    """Reports 0.1 s apart against a 0.05 s poll, each held 0.2 s by something else (a slower rank at the
    barrier): not the poll's doing, so no hint that would send the user to train.report_every."""
    monkeypatch.setenv(POLL_ENV, "0.05")
    monkeypatch.setattr(ray_worker, "SLOW_REPORT_S", 0.1)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: time.sleep(0.2))
    sink = RaySink(tiny_cfg(), 0, None)
    with caplog.at_level(logging.WARNING, logger=ray_worker.__name__):
        for _ in range(3):
            time.sleep(0.1)  # the loop's steps between reports
            sink.report(None, {"loss": 1.0}, False, None, None)
    assert not [r for r in caplog.records if "ray.train.report waited" in r.getMessage()]

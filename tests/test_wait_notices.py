"""No silent waits: WaitNotices fills every quiet stretch with what the process waits for."""

from __future__ import annotations

import logging
import time

from fedprune.wait_notices import WaitNotices


def test_a_quiet_process_says_what_it_waits_for_and_thins_out_a_long_wait(caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("fedprune.test.waiting")
    state = {"what": "waiting for the aggregator of federation 'default'"}
    with WaitNotices(lambda: state["what"], log, interval_s=0.2, thin_after_s=0.6, slow_interval_s=1.0):
        time.sleep(0.5)
        log.warning("something happened")  # output of its own: the next notice is a full interval away
        state["what"] = "training round 3"
        time.sleep(2.8)
    records = [(r.created, r.getMessage()) for r in caplog.records if r.name == log.name]
    texts = [text for _, text in records]
    assert texts[0] == "waiting for the aggregator of federation 'default'"
    assert "something happened" in texts and texts[-1] == "training round 3"
    gaps = [b[0] - a[0] for a, b in zip(records, records[1:])]
    assert max(gaps) < 1.5  # never silent for longer than an interval (or the slow one, later)
    after = [t for t, text in records if text == "training round 3"]
    early = [b - a for a, b in zip(after, after[1:]) if b < after[0] + 0.5]
    late = [b - a for a, b in zip(after, after[1:]) if a > after[0] + 0.7]
    assert early and all(g < 0.5 for g in early) and late and all(g > 0.8 for g in late), (early, late)


def test_a_describe_that_fails_or_has_nothing_to_say_never_stops_the_notices(caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("fedprune.test.waiting2")
    calls = []

    def describe():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return None if len(calls) == 2 else "still here"

    with WaitNotices(describe, log, interval_s=0.1):
        time.sleep(0.6)
    texts = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert texts[0].startswith("(could not describe what this process waits for: RuntimeError: boom)")
    assert "still here" in texts

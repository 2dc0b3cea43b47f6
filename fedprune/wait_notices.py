"""No silent waits: while a process has logged nothing for a while, a line saying what it is
waiting for (or doing).

A newcomer who starts an aggregator and an agent and sees nothing for minutes cannot tell a
federation waiting for its devices from a hung one. ``WaitNotices`` watches everything the
process logs (a handler on the root logger) and, when nothing has been logged for
``interval_s``, logs ``describe()``: the aggregator says which devices it waits for and until
when, the agent whether it is connecting, waiting for its aggregator, waiting for a task or
training. A wait that goes on with nothing else logged is told every ``interval_s`` for its
first ``thin_after_s``, then every ``slow_interval_s``, so a device idle for a day writes a line a
minute, not six.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["WaitNotices"]


class _LastRecord(logging.Handler):
    """Remembers when the process last logged anything (at any logger, any enabled level)."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.at = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.at = time.monotonic()


class WaitNotices:
    """``with WaitNotices(describe, log):`` logs ``describe()`` at INFO whenever the process has
    been silent for ``interval_s`` (``describe`` returning None or "" skips that notice)."""

    def __init__(self, describe: Callable[[], str | None], logger: logging.Logger, *, interval_s: float = 10.0,
                 thin_after_s: float = 60.0, slow_interval_s: float = 60.0, level: int = logging.INFO) -> None:
        self.describe, self.log, self.level = describe, logger, level
        self.interval_s, self.thin_after_s, self.slow_interval_s = interval_s, thin_after_s, slow_interval_s
        self._last = _LastRecord()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="wait-notices", daemon=True)
        self._quiet_since: float | None = None  # when the notices began with nothing else logged between them
        self._own_at = 0.0  # when the last notice was logged

    def __enter__(self) -> "WaitNotices":
        logging.getLogger().addHandler(self._last)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        logging.getLogger().removeHandler(self._last)

    def touch(self) -> None:
        """Count a line the process printed (not logged) as output: no notice is due for a while."""
        self._last.at = time.monotonic()

    def _watch(self) -> None:
        tick = min(1.0, self.interval_s / 10)
        while not self._stop.wait(tick):
            now = time.monotonic()
            if self._last.at > self._own_at + tick / 2:  # something else was logged: a new wait
                self._quiet_since = None
            thin = self._quiet_since is not None and now - self._quiet_since >= self.thin_after_s
            if now - self._last.at < (self.slow_interval_s if thin else self.interval_s) - tick / 2:
                continue
            try:
                notice = self.describe()
            except Exception as e:  # noqa: BLE001 - a notice must never take the process down
                notice = f"(could not describe what this process waits for: {type(e).__name__}: {e})"
            if notice:
                self.log.log(self.level, "%s", notice)
            if self._quiet_since is None:
                self._quiet_since = now
            self._own_at = self._last.at = time.monotonic()  # also when this logger's records stop short of the root

"""When to log one more of a repeated event: peers decide how often it repeats.

A flood of a million refused messages must not become a million log lines; the first few, then
one line per power of ten, each with the running count, say all there is to say.
"""

from __future__ import annotations

LOG_FIRST = 10


def worth_logging(count: int) -> bool:
    """Whether the ``count``-th occurrence (from 1) gets a log line: the first ``LOG_FIRST``, then
    the 100th, 1,000th, 10,000th, ..."""
    if count <= LOG_FIRST:
        return True
    while count % 10 == 0:
        count //= 10
    return count == 1

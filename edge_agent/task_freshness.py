"""The newest task a device took, by the time the aggregator issued it: what an older task
replayed on the device's task topic is refused against.

A signature binds a task to its topic, not to its time: whoever can publish there (anyone, on an
open broker; a compromised broker) could replay a task the aggregator signed rounds ago, and the
device trained that round again and took on its older global model. Each task now carries
``issued_us``, later for every task the aggregator issues (``FederationState.issue_task``); a
device refuses one issued before the newest it took, and once it has taken one that carries the
field, any task without it (docs/protocol.md, section 12.3). The newest is kept in the device's
state folder, so a restart does not reopen the window.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedprune.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["NewestTask"]

FILE_NAME = "newest_task.json"


class NewestTask:
    """The ``issued_us`` of the newest task taken (None: none with the field yet), kept in
    ``<state_dir>/newest_task.json`` when there is a state folder."""

    def __init__(self, state_dir: str | Path | None = None) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir else None
        self.issued_us: int | None = None
        if self.path is not None and self.path.is_file():
            try:
                value = json.loads(self.path.read_text())["issued_us"]
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    self.issued_us = value
                else:
                    raise ValueError(f"issued_us {value!r} is not a non-negative integer")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s unreadable (%s): tasks are taken as if none had been", self.path, e)

    def refusal(self, issued_us: int | None) -> str | None:
        """Why a task issued at ``issued_us`` is refused, or None if it is not older than the
        newest taken."""
        if self.issued_us is None:
            return None
        if issued_us is None:
            return (f"a task without an issue time, after one issued at {self.issued_us} us: replayed from an "
                    "aggregator of an earlier version, or sent by one")
        if issued_us < self.issued_us:
            return (f"a task issued at {issued_us} us, before the newest taken ({self.issued_us} us): an older task "
                    "replayed, or an aggregator whose clock and checkpoint are behind the one that sent the newest")
        return None

    def take(self, issued_us: int | None) -> None:
        """Remember a task taken (one without the field changes nothing)."""
        if issued_us is None or (self.issued_us is not None and issued_us <= self.issued_us):
            return
        self.issued_us = issued_us
        if self.path is not None:
            atomic_write_bytes(self.path, json.dumps({"issued_us": issued_us}).encode())

"""The newest task and final model a device took, by the time the aggregator issued them: what
an older one replayed on the device's topic is refused against.

A signature binds a message to its topic, not to its time: whoever can publish there (anyone, on
an open broker; a compromised broker) could replay a task the aggregator signed rounds ago, and
the device trained that round again and took on its older global model; or replay an earlier
run's final model, and the device installed it over the current one. Tasks and final models now
carry ``issued_us``, later for every one the aggregator issues (``FederationState.issue``);
a device refuses one issued before the newest of its kind it took, and once it has taken one that
carries the field, any of that kind without it (docs/protocol.md, sections 12.3 and 19). The
newest are kept in the device's state folder, so a restart does not reopen the window.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedprune.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["KINDS", "NewestIssued"]

FILE_NAME = "newest_issued.json"
KINDS = ("task", "final model")


class NewestIssued:
    """The ``issued_us`` of the newest message of each kind taken (a kind absent: none with the
    field yet) from the aggregator whose key id is ``signer`` (hex), kept in
    ``<state_dir>/newest_issued.json`` when there is a state folder, beside those of any other key
    the device trusted before: only messages signed by the trusted key open, so each key's times
    hold only against its own messages, and a device moved back to a key keeps that key's."""

    def __init__(self, state_dir: str | Path | None = None, signer: str = "") -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir else None
        self.signer = signer
        self._by_signer: dict[str, dict[str, int]] = {}
        if self.path is not None and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
                if not isinstance(saved, dict) or not all(
                        isinstance(times, dict) and all(k in KINDS and isinstance(v, int) and not isinstance(v, bool)
                                                        and v >= 0 for k, v in times.items())
                        for times in saved.values()):
                    raise ValueError(f"expected {{key id: {{kind: non-negative integer}}}} for kinds {list(KINDS)}")
                self._by_signer = saved
            except (OSError, ValueError) as e:
                log.warning("%s unreadable (%s): messages are taken as if none had been", self.path, e)
        self.issued_us: dict[str, int] = self._by_signer.setdefault(signer, {})

    def refusal(self, kind: str, issued_us: int | None) -> str | None:
        """Why a ``kind`` message issued at ``issued_us`` is refused, or None if it is not older
        than the newest of its kind taken."""
        newest = self.issued_us.get(kind)
        if newest is None:
            return None
        if issued_us is None:
            return (f"a {kind} without an issue time, after one issued at {newest} us: replayed from an "
                    "aggregator of an earlier version, or sent by one")
        if issued_us < newest:
            return (f"a {kind} issued at {issued_us} us, before the newest taken ({newest} us): an older one "
                    "replayed, or an aggregator whose clock and checkpoint are behind the one that sent the newest")
        return None

    def take(self, kind: str, issued_us: int | None) -> None:
        """Remember a ``kind`` message taken (one without the field changes nothing)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {list(KINDS)}")
        newest = self.issued_us.get(kind)
        if issued_us is None or (newest is not None and issued_us <= newest):
            return
        self.issued_us[kind] = issued_us
        if self.path is not None:
            atomic_write_bytes(self.path, json.dumps(self._by_signer).encode())

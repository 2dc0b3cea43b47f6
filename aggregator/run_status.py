"""Where a run stands, for the people watching it: what the aggregator is doing or waiting for
(``describe``: the wait notices), and a JSON snapshot for the status page (``snapshot``): the
round and its progress, every device, and every completed round's record.

Fed by the round loop (phases, attempts, completed rounds) and by the collector's progress
reports (each update: whose, its size, why it was refused). Thread-safe: the loop writes, the
status page's threads read. Holds nothing secret: no broker URL, credential or weight.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedprune.aggregator.collect import RoundProgress
    from fedprune.aggregator.records import RoundRecord, RunResult
    from fedprune.aggregator.registry import DeviceRegistry, OtherFederations
    from fedprune.task import Task

__all__ = ["DeviceStats", "RunStatus"]

UNKNOWN = "unknown"


@dataclass
class DeviceStats:
    """What one device did in this run, as the aggregator saw it."""

    rounds_done: int = 0  # accepted updates
    bytes_up: int = 0  # every update message it sent, accepted or not
    bytes_down: int = 0  # the tasks sent to it
    last_error: str = ""  # the last failure it reported, or why its last refused update was refused
    last_round: int = 0  # the last round it was selected for
    last_update: float = 0.0  # time.time() its last update came in


@dataclass
class _Attempt:
    round: int
    attempt: int
    selected: tuple[str, ...]
    deadline: float  # time.monotonic()
    reported: set[str]
    refused: set[str]


class RunStatus:
    """The live state of one run (see the module's docstring)."""

    def __init__(self, task: Task, registry: DeviceRegistry, others: OtherFederations | None = None,
                 name: str = "") -> None:
        self.task, self.registry, self.others = task, registry, others
        self.name = name  # the run folder's name
        self._lock = threading.Lock()
        self._phase = "starting: evaluating the initial model, then waiting for devices"
        self._waiting: tuple[int, int, float] | None = None  # devices wanted, quorum, deadline
        self._attempt: _Attempt | None = None
        self._devices: dict[str, DeviceStats] = {}
        self._rounds: list[dict[str, Any]] = []
        self._outcome: dict[str, Any] = {}

    # --- written by the round loop and the collector ---
    def phase(self, text: str) -> None:
        with self._lock:
            self._phase, self._waiting, self._attempt = text, None, None

    def waiting_for_devices(self, wanted: int, quorum: int, timeout_s: float) -> None:
        with self._lock:
            self._phase, self._attempt = "waiting for devices", None
            self._waiting = (wanted, quorum, time.monotonic() + timeout_s)

    def attempt_opened(self, round_: int, attempt: int, selected: list[str], task_bytes: int, timeout_s: float) -> None:
        with self._lock:
            self._phase, self._waiting = "collecting updates", None
            self._attempt = _Attempt(round_, attempt, tuple(selected), time.monotonic() + timeout_s, set(), set())
            for device_id in selected:
                stats = self._devices.setdefault(device_id, DeviceStats())
                stats.bytes_down += task_bytes
                stats.last_round = round_

    def progress(self, p: RoundProgress) -> None:
        """A collector's report on one update (``p.device_id`` empty: the attempt opened)."""
        if not p.device_id:
            return
        with self._lock:
            stats = self._devices.setdefault(p.device_id, DeviceStats())
            stats.bytes_up += p.update_bytes
            stats.last_update = time.time()
            attempt = self._attempt
            if p.refused:
                stats.last_error = p.refused[:300]
                if attempt is not None:
                    attempt.refused.add(p.device_id)
            else:
                stats.rounds_done += 1
                if attempt is not None:
                    attempt.reported.add(p.device_id)

    def round_completed(self, record: RoundRecord) -> None:
        with self._lock:
            self._rounds.append(asdict(record))
            self._phase, self._attempt = f"round {record.round} completed", None

    def rounds_restored(self, records: list[RoundRecord]) -> None:
        """The rounds a resumed run completed before (charts start from round 1)."""
        with self._lock:
            self._rounds = [asdict(r) for r in records]

    def finished(self, result: RunResult) -> None:
        with self._lock:
            self._phase, self._attempt, self._waiting = "finished", None, None
            self._outcome = {"final_accuracy": result.final_accuracy, "final_sparsity": result.final_sparsity,
                             "final_sparsity_all_weights": result.final_sparsity_all,
                             "not_pruned": dict(result.not_pruned),
                             "exports": [{k: e.get(k) for k in ("precision", "size_bytes", "accuracy", "note")}
                                         for e in result.exports]}

    # --- read by the wait notices and the status page ---
    def describe(self) -> str:
        """One line: what the aggregator is waiting for, or doing."""
        with self._lock:
            now = time.monotonic()
            if self._waiting is not None:
                wanted, quorum, deadline = self._waiting
                online = len(self.registry.online())
                hint = self.others.hint() if self.others is not None else ""
                return (f"waiting for devices on federation '{self.task.federation.id}': {online} of {wanted} "
                        f"online (at least {quorum} needed), {max(0.0, deadline - now):.0f} s left"
                        + (f"; {hint}" if hint else ""))
            a = self._attempt
            if a is not None:
                due = [d for d in a.selected if d not in a.reported and d not in a.refused]
                shown = ", ".join(due[:10]) + (f" and {len(due) - 10} more" if len(due) > 10 else "")
                return (f"round {a.round} attempt {a.attempt}: waiting for updates from {shown or 'no one'} "
                        f"({len(a.reported)} of {len(a.selected)} in; deadline in {max(0.0, a.deadline - now):.0f} s)")
            return self._phase

    def snapshot(self) -> dict[str, Any]:
        """The status page's JSON: the run, every device, every completed round."""
        activity = self.describe()
        with self._lock:
            a = self._attempt
            rounds = list(self._rounds)
            current = a.round if a is not None else (rounds[-1]["round"] if rounds else 0)
            run = {
                "name": self.name, "task": self.task.source, "federation": self.task.federation.id,
                "rounds": self.task.federation.rounds, "devices_per_round": self.task.federation.devices_per_round,
                "min_devices": self.task.federation.min_devices, "dataset": self.task.data.dataset,
                "model": self.task.model.factory, "phase": self._phase, "activity": activity,
                "round": current, "completed_rounds": rounds[-1]["round"] if rounds else 0,
                "attempt": a.attempt if a is not None else None,
                "progress": None if a is None else {"selected": len(a.selected), "reported": len(a.reported),
                                                    "refused": len(a.refused),
                                                    "deadline_in_s": round(max(0.0, a.deadline - time.monotonic()), 1)},
                "other_federations": self.others.seen() if self.others is not None else {},
                **self._outcome,
            }
            stats = {d: asdict(s) for d, s in self._devices.items()}
        devices = []
        for info in self.registry.devices():
            mine = stats.pop(info.device_id, asdict(DeviceStats()))
            devices.append({"device_id": info.device_id, "online": info.online, "num_samples": info.num_samples,
                            # Heard from: its last presence, or its last update.
                            "last_seen": max(info.last_seen, mine["last_update"]),
                            # From its presence; an older agent names neither (it trains with Keras).
                            "trainer": info.trainer or UNKNOWN, "runtime": info.runtime or UNKNOWN, **mine})
        return {"run": run, "devices": devices, "rounds": rounds, "time": time.time()}

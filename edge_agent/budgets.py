"""The limits a device sets on one round's training, and what it remembers to enforce them.

- ``max_train_memory_mb``: the training child's resident memory. The agent watches it (every
  50 ms, from ``/proc``) and kills the child above it; a device that knows from an earlier round
  that this model's training needs more does not start it at all. Either way the aggregator gets
  a failure update that names the budget.
- ``max_round_s``: seconds from the start of training to the update. The child is killed at the
  deadline (or at the task's own ``deadline_s``, if sooner) and a failure update goes out, so a
  slow device never holds a round past its end.

A hard limit on top (a Pi's OOM killer acts faster than any poll) belongs to the service
manager: ``MemoryMax=`` in the systemd unit (``deploy/fedprune-agent.service``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedprune.fileio import atomic_write_json

log = logging.getLogger(__name__)


class BudgetExceeded(RuntimeError):
    """A round would break, or broke, one of the device's budgets; the message names it."""


@dataclass(frozen=True)
class Budgets:
    max_train_memory_mb: float | None = None  # None: no limit
    max_round_s: float | None = None  # None: the task's deadline_s only

    def __post_init__(self) -> None:
        for name in ("max_train_memory_mb", "max_round_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"budgets.{name} must be > 0 (or unset for no limit), got {value}")

    def round_deadline_s(self, task_deadline_s: float) -> float:
        """Seconds this round's training may take: the budget or the task's deadline, if sooner."""
        limits = [s for s in (self.max_round_s, task_deadline_s) if s and s > 0]
        return min(limits) if limits else float("inf")

    def memory_message(self, used_mb: float, when: str) -> str:
        return (f"training {when} {used_mb:.0f} MB of memory, over this device's budget "
                f"max_train_memory_mb = {self.max_train_memory_mb:.0f}; raise budgets.max_train_memory_mb "
                "in the agent's config, or train a smaller model or batch on this device")

    def time_message(self, limit_s: float) -> str:
        return (f"training did not finish within {limit_s:.0f} s (max_round_s = {self.max_round_s}, "
                "or the task's deadline); the child was stopped. Raise budgets.max_round_s, or use fewer "
                "local epochs or samples on this device")


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory of a process now, in MB (Linux ``/proc``); None where it cannot be read."""
    return _status_mb(pid, "VmRSS")


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """The most resident memory a process has used since it started (its exec), in MB.

    ``VmHWM`` of ``/proc``, not ``getrusage``: ``ru_maxrss`` of a child carries its parent's high
    water mark through ``fork`` and ``exec`` (a ``pass`` script started by a process holding
    800 MB reports 800 MB), so it overstates a small child of a big parent.
    """
    return _status_mb(pid, "VmHWM")


def _status_mb(pid: int | str, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """The peak memory of the last training child, per model architecture, kept across restarts.

    A device whose budget is below what its model's training needed last time refuses the round
    at once, instead of loading TensorFlow only to be stopped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._peaks: dict[str, float] = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except FileNotFoundError:
            self._peaks = {}
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s unreadable (%s); forgetting earlier peaks", path, e)
            self._peaks = {}

    def get(self, architecture_digest: str) -> float | None:
        return self._peaks.get(architecture_digest)

    def record(self, architecture_digest: str, peak_mb: float) -> None:
        self._peaks[architecture_digest] = round(peak_mb, 1)
        atomic_write_json(self.path, self._peaks)

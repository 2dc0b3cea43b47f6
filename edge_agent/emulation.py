"""A Raspberry-Pi-like device on a bigger host, for tests and benchmarks.

- **CPU**: the agent and its training child are pinned to ``cpus`` cores (``taskset``, or
  ``os.sched_setaffinity`` on this process). The cores are still x86 ones: clock, caches and
  SIMD (AVX vs NEON) differ, so times are only comparable between runs on the same host.
- **Memory**: ``memory_mb`` caps the address space (``prlimit --as``, i.e. ``ulimit -v``) of the
  process and its children. It is not RAM: TensorFlow reserves about 1.7 GB of address space on
  import while its resident set is about 0.6 GB, so a 1 GB board cannot be emulated with a
  1 GB address-space cap. The agent's own resident-memory budget (``budgets.max_train_memory_mb``)
  is the figure that carries over to a real board.
- **Link**: ``uplink_kbps`` and ``latency_ms`` delay each message the agent publishes by
  ``latency + size / bandwidth`` (upload only; the broker's downlink is not slowed here).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SlowLink:
    """An uplink of ``kbps`` kilobits per second and ``latency_ms`` per message."""

    kbps: float
    latency_ms: float = 0.0

    def delay_s(self, nbytes: int) -> float:
        return self.latency_ms / 1000 + nbytes * 8 / (self.kbps * 1000)

    def wait(self, nbytes: int) -> None:
        time.sleep(self.delay_s(nbytes))


@dataclass(frozen=True)
class DeviceProfile:
    cpus: int = 1
    memory_mb: int | None = None  # address-space cap of the agent and its children
    uplink_kbps: float | None = None
    latency_ms: float = 0.0

    def command_prefix(self) -> list[str]:
        """``taskset``/``prlimit`` in front of a command, so it and its children run under the
        profile (the tools come with util-linux)."""
        prefix: list[str] = []
        if self.cpus:
            if shutil.which("taskset") is None:
                raise RuntimeError("taskset not found: install util-linux")
            prefix += ["taskset", "-c", ",".join(str(c) for c in self.cpu_set())]
        if self.memory_mb:
            if shutil.which("prlimit") is None:
                raise RuntimeError("prlimit not found: install util-linux")
            prefix += ["prlimit", f"--as={self.memory_mb * 1024 * 1024}", "--"]
        return prefix

    def cpu_set(self) -> list[int]:
        allowed = sorted(os.sched_getaffinity(0))
        if self.cpus > len(allowed):
            raise ValueError(f"the profile wants {self.cpus} CPUs, this process may use {len(allowed)}")
        return allowed[: self.cpus]

    def link(self) -> SlowLink | None:
        return SlowLink(self.uplink_kbps, self.latency_ms) if self.uplink_kbps else None


#: A Raspberry Pi 4 with 1 GB on a poor Wi-Fi link, as far as this host can play one: one core,
#: a 4 GB address-space cap (TensorFlow needs about 2 GB of it), 2 Mbit/s up, 50 ms per message.
PI_PROFILE = DeviceProfile(cpus=1, memory_mb=4096, uplink_kbps=2000, latency_ms=50)

"""Device processes of one simulation: ``fedprune-simulate --processes P``.

The devices of one process share one Python interpreter: one event loop for their connections and
one TensorFlow runtime on which they train one after another. To use more than one core, and to
keep each process's connections and memory in bounds, the fleet is cut into P contiguous ranges of
device ids and each range runs in a child process of its own (``fedprune-simulate --device-ids
A-B --no-aggregator``) against the same broker, trusting the run's aggregator key. The parent runs
the aggregator. This module starts those children, watches them, stops them, and merges the
counters each prints as its last line.

A child that fails before the aggregator's run ends (a crash, killed for memory) stops the
simulation: the watcher records which child and where its log is, and interrupts the parent's main
thread (a SIGINT to itself, as Ctrl-C would), which reports it (``DeviceProcesses.failure``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["BASE_OPEN_FILES", "CONNECTED_MARKER", "ChildFailure", "DeviceProcesses", "child_environment",
           "device_command", "exit_with_parent", "merge_counters", "raise_open_files_limit", "split_ranges"]

#: file descriptors a process needs beside its MQTT connections (TensorFlow's libraries, logs, pipes)
BASE_OPEN_FILES = 1024
#: how a ``--no-aggregator`` process's line saying its devices are connected begins
CONNECTED_MARKER = "connected:"


def split_ranges(num_devices: int, processes: int) -> list[range]:
    """``num_devices`` device ids cut into ``processes`` contiguous ranges, sizes differing by at
    most one (the first ones larger), in order: ``split_ranges(10, 3)`` is 0-3, 4-6, 7-9."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if num_devices < processes:
        raise ValueError(f"{num_devices} devices cannot fill {processes} device processes; "
                         f"use at most {num_devices} processes")
    size, extra = divmod(num_devices, processes)
    ranges, start = [], 0
    for k in range(processes):
        stop = start + size + (1 if k < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``needed`` (children and the private
    Mosquitto inherit it: one descriptor per MQTT connection). Returns the new soft limit.
    RuntimeError saying what to do if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"this simulation needs {needed:,} open files (one per device connection in the broker, plus "
            f"{BASE_OPEN_FILES:,}), but this shell allows at most {hard:,} (ulimit -Hn). Raise the hard limit "
            "(as root: `ulimit -Hn 65536` in the shell that starts it, `nofile` in /etc/security/limits.conf, or "
            "LimitNOFILE= for a systemd service), simulate fewer devices, or use --broker mqtt://HOST:PORT with "
            "a broker on another host")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    log.info("open files limit raised from %d to %d", soft, needed)
    return needed


def merge_counters(counters: list[dict]) -> dict:
    """The fleet counters of several device processes (each ``Fleet.stats()``) as one: numbers
    summed, tables of numbers (``train_s_by_round``) summed key by key, and each process's own
    under ``"processes"``."""
    merged: dict = {}
    for c in counters:
        for name, value in c.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[name] = merged.get(name, 0) + value
            elif isinstance(value, dict):
                table = merged.setdefault(name, {})
                for key, number in value.items():
                    table[key] = table.get(key, 0) + number
    merged["processes"] = counters
    return merged


@dataclass(frozen=True)
class ChildFailure:
    """A device process that ended before the run did."""

    index: int
    device_ids: range
    returncode: int
    log_path: Path

    def message(self) -> str:
        ids = f"{self.device_ids.start}-{self.device_ids.stop - 1}"
        how = f"was killed by signal {-self.returncode}" if self.returncode < 0 else \
            f"exited with status {self.returncode}"
        return (f"device process {self.index} (devices {ids}) {how} before the run ended; "
                f"its log: {self.log_path}{_log_tail(self.log_path)}")


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("\n  " + "\n  ".join(tail)) if tail else ""


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up here: between fork and exec a child must not import or load
    anything (another thread of the parent may have held the import lock at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the parent dies (even by SIGKILL), so no orphaned devices
    (or broker) keep running for an aggregator that is gone."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _device_process_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A device process ends with the parent, and takes SIGINT as Ctrl-C (a simulator started in
    the background or under nohup ignores SIGINT, and a child would inherit that: the parent's
    clean stop would then wait for the SIGKILL)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    exit_with_parent()


class DeviceProcesses:
    """``with DeviceProcesses(cmd, ranges, log_dir) as procs``: one child per range of device ids,
    started at once; leaving the block stops those still running (SIGINT, then SIGKILL).

    ``base_command``: ``fedprune-simulate`` with everything but ``--device-ids`` (task, devices,
    ``--no-aggregator``, broker, key). Each child's output goes to ``<log_dir>/devices-<k>.log``.
    """

    def __init__(self, base_command: list[str], ranges: list[range], log_dir: Path,
                 env: dict[str, str] | None = None,
                 on_connected: Callable[[int, str, int], None] | None = None) -> None:
        """``on_connected(index, line, ready)``: child ``index`` printed ``line`` (its devices are
        connected); ``ready`` children have so far. Called from the watching thread."""
        self.base_command, self.ranges, self.log_dir = base_command, ranges, Path(log_dir)
        self.env = env
        self.on_connected = on_connected
        self.connected: set[int] = set()  # children whose devices are all connected
        self._log_offsets: dict[int, int] = {}
        self.procs: list[subprocess.Popen] = []
        self.failure: ChildFailure | None = None
        self._finishing = threading.Event()  # the run is over: children ending now is expected
        self._watcher: threading.Thread | None = None

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"devices-{index}.log"

    def start(self) -> DeviceProcesses:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for k, ids in enumerate(self.ranges):
            with open(self.log_path(k), "wb") as out:  # the child holds its own descriptor
                self.procs.append(subprocess.Popen(
                    [*self.base_command, "--device-ids", f"{ids.start}-{ids.stop - 1}"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                    # Ctrl-C reaches the parent only: it stops the children in order and says so.
                    start_new_session=True, preexec_fn=_device_process_setup if sys.platform == "linux" else None))
            log.info("device process %d (pid %d): devices %d-%d, log %s", k, self.procs[-1].pid, ids.start,
                     ids.stop - 1, self.log_path(k))
        self._watcher = threading.Thread(target=self._watch, name="device-processes", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._finishing.is_set():
            for k, proc in enumerate(self.procs):
                if k not in self.connected:
                    self._look_for_connected(k)
                code = proc.poll()
                # Status 0: the child saw the aggregator announce the run's end (it may exit before
                # the parent's run returns); anything else ends the run.
                if code is not None and code != 0 and not self._finishing.is_set():
                    self.failure = ChildFailure(k, self.ranges[k], code, self.log_path(k))
                    log.error("%s", self.failure.message())
                    # A real signal, not _thread.interrupt_main(): it also wakes a main thread
                    # blocked in a wait, and the aggregator's loop there stops at once.
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            time.sleep(0.2)

    def _look_for_connected(self, index: int) -> None:
        """Read what child ``index`` wrote since the last look (only until its devices are
        connected: its log may grow long) for the line that says so."""
        try:
            with open(self.log_path(index), "rb") as f:
                f.seek(self._log_offsets.get(index, 0))
                text = f.read()
        except OSError:
            return
        whole = text[:text.rfind(b"\n") + 1]  # a line still being written is read next time
        self._log_offsets[index] = self._log_offsets.get(index, 0) + len(whole)
        for line in whole.decode(errors="replace").splitlines():
            if line.startswith(CONNECTED_MARKER):
                self.connected.add(index)
                if self.on_connected is not None:
                    self.on_connected(index, line, len(self.connected))
                return

    def finish(self, timeout_s: float = 120.0) -> list[dict]:
        """After the aggregator's run: wait for every child to see its end and exit; their
        counters. RuntimeError naming the child if one fails or does not end in time."""
        self._finishing.set()
        counters = []
        deadline = time.monotonic() + timeout_s
        for k, proc in enumerate(self.procs):
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"device process {k} did not end within {timeout_s:.0f} s of the run's end; "
                                   f"its log: {self.log_path(k)}") from None
            if code != 0:
                raise RuntimeError(ChildFailure(k, self.ranges[k], code, self.log_path(k)).message())
            counters.append(self._counters(k))
        return counters

    def _counters(self, index: int) -> dict:
        """The JSON line a ``--no-aggregator`` process prints last."""
        for line in reversed(self.log_path(index).read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    break
        raise RuntimeError(f"device process {index} ended without its counters; its log: {self.log_path(index)}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the children still running: SIGINT (they disconnect their devices cleanly), then
        SIGKILL after ``timeout_s``."""
        self._finishing.set()
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for p in running:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("device process %d did not stop within %.0f s: killed", p.pid, timeout_s)
                p.kill()
                p.wait()

    def __enter__(self) -> DeviceProcesses:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def device_command(task_file: str, num_devices: int, broker_url: str, aggregator_key: str,
                   extra: list[str] | None = None) -> list[str]:
    """``fedprune-simulate`` for a device process (``--device-ids`` added per child), run by this
    interpreter so that it runs this checkout's code."""
    return [sys.executable, "-m", "fedprune.simulation.cli", "--task", task_file, "--devices", str(num_devices),
            "--no-aggregator", "--broker", broker_url, "--aggregator-key", aggregator_key, *(extra or [])]


def child_environment(processes: int = 1) -> dict[str, str]:
    """The parent's environment, unbuffered, so a child's log is whole up to a crash, and with
    glibc's malloc held to two arenas unless the environment says otherwise: a device process's
    threads (training, codec pool, event loop, TensorFlow's) otherwise each grow an arena of their
    own, and at 10,000 devices the whole simulation peaked at 7.08 GiB with two arenas against
    7.44-7.69 GiB without (one run against two, docs/benchmarks.md).

    TensorFlow's thread pools are sized to each child's share of the cores (``processes`` children),
    unless the environment sets them: every child sized its pools to the whole machine, so two
    children on two cores ran four busy threads, and their training took 29 % more CPU for the same
    work (issue 17, docs/benchmarks.md)."""
    share = str(max(1, (os.cpu_count() or 1) // max(1, processes)))
    return {"MALLOC_ARENA_MAX": "2", "TF_NUM_INTRAOP_THREADS": share, "TF_NUM_INTEROP_THREADS": share,
            **os.environ, "PYTHONUNBUFFERED": "1"}

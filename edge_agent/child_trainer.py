"""Training in a child process, so the long-lived agent never loads TensorFlow.

TensorFlow costs about 600 MB of resident memory once imported, and gives little of it back. The
agent (MQTT, scheduling, inference: about 40 MB) therefore runs each round's training, pruning
and TFLite export in ``python -m fedprune.edge_agent.train_worker``, a child that exits when the round's
work is done. They talk through files in ``<state dir>/work/`` (:mod:`fedprune.edge_agent.jobfiles`).

A device without TensorFlow (``trainer="litert"``) trains in the same kind of child, with the
architecture's trainable TFLite file: 70-90 MB while it trains, given back after each round; a
runtime crash on a file from the network ends the child, not the agent; and the same memory and
time budgets hold (docs/edge.md says why the child and not the agent).

The child writes its result first and exports the global model to TFLite after, so the update
leaves as soon as training ends; the agent installs the exported model (:mod:`edge_agent.
model_store`) once the child exits, and starts no second child before the first has exited.

Budgets (:mod:`fedprune.edge_agent.budgets`) are enforced here: a child over the memory budget or past
the round's deadline is killed (its whole process group) and the round reports a failure.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedprune.architecture import registered_custom_layers
from fedprune.fileio import atomic_write_bytes
from fedprune.converters.protocol import Architecture, TrainTask
from fedprune.data_files import DataOptions
from fedprune.edge_agent import jobfiles
from fedprune.edge_agent.budgets import BudgetExceeded, Budgets, PeakMemory, peak_rss_mb
from fedprune.edge_agent.device import TrainResult
from fedprune.edge_agent.model_store import ModelInfo, ModelStore, ModelStoreError
from fedprune.edge_agent.trainable_files import TrainableFiles
from fedprune.edge_agent.training_checks import TrainingError

log = logging.getLogger(__name__)

POLL_S = 0.05
EXPORT_PRECISIONS = ("int8", "float32", "off")


class TrainingChildFailed(RuntimeError):
    """The training child ended without a result; the message carries its own error."""


@dataclass
class ChildReport:
    """How one training child ended."""

    exit_code: int | None = None  # negative: killed by that signal
    peak_rss_mb: float = 0.0  # its VmHWM, sampled while it ran (see budgets.peak_rss_mb)
    wall_s: float = 0.0
    result_s: float | None = None  # when its result appeared, from its start
    killed_for: str | None = None  # why the agent killed it: the budget message
    over_memory: bool = False  # killed for the memory budget


class _Child:
    """One running ``train_worker``, watched by a thread: memory, deadline, result, exit."""

    def __init__(self, folder: Path, budgets: Budgets, deadline_s: float, command_prefix: list[str]) -> None:
        self.folder = folder
        self.budgets = budgets
        self.deadline_s = deadline_s
        self.report = ChildReport()
        self.result_ready = threading.Event()
        self.exited = threading.Event()
        self.settled = threading.Event()  # exited, and its model installed (by the trainer)
        self._start = time.monotonic()
        with open(folder / jobfiles.LOG, "ab") as log_file:
            self.proc = subprocess.Popen(
                [*command_prefix, sys.executable, "-m", "fedprune.edge_agent.train_worker", str(folder)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a kill takes anything it started
            )
        self._thread = threading.Thread(target=self._watch, name=f"watch-train-{self.proc.pid}", daemon=True)
        self._thread.start()

    def kill(self, reason: str | None = None) -> None:
        if self.exited.is_set():
            return
        if reason and self.report.killed_for is None:
            self.report.killed_for = reason
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _watch(self) -> None:
        pid = self.proc.pid
        limit_mb = self.budgets.max_train_memory_mb
        deadline = self._start + self.deadline_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.monotonic()
            used = peak_rss_mb(pid)
            self.report.peak_rss_mb = max(self.report.peak_rss_mb, used or 0.0)
            if not self.result_ready.is_set() and (self.folder / jobfiles.RESULT).is_file():
                self.report.result_s = now - self._start
                self.result_ready.set()
                deadline = now + self.deadline_s  # the export gets as long again, then it is stopped
            if limit_mb is not None and used is not None and used > limit_mb:
                self.report.over_memory = True
                self.kill(self.budgets.memory_message(used, "reached at least"))
            elif now > deadline:
                self.kill(self.budgets.time_message(self.deadline_s) if not self.result_ready.is_set()
                          else f"the model export did not finish within {self.deadline_s:.0f} s after training")
            time.sleep(POLL_S)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        self.report.exit_code = self.proc.returncode
        self.report.wall_s = time.monotonic() - self._start
        if not self.result_ready.is_set() and (self.folder / jobfiles.RESULT).is_file():
            self.report.result_s = self.report.wall_s
            self.result_ready.set()
        self.exited.set()
        self.result_ready.set()  # wake a waiter: there will be no result after the exit


class ChildProcessTrainer:
    """A ``Trainer`` (see :mod:`fedprune.edge_agent.device`) that trains in a child process.

    Args:
        state_dir: The agent's state folder; the child works in ``state_dir/work`` and the
            exported models go to ``state_dir/model`` (:class:`ModelStore`).
        data_path: The device's data (``.npz``, ``.csv`` or a folder of images); the child reads it,
            so the agent never holds the data.
        data_options: How the child reads it (a .csv's label column, the images' size).
        budgets: Memory and time limits for each round.
        export_precision: What the child exports each round's global model to: ``"int8"``,
            ``"float32"`` (both sparse TFLite), or ``"off"``.
        command_prefix: Put in front of the child's command line (e.g. ``["taskset", "-c",
            "0"]``); empty by default.
        trainer: ``"keras"`` (TensorFlow in the child) or ``"litert"`` (the architecture's
            trainable TFLite file from ``trainable_files``, no TensorFlow; nothing is exported).

    ``train``'s ``x`` and ``y`` are ignored: the child loads ``data_path`` itself.
    """

    def __init__(self, state_dir: str | Path, data_path: str | Path, *, budgets: Budgets = Budgets(),
                 export_precision: str = "int8", command_prefix: list[str] | None = None,
                 data_options: DataOptions = DataOptions(), trainer: str = "keras",
                 trainable_files: TrainableFiles | None = None) -> None:
        if export_precision not in EXPORT_PRECISIONS:
            raise ValueError(f"model export must be one of {EXPORT_PRECISIONS}, got {export_precision!r}")
        if trainer not in ("keras", "litert"):
            raise ValueError(f"trainer must be 'keras' or 'litert', got {trainer!r}")
        if trainer == "litert" and trainable_files is None:
            raise ValueError("trainer 'litert' needs the device's TrainableFiles")
        self.trainer, self.trainable_files = trainer, trainable_files
        self.state_dir = Path(state_dir)
        self.data_path = str(Path(data_path).resolve())
        self.data_options = data_options
        self.budgets = budgets
        self.export_precision = export_precision
        self.command_prefix = list(command_prefix or [])
        self.work_dir = self.state_dir / "work"
        self.models = ModelStore(self.state_dir / "model", writer=True)
        self.peaks = PeakMemory(self.state_dir / "training-peaks.json")
        self.last_report: ChildReport | None = None
        self._child: _Child | None = None
        self._lock = threading.Lock()
        self._closed = False
        # A round in flight when the agent died cannot be resumed: its task is still retained on
        # the broker while the round is open, and is trained again from the start.
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def train(self, architecture: Architecture, task: TrainTask, x: object = None, y: object = None) -> TrainResult:
        with self._lock:
            if self._closed:
                raise TrainingChildFailed("the agent is stopping")
            self.wait_idle()
            limit = self.budgets.max_train_memory_mb
            peak_key = self._peak_key(architecture)
            known = self.peaks.get(peak_key)
            if limit is not None and known is not None and known > limit:
                raise BudgetExceeded(self.budgets.memory_message(known, "needed") + " (measured in an earlier round; "
                                     "not started)")
            trainable = None
            if self.trainer == "litert":
                trainable = self.trainable_files.get(architecture.digest)
                if trainable is None:
                    raise TrainingError(f"no trainable TFLite file for architecture {architecture.digest[:8]} on this "
                                        "device; the aggregator publishes one when it can build it (see its log)")
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir.mkdir(parents=True)
            current = self.models.current()
            options = self.data_options
            spec = jobfiles.JobSpec(self.data_path, self.export_precision if self.trainer == "keras" else "off",
                                    current.source_digest if current else "", os.getpid(),
                                    registered_custom_layers(), self.trainer, options.label_column,
                                    tuple(options.image_size or ()), options.color_mode)
            if trainable is not None:
                atomic_write_bytes(self.work_dir / jobfiles.TRAINABLE, trainable.content)
            jobfiles.write_job(self.work_dir, architecture, task, spec)
            deadline_s = self.budgets.round_deadline_s(task.deadline_s)
            child = self._child = _Child(self.work_dir, self.budgets, deadline_s, self.command_prefix)
            threading.Thread(target=self._after_exit, args=(child, peak_key, task.round),
                             name="train-child-exit", daemon=True).start()
            log.info("round %d: training in child pid %d (deadline %.0f s, memory budget %s)", task.round,
                     child.proc.pid, deadline_s, f"{limit:.0f} MB" if limit else "none")
        child.result_ready.wait()
        if child.report.result_s is not None:  # complete (written atomically), even if the export then fails
            result = jobfiles.read_result(self.work_dir, len(architecture.shapes))
            result.metrics["child_result_s"] = float(child.report.result_s or 0.0)
            return result
        child.exited.wait()
        if self._closed:
            raise TrainingChildFailed("the agent stopped during training")
        if child.report.killed_for:
            raise BudgetExceeded(child.report.killed_for)
        error = jobfiles.read_error(self.work_dir)
        if error:
            raise TrainingChildFailed(error)
        raise TrainingChildFailed(f"the training child {_exit_description(child.report.exit_code)} without a "
                                  f"result; its log says: {_log_summary(self.work_dir / jobfiles.LOG)} "
                                  f"(all of it: {self.work_dir / jobfiles.LOG})")

    def _peak_key(self, architecture: Architecture) -> str:
        """What a peak is remembered under: the architecture, and the trainer when not Keras (the
        TensorFlow-free child needs a tenth of the memory)."""
        return architecture.digest if self.trainer == "keras" else f"{architecture.digest}:{self.trainer}"

    def _after_exit(self, child: _Child, peak_key: str, round_: int) -> None:
        child.exited.wait()
        try:
            self._record_exit(child, peak_key, round_)
        finally:
            child.settled.set()

    def _record_exit(self, child: _Child, peak_key: str, round_: int) -> None:
        report = self.last_report = child.report
        log.info("round %d: training child exited (code %s) after %.1f s, peak RSS %.0f MB%s", round_,
                 report.exit_code, report.wall_s, report.peak_rss_mb,
                 f"; stopped: {report.killed_for}" if report.killed_for else "")
        if report.exit_code == 0 or report.over_memory:  # a whole run's peak, or at least the budget
            self.peaks.record(peak_key, report.peak_rss_mb)
        export = child.folder / jobfiles.EXPORT
        if report.exit_code == 0 and export.is_file():
            try:
                info = ModelInfo.from_json(json.loads(export.read_text()))
                if not info.sha256:
                    raise ModelStoreError("export.json names no sha256 of the model the child verified")
                self.models.install(child.folder / jobfiles.MODEL, info)
            except (OSError, ValueError, TypeError, ModelStoreError) as e:  # the previous model stays
                log.error("round %d: could not install the exported model: %s", round_, e)

    def wait_idle(self) -> None:
        """Wait for the last child (exporting its model) to exit, and the model to be installed."""
        child = self._child
        if child is not None and not child.settled.is_set():
            log.info("waiting for the previous training child to finish its export")
            child.settled.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop: kill a running child and wait for it."""
        with self._lock:
            self._closed = True
            child = self._child
        if child is not None:
            child.kill()
            child.exited.wait(timeout_s)


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


_ERROR_WORDS = re.compile(r"error|failed|bad_alloc|terminate|exhausted|cannot|killed", re.IGNORECASE)


def _log_summary(path: Path, lines: int = 2) -> str:
    """The last lines of the child's log that look like an error (else its last lines)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-300:]
    except OSError:
        return "(no log)"
    errors = [line.strip() for line in text if _ERROR_WORDS.search(line)]
    return " | ".join((errors or text)[-lines:]) or "(empty log)"

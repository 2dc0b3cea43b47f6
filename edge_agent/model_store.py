"""The device's model folder: the current TFLite model, the previous one, and a manifest.

Layout of ``<state dir>/model/``::

    current.tflite     the model inference runs
    previous.tflite    the one before it, for rollback
    manifest.json      round, sparsity, size and sha256 of both (and of a model being installed)

An inference service may open ``current.tflite`` at any moment, and the power may go at any
moment. So a model is installed in steps that each leave a usable folder, with the manifest as a
journal:

1. the new model is complete and fsynced at ``incoming.tflite``;
2. the manifest records it under ``incoming`` (the intent);
3. ``previous.tflite`` becomes a hard link to the current file (``link`` + ``os.replace``);
4. ``incoming.tflite`` is renamed onto ``current.tflite`` (atomic: a reader gets the old model or
   the new one, never a mix);
5. the manifest moves ``current`` to ``previous``, ``incoming`` to ``current``.

A writer (``ModelStore(folder, writer=True)``: the agent, or ``fedprune-agent model rollback``)
finishes or drops an interrupted install when it opens the folder, by the sha256 of the files,
so a restart after a power cut at any step sees a consistent folder. Writers take an exclusive
``flock`` on ``lock`` for each change; readers (inference) take no lock and change nothing.
Rollback installs the previous model the same way (so a second rollback undoes the first).
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprune.fileio import atomic_move, atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class ModelStoreError(RuntimeError):
    """The model folder has no usable model for what was asked; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What the manifest says about one model file."""

    round: int  # the federation round whose global model this is (-1: not from a round)
    precision: str  # "float32" | "int8"
    sparsity: float  # share of zero weights in the pruned (masked) kernels
    size_bytes: int = 0
    sha256: str = ""
    source_digest: str = ""  # digest of the global weights it was exported from
    runtime: str = ""  # the runtime that verified it when it was exported
    local_accuracy: float | None = None  # on the device's own training data, when exported
    installed_unix: float = 0.0
    # The aggregator's final model of a run (the file its report describes, received as it is),
    # not a file this device exported from a round's task.
    final: bool = False

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    """The current and previous TFLite models of a device, swapped atomically."""

    def __init__(self, directory: str | Path, *, writer: bool = False) -> None:
        self.directory = Path(directory)
        self.writer = writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._recover()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.writer:
            raise ModelStoreError(f"{self.directory} was opened read-only; changing it needs writer=True")
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
            yield
        finally:
            os.close(fd)

    # --- paths ---
    @property
    def current_path(self) -> Path:
        return self.directory / "current.tflite"

    @property
    def previous_path(self) -> Path:
        return self.directory / "previous.tflite"

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    @property
    def _incoming_path(self) -> Path:
        return self.directory / "incoming.tflite"

    # --- reading ---
    def manifest(self) -> dict[str, ModelInfo | None]:
        """``{"current": ModelInfo | None, "previous": ..., "incoming": ...}``."""
        try:
            raw = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as e:
            # Written atomically, so this is damage from outside (a full disk, a hand edit).
            log.error("model manifest %s unreadable (%s); treating the folder as empty", self.manifest_path, e)
            raw = {}
        return {k: ModelInfo.from_json(raw[k]) if isinstance(raw.get(k), dict) else None
                for k in ("current", "previous", "incoming")}

    def current(self) -> ModelInfo | None:
        return self.manifest()["current"]

    def previous(self) -> ModelInfo | None:
        return self.manifest()["previous"]

    def read_current(self, attempts: int = 5) -> tuple[bytes, ModelInfo]:
        """The current model's bytes (read once, checked against the manifest) and its info.

        A reader may look between an install's rename and its manifest update (the file is the
        new model, the manifest's ``current`` still the old one): the ``incoming`` entry names
        that file. Between reading the manifest and the file, a whole install may pass: then it
        reads both again.
        """
        for attempt in range(attempts):
            manifest = self.manifest()
            if manifest["current"] is None and manifest["incoming"] is None or not self.current_path.is_file():
                raise ModelStoreError(
                    f"no model installed in {self.directory} yet: the agent installs one after its first "
                    "round (model export on), or pass a .tflite file"
                )
            data = self.current_path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            for info in (manifest["current"], manifest["incoming"]):
                if info is not None and info.sha256 == digest:
                    return data, info
            time.sleep(0.05 * (attempt + 1))
        raise ModelStoreError(
            f"{self.current_path} (sha256 {digest[:12]}) is not the model the manifest names; restart the "
            "agent to repair the folder, or roll back"
        )

    # --- writing ---
    def install(self, model_file: str | Path, info: ModelInfo) -> ModelInfo:
        """Make ``model_file`` the current model (the file is moved in: same file system).

        The current model becomes the previous one. Returns the info as recorded (size, sha256
        and install time filled in). An ``info.sha256`` given (the one a runtime verified) must
        be the file's: otherwise ``ModelStoreError`` and nothing changes.
        """
        with self._locked():
            return self._install(Path(model_file), info)

    def _install(self, model_file: Path, info: ModelInfo) -> ModelInfo:
        size = model_file.stat().st_size
        if size == 0:
            raise ModelStoreError(f"{model_file} is empty; not installing it")
        digest = file_sha256(model_file)
        if info.sha256 and info.sha256 != digest:
            raise ModelStoreError(f"{model_file} (sha256 {digest[:12]}) is not the model that was verified "
                                  f"(sha256 {info.sha256[:12]}); not installing it")
        incoming = dataclasses.replace(info, size_bytes=size, sha256=digest, installed_unix=time.time())
        atomic_move(model_file, self._incoming_path)  # step 1
        state = self.manifest()
        self._write_manifest(state["current"], state["previous"], incoming)  # step 2
        self._commit(state["current"], incoming)  # steps 3-5
        log.info("installed model of round %d (%s, %d bytes, sparsity %.3f, sha256 %s)", incoming.round,
                 incoming.precision, incoming.size_bytes, incoming.sparsity, incoming.sha256[:12])
        return incoming

    def rollback(self) -> ModelInfo:
        """Make the previous model current again (and the current one previous)."""
        with self._locked():
            previous = self.manifest()["previous"]
            if previous is None or not self.previous_path.is_file():
                raise ModelStoreError(f"no previous model in {self.directory} to roll back to")
            staged = self.directory / ".rollback.tflite"
            shutil.copyfile(self.previous_path, staged)
            info = self._install(staged, previous)
        log.warning("rolled back to the model of round %d (sha256 %s)", info.round, info.sha256[:12])
        return info

    def _commit(self, current: ModelInfo | None, incoming: ModelInfo) -> None:
        if current is not None and self.current_path.is_file():  # step 3: keep the current one
            link = self.directory / ".previous.tflite.link"
            link.unlink(missing_ok=True)
            os.link(self.current_path, link)
            os.replace(link, self.previous_path)
            # rename() between two links of one file does nothing (POSIX): after a crash that
            # left previous.tflite linked to current.tflite already, the new link is still here.
            link.unlink(missing_ok=True)
        else:
            current = None
        os.replace(self._incoming_path, self.current_path)  # step 4
        fsync_dir(self.directory)
        self._write_manifest(incoming, current, None)  # step 5

    def _write_manifest(self, current: ModelInfo | None, previous: ModelInfo | None,
                        incoming: ModelInfo | None) -> None:
        atomic_write_json(self.manifest_path, {
            "version": MANIFEST_VERSION,
            **{k: dataclasses.asdict(v) if v else None
               for k, v in (("current", current), ("previous", previous), ("incoming", incoming))},
        })

    def _recover(self) -> None:
        """Finish or drop an install that a crash interrupted; remove temporary files."""
        for leftover in self.directory.glob(".*"):
            leftover.unlink(missing_ok=True)  # temp files of atomic writes, links, rollback copies
        state = self.manifest()
        incoming, current = state["incoming"], state["current"]
        if incoming is None:
            self._incoming_path.unlink(missing_ok=True)  # step 1 done, step 2 not: never announced
            return
        if self._incoming_path.is_file() and file_sha256(self._incoming_path) == incoming.sha256:
            log.warning("finishing the install of the model of round %d that was interrupted", incoming.round)
            self._commit(current, incoming)  # step 3 is idempotent: it links the same current file
        elif self.current_path.is_file() and file_sha256(self.current_path) == incoming.sha256:
            self._write_manifest(incoming, current, None)  # only step 5 was missing
        else:
            log.warning("dropping an interrupted install of the model of round %d", incoming.round)
            self._incoming_path.unlink(missing_ok=True)
            self._write_manifest(current, state["previous"], None)

"""Checkpoints of the federation state, written atomically (temp file, fsync, rename).

A crash or Ctrl-C at any moment leaves the previous checkpoint intact, and ``--resume`` starts
from the last completed round.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.fileio import atomic_write_bytes

log = logging.getLogger(__name__)
_NAME = re.compile(r"^round-(\d{5})\.npz$")
KEEP_LAST = 3


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed; the message names the file and what is wrong."""


@dataclass
class FederationState:
    """Everything needed to continue a run after the round ``completed_rounds``."""

    completed_rounds: int
    weights: list[np.ndarray]
    masks: list[np.ndarray | None]
    rng_state: dict[str, Any]
    totals: dict[str, float] = field(default_factory=dict)
    model_json: str = ""  # the architecture, once structured pruning has changed it
    schedule_state: dict[str, Any] = field(default_factory=dict)  # an adaptive schedule's history
    # The aggregator session the devices' tasks carry: kept across --resume, so that a device that
    # trained the open round already answers the resumed aggregator's same task with the same update.
    session: str = ""
    # What quantizing the last round's downlink lost (aggregator/downlink.py): the next round's
    # weights carry it, so a resumed run's downlink error feedback goes on where it stopped.
    downlink_residual: list[np.ndarray] | None = None
    # The ``issued_us`` of the last task or final model sent: a resumed run issues later ones,
    # whatever its clock says (devices refuse one issued before the newest they took).
    issued_us: int = 0

    def issue(self) -> int:
        """The ``issued_us`` of the next task or final model: the clock's microseconds since the
        epoch, or one more than the last issued where the clock is not past it, so that each is
        newer than the one before, also after a resume whose clock went back. Devices refuse one
        issued before the newest of its kind they took: an older one replayed on their topic
        (docs/protocol.md, section 12.3)."""
        self.issued_us = max(time.time_ns() // 1000, self.issued_us + 1)
        return self.issued_us


def save_checkpoint(directory: Path, state: FederationState) -> Path:
    arrays: dict[str, np.ndarray] = {}
    for i, w in enumerate(state.weights):
        arrays[f"w{i}"] = w
    for i, m in enumerate(state.masks):
        if m is not None:
            arrays[f"m{i}"] = m
    for i, r in enumerate(state.downlink_residual or []):
        arrays[f"r{i}"] = r
    meta = {
        "completed_rounds": state.completed_rounds,
        "num_weights": len(state.weights),
        "rng_state": state.rng_state,
        "totals": state.totals,
        "model_json": state.model_json,
        "schedule_state": state.schedule_state,
        "session": state.session,
        "issued_us": state.issued_us,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = directory / f"round-{state.completed_rounds:05d}.npz"
    atomic_write_bytes(path, buf.getvalue())
    for old in sorted(_checkpoints(directory))[:-KEEP_LAST]:
        old[1].unlink(missing_ok=True)
    return path


def checkpoint_rounds(directory: Path) -> list[int]:
    """The rounds ``directory`` holds checkpoints of, in order (their files' names; not opened)."""
    return [r for r, _ in _checkpoints(directory)]


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_latest_checkpoint(directory: Path) -> FederationState | None:
    """The newest readable checkpoint, or None if there is none.

    A damaged file is skipped for the one before it (a crash mid-write leaves the previous one
    intact); a readable one whose weights hold NaN or infinity raises ``CheckpointError``: it is
    not damage but a diverged model, which resuming would train on (and devices would refuse)."""
    for _, path in reversed(_checkpoints(directory)):
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(f["meta"].tobytes())
                n = meta["num_weights"]
                weights = [f[f"w{i}"] for i in range(n)]
                masks = [f[f"m{i}"] if f"m{i}" in f.files else None for i in range(n)]
                residual = [f[f"r{i}"] for i in range(n)] if "r0" in f.files else None
        except Exception as e:  # noqa: BLE001 - zip, npy and JSON damage raise many types
            log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(e).__name__, e)
            continue
        bad = [i for i, w in enumerate(weights) if not np.issubdtype(w.dtype, np.number) or not np.isfinite(w).all()]
        if bad:
            raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights (tensor {bad[0]} of {n}): the "
                                  "model diverged; resume from an earlier checkpoint by moving this one away")
        return FederationState(meta["completed_rounds"], weights, masks, meta["rng_state"], meta["totals"],
                               meta.get("model_json", ""), meta.get("schedule_state", {}), meta.get("session", ""),
                               residual, int(meta.get("issued_us", 0)))
    return None

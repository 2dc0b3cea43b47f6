"""Error feedback for lossy transport (int8, int4, float16).

What a round's quantization loses is added to the next round's update before it is quantized, so
the errors do not accumulate into a bias of the global model (Seide et al., "1-Bit Stochastic
Gradient Descent", Interspeech 2014; Karimireddy et al., "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", ICML 2019). The residual lives on the device and is saved
atomically after every round, so it survives an agent restart.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from fedprune.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


class ErrorFeedback:
    """The residual of one device: ``compensate`` before encoding, ``record`` after."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.residual: list[np.ndarray] | None = None
        if self.path and self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as f:
                    self.residual = [f[f"r{i}"] for i in range(len(f.files))]
            except Exception as e:  # noqa: BLE001 - a damaged file only costs one round's residual
                log.warning("error-feedback state %s unreadable (%s); starting from zero", self.path, e)

    def compensate(
        self, update: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
    ) -> list[np.ndarray]:
        """The update plus the carried residual (restricted to the current mask)."""
        r = self.residual
        if r is None or len(r) != len(update) or any(a.shape != b.shape for a, b in zip(r, update)):
            return [np.asarray(u, np.float32) for u in update]
        return [
            (np.asarray(u, np.float32) + (e if m is None else np.where(m, e, 0.0))).astype(np.float32)
            for u, e, m in zip(update, r, masks)
        ]

    def record(self, compensated: Sequence[np.ndarray], transmitted: Sequence[np.ndarray]) -> None:
        """Keep what was lost: ``compensated - transmitted`` (what the receiver decodes)."""
        self.residual = [np.asarray(c, np.float32) - np.asarray(t, np.float32)
                         for c, t in zip(compensated, transmitted)]
        if self.path:
            buf = io.BytesIO()
            np.savez(buf, **{f"r{i}": r for i, r in enumerate(self.residual)})
            atomic_write_bytes(self.path, buf.getvalue())

    def reset(self) -> None:
        self.residual = None
        if self.path:
            self.path.unlink(missing_ok=True)

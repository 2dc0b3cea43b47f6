"""What every local trainer checks before it trains, and the error it raises; no TensorFlow."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class TrainingError(RuntimeError):
    """Local training could not run; the message goes back to the aggregator."""


def check_local_data(x: np.ndarray, y: np.ndarray, sample_shape: Sequence[int], classes: int) -> None:
    """Raise :class:`TrainingError` unless the local samples fit the model's input and every label
    is one of its classes."""
    expected = tuple(int(d) for d in sample_shape)
    if tuple(x.shape[1:]) != expected:
        raise TrainingError(f"local data has sample shape {tuple(x.shape[1:])}, the model expects {expected}")
    if len(y) != len(x):
        raise TrainingError(f"local data has {len(x)} samples and {len(y)} labels")
    if len(y) and (int(y.max()) >= classes or int(y.min()) < 0):
        raise TrainingError(f"local labels go from {int(y.min())} to {int(y.max())}, the model has {classes} classes")

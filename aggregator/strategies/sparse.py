"""The updates of a round as matrices over the kept positions, and back.

Every device trained under the same global mask, so a strategy can reduce each tensor over its
kept positions only, as a (devices x kept) float32 matrix built one tensor at a time, and write
the result back with pruned positions exactly zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from fedprune.aggregator.strategies.base import ClientResult


def kept_deltas(results: Sequence[ClientResult], index: int, mask: np.ndarray | None) -> np.ndarray:
    """Tensor ``index`` of every update at the kept positions: a (devices, kept) float32 matrix."""
    keep = None if mask is None else np.asarray(mask, bool).ravel()
    size = results[0].delta[index].size if keep is None else int(keep.sum())
    out = np.empty((len(results), size), np.float32)
    for row, r in zip(out, results):
        flat = r.delta[index].ravel()
        row[:] = flat if keep is None else flat[keep]
    return out


def add_at_kept(weights: np.ndarray, mask: np.ndarray | None, delta: np.ndarray) -> np.ndarray:
    """``weights`` plus ``delta`` (one value per kept position) as float32; pruned positions 0."""
    out = np.zeros(np.shape(weights), np.float32)
    keep = slice(None) if mask is None else np.asarray(mask, bool).ravel()
    out.reshape(-1)[keep] = np.asarray(weights).ravel()[keep].astype(np.float64) + delta
    return out

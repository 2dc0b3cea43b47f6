"""Norm clipping of a model update, shared by the device (before sending) and the aggregator.

An update is a list of tensors; its norm is the L2 norm of all of them together (the update seen as
one vector). Pruned positions are zero in every update, so they neither add to the norm nor change.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def global_norm(tensors: Sequence[np.ndarray]) -> float:
    """The L2 norm of all tensors together, accumulated in float64."""
    return float(np.sqrt(sum(float(np.dot(t.ravel().astype(np.float64), t.ravel())) for t in tensors)))


def clip_to_norm(tensors: Sequence[np.ndarray], clip_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale ``tensors`` by ``min(1, clip_norm / norm)`` so their global L2 norm is at most
    ``clip_norm``; returns the (possibly) scaled tensors and the norm before clipping.

    An update already within the bound comes back unchanged (the same arrays).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(tensors)
    if norm <= clip_norm:
        return list(tensors), norm
    factor = clip_norm / norm
    return [(t.astype(np.float64) * factor).astype(t.dtype) for t in tensors], norm

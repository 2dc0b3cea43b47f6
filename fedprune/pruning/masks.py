"""Magnitude masks over a model's weight list.

A model's weights are the list ``model.get_weights()``; its masks are a list of the same length
holding a boolean array (True = kept) for each prunable kernel and ``None`` for weights that are
never pruned (biases, normalization, layers left dense).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

Masks = list["np.ndarray | None"]


def magnitude_mask(
    weights: np.ndarray, target_sparsity: float, current: np.ndarray | None = None
) -> np.ndarray:
    """Keep the largest-magnitude weights so that exactly ``round(target_sparsity * n)`` are pruned.

    Positions already pruned in ``current`` stay pruned (a kept weight that happens to be exactly
    0.0 must not trade places with them); if ``current`` is already sparser than the target, it is
    returned unchanged. Ties are broken by position (stable sort), so every party computes the
    same mask from the same weights.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    flat = np.abs(np.asarray(weights, dtype=np.float64)).ravel()
    keep = np.ones(flat.size, dtype=bool) if current is None else np.asarray(current, bool).ravel().copy()
    n_more = int(round(target_sparsity * flat.size)) - int((~keep).sum())
    if n_more > 0:
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(flat[candidates], kind="stable")]
        keep[order[:n_more]] = False
    return keep.reshape(np.shape(weights))


def prune_to_sparsity(
    weights: Sequence[np.ndarray], masks: Masks, target_sparsity: float
) -> tuple[list[np.ndarray], Masks]:
    """Prune each masked tensor to ``target_sparsity`` by magnitude (per layer).

    Weights already pruned are zero, hence the smallest, so sparsity only grows along a schedule.
    Returns new weights with pruned positions exactly zero, and the new masks.
    """
    new_weights: list[np.ndarray] = []
    new_masks: Masks = []
    for w, m in zip(weights, masks, strict=True):
        if m is None:
            new_weights.append(np.asarray(w))
            new_masks.append(None)
            continue
        keep = magnitude_mask(w, target_sparsity, current=m)
        new_weights.append(np.where(keep, w, 0.0).astype(np.asarray(w).dtype))
        new_masks.append(keep)
    return new_weights, new_masks


def apply_masks(weights: Sequence[np.ndarray], masks: Masks) -> list[np.ndarray]:
    """Zero the pruned positions."""
    return [
        np.asarray(w) if m is None else np.where(m, w, 0.0).astype(np.asarray(w).dtype)
        for w, m in zip(weights, masks, strict=True)
    ]


def sparsity(masks: Masks) -> float:
    """Fraction of pruned positions over all prunable tensors (0.0 when nothing is prunable)."""
    total = sum(m.size for m in masks if m is not None)
    kept = sum(int(m.sum()) for m in masks if m is not None)
    return 0.0 if total == 0 else 1.0 - kept / total


def layer_sparsities(masks: Masks, names: Sequence[str]) -> dict[str, float]:
    """Sparsity of each prunable tensor, by name."""
    return {n: 1.0 - float(m.mean()) for n, m in zip(names, masks, strict=True) if m is not None}


def mask_digest(masks: Masks) -> str:
    """SHA-256 (hex, first 16 bytes) naming a mask list: which tensors are masked, their shapes, bits.

    Devices and the aggregator compare digests so a values-only update can never be aligned
    against the wrong mask.
    """
    h = hashlib.sha256()
    for i, m in enumerate(masks):
        if m is None:
            continue
        h.update(f"{i}:{'x'.join(map(str, m.shape))};".encode())
        h.update(np.packbits(m.ravel()).tobytes())
    return h.hexdigest()[:32]

"""Magnitude masks over a model's weight list.

A model's weights are the list ``model.get_weights()``; its masks are a list of the same length
holding a boolean array (True = kept) for each prunable kernel and ``None`` for weights that are
never pruned (biases, normalization, layers left dense).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # rules.py imports this module
    from fedprune.pruning.rules import Rule

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


def prune_with_rules(
    weights: Sequence[np.ndarray],
    masks: Masks,
    rules: Sequence["Rule | None"],
    target_sparsity: float | None,
) -> tuple[list[np.ndarray], Masks]:
    """Apply one rule per tensor (see ``fedprune.pruning.rules``); ``None`` = not pruned now.

    ``weights``, ``masks`` and ``rules`` are aligned. A tensor with a rule must be prunable (its
    mask is an array); a tensor whose rule is ``None`` keeps its mask (``None`` or array) as is.
    ``target_sparsity`` is passed to every rule (threshold rules ignore it). The new mask is
    intersected with the old one, so even a faulty rule cannot revive a position. Returns new
    weights with every pruned position exactly zero (dtype kept) and the new masks.
    """
    if not len(weights) == len(masks) == len(rules):
        raise ValueError(
            f"weights, masks and rules differ in length: {len(weights)}, {len(masks)}, {len(rules)}"
        )
    new_weights: list[np.ndarray] = []
    new_masks: Masks = []
    for i, (w, m, rule) in enumerate(zip(weights, masks, rules)):
        w = np.asarray(w)
        if rule is None:
            new_masks.append(None if m is None else np.asarray(m, bool).copy())
            new_weights.append(w if m is None else np.where(m, w, 0.0).astype(w.dtype))
            continue
        if m is None:
            raise ValueError(f"tensor {i} has a rule ({rule!r}) but no mask: it is not prunable")
        current = np.asarray(m, bool)
        keep = np.asarray(rule.mask(w, current, target_sparsity), dtype=bool)
        if keep.shape != w.shape:
            raise ValueError(f"rule {rule!r} returned shape {keep.shape} for tensor {i} {w.shape}")
        keep = keep & current
        new_weights.append(np.where(keep, w, 0.0).astype(w.dtype))
        new_masks.append(keep)
    return new_weights, new_masks


def global_magnitude_masks(
    weights: Sequence[np.ndarray], masks: Masks, target_sparsity: float
) -> Masks:
    """Rank all prunable weights of all layers together; prune the smallest overall.

    Exactly ``round(target_sparsity * total)`` positions end up pruned, ``total`` being the size
    of all masked tensors together (unchanged if the masks are already sparser). Positions
    already pruned stay pruned and are not ranked (a kept exact 0.0 never trades places with
    them). Ties are broken by position in the concatenation (tensor order, then C order), the
    earlier pruned first, as in ``magnitude_mask``. Tensors with a ``None`` mask are skipped and
    stay ``None``. Raw magnitudes are compared across layers, so layers of small weights lose
    more.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if len(weights) != len(masks):
        raise ValueError(f"weights and masks differ in length: {len(weights)}, {len(masks)}")
    idx = [i for i, m in enumerate(masks) if m is not None]
    new_masks: Masks = [None if m is None else np.asarray(m, bool).copy() for m in masks]
    if not idx:
        return new_masks
    for i in idx:
        if np.shape(weights[i]) != new_masks[i].shape:
            raise ValueError(
                f"mask {i} shape {new_masks[i].shape} does not match weights {np.shape(weights[i])}"
            )
    flat = np.concatenate([np.abs(np.asarray(weights[i], np.float64)).ravel() for i in idx])
    keep = np.concatenate([new_masks[i].ravel() for i in idx])
    n_more = int(round(target_sparsity * flat.size)) - int((~keep).sum())
    if n_more > 0:
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(flat[candidates], kind="stable")]
        keep[order[:n_more]] = False
    offset = 0
    for i in idx:
        size = new_masks[i].size
        new_masks[i] = keep[offset:offset + size].reshape(new_masks[i].shape)
        offset += size
    return new_masks


def prune_globally(
    weights: Sequence[np.ndarray], masks: Masks, target_sparsity: float
) -> tuple[list[np.ndarray], Masks]:
    """``global_magnitude_masks`` then zero the pruned positions: returns (weights, masks)."""
    new_masks = global_magnitude_masks(weights, masks, target_sparsity)
    return apply_masks(weights, new_masks), new_masks


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


def rescale_units_to_norms(
    reference: Sequence[np.ndarray], weights: Sequence[np.ndarray], masks: Masks
) -> list[np.ndarray]:
    """Scale each output unit's kept weights (the last axis of a Keras kernel) so that its L2 norm
    equals the unit's norm in ``reference``; tensors without a mask, and units with nothing kept,
    are left as they are.

    For a model pruned at initialization: a unit left with a tenth of its inputs passes on about a
    third of the signal, and stacked layers shrink it towards nothing, so the sparse network barely
    learns at first. Restoring each unit's norm keeps the initializer's signal scale (the sparse
    initialization of Evci et al., "Gradient Flow in Sparse Neural Networks and How Lottery Tickets
    Win", AAAI 2022).
    """
    out = []
    for ref, w, m in zip(reference, weights, masks, strict=True):
        if m is None or w.ndim < 2:
            out.append(w)
            continue
        axes = tuple(range(w.ndim - 1))
        before = np.sqrt(np.sum(np.square(ref.astype(np.float64)), axis=axes))
        after = np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=axes))
        scale = np.divide(before, after, out=np.ones_like(after), where=after > 0)
        out.append((w * scale).astype(w.dtype))
    return out


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
    weights: Sequence[np.ndarray], masks: Masks, target_sparsity: float, layer_floor: float = 0.0
) -> Masks:
    """Rank all prunable weights of all layers together; prune the smallest overall.

    Exactly ``round(target_sparsity * total)`` positions end up pruned, ``total`` being the size
    of all masked tensors together (unchanged if the masks are already sparser). Positions
    already pruned stay pruned and are not ranked (a kept exact 0.0 never trades places with
    them). Ties are broken by position in the concatenation (tensor order, then C order), the
    earlier pruned first, as in ``magnitude_mask``. Tensors with a ``None`` mask are skipped and
    stay ``None``. Raw magnitudes are compared across layers, so layers of small weights lose
    more.

    ``layer_floor`` (in [0, 1]): each layer keeps at least this share of the overall density
    (``1 - target_sparsity``) of its own weights, or what it keeps already if that is fewer.
    Without a floor, a layer whose weights are all small can lose every weight: at 95 % the
    ranking of MNIST-1D's initial weights kept none of its largest layer (Glorot scales shrink
    with fan-in), and the network never learned. Layers held at their floor keep their largest
    weights; the rest are ranked together for what remains (water-filling: a layer that falls
    below its floor in the ranking is held at it, and the ranking is redone without it).
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if not 0.0 <= layer_floor <= 1.0:
        raise ValueError(f"layer_floor must be in [0, 1] (a share of the overall density), got {layer_floor}")
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
    magnitudes = {i: np.abs(np.asarray(weights[i], np.float64)).ravel() for i in idx}
    keeps = {i: new_masks[i].ravel() for i in idx}
    total = sum(k.size for k in keeps.values())
    keep_total = total - int(round(target_sparsity * total))
    density = keep_total / total
    floors = {i: min(int(keeps[i].sum()), int(np.ceil(layer_floor * density * keeps[i].size))) for i in idx}
    held: list[int] = []
    while True:
        free = [i for i in idx if i not in held]
        ranked = _keep_largest([magnitudes[i] for i in free], [keeps[i] for i in free],
                               keep_total - sum(floors[i] for i in held))
        below = [i for i, keep in zip(free, ranked) if keep.sum() < floors[i]]
        if not below:
            break
        held += below
    result = dict(zip(free, ranked))
    for i in held:
        result[i] = _keep_largest([magnitudes[i]], [keeps[i]], floors[i])[0]
    for i in idx:
        new_masks[i] = result[i].reshape(new_masks[i].shape)
    return new_masks


def _keep_largest(magnitudes: list[np.ndarray], keeps: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The kept positions of these flat tensors, ranked together, cut to the ``count`` largest
    (ties: the earlier position goes first); unchanged where they keep no more than that."""
    if not keeps:
        return []
    flat, keep = np.concatenate(magnitudes), np.concatenate(keeps)
    n_more = int(keep.sum()) - count
    if n_more > 0:
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(flat[candidates], kind="stable")]
        keep[order[:n_more]] = False
    return np.split(keep, np.cumsum([k.size for k in keeps])[:-1])


def prune_globally(
    weights: Sequence[np.ndarray], masks: Masks, target_sparsity: float, layer_floor: float = 0.0
) -> tuple[list[np.ndarray], Masks]:
    """``global_magnitude_masks`` then zero the pruned positions: returns (weights, masks)."""
    new_masks = global_magnitude_masks(weights, masks, target_sparsity, layer_floor)
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


def kept_jaccard(before: Masks, after: Masks) -> float | None:
    """Jaccard index of two masks' kept sets over their masked positions (1 = the same weights
    kept); None when they do not cover the same tensors in the same shapes (a structured step
    changed the model) or nothing is masked."""
    pairs = [(a, b) for a, b in zip(before, after) if a is not None or b is not None]
    if len(before) != len(after) or not pairs or any(a is None or b is None or a.shape != b.shape
                                                     for a, b in pairs):
        return None
    union = sum(int(np.logical_or(a, b).sum()) for a, b in pairs)
    both = sum(int(np.logical_and(a, b).sum()) for a, b in pairs)
    return 1.0 if union == 0 else both / union


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


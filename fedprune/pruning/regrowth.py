"""Regrowth: at a pruning step, swap the weakest kept weights for the pruned ones whose gradient
says they matter most, keeping the sparsity.

In the spirit of PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge
Devices", IEEE TNNLS 2022) and FedDST (Bibikar et al., "Federated Dynamic Sparse Training", AAAI
2022): a mask fixed early can be wrong, and the loss gradient at a pruned position (which is not
zero, though the weight is) says how much bringing it back would help. The devices report the
gradient at their largest-gradient pruned positions; the aggregator sums the magnitudes, weighted
by sample count, and calls ``regrow``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

#: A device's regrowth gradient is the mean loss's gradient over its first this many samples.
GRADIENT_SAMPLES = 512


def gradient_scores(
    reports: Iterable[tuple[Sequence[np.ndarray] | None, int]],
) -> list[np.ndarray] | None:
    """Sample-weighted sum of the gradient magnitudes the devices reported, per tensor.

    ``reports`` holds each device's ``(gradients, num_samples)``, ``gradients`` None for a device
    that reported none. None when no device reported any.
    """
    reported = [(g, n) for g, n in reports if g is not None]
    if not reported:
        return None
    return [sum(np.abs(g[i]) * n for g, n in reported) for i in range(len(reported[0][0]))]


def regrow(
    weights: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    scores: Sequence[np.ndarray | None],
    fraction: float,
) -> tuple[list[np.ndarray], list[np.ndarray | None], int]:
    """Per masked tensor, revive up to ``round(fraction * kept)`` pruned positions with the highest
    score (> 0) and prune as many kept weights of the smallest magnitude; revived weights start at 0.

    Returns the new weights, masks and the number of positions swapped in total.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"regrowth fraction must be in [0, 1), got {fraction}")
    new_w, new_m, swapped = [], [], 0
    for w, m, sc in zip(weights, masks, scores, strict=True):
        if m is None or sc is None:
            new_w.append(w)
            new_m.append(m)
            continue
        keep = m.ravel().copy()
        flat_w = np.asarray(w, np.float32).ravel().copy()
        candidates = np.flatnonzero(~keep & (sc.ravel() > 0))
        k = min(int(round(fraction * keep.sum())), candidates.size, int(keep.sum()) - 1)
        if k > 0:
            revive = candidates[np.argsort(-sc.ravel()[candidates], kind="stable")[:k]]
            kept = np.flatnonzero(keep)
            drop = kept[np.argsort(np.abs(flat_w[kept]), kind="stable")[:k]]
            keep[drop] = False
            flat_w[drop] = 0.0
            keep[revive] = True  # the weight is 0 and trains from there
            swapped += k
        new_w.append(flat_w.reshape(np.shape(w)))
        new_m.append(keep.reshape(m.shape))
    return new_w, new_m, swapped


def report_pruned_gradients(
    shapes: Sequence[Sequence[int]],
    gradients: Sequence[np.ndarray | None],
    masks: Sequence[np.ndarray | None],
    fraction: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What a device reports for regrowth: per weight tensor, the loss gradient at its pruned
    positions with the largest magnitude, ``ceil(fraction * kept)`` of them (at least one), and
    which positions those are; zeros and no positions where the tensor has no mask, no pruned
    position, or no gradient (``None``). A zero gradient is never reported: it adds nothing to any
    position's score, so the aggregator could not regrow on its account.

    A pruned weight is 0, but its gradient (input activation times output error) says how much the
    loss would fall if it came back: the signal PruneFL and FedDST regrow by.
    """
    reported, chosen_masks = [], []
    for shape, grad, mask in zip(shapes, gradients, masks, strict=True):
        values = np.zeros(tuple(shape), np.float32)
        chosen = np.zeros(tuple(shape), bool)
        if grad is not None and mask is not None and (~mask).any():
            flat = np.asarray(grad, np.float32).ravel()
            pruned = np.flatnonzero(~mask.ravel() & (flat != 0))
            k = min(pruned.size, max(1, int(np.ceil(fraction * mask.sum()))))
            top = pruned[np.argsort(-np.abs(flat[pruned]), kind="stable")[:k]]
            chosen.ravel()[top] = True
            values.ravel()[top] = flat[top]
        reported.append(values)
        chosen_masks.append(chosen)
    return reported, chosen_masks

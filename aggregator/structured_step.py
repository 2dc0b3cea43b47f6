"""Structured pruning of the global model: whole units and filters removed, a smaller model built.

The pruning controller says when (``PruningController.structured_due``); this is the surgery,
which needs the Keras model. The masks go through the same surgery as the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fedprune.pruning.masks import Masks, apply_masks
from fedprune.task import PruningSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StructuredStep:
    """The smaller model, its weights and masks, and the before/after report for summary.json."""

    model: Any
    weights: list[np.ndarray]
    masks: Masks
    report: dict[str, Any]


def prune_structured(model: Any, weights: list[np.ndarray], masks: Masks, section: PruningSection,
                     latency_ms: Callable[[Any, list[np.ndarray]], float]) -> StructuredStep:
    """Remove ``section.structured_fraction`` of the units and filters of ``model`` (lowest norm)
    and rebuild it; ``latency_ms(model, weights)`` measures each side for the report."""
    from fedprune.pruning.structured import apply_structured, count_flops, plan_structured

    plan = plan_structured(model, weights, section.structured_fraction, norm=section.structured_norm,
                           leave=section.leave_dense)
    before = {"parameters": int(sum(w.size for w in weights)), "flops": count_flops(model),
              "latency_ms": latency_ms(model, weights)}
    new_model, new_weights = apply_structured(model, weights, plan)
    # Cut the masks exactly as the weights: run them through the same surgery.
    as_arrays = [np.zeros(w.shape, np.float32) if m is None else m.astype(np.float32)
                 for w, m in zip(weights, masks)]
    _, cut = apply_structured(model, as_arrays, plan)
    new_masks = [None if m is None else c > 0.5 for m, c in zip(masks, cut)]
    new_weights = apply_masks(new_weights, new_masks)
    after = {"parameters": int(sum(w.size for w in new_weights)), "flops": count_flops(new_model),
             "latency_ms": latency_ms(new_model, new_weights)}
    log.warning("structured pruning: %s parameters -> %s, FLOPs %s -> %s, TFLite latency %.3f -> %.3f ms",
                f"{before['parameters']:,}", f"{after['parameters']:,}", f"{before['flops']:,}",
                f"{after['flops']:,}", before["latency_ms"], after["latency_ms"])
    report = {"before": before, "after": after, "kept_units": {k: int(v.size) for k, v in plan.keep.items()}}
    return StructuredStep(new_model, new_weights, new_masks, report)

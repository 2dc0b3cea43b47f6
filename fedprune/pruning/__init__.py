"""Pruning rules shared by the aggregator and the devices: masks by weight magnitude and schedules.

Pure NumPy, so both sides apply exactly the same rule and agree on every mask bit.
"""

from fedprune.pruning.masks import (
    apply_masks,
    magnitude_mask,
    mask_digest,
    prune_to_sparsity,
    sparsity,
)
from fedprune.pruning.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PruningSchedule",
    "apply_masks",
    "magnitude_mask",
    "mask_digest",
    "prune_to_sparsity",
    "sparsity",
]

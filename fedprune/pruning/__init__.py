"""Pruning rules shared by the aggregator and the devices: masks by weight magnitude and schedules.

Pure NumPy, so both sides apply exactly the same rule and agree on every mask bit.
"""

from fedprune.pruning.masks import (
    apply_masks,
    global_magnitude_masks,
    magnitude_mask,
    prune_globally,
    prune_to_sparsity,
    prune_with_rules,
    sparsity,
)
from fedprune.pruning.rules import (
    AbsoluteThreshold,
    LayerMagnitude,
    MaxRateThreshold,
    MByN,
    RowMeanThreshold,
    Rule,
    rule_from_config,
)
from fedprune.pruning.schedules import (
    AdaptiveSparsity,
    ConstantSparsity,
    Decision,
    PolynomialDecay,
    PruningSchedule,
    schedule_from_config,
)

__all__ = [
    "AbsoluteThreshold",
    "AdaptiveSparsity",
    "ConstantSparsity",
    "Decision",
    "LayerMagnitude",
    "MByN",
    "MaxRateThreshold",
    "PolynomialDecay",
    "PruningSchedule",
    "RowMeanThreshold",
    "Rule",
    "apply_masks",
    "global_magnitude_masks",
    "magnitude_mask",
    "prune_globally",
    "prune_to_sparsity",
    "prune_with_rules",
    "rule_from_config",
    "schedule_from_config",
    "sparsity",
]

"""Aggregation strategies: one file per algorithm behind one interface (``base.Strategy``), and a
registry (``registry.STRATEGIES``, ``strategy_from_config``). See ``base`` for how to add one."""

from fedprune.aggregator.strategies.base import ClientResult, CoordinateWise, Strategy
from fedprune.aggregator.strategies.device_mask_averaging import DeviceMaskAveraging, mask_agreement
from fedprune.aggregator.strategies.dp_fedavg import DPFedAvg
from fedprune.aggregator.strategies.fedavg import FedAvg
from fedprune.aggregator.strategies.krum import Krum, MultiKrum, pairwise_sq_distances
from fedprune.aggregator.strategies.median import CoordinateMedian
from fedprune.aggregator.strategies.norm_clipping import NormClipping, clip_results
from fedprune.aggregator.strategies.registry import (
    STRATEGIES,
    strategy_config,
    strategy_for_task,
    strategy_from_config,
)
from fedprune.aggregator.strategies.sparse import add_at_kept, kept_deltas
from fedprune.aggregator.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "STRATEGIES",
    "ClientResult",
    "CoordinateMedian",
    "CoordinateWise",
    "DPFedAvg",
    "DeviceMaskAveraging",
    "FedAvg",
    "Krum",
    "MultiKrum",
    "NormClipping",
    "Strategy",
    "TrimmedMean",
    "add_at_kept",
    "clip_results",
    "kept_deltas",
    "mask_agreement",
    "pairwise_sq_distances",
    "strategy_config",
    "strategy_for_task",
    "strategy_from_config",
]

"""Every aggregation strategy by the name a config gives it, and the one a task asks for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedprune.aggregator.strategies.base import Strategy
from fedprune.aggregator.strategies.device_mask_averaging import DeviceMaskAveraging
from fedprune.aggregator.strategies.dp_fedavg import DPFedAvg
from fedprune.aggregator.strategies.fedavg import FedAvg
from fedprune.aggregator.strategies.krum import Krum, MultiKrum
from fedprune.aggregator.strategies.median import CoordinateMedian
from fedprune.aggregator.strategies.norm_clipping import NormClipping
from fedprune.aggregator.strategies.trimmed_mean import TrimmedMean
from fedprune.configs import parse_config

if TYPE_CHECKING:
    from fedprune.task import Task

#: name in a config -> class; a new strategy is one more line here
STRATEGIES: dict[str, type[Strategy]] = {
    cls.strategy_name: cls
    for cls in (FedAvg, CoordinateMedian, TrimmedMean, Krum, MultiKrum, NormClipping, DPFedAvg,
                DeviceMaskAveraging)
}


def strategy_from_config(d: Mapping[str, Any]) -> Strategy:
    """Build a strategy from ``{"strategy": name, **parameters}``; a wrapper's ``inner`` is a
    config of its own (``{"strategy": "norm_clipping", "clip_norm": 3.0, "inner": {"strategy":
    "median"}}``).

    Raises ``ValueError`` naming the offending key: a missing or unknown ``strategy``, a parameter
    the strategy does not take, a missing required parameter, or a bad value.
    """
    cls, params = parse_config("strategy", STRATEGIES, d)
    if "inner" in params:
        try:
            params["inner"] = strategy_from_config(params["inner"])
        except ValueError as e:
            raise ValueError(f"inner: {e}") from None
    return cls(**params)


def strategy_config(task: Task) -> dict[str, Any]:
    """The config of the strategy the task asks for: its ``[aggregation]`` method (wrapped in
    norm clipping when ``aggregation.clip_norm`` > 0), DP-FedAvg under ``[privacy]``, device-mask
    averaging when the devices own the masks (``[pruning] mask_owner = "device"``)."""
    agg, privacy, pruning = task.aggregation, task.privacy, task.pruning
    if pruning.enabled and pruning.mask_owner == "device":
        return {"strategy": DeviceMaskAveraging.strategy_name}
    if privacy.enabled:
        return {"strategy": DPFedAvg.strategy_name, "clip_norm": privacy.clip_norm,
                "noise_multiplier": privacy.noise_multiplier, "sampled": task.federation.devices_per_round}
    params: dict[str, dict[str, Any]] = {
        "trimmed_mean": {"trim_fraction": agg.trim_fraction},
        "krum": {"byzantine": agg.byzantine},
        "multi_krum": {"byzantine": agg.byzantine, "keep": agg.multi_krum_keep or None},
    }
    # A plug-in strategy takes its [aggregation.params] (docs/extending.md).
    method = {"strategy": agg.method, **params.get(agg.method, {}), **agg.params}
    if agg.clip_norm > 0:
        return {"strategy": NormClipping.strategy_name, "clip_norm": agg.clip_norm, "inner": method}
    return method


def strategy_for_task(task: Task) -> Strategy:
    """The strategy the task asks for (``strategy_config``), built; ``TaskError`` naming the
    ``[aggregation]`` key when the task names an unknown strategy or a bad parameter."""
    from fedprune.task import TaskError

    if task.aggregation.method not in STRATEGIES:
        raise TaskError(f"aggregation.method {task.aggregation.method!r} is not a registered strategy; use one of "
                        f"{sorted(STRATEGIES)}")
    try:
        return strategy_from_config(strategy_config(task))
    except ValueError as e:
        raise TaskError(f"aggregation: {e}") from None

"""The one interface of an aggregation strategy, and the update it aggregates.

A strategy turns the round's accepted updates into the new global weights:
``strategy.aggregate(global_weights, results, masks)``. It is a small frozen dataclass whose
fields are its parameters; ``get_config()`` gives ``{"strategy": name, **parameters}`` and
``strategies.strategy_from_config`` builds it again (as Flower's strategies are one class per
algorithm, and fedprune's pruning rules one dataclass per rule).

To add one: copy ``median.py`` (coordinate-wise) or ``fedavg.py`` to a file of its own, cite the
paper in the class docstring, set ``strategy_name`` and ``sample_weighted``, and refuse what it
cannot handle with a ``ValueError`` that names the problem; add one line to
``registry.STRATEGIES``, and an example config to ``tests/test_strategies_conformance.py`` (which
then checks masks, weighting, determinism and refusals) beside a test of its own numbers. The
task file reaches it once ``registry.strategy_config`` maps an ``[aggregation]`` method to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from fedprune.aggregator.strategies.running import RunningAggregate
from fedprune.aggregator.strategies.sparse import add_at_kept, kept_deltas
from fedprune.configs import config_of
from fedprune.pruning.masks import Masks

__all__ = ["ClientResult", "CoordinateWise", "Strategy"]


@dataclass(frozen=True)
class ClientResult:
    """One device's accepted update of a round."""

    device_id: str
    num_samples: int
    delta: list[np.ndarray]  # the update's tensors: deltas, or weights for DeviceMaskAveraging
    metrics: dict[str, float] = field(default_factory=dict)
    masks: list[np.ndarray | None] | None = None  # the device's own masks (device-side pruning)
    gradients: list[np.ndarray] | None = None  # regrowth: gradient at reported pruned positions


class Strategy(ABC):
    """How the round's updates become the new global weights (subclasses: frozen dataclasses).

    Every strategy keeps pruned positions (``masks[i]`` False) exactly zero in its output, is
    deterministic given its inputs (and, for a noising one, its random generator), and refuses
    what it cannot handle with a ``ValueError`` that says what was wrong.
    """

    #: the ``"strategy"`` value naming this class in a config dict
    strategy_name: ClassVar[str]
    #: whether the updates count by the sample counts the devices claim (a hostile device can
    #: inflate its claim: the robust strategies ignore it)
    sample_weighted: ClassVar[bool] = False

    @abstractmethod
    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        """The new global weights (float32) from the old ones, the round's updates and the masks
        the devices trained under."""

    def min_results(self) -> int:
        """The fewest updates ``aggregate`` accepts."""
        return 1

    def running(self, global_weights: Sequence[np.ndarray], masks: Masks) -> RunningAggregate | None:
        """This round's aggregation fed one update at a time (streaming: memory independent of the
        updates' number, result independent of their order), or None when the strategy needs all
        of a round's updates at once (then they are aggregated sorted by device id)."""
        return None

    def get_config(self) -> dict[str, Any]:
        """``{"strategy": name, **parameters}``; ``strategy_from_config`` builds an equal one."""
        return config_of("strategy", self.strategy_name, self)

    def _require_results(self, results: Sequence[ClientResult]) -> None:
        """Refuse an empty round."""
        if not results:
            raise ValueError(f"{type(self).__name__} needs at least one update")


class CoordinateWise(Strategy):
    """Base of the coordinate-wise rules: the new delta at each kept position is a statistic of
    the devices' deltas at that position (``combine`` over axis 0 of a devices x kept matrix).
    Each tensor is reduced over its kept positions only; pruned positions stay exactly zero."""

    @abstractmethod
    def combine(self, deltas: np.ndarray) -> np.ndarray:
        """One value per column of the (devices, kept) matrix ``deltas``."""

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        self._require_results(results)
        return [add_at_kept(w, m, self.combine(kept_deltas(results, i, m)))
                for i, (w, m) in enumerate(zip(global_weights, masks, strict=True))]

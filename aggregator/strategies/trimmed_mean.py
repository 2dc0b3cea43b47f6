"""Coordinate-wise trimmed mean of the deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedprune.aggregator.strategies.base import CoordinateWise
from fedprune.configs import check_real


@dataclass(frozen=True)
class TrimmedMean(CoordinateWise):
    """Coordinate-wise trimmed mean of the deltas.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. At each position, the ``floor(trim_fraction * n)`` largest and
    as many smallest of the n values are dropped and the rest averaged; it tolerates that many
    hostile devices. Sample counts are ignored.
    """

    strategy_name: ClassVar[str] = "trimmed_mean"
    trim_fraction: float

    def __post_init__(self) -> None:
        if not 0.0 <= check_real("trim_fraction", self.trim_fraction) < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        n = deltas.shape[0]
        k = int(self.trim_fraction * n)
        if k == 0:
            return deltas.mean(axis=0, dtype=np.float64)
        middle = np.partition(deltas, (k, n - k - 1), axis=0)[k:n - k]
        return middle.mean(axis=0, dtype=np.float64)

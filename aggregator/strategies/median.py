"""Coordinate-wise median of the deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedprune.aggregator.strategies.base import CoordinateWise


@dataclass(frozen=True)
class CoordinateMedian(CoordinateWise):
    """Coordinate-wise median of the deltas.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. Any minority of hostile devices moves each coordinate at most
    to the range of the honest values there. Sample counts are ignored.
    """

    strategy_name: ClassVar[str] = "median"

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)

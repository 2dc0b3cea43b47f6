"""Streaming aggregation: a round's updates folded into running sums as they are accepted.

FedAvg, DP-FedAvg and device-mask averaging need only sums over the round's updates, so the
aggregator need not hold the updates until the round closes: a strategy that can returns a
``RunningAggregate`` from ``Strategy.running(global_weights, masks)``, which takes one update at
a time (``add``) and gives the new global weights at the end (``result``). Its memory is a few
arrays the size of the model, however many devices report (the robust strategies, which need all
of a round's updates at once, return None and keep them: at most ``devices_per_round``).

The order updates arrive in must not change the result (the same task and seed must give the same
run, and arrival order is thread timing). Float sums depend on their order, so every running sum
is an ``ExactishSum``: a double-double (Knuth's TwoSum) accumulation in float64, whose value is the
exact sum of its addends up to about 2^-100 of their magnitudes. Two orders give float32 results
that differ only if the exact sum lies that close to a float32 rounding boundary: never seen, and
under 1e-15 per weight and round by the bound. Integer totals (sample counts) are exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from fedprune.aggregator.strategies.base import ClientResult

__all__ = ["ExactishSum", "RunningAggregate", "sums_for"]


class ExactishSum:
    """A running sum of float64 arrays of one shape, nearly independent of the order of its
    addends: the rounded sum ``hi`` and the sum of every addition's rounding error ``lo``
    (TwoSum: ``hi + x == s + err`` exactly)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.hi = np.zeros(shape, np.float64)
        self.lo = np.zeros(shape, np.float64)

    def add(self, x: np.ndarray) -> None:
        """Add ``x`` (a float32 array converts to float64 exactly)."""
        x = np.asarray(x, np.float64)
        s = self.hi + x
        b = s - self.hi
        self.lo += (self.hi - (s - b)) + (x - b)
        self.hi = s

    def value(self) -> np.ndarray:
        """The sum (float64)."""
        return self.hi + self.lo

    def merge(self, other: ExactishSum) -> None:
        """Add another running sum (an aggregation worker's partial): its ``hi`` and its ``lo`` are
        added as two more addends, so the result is still the exact sum to about 2^-100."""
        self.add(other.hi)
        self.add(other.lo)


class RunningAggregate(ABC):
    """One round's aggregation, fed one accepted update at a time (``add``), in any order."""

    def __init__(self) -> None:
        self.count = 0  # updates added

    @abstractmethod
    def add(self, result: ClientResult) -> None:
        """Fold ``result`` in; the caller may reuse its arrays afterwards."""

    def merge(self, other: RunningAggregate) -> None:
        """Fold in ``other``, a running aggregate of the same kind over other updates of the same
        attempt (an aggregation worker's partial sums): as if its updates had been added here."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge partial sums")

    def _merge_count(self, other: RunningAggregate) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self.count += other.count

    def _merge_sums(self, other: RunningAggregate) -> None:
        """``_merge_count``, then ``other``'s compensated sums into this one's, tensor by tensor
        (for the aggregates that keep one ``ExactishSum`` per tensor in ``sums``)."""
        self._merge_count(other)
        for total, part in zip(self.sums, other.sums, strict=True):
            total.merge(part)

    @abstractmethod
    def result(self) -> list[np.ndarray]:
        """The new global weights (float32), as the strategy's ``aggregate`` of the same updates
        gives them (to float32 rounding)."""

    def _require(self) -> None:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__} needs at least one update")


def sums_for(shapes: Sequence[tuple[int, ...]]) -> list[ExactishSum]:
    """One ``ExactishSum`` per tensor shape."""
    return [ExactishSum(tuple(s)) for s in shapes]

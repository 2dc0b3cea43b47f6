"""Pruning schedules counted in federated rounds.

Modelled on tfmot's ``PruningSchedule`` classes (small, with ``get_config``), but the step is the
round number and the aggregator applies them to the global model after aggregation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any


class PruningSchedule(ABC):
    """Says, for a round, whether to prune after aggregating it and to which sparsity."""

    @abstractmethod
    def __call__(self, round_number: int) -> tuple[bool, float]:
        """Return ``(prune_now, target_sparsity)`` for the round just aggregated (1-based)."""

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Parameters that rebuild this schedule."""


def _check_range(begin_round: int, end_round: int, frequency: int) -> None:
    if begin_round < 1:
        raise ValueError(f"begin_round must be >= 1, got {begin_round}")
    if end_round < begin_round:
        raise ValueError(f"end_round ({end_round}) must be >= begin_round ({begin_round})")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")


def _is_pruning_turn(r: int, begin: int, end: int, frequency: int) -> bool:
    # tfmot prunes every `frequency` steps from begin to end; we also prune at `end` itself so the
    # final sparsity is always reached even when frequency does not divide the range.
    return begin <= r <= end and ((r - begin) % frequency == 0 or r == end)


@dataclass(frozen=True)
class ConstantSparsity(PruningSchedule):
    """Prune to a fixed sparsity every ``frequency`` rounds in ``[begin_round, end_round]``."""

    target_sparsity: float
    begin_round: int = 1
    end_round: int = 1
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_range(self.begin_round, self.end_round, self.frequency)
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")

    def __call__(self, round_number: int) -> tuple[bool, float]:
        turn = _is_pruning_turn(round_number, self.begin_round, self.end_round, self.frequency)
        return turn, self.target_sparsity

    def get_config(self) -> dict[str, Any]:
        return {"class_name": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class PolynomialDecay(PruningSchedule):
    """tfmot's PolynomialDecay in rounds.

    s(r) = final + (initial - final) * (1 - (r - begin) / (end - begin)) ** power, for r clipped to
    [begin, end]; pruning happens every ``frequency`` rounds from ``begin_round`` and at ``end_round``.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_round: int
    end_round: int
    power: float = 3.0
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_range(self.begin_round, self.end_round, self.frequency)
        for name in ("initial_sparsity", "final_sparsity"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"power must be a finite number > 0, got {self.power}")
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(
                f"final_sparsity ({self.final_sparsity}) must be >= initial_sparsity "
                f"({self.initial_sparsity})"
            )

    def sparsity_at(self, round_number: int) -> float:
        span = self.end_round - self.begin_round
        r = min(max(round_number, self.begin_round), self.end_round)
        progress = 1.0 if span == 0 else (r - self.begin_round) / span
        s = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            1.0 - progress
        ) ** self.power
        return float(s)

    def __call__(self, round_number: int) -> tuple[bool, float]:
        turn = _is_pruning_turn(round_number, self.begin_round, self.end_round, self.frequency)
        return turn, self.sparsity_at(round_number)

    def get_config(self) -> dict[str, Any]:
        return {"class_name": type(self).__name__, **asdict(self)}

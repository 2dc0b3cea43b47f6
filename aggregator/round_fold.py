"""Where one attempt's accepted updates go: into the strategy's running sums, or kept.

A strategy that streams (``Strategy.running``: FedAvg, DP-FedAvg, norm clipping around them,
device-mask averaging) folds each accepted update in as it is accepted; the update's tensors are
then dropped, and every update decodes into the same reserved buffer row, so the aggregator's
memory does not grow with the devices per round. The robust strategies (median, trimmed mean,
Krum, Multi-Krum) need every update of the round at once: those are kept, one reserved row each,
at most ``devices_per_round`` of them, and aggregated sorted by device id so that their order is
not the order they arrived in.

What is kept of a folded update: its device id, sample count and metrics (the round's record),
its own masks (device-side pruning: the mask agreement compares them) and the gradients it
reported at pruned positions (regrowth), which are small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.pruning.masks import Masks

__all__ = ["RoundFold", "buffer_rows"]


def buffer_rows(strategy: Strategy, devices_per_round: int) -> int:
    """Rows of decoded updates to reserve: one for a streaming strategy (every update decodes into
    it in turn), else one per device of a round."""
    streams = strategy.running([np.zeros(1, np.float32)], [None]) is not None
    return 1 if streams else devices_per_round


class RoundFold:
    """One attempt's aggregation: ``row`` to decode the next accepted update into, ``take`` it,
    and at the close ``weights``, the new global weights."""

    def __init__(self, strategy: Strategy | None, global_weights: Sequence[np.ndarray], masks: Masks,
                 buffers: UpdateBuffers | None = None) -> None:
        """``strategy`` None: keep every update, aggregate nothing (collecting only)."""
        self.strategy, self.global_weights, self.masks, self.buffers = strategy, global_weights, masks, buffers
        self.running = strategy.running(global_weights, masks) if strategy is not None else None

    @property
    def streaming(self) -> bool:
        return self.running is not None

    def row(self, accepted: int) -> list[np.ndarray] | None:
        """The arrays the next update decodes into (None: arrays of its own), ``accepted`` being
        the number of updates this attempt has taken so far."""
        if self.buffers is None:
            return None
        return self.buffers.row(0 if self.streaming else accepted)

    def take(self, result: ClientResult) -> ClientResult:
        """Fold ``result`` in (streaming) and return what the round keeps of it."""
        if self.running is None:
            return result
        self.running.add(result)
        return dataclasses.replace(result, delta=[])

    def weights(self, results: Sequence[ClientResult]) -> list[np.ndarray]:
        """The new global weights from this attempt's accepted updates (``results``: what ``take``
        returned for each)."""
        if self.running is not None:
            return self.running.result()
        if self.strategy is None:
            raise ValueError("this RoundFold collects only: give it the strategy to aggregate with")
        ordered = sorted(results, key=lambda r: r.device_id)
        return self.strategy.aggregate(self.global_weights, ordered, self.masks)

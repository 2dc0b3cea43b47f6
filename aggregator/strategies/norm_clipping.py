"""Norm bounding around any strategy: every update clipped to one L2 norm first."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.strategies.running import RunningAggregate
from fedprune.clipping import clip_to_norm
from fedprune.configs import check_real
from fedprune.pruning.masks import Masks, apply_masks

log = logging.getLogger(__name__)


def clip_results(results: Sequence[ClientResult], clip_norm: float, masks: Masks) -> list[ClientResult]:
    """Every update scaled to an L2 norm of at most ``clip_norm`` over its kept positions (its
    pruned positions are set to zero first)."""
    out, clipped = [], []
    for r in results:
        delta, norm = clip_to_norm(apply_masks(r.delta, masks), clip_norm)
        if norm > clip_norm:
            clipped.append(f"{r.device_id} ({norm:.3g})")
        out.append(dataclasses.replace(r, delta=delta))
    if clipped:
        log.info("clipped %d of %d updates to norm %g: %s", len(clipped), len(results), clip_norm, ", ".join(clipped))
    return out


@dataclass(frozen=True)
class NormClipping(Strategy):
    """Norm bounding: clip every update to L2 norm ``clip_norm``, then aggregate with ``inner``.

    Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019: an update
    scaled up (boosted) to outweigh the others is cut back to the norm honest updates have.
    Composes with any strategy; alone (around FedAvg) it limits, rather than removes, the harm.
    Weights by sample count exactly when ``inner`` does. Its config holds ``inner``'s config.
    """

    strategy_name: ClassVar[str] = "norm_clipping"
    inner: Strategy
    clip_norm: float

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Strategy):
            raise ValueError(f"inner must be a Strategy, got {type(self.inner).__name__}")
        if not check_real("clip_norm", self.clip_norm) > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")

    @property
    def sample_weighted(self) -> bool:  # type: ignore[override]
        return self.inner.sample_weighted

    def min_results(self) -> int:
        return self.inner.min_results()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "inner": self.inner.get_config()}

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        return self.inner.aggregate(global_weights, clip_results(results, self.clip_norm, masks), masks)

    def running(self, global_weights: Sequence[np.ndarray], masks: Masks) -> RunningAggregate | None:
        inner = self.inner.running(global_weights, masks)
        return None if inner is None else RunningClipped(inner, self.clip_norm, masks)


class RunningClipped(RunningAggregate):
    """Norm clipping streamed: each update clipped as it comes, then folded into ``inner``'s."""

    def __init__(self, inner: RunningAggregate, clip_norm: float, masks: Masks) -> None:
        super().__init__()
        self.inner, self.clip_norm, self.masks = inner, clip_norm, masks

    def add(self, result: ClientResult) -> None:
        self.inner.add(clip_results([result], self.clip_norm, self.masks)[0])
        self.count += 1

    def merge(self, other: RunningAggregate) -> None:
        self._merge_count(other)
        self.inner.merge(other.inner)

    def result(self) -> list[np.ndarray]:
        return self.inner.result()

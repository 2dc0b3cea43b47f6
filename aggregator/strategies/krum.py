"""Krum and Multi-Krum: the updates closest to their neighbours.

Both from one paper; Krum is Multi-Krum keeping one update (as Flower's ``Krum(MultiKrum)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.strategies.sparse import add_at_kept, kept_deltas
from fedprune.configs import check_int
from fedprune.pruning.masks import Masks

log = logging.getLogger(__name__)


def pairwise_sq_distances(results: Sequence[ClientResult], masks: Masks) -> np.ndarray:
    """Squared L2 distances between the updates (n x n, float64) over the kept positions, summed
    tensor by tensor."""
    n = len(results)
    d = np.zeros((n, n), np.float64)
    for i, m in enumerate(masks):
        x = kept_deltas(results, i, m)
        x -= x.mean(axis=0)  # distances do not change; the Gram matrix loses less to rounding
        g = (x @ x.T).astype(np.float64)
        sq = np.diag(g)
        d += sq[:, None] + sq[None, :] - 2.0 * g
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


@dataclass(frozen=True)
class MultiKrum(Strategy):
    """Multi-Krum: average the ``keep`` updates closest to their neighbours.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017. With n updates of which at most f (``byzantine``) are
    hostile, an update's score is the sum of its squared distances to its n - f - 2 nearest
    others; the ``keep`` updates (m; default n - f) of lowest score are averaged, unweighted.
    Needs n >= 2f + 3.
    """

    strategy_name: ClassVar[str] = "multi_krum"
    byzantine: int
    keep: int | None = None

    def __post_init__(self) -> None:
        if check_int("byzantine", self.byzantine) < 0:
            raise ValueError(f"byzantine must be >= 0, got {self.byzantine}")
        if self.keep is not None and check_int("keep", self.keep) < 1:
            raise ValueError(f"keep must be >= 1 (or None for n - byzantine), got {self.keep}")

    def min_results(self) -> int:
        return 2 * self.byzantine + 3

    def scores(self, results: Sequence[ClientResult], masks: Masks) -> np.ndarray:
        """Each update's Krum score (lower: closer to the others)."""
        n, f = len(results), self.byzantine
        if n < self.min_results():
            raise ValueError(
                f"{type(self).__name__} with byzantine = {f} needs at least {2 * f + 3} updates, got {n}; "
                f"raise federation.min_devices or lower aggregation.byzantine"
            )
        d = pairwise_sq_distances(results, masks)
        nearest = np.sort(d, axis=1)[:, 1:n - f - 1]  # column 0 is the distance to itself
        return nearest.sum(axis=1)

    def select(self, results: Sequence[ClientResult], masks: Masks) -> list[int]:
        """Indices of the updates to average, best score first."""
        m = len(results) - self.byzantine if self.keep is None else self.keep
        if m > len(results) - self.byzantine:
            raise ValueError(f"keep = {m} exceeds n - byzantine = {len(results) - self.byzantine}")
        order = np.argsort(self.scores(results, masks), kind="stable")
        return [int(i) for i in order[:m]]

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        self._require_results(results)
        chosen = self.select(results, masks)
        left_out = sorted(results[i].device_id for i in range(len(results)) if i not in chosen)
        log.info("%s kept %d of %d updates; left out: %s", type(self).__name__, len(chosen), len(results),
                 ", ".join(left_out) or "none")
        picked = [results[i] for i in chosen]
        return [add_at_kept(w, m, kept_deltas(picked, i, m).mean(axis=0, dtype=np.float64))
                for i, (w, m) in enumerate(zip(global_weights, masks, strict=True))]


@dataclass(frozen=True)
class Krum(MultiKrum):
    """Krum: the single update closest to its neighbours becomes the round's delta.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017. Multi-Krum with m = 1; needs n >= 2f + 3.
    """

    strategy_name: ClassVar[str] = "krum"
    keep: int | None = field(default=1, init=False)

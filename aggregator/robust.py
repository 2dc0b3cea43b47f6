"""Robust aggregation: strategies that bound what a few hostile devices can do to the global model.

One class per algorithm, as in ``fedprune.aggregator.strategy``. All of them work on the sparse updates:
every device trained under the same global mask, so each tensor is reduced over its kept positions
only, as a (devices x kept) float32 matrix built one tensor at a time; pruned positions stay
exactly zero. None of the rules here weights by sample count (the count is the device's own
claim, and a hostile device could inflate it); ``NormClipping`` keeps what its inner strategy does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol, Sequence

import numpy as np

from fedprune.aggregator.strategy import ClientResult
from fedprune.clipping import clip_to_norm
from fedprune.pruning.masks import Masks, apply_masks

log = logging.getLogger(__name__)


class Strategy(Protocol):
    """What the round loop needs of an aggregation strategy (FedAvg is the plain one)."""

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]: ...


def kept_deltas(results: Sequence[ClientResult], index: int, mask: np.ndarray | None) -> np.ndarray:
    """Tensor ``index`` of every update at the kept positions: a (devices, kept) float32 matrix."""
    keep = None if mask is None else np.asarray(mask, bool).ravel()
    size = results[0].delta[index].size if keep is None else int(keep.sum())
    out = np.empty((len(results), size), np.float32)
    for row, r in zip(out, results):
        flat = r.delta[index].ravel()
        row[:] = flat if keep is None else flat[keep]
    return out


def add_at_kept(weights: np.ndarray, mask: np.ndarray | None, delta: np.ndarray) -> np.ndarray:
    """``weights`` plus ``delta`` (one value per kept position) as float32; pruned positions 0."""
    out = np.zeros(np.shape(weights), np.float32)
    keep = slice(None) if mask is None else np.asarray(mask, bool).ravel()
    out.reshape(-1)[keep] = np.asarray(weights).ravel()[keep].astype(np.float64) + delta
    return out


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


def _require_results(strategy: object, results: Sequence[ClientResult]) -> None:
    if not results:
        raise ValueError(f"{type(strategy).__name__} needs at least one update")


class NormClipping:
    """Norm bounding: clip every update to L2 norm ``clip_norm``, then aggregate with ``inner``.

    Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019: an update
    scaled up (boosted) to outweigh the others is cut back to the norm honest updates have.
    Composes with any strategy; alone (around FedAvg) it limits, rather than removes, the harm.
    """

    def __init__(self, inner: Strategy, clip_norm: float) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.inner = inner
        self.clip_norm = clip_norm

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        return self.inner.aggregate(global_weights, clip_results(results, self.clip_norm, masks), masks)


class _CoordinateWise:
    """Base of the coordinate-wise rules: the new delta at each kept position is a statistic of
    the devices' deltas at that position (``combine`` over axis 0 of a devices x kept matrix)."""

    def combine(self, deltas: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        _require_results(self, results)
        return [add_at_kept(w, m, self.combine(kept_deltas(results, i, m)))
                for i, (w, m) in enumerate(zip(global_weights, masks, strict=True))]


class CoordinateMedian(_CoordinateWise):
    """Coordinate-wise median of the deltas.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. Any minority of hostile devices moves each coordinate at most
    to the range of the honest values there.
    """

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)


class TrimmedMean(_CoordinateWise):
    """Coordinate-wise trimmed mean of the deltas.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. At each position, the ``floor(trim_fraction * n)`` largest and
    as many smallest of the n values are dropped and the rest averaged; it tolerates that many
    hostile devices.
    """

    def __init__(self, trim_fraction: float) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        n = deltas.shape[0]
        k = int(self.trim_fraction * n)
        if k == 0:
            return deltas.mean(axis=0, dtype=np.float64)
        middle = np.partition(deltas, (k, n - k - 1), axis=0)[k:n - k]
        return middle.mean(axis=0, dtype=np.float64)


def pairwise_sq_distances(results: Sequence[ClientResult], masks: Masks) -> np.ndarray:
    """Squared L2 distances between the updates (n x n, float64), summed tensor by tensor."""
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


class MultiKrum:
    """Multi-Krum: average the ``keep`` updates closest to their neighbours.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017. With n updates of which at most f (``byzantine``) are
    hostile, an update's score is the sum of its squared distances to its n - f - 2 nearest
    others; the ``keep`` updates (m; default n - f) of lowest score are averaged, unweighted.
    Needs n >= 2f + 3.
    """

    def __init__(self, byzantine: int, keep: int | None = None) -> None:
        if byzantine < 0:
            raise ValueError(f"byzantine must be >= 0, got {byzantine}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None for n - byzantine), got {keep}")
        self.byzantine = byzantine
        self.keep = keep

    def scores(self, results: Sequence[ClientResult], masks: Masks) -> np.ndarray:
        """Each update's Krum score (lower: closer to the others)."""
        n, f = len(results), self.byzantine
        if n < 2 * f + 3:
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
        _require_results(self, results)
        chosen = self.select(results, masks)
        left_out = sorted(results[i].device_id for i in range(len(results)) if i not in chosen)
        log.info("%s kept %d of %d updates; left out: %s", type(self).__name__, len(chosen), len(results),
                 ", ".join(left_out) or "none")
        picked = [results[i] for i in chosen]
        return [add_at_kept(w, m, kept_deltas(picked, i, m).mean(axis=0, dtype=np.float64))
                for i, (w, m) in enumerate(zip(global_weights, masks, strict=True))]


class Krum(MultiKrum):
    """Krum: the single update closest to its neighbours becomes the round's delta.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017. Multi-Krum with m = 1; needs n >= 2f + 3.
    """

    def __init__(self, byzantine: int) -> None:
        super().__init__(byzantine, keep=1)

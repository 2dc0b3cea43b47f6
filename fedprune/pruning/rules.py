"""Per-tensor pruning rules: which weights of one kernel to keep.

A rule is a small frozen dataclass. ``rule.mask(w, current, target_sparsity)`` returns the new
boolean keep-mask (True = kept) for the kernel ``w`` whose present mask is ``current``. Every rule:

* never revives a position: the result is ``<= current`` elementwise (pruned stays pruned), and a
  position already pruned is never counted as a survivor, whatever value ``w`` holds there;
* is deterministic (ties are broken by position, the same way on every party);
* is pure NumPy and leaves ``w`` untouched; zeroing pruned weights is the caller's job
  (:func:`fedprune.pruning.masks.prune_with_rules` does it).

Layout (Keras): the LAST axis is the output unit/filter; every other axis indexes an input
(Dense kernel ``(in, out)``, Conv2D kernel ``(kh, kw, in, out)``); axis ``-2`` is the input
channel.

Threshold rules (``AbsoluteThreshold``, ``MaxRateThreshold``, ``RowMeanThreshold``) ignore the
schedule's target sparsity: the threshold decides how many go. ``LayerMagnitude`` prunes to the
target. ``MByN`` imposes a fixed structure and ignores the target too.

``rule_from_config`` rebuilds a rule from a dict such as ``{"rule": "absolute", "threshold":
0.4}``; ``rule.get_config()`` returns exactly such a dict.

To add one: a frozen dataclass subclass of ``Rule`` with a ``rule_name`` and ``mask`` (checking
its parameters in ``__post_init__``), one line in ``RULES``, and an instance in
``tests/test_pruning_rules.py``'s ``ALL_RULES``, whose tests then check that it never revives a
position and that its config round-trips.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedprune.configs import check_int, check_real, config_of, parse_config
from fedprune.pruning.masks import magnitude_mask

__all__ = [
    "AbsoluteThreshold",
    "LayerMagnitude",
    "MByN",
    "MaxRateThreshold",
    "RowMeanThreshold",
    "Rule",
    "RULES",
    "rule_from_config",
]


class Rule(ABC):
    """A pruning rule for one prunable tensor (subclasses are frozen dataclasses)."""

    #: the ``"rule"`` value naming this class in a config dict
    rule_name: ClassVar[str]

    @abstractmethod
    def mask(
        self, w: np.ndarray, current: np.ndarray | None, target_sparsity: float | None
    ) -> np.ndarray:
        """New keep-mask for ``w`` (same shape, bool), never keeping a position ``current`` pruned.

        ``current=None`` means nothing is pruned yet. ``target_sparsity`` is the schedule's target;
        only rules that prune to a sparsity use it.
        """

    def __call__(
        self, w: np.ndarray, current: np.ndarray | None, target_sparsity: float | None = None
    ) -> np.ndarray:
        return self.mask(w, current, target_sparsity)

    def get_config(self) -> dict[str, Any]:
        """``{"rule": name, **parameters}``; ``rule_from_config(rule.get_config()) == rule``."""
        return config_of("rule", self.rule_name, self)


# --------------------------------------------------------------------------- helpers


def _prepare(w: np.ndarray, current: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(|w| as float64, a fresh copy of the keep-mask) after checking shapes."""
    w = np.asarray(w)
    a = np.abs(w.astype(np.float64))
    if current is None:
        keep = np.ones(w.shape, dtype=bool)
    else:
        current = np.asarray(current)
        if current.shape != w.shape:
            raise ValueError(f"mask shape {current.shape} does not match weights shape {w.shape}")
        keep = current.astype(bool, copy=True)
    return a, keep


def _in_precision_of(w: np.ndarray, theta):
    """``theta`` (a float or an array) rounded to ``w``'s floating precision, so that float32
    weights are compared with a threshold as float32 holds it (a weight equal to it is pruned)."""
    dtype = np.asarray(w).dtype
    if not np.issubdtype(dtype, np.floating):
        return theta
    with np.errstate(over="ignore"):  # a huge threshold becomes inf: prune all, correctly
        return np.asarray(theta, dtype=dtype).astype(np.float64)


# --------------------------------------------------------------------------- threshold rules


@dataclass(frozen=True)
class AbsoluteThreshold(Rule):
    """Keep ``|w| > threshold`` (strictly greater; a weight equal to the threshold is pruned).

    The threshold is first rounded to the weights' own floating precision, so ``float32`` weights
    compare as ``float32``: ``np.float32(0.4)`` is pruned by ``AbsoluteThreshold(0.4)`` although
    it is a hair above the float64 number 0.4.
    """

    rule_name: ClassVar[str] = "absolute"
    threshold: float

    def __post_init__(self) -> None:
        if check_real("threshold", self.threshold) < 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    def mask(self, w, current, target_sparsity=None):
        a, keep = _prepare(w, current)
        return keep & (a > _in_precision_of(w, float(self.threshold)))


@dataclass(frozen=True)
class MaxRateThreshold(Rule):
    """Keep ``|w| > rate * max|w|``, the max taken over the layer's currently kept weights.

    Re-applying it to unchanged weights prunes nothing more (the max survives). A layer with no
    kept weight is returned unchanged.
    """

    rule_name: ClassVar[str] = "max_rate"
    rate: float

    def __post_init__(self) -> None:
        r = check_real("rate", self.rate)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")

    def mask(self, w, current, target_sparsity=None):
        a, keep = _prepare(w, current)
        if not keep.any():
            return keep
        theta = float(self.rate) * float(a[keep].max())
        return keep & (a > theta)


@dataclass(frozen=True)
class RowMeanThreshold(Rule):
    """Per input row i: keep ``|w_ij| > scale * mean_j |w_ij|``, the threshold rounded to the
    weights' own precision as in ``AbsoluteThreshold`` (a float32 weight equal to its row's mean,
    as float32 holds it, is pruned, as it is with float64 weights).

    A row is one input: every index but the last axis (Dense: a kernel row; Conv2D: one
    ``(kh, kw, in)`` position, averaged over the output filters). A 1-D tensor is a single row.

    The mean is over ALL the row's weights, already-pruned ones counting as 0 (the divisor is the
    row length, not the number of survivors). Reasons: (1) pruned weights ARE 0 in the global
    model, so this is just the mean of the stored row and the paper's formula as written; (2) it
    makes the rule idempotent: after pruning, the row's mean can only fall, so every survivor
    (which beat the old, higher threshold) survives re-application on unchanged weights. Averaging
    only the survivors would raise the threshold after every application and, applied each
    pruning turn, ratchet every row down towards a single weight.
    """

    rule_name: ClassVar[str] = "row_mean"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if check_real("scale", self.scale) < 0.0:
            raise ValueError(f"scale must be >= 0, got {self.scale}")

    def mask(self, w, current, target_sparsity=None):
        a, keep = _prepare(w, current)
        if a.size == 0:
            return keep
        rows = np.where(keep, a, 0.0)
        rows = rows.reshape(1, -1) if rows.ndim < 2 else rows.reshape(-1, rows.shape[-1])
        theta = _in_precision_of(w, float(self.scale) * rows.mean(axis=1, keepdims=True))
        return keep & (rows > theta).reshape(keep.shape)


# --------------------------------------------------------------------------- target-driven rules


@dataclass(frozen=True)
class LayerMagnitude(Rule):
    """The schedule's target sparsity by magnitude ranking within the layer (``magnitude_mask``)."""

    rule_name: ClassVar[str] = "magnitude"

    def mask(self, w, current, target_sparsity=None):
        if target_sparsity is None:
            raise ValueError("LayerMagnitude needs a target sparsity (got None)")
        _, keep = _prepare(w, current)
        return magnitude_mask(w, target_sparsity, current=keep)


@dataclass(frozen=True)
class MByN(Rule):
    """Keep the ``m`` largest of every ``n`` consecutive weights along the INPUT axis.

    Groups run along axis ``-2`` (the input channel) for each fixed output unit (and each fixed
    kernel position for convolutions), as tfmot's ``weights_rearrange`` + ``generate_m_by_n_mask``
    do: a Dense kernel ``(in, out)`` is grouped as ``w[4g:4g+4, j]``, a Conv2D kernel
    ``(kh, kw, in, out)`` as ``w[y, x, 4g:4g+4, j]``. A 1-D tensor is grouped along its only axis.

    NOTE: ``m`` here is the number KEPT (as in "2:4 sparsity" = 2 non-zeros of 4); tfmot's
    ``sparsity_m_by_n=(m, n)`` counts ZEROS. Both mean the same for 2:4, not for e.g. 1:4.

    When the input size is not a multiple of ``n``, the last group (length ``t < n``) keeps
    ``ceil(m * t / n)``. Already-pruned positions stay pruned and count against their group (a
    group keeps ``min(quota, kept so far)``). Ties are broken like ``magnitude_mask``: among equal
    magnitudes, the earlier position is pruned first. The target sparsity is ignored.
    """

    rule_name: ClassVar[str] = "m_by_n"
    m: int = 2
    n: int = 4

    def __post_init__(self) -> None:
        m, n = check_int("m", self.m), check_int("n", self.n)
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n}")
        if not 1 <= m < n:
            raise ValueError(f"m must be in [1, n) = [1, {n}), got {m}")

    def mask(self, w, current, target_sparsity=None):
        a, keep = _prepare(w, current)
        if a.size == 0:
            return keep
        m, n = int(self.m), int(self.n)
        if a.ndim < 2:
            moved_shape = (1, a.size)
            score, kept = a.reshape(moved_shape), keep.reshape(moved_shape)
        else:
            # (..., in, out) -> (..., out, in): each row is one output unit's inputs, in order
            score, kept = np.moveaxis(a, -2, -1), np.moveaxis(keep, -2, -1)
            moved_shape = score.shape
            score, kept = score.reshape(-1, moved_shape[-1]), kept.reshape(-1, moved_shape[-1])
        n_rows, length = score.shape
        n_groups = -(-length // n)
        pad = n_groups * n - length
        # pruned (and padding) positions rank below every kept weight, even a kept exact 0.0
        score = np.where(kept, score, -np.inf)
        score = np.pad(score, ((0, 0), (0, pad)), constant_values=-np.inf)
        score = score.reshape(n_rows, n_groups, n)
        order = np.argsort(score, axis=-1, kind="stable")  # ascending, ties: earlier first
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), order.shape), axis=-1)
        quota = np.full(n_groups, m)
        tail = length - (n_groups - 1) * n
        quota[-1] = -(-m * tail // n)  # ceil(m * tail / n); == m when the tail is a full group
        chosen = rank >= (n - quota)[None, :, None]
        chosen = chosen.reshape(n_rows, n_groups * n)[:, :length] & kept
        if a.ndim < 2:
            return chosen.reshape(keep.shape)
        return np.moveaxis(chosen.reshape(moved_shape), -1, -2)


# --------------------------------------------------------------------------- config

RULES: dict[str, type[Rule]] = {
    cls.rule_name: cls
    for cls in (LayerMagnitude, AbsoluteThreshold, MaxRateThreshold, RowMeanThreshold, MByN)
}


def rule_from_config(d: Mapping[str, Any]) -> Rule:
    """Build a rule from ``{"rule": name, **parameters}``.

    Names and parameters: ``"magnitude"`` (none), ``"absolute"`` (``threshold``), ``"max_rate"``
    (``rate``), ``"row_mean"`` (``scale``, default 1.0), ``"m_by_n"`` (``m`` default 2, ``n``
    default 4). Raises ``ValueError`` naming the offending key: a missing or unknown ``rule``, a
    parameter the rule does not take, a missing required parameter, or a bad value.
    """
    cls, params = parse_config("rule", RULES, d)
    return cls(**params)

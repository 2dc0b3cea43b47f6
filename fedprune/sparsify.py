"""Sparsified updates: which positions of a trained delta a device sends.

A baseline from the update-compression literature, and a transport for dense layers and dense
rounds: each device sends only a fraction of each kernel's delta, the entries of largest magnitude,
in a self-describing update (the codec codes the chosen positions as a mask), and carries what it
did not send into the next round with its error-feedback residual (Aji & Heafield, "Sparse
Communication for Distributed Gradient Descent", EMNLP 2017; Lin et al., "Deep Gradient
Compression", ICLR 2018; Sattler et al., "Sparse Ternary Compression", IEEE TNNLS 2019). Unlike
pruning, the model itself stays dense: the positions change every round and from device to device.

The task file names one by its registered name (``[transport] sparsifier = "top_k"``, its
parameters in ``[transport.sparsifier_params]``); the task carries its config to the devices
(``uplink_sparsifier`` in the task header, docs/protocol.md). One class per sparsifier, one line
in ``SPARSIFIERS``, as the precisions, rules and strategies are registered (docs/extending.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from fedprune.configs import check_int, check_real, config_of, parse_config

__all__ = ["SPARSIFIERS", "Sparsifier", "TopK", "sparsifier_from_config"]


class Sparsifier(ABC):
    """Chooses the positions of one tensor's delta that travel (subclasses: frozen dataclasses)."""

    sparsifier_name: ClassVar[str]

    @abstractmethod
    def select(self, delta: np.ndarray, allowed: np.ndarray | None) -> np.ndarray | None:
        """A boolean mask of the positions of ``delta`` to send, within ``allowed`` (the task's
        mask; None: every position), or None to send the tensor as it is. Deterministic; never
        selects a position ``allowed`` excludes."""

    def get_config(self) -> dict[str, Any]:
        return config_of("sparsifier", self.sparsifier_name, self)


@dataclass(frozen=True)
class TopK(Sparsifier):
    """The ``fraction`` of each kernel's allowed positions with the largest ``|delta|`` (at least
    one; ties broken by position). Tensors with fewer than ``min_size`` elements (biases,
    normalization vectors) travel whole: their positions would cost more than their values."""

    sparsifier_name: ClassVar[str] = "top_k"
    fraction: float
    min_size: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 < check_real("fraction", self.fraction) <= 1.0:
            raise ValueError(f"top_k fraction must be in (0, 1], got {self.fraction}")
        if check_int("min_size", self.min_size) < 1:
            raise ValueError(f"top_k min_size must be at least 1, got {self.min_size}")

    def select(self, delta: np.ndarray, allowed: np.ndarray | None) -> np.ndarray | None:
        if delta.size < self.min_size:
            return allowed
        flat = np.abs(np.asarray(delta, np.float32)).reshape(-1)
        candidates = np.arange(flat.size) if allowed is None else np.flatnonzero(allowed.reshape(-1))
        k = min(len(candidates), max(1, math.ceil(self.fraction * len(candidates))))
        chosen = np.zeros(flat.size, dtype=bool)
        if k:
            # Stable sort of -|delta|: the largest first, equal magnitudes by position.
            order = np.argsort(-flat[candidates], kind="stable")[:k]
            chosen[candidates[order]] = True
        return chosen.reshape(delta.shape)


SPARSIFIERS: dict[str, type[Sparsifier]] = {cls.sparsifier_name: cls for cls in (TopK,)}


def sparsifier_from_config(config: Mapping[str, Any]) -> Sparsifier:
    """The sparsifier ``{"sparsifier": name, **parameters}`` names; ValueError naming what is wrong."""
    cls, params = parse_config("sparsifier", SPARSIFIERS, config)
    return cls(**params)

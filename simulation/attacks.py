"""Hostile devices, for simulations, tests and benchmarks of robust aggregation.

A hostile device here runs the real agent and the real training, then lies about the result: its
trainer is wrapped so the update it sends is corrupted. Everything else (the protocol, the
quantization, the broker) is what an honest device goes through.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedprune.task import AggregationSection, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attack:
    """Which devices are hostile and what they send.

    ``sign_flip``: the device sends ``-scale`` times its honestly trained delta, pulling the
    global model away from where the honest devices push it (the sign-flipping attack used to
    evaluate robust aggregation, e.g. Li et al., "RSA: Byzantine-Robust Stochastic Aggregation
    Methods", AAAI 2019); ``scale`` > 1 also outweighs the honest updates in a plain mean.
    """

    kind: Literal["sign_flip"] = "sign_flip"
    fraction: float = 0.2  # of the fleet
    scale: float = 10.0

    def __post_init__(self) -> None:
        if self.kind != "sign_flip":
            raise ValueError(f"unknown attack {self.kind!r}; known: 'sign_flip'")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"attack fraction must be in (0, 1), got {self.fraction}")
        if not self.scale > 0:
            raise ValueError(f"attack scale must be > 0, got {self.scale}")

    def hostile_devices(self, num_devices: int, seed: int = 0) -> set[int]:
        """Indices of the ``round(fraction * num_devices)`` hostile devices (at least one), drawn
        with ``seed``."""
        k = min(num_devices, max(1, round(self.fraction * num_devices)))
        return {int(i) for i in np.random.default_rng(seed).choice(num_devices, size=k, replace=False)}

    def wrap(self, trainer: Any) -> "SignFlipTrainer":
        """A trainer for a hostile device: ``trainer``'s training, this attack's update."""
        return SignFlipTrainer(trainer, self.scale)


class SignFlipTrainer:
    """Trains with ``inner``, then returns ``-scale`` times the delta it computed.

    Works with any trainer whose result is a dataclass with a ``delta`` list (as
    ``fedprune.edge_agent.trainer.TrainResult``); several hostile devices may share one.
    """

    def __init__(self, inner: Any, scale: float) -> None:
        self.inner = inner
        self.scale = scale

    def train(self, architecture: Any, task: Any, x: np.ndarray, y: np.ndarray, **options: Any) -> Any:
        result = self.inner.train(architecture, task, x, y, **options)
        flipped = [(-self.scale * d).astype(d.dtype) for d in result.delta]
        return dataclasses.replace(result, delta=flipped)


def robust_aggregations(devices_per_round: int, hostile: int, clip_norm: float) -> dict[str, dict[str, Any]]:
    """The ``[aggregation]`` settings of each robust option, sized for ``hostile`` hostile updates
    among ``devices_per_round``: what the attack benchmark and tests compare against FedAvg."""
    if not 0 < hostile < devices_per_round / 2:
        raise ValueError(f"need 0 < hostile < devices_per_round / 2, got {hostile} of {devices_per_round}")
    return {
        "clipping": {"method": "fedavg", "clip_norm": clip_norm},
        "median": {"method": "median"},
        "trimmed_mean": {"method": "trimmed_mean", "trim_fraction": hostile / devices_per_round},
        "krum": {"method": "krum", "byzantine": hostile},
        "multi_krum": {"method": "multi_krum", "byzantine": hostile},
    }


def every_device_task(task: Task, devices: int, aggregation: dict[str, Any]) -> Task:
    """``task`` with all ``devices`` in every round (so each round has exactly the attack's share of
    hostile updates) and the given ``[aggregation]`` settings; validated."""
    fed = dataclasses.replace(task.federation, devices_per_round=devices, min_devices=devices)
    return dataclasses.replace(task, federation=fed, aggregation=AggregationSection(**aggregation)).check()

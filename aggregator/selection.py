"""Which online devices can train the task, and why the others are left out.

A device says in its presence what it trains with (``trainer``): ``keras`` trains anything the
task asks; ``litert`` (no TensorFlow on the device) needs the architecture's trainable TFLite
file (``aggregator.trainable_file``) and cannot prune on the device; ``none`` cannot train. A
device left out is logged once per reason, not every round.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from fedprune.aggregator.registry import DeviceInfo, DeviceRegistry
from fedprune.aggregator.trainable_file import TrainableFile
from fedprune.task import FederationSection

log = logging.getLogger(__name__)


def can_ever_train(device: DeviceInfo) -> bool:
    """Whether the device has a trainer at all (what waiting for devices counts)."""
    return device.trainer != "none"


def why_left_out(device: DeviceInfo, trainable: TrainableFile | None, device_side_pruning: bool) -> str | None:
    """Why ``device`` cannot train the task now (None: it can). ``trainable``: the current
    architecture's trainable file, when one was asked for."""
    if device.trainer == "none":
        return ("it has no trainer: its agent has neither TensorFlow (fedprune[agent]) nor a TFLite runtime "
                "(fedprune[agent-lite])")
    if device.trainer != "litert":
        return None
    if device_side_pruning:
        return ("it trains without TensorFlow, which cannot prune on the device (pruning.mask_owner = 'device' "
                "needs the Keras trainer)")
    if trainable is None:
        return "it trains without TensorFlow and the architecture's trainable TFLite file was not built"
    if trainable.message is None:
        return f"it trains without TensorFlow and the architecture has no trainable TFLite file: {trainable.refusal[:300]}"
    return None


class DeviceSelection:
    """The online devices that can train, from the registry; logs each device left out once per
    reason."""

    def __init__(self, registry: DeviceRegistry, *, device_side_pruning: bool) -> None:
        self.registry = registry
        self.device_side_pruning = device_side_pruning
        self._logged: set[tuple[str, str]] = set()

    def wants_trainable_file(self) -> bool:
        """Whether a device that trains without TensorFlow is online (so the file is worth building)."""
        return not self.device_side_pruning and any(d.trainer == "litert" for d in self.registry.online_devices())

    def eligible(self, trainable: TrainableFile | None) -> list[str]:
        """The ids of online devices that can train the task, in id order."""
        out = []
        for device in self.registry.online_devices():
            reason = why_left_out(device, trainable, self.device_side_pruning)
            if reason is None:
                out.append(device.device_id)
            elif (device.device_id, reason) not in self._logged:
                self._logged.add((device.device_id, reason))
                log.warning("device %s is left out of the rounds: %s", device.device_id, reason)
        return out

    def draw(self, rng: np.random.Generator, fed: FederationSection,
             trainable: Callable[[], TrainableFile | None]) -> tuple[list[str], int]:
        """Draw up to ``fed.devices_per_round`` of the devices that can train (waiting up to
        ``fed.wait_for_devices_s`` while fewer than ``fed.min_devices`` can): the drawn ids in id
        order, and how many could have been drawn. ``trainable`` gives the current trainable file."""
        online = self.eligible(trainable())
        if len(online) < fed.min_devices:
            self.registry.wait_for(fed.min_devices, fed.wait_for_devices_s, counts=can_ever_train)
            online = self.eligible(trainable())
        k = min(fed.devices_per_round, len(online))
        return (sorted(rng.choice(online, size=k, replace=False).tolist()) if k else []), len(online)

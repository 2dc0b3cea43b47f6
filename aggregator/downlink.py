"""What each selected device is sent: the task, values-only where the device holds its masks.

A device that holds the round's mask list (it named the list's digest in its presence, and the
aggregator has seen it answer a task with those masks since) is sent only the kept values of the
global weights at the task's downlink precision (a values-only task, docs/protocol.md section 12);
a device that holds other masks or none, or an agent that takes self-describing tasks only (its
presence names no mask digest), is sent the self-describing task, masks included. At 90 % sparsity
the masks are most of a float32 task's bytes.

With a lossy downlink precision and the task's ``error_feedback``, the aggregator keeps what
quantizing the weights lost (the residual) and adds it to the next round's weights before they
are quantized, so that the quantization errors of successive rounds cancel instead of being the
same rounding of nearly the same weights, round after round (Seide et al. 2014; the downlink form,
Tang et al., DoubleSqueeze, ICML 2019). The residual goes into each round's checkpoint
(``residual``, ``restore``), so a resumed run carries it on.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from fedprune.converters.codec import decode_values_only, encode_values_only
from fedprune.converters.mask_coding import mask_digest
from fedprune.converters.protocol import TrainTask, encode_task
from fedprune.task import TransportSection


class HeldMasks(Protocol):
    def mask_digest(self, device_id: str) -> str | None: ...


class Downlink:
    """Encodes each attempt's task for the selected devices, and keeps the downlink residual."""

    def __init__(self, transport: TransportSection, names: Sequence[str]) -> None:
        self.names = list(names)
        self.compression = transport.compression
        self.feedback = transport.error_feedback and transport.downlink_precision != "float32"
        self._round = -1
        self._base: list[np.ndarray] | None = None  # the residual the open round's weights carry
        self._next: list[np.ndarray] | None = None  # what quantizing the open round's weights lost

    def payloads(self, task: TrainTask, selected: Sequence[str], held: HeldMasks) -> dict[str, bytes]:
        """Each selected device's task frame: values-only where ``held`` says the device holds the
        task's masks, self-describing otherwise (each form encoded once)."""
        if self.feedback:
            task.weights = self._compensated(task)
        digest = mask_digest(task.masks)
        encoded: dict[bool, bytes] = {}
        out = {}
        for device_id in selected:
            values_only = held.mask_digest(device_id) == digest
            if values_only not in encoded:
                encoded[values_only] = encode_task(task, self.names, self.compression, values_only=values_only,
                                                   digest=digest)
            out[device_id] = encoded[values_only]
        return out

    @property
    def residual(self) -> list[np.ndarray] | None:
        """What quantizing the last encoded round's weights lost: the next round's weights carry it
        (None without feedback, or before any round)."""
        return self._next

    def restore(self, residual: list[np.ndarray] | None) -> None:
        """Carry on from a checkpoint's ``residual`` (ignored without feedback)."""
        if self.feedback and residual is not None:
            self._round, self._next = -1, [np.asarray(r, np.float32) for r in residual]

    def _compensated(self, task: TrainTask) -> list[np.ndarray]:
        """The weights plus the residual of the rounds before (zero at pruned positions); records
        what quantizing them loses, for the next round. Every attempt of a round sends the same."""
        if task.round != self._round:
            self._round, self._base = task.round, self._next
        weights, masks = task.weights, task.masks
        if self._base is not None and [r.shape for r in self._base] == [w.shape for w in weights]:
            weights = [(w + (r if m is None else r * m)).astype(np.float32)
                       for w, r, m in zip(weights, self._base, masks)]
        precision = task.downlink_precision
        sent = decode_values_only(encode_values_only(weights, masks, precision), [w.shape for w in weights],
                                  masks, precision)
        self._next = [w - s for w, s in zip(weights, sent)]
        return weights

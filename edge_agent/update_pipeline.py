"""A trained update on its way out of the device, as an ordered list of small steps.

In the spirit of Flower's client mods: each step does one thing to the update and can be tested
alone, and ``DeviceSession`` runs them in order for every trained job (``default_steps``):

1. ``ClipToNorm``: DP-FedAvg clipping on the device, of the delta, to the task's
   ``training.clip_norm`` (docs/robustness.md);
2. ``SendWeights``: the trained weights instead of the delta, where the task asks for them or the
   device prunes on its own;
3. ``CompensateErrors``: error feedback: adds the carried residual before encoding, and once the
   update has been published keeps what quantization (and sparsification) lost (docs/protocol.md,
   section 15);
4. ``Sparsify``: where the task names a sparsifier (top-k), only the positions it chooses travel,
   in a self-describing update (``fedprune.sparsify``);
5. ``Encode``: quantizes and frames the update (the payload to publish).

A step is a callable that changes the ``OutgoingUpdate`` it is given; one that must act after the
update has left (error feedback) appends a callback to ``outgoing.after_sent``. To add one (top-k
sparsification, a hostile device's lie), write a small callable and insert it into the session's
``update_steps`` where it belongs: before ``CompensateErrors`` if what it loses is to be carried
into the next round, before ``Encode`` in any case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedprune.clipping import clip_to_norm
from fedprune.converters.codec import round_trip_tensors
from fedprune.converters.protocol import Architecture, Encoding, TrainTask, Update, decode_update, encode_update
from fedprune.converters.quantize import precision_named
from fedprune.error_feedback import ErrorFeedback
from fedprune.pruning.masks import apply_masks
from fedprune.sparsify import sparsifier_from_config

log = logging.getLogger(__name__)

__all__ = [
    "ClipToNorm",
    "CompensateErrors",
    "Encode",
    "OutgoingUpdate",
    "SendWeights",
    "Sparsify",
    "UpdateStep",
    "default_steps",
    "run_steps",
]


@dataclass
class OutgoingUpdate:
    """What the steps work on: the update of one job, from the trained delta to its payload."""

    task: TrainTask
    architecture: Architecture
    update: Update  # ``tensors`` is the trained delta until a step makes it something else
    masks: list[np.ndarray | None]  # what the update is encoded against: the task's, or the device's own
    payload: bytes | None = None  # set by the encoding step
    # Called with the payload once it has been published, in the order the steps added them.
    after_sent: list[Callable[[bytes], None]] = field(default_factory=list)

    def sent(self) -> None:
        """Run what the steps left for after publishing (call once the payload is out)."""
        if self.payload is None:
            raise RuntimeError("the update was never encoded, so it cannot have been sent")
        for callback in self.after_sent:
            callback(self.payload)


UpdateStep = Callable[[OutgoingUpdate], None]


def run_steps(steps: Sequence[UpdateStep], outgoing: OutgoingUpdate) -> bytes:
    """Run ``steps`` in order on ``outgoing``; returns the payload the last of them encoded.
    Raises ValueError if the update cannot be encoded."""
    for step in steps:
        step(outgoing)
    if outgoing.payload is None:
        raise ValueError(f"no step encoded the update (steps: {[type(s).__name__ for s in steps]})")
    return outgoing.payload


@dataclass(frozen=True)
class ClipToNorm:
    """DP-FedAvg on the device: scale the delta to L2 norm ``training.clip_norm`` at most (when the
    task sets it), before anything else sees it."""

    def __call__(self, outgoing: OutgoingUpdate) -> None:
        clip_norm = outgoing.task.training.clip_norm
        if clip_norm is not None:
            outgoing.update.tensors = clip_to_norm(outgoing.update.tensors, clip_norm)[0]


@dataclass(frozen=True)
class SendWeights:
    """The trained weights (task weights + delta) instead of the delta, where the task asks for
    them or the device prunes on its own (the aggregator then averages weights under each
    device's mask)."""

    def __call__(self, outgoing: OutgoingUpdate) -> None:
        task, update = outgoing.task, outgoing.update
        if update.content == "delta" and (task.update_content == "weights" or task.device_sparsity is not None):
            update.tensors = [w + d for w, d in zip(task.weights, update.tensors)]
            update.content = "weights"


@dataclass(frozen=True)
class CompensateErrors:
    """Error feedback: the carried residual is added to a lossy delta before it is encoded, and
    once it has been published, ``compensated - what the aggregator decodes`` becomes the next
    residual (so a failed publish leaves the residual as it was)."""

    error_feedback: ErrorFeedback

    def __call__(self, outgoing: OutgoingUpdate) -> None:
        task, update = outgoing.task, outgoing.update
        lossy = not precision_named(update.precision).exact or task.uplink_sparsifier is not None
        if not (task.error_feedback and lossy and update.content == "delta"):
            return
        compensated = self.error_feedback.compensate(update.tensors, outgoing.masks)
        update.tensors = compensated
        outgoing.after_sent.append(lambda payload: self._record(outgoing, compensated, payload))

    def _record(self, outgoing: OutgoingUpdate, compensated: list[np.ndarray], payload: bytes) -> None:
        update = outgoing.update
        if outgoing.task.stochastic_rounding:  # the draws are spent: read back what was sent
            arch = outgoing.architecture
            sent = decode_update(payload, arch.shapes, outgoing.masks, len(payload), names=arch.names).tensors
        else:  # the same values, bit for bit, without making and decoding the sections again
            sent = round_trip_tensors(update.tensors, outgoing.masks, update.precision)
        self.error_feedback.record(compensated, sent)


@dataclass(frozen=True)
class Sparsify:
    """Sparsified updates: where the task names a sparsifier, each tensor's delta keeps only the
    positions it chooses (within the task's mask), and the update goes self-describing with those
    positions as its masks. After ``CompensateErrors``, so what is left out is carried into the
    next round. An unknown sparsifier (a newer aggregator's) leaves the update dense, which is
    always valid, and says so."""

    def __call__(self, outgoing: OutgoingUpdate) -> None:
        task, update = outgoing.task, outgoing.update
        if task.uplink_sparsifier is None or update.content != "delta" or task.device_sparsity is not None:
            return
        try:
            sparsifier = sparsifier_from_config(task.uplink_sparsifier)
        except ValueError as e:
            log.warning("the task's uplink_sparsifier cannot be used (%s); the update is sent dense", e)
            return
        masks = [sparsifier.select(t, m) for t, m in zip(update.tensors, outgoing.masks)]
        update.tensors = apply_masks(update.tensors, masks)
        update.encoding = Encoding.SELF_DESCRIBING
        outgoing.masks = masks


@dataclass(frozen=True)
class Encode:
    """Quantize and frame the update at the task's uplink precision (stochastic rounding from
    ``rng`` where the task asks for it): the payload to publish."""

    rng: np.random.Generator

    def __call__(self, outgoing: OutgoingUpdate) -> None:
        outgoing.payload = encode_update(outgoing.update, outgoing.masks, names=outgoing.architecture.names,
                                         rng=self.rng, stochastic=outgoing.task.stochastic_rounding)


def default_steps(error_feedback: ErrorFeedback, rng: np.random.Generator) -> list[UpdateStep]:
    """Clip, send weights where asked, compensate errors, sparsify where asked, encode: every
    device's pipeline."""
    return [ClipToNorm(), SendWeights(), CompensateErrors(error_feedback), Sparsify(), Encode(rng)]

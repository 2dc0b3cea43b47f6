"""Intake of one update: check it against the open round and decode it, or say why not.

Pure: no TensorFlow, no MQTT, no aggregator. ``check_update`` reads the update's frame and header,
checks them against a ``RoundContext`` (in this order: the topic, the frame, the device named by
the topic and the header, a known device, the round and attempt, selected, not reported yet, no
device error, the uplink precision asked), decodes the tensors against the round's masks, and
returns the ``ClientResult`` to aggregate or a ``Rejection`` whose reason starts with its kind
(``"wrong round: ..."``), which the aggregator counts, logs and acknowledges.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult
from fedprune.converters.codec import MaskLayout
from fedprune.converters.errors import CodecError
from fedprune.converters.protocol import Encoding, Topics, Update, UpdateHeader, decode_update, peek_update
from fedprune.converters.text import one_line
from fedprune.pruning.masks import Masks, apply_masks

__all__ = ["Rejection", "RoundContext", "check_update"]

MAX_REASON_CHARS = 300  # a kind ("device error: ") and a quoted text of at most MAX_TEXT_CHARS


@dataclass(frozen=True)
class RoundContext:
    """What the updates of one attempt of a round are checked and decoded against.

    Fixed for the attempt; what changes with every accepted update (the devices that have
    reported, the buffer row the next one decodes into) is passed to ``check_update`` itself.
    """

    round: int
    attempt: int
    selected: Collection[str]
    known: Callable[[str], bool]  # a device that has announced itself (the registry's)
    topics: Topics
    shapes: Sequence[tuple[int, ...]]
    masks: Masks  # the global masks the devices trained under
    names: Sequence[str]  # tensor names, for self-describing updates
    max_message_bytes: int
    uplink_precision: str  # the task's transport.uplink_precision
    device_masks: bool  # devices prune themselves and send weights with their own masks
    global_weights: Sequence[np.ndarray]  # an update that sends weights is turned into a delta
    layout: MaskLayout | None = None  # ``masks`` prepared once for decoding values-only updates


@dataclass(frozen=True)
class Rejection:
    """Why an update was refused; ``device_id`` is "" when the topic names no device.

    The reason quotes what the peer sent (its error text, a device id, a topic): it is made one
    line of at most ``MAX_REASON_CHARS`` here, once, for the log and the acknowledgement alike.
    """

    reason: str
    device_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", one_line(self.reason, MAX_REASON_CHARS))

    @property
    def kind(self) -> str:
        """The reason's first words (``"wrong round"``): what the round's record counts."""
        return self.reason.split(":")[0]


def check_update(ctx: RoundContext, topic: str, data: bytes, reported: Collection[str] = (),
                 row: Sequence[np.ndarray] | None = None) -> ClientResult | Rejection:
    """The update ``data`` that arrived on ``topic``, checked and decoded; or why it is refused.

    ``reported``: the devices whose update this attempt has accepted so far. ``row``: arrays to
    decode a values-only update into (one buffer row per accepted update of the round), or None
    for arrays of its own.
    """
    try:
        device_id = ctx.topics.device_from_topic(topic)
    except ValueError:
        return Rejection(f"bad topic: {one_line(topic)}")
    try:
        peeked = peek_update(data, ctx.max_message_bytes, device_id)  # the topic names the sender
    except CodecError as e:
        return Rejection(f"undecodable: {e.reason}", device_id)
    problem = _header_problem(ctx, peeked[0], device_id, reported)
    if problem:
        return Rejection(problem, device_id)
    out = row if peeked[0].encoding == Encoding.VALUES_ONLY else None
    try:
        update = decode_update(data, ctx.shapes, ctx.masks, ctx.max_message_bytes, names=ctx.names,
                               layout=ctx.layout, peeked=peeked, out=out)
    except CodecError as e:
        return Rejection(f"undecodable: {e.reason}", device_id)
    return _as_result(ctx, update, device_id)


def _header_problem(ctx: RoundContext, header: UpdateHeader, device_id: str, reported: Collection[str]) -> str:
    """Why the header rules the update out for this attempt ("" when it does not)."""
    r, attempt = ctx.round, ctx.attempt
    if not ctx.known(device_id):
        return f"unknown device: {device_id}"
    if (header.round, header.attempt) != (r, attempt):
        return (f"wrong round: update is for round {header.round} attempt {header.attempt}, "
                f"open is {r} attempt {attempt}")
    if device_id not in ctx.selected:
        return f"not selected: {device_id} was not selected for round {r}"
    if device_id in reported:
        return f"duplicate: {device_id} already reported round {r}"
    if header.error:
        return f"device error: {one_line(header.error)}"
    if header.precision.name != ctx.uplink_precision:
        return f"wrong encoding: update is {header.precision.name}, the task asked for {ctx.uplink_precision}"
    return ""


def _as_result(ctx: RoundContext, update: Update, device_id: str) -> ClientResult | Rejection:
    """The decoded update as what the strategy aggregates: the device's weights and masks
    (device-side masks), else a delta with exact zeros at the global mask's pruned positions."""
    if ctx.device_masks:
        if update.masks is None or update.content != "weights":
            return Rejection("wrong encoding: device-side pruning needs weights with the device's own masks",
                             device_id)
        return ClientResult(device_id, update.num_samples, update.tensors, update.metrics, update.masks)
    tensors = update.tensors  # values-only: exact zeros at pruned positions already
    if update.encoding != Encoding.VALUES_ONLY:
        tensors = apply_masks(tensors, ctx.masks)
    if update.content == "weights":
        tensors = [t - w for t, w in zip(tensors, ctx.global_weights)]
    return ClientResult(device_id, update.num_samples, tensors, update.metrics, gradients=update.gradients)

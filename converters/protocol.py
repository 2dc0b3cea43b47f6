"""The fedprune MQTT protocol, version 1: topics and message envelopes.

See docs/protocol.md for the full description. All messages use QoS 1. Small control messages are
UTF-8 JSON objects carrying ``"v": PROTOCOL_VERSION``; model-carrying messages (task, update) are
binary frames (``converters.codec``) whose JSON header carries the same fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import numpy as np

from converters.codec import (
    PRECISION_BYTES,
    CodecError,
    decode_masks,
    decode_values,
    encode_masks,
    encode_values,
    kept_counts,
    pack_frame,
    unpack_frame,
    values_body_size,
)
from fedprune.pruning.masks import mask_digest

PROTOCOL_VERSION = 1
TOPIC_ROOT = "fedprune/v1"


class Kind(IntEnum):
    TASK = 1  # aggregator -> one device: train this global model for this round
    UPDATE = 2  # device -> aggregator: the result of that training


class Topics:
    """Topic names of one federation; ``federation`` namespaces several on one broker."""

    def __init__(self, federation: str) -> None:
        if not federation or any(c in federation for c in "/+#"):
            raise ValueError(f"federation id must be non-empty without '/', '+', '#': {federation!r}")
        self.root = f"{TOPIC_ROOT}/{federation}"

    # device -> all (retained, with a retained last will): online/offline and sample count
    def presence(self, device_id: str) -> str:
        return f"{self.root}/presence/{device_id}"

    # aggregator -> all (retained): the model architecture, sent once per run
    @property
    def architecture(self) -> str:
        return f"{self.root}/model/architecture"

    # aggregator -> all (retained): the round that is open, who is selected, its deadline
    @property
    def round(self) -> str:
        return f"{self.root}/round"

    # aggregator -> one device (retained until the round closes): global weights, mask, settings
    def task(self, device_id: str) -> str:
        return f"{self.root}/device/{device_id}/task"

    # device -> aggregator: the encoded update
    def update(self, device_id: str) -> str:
        return f"{self.root}/device/{device_id}/update"

    # aggregator -> one device: accepted or rejected, with the reason
    def ack(self, device_id: str) -> str:
        return f"{self.root}/device/{device_id}/ack"

    @property
    def all_presence(self) -> str:
        return f"{self.root}/presence/+"

    @property
    def all_updates(self) -> str:
        return f"{self.root}/device/+/update"

    def device_from_topic(self, topic: str) -> str:
        """The device id in a presence or device topic; raises ValueError for other topics."""
        parts = topic.split("/")
        root_len = len(self.root.split("/"))
        if topic.startswith(self.root + "/") and len(parts) > root_len + 1:
            return parts[root_len + 1]
        raise ValueError(f"topic {topic!r} names no device")


def valid_device_id(device_id: str) -> bool:
    return 0 < len(device_id) <= 128 and not any(c in device_id for c in "/+#\x00") and device_id.isprintable()


# --- JSON control messages -----------------------------------------------------------------------


def _dump(kind: str, obj: Any) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "type": kind, **asdict(obj)}, separators=(",", ":")).encode()


def _load(data: bytes, kind: str, max_bytes: int = 1 << 20) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise CodecError(f"{kind} message of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"{kind} message is not JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("type") != kind:
        raise CodecError(f"not a {kind} message")
    if obj.get("v") != PROTOCOL_VERSION:
        raise CodecError(f"{kind} message speaks protocol {obj.get('v')}, expected {PROTOCOL_VERSION}")
    obj.pop("v"), obj.pop("type")
    return obj


def _build(cls: type, obj: dict[str, Any], kind: str) -> Any:
    try:
        return cls(**obj)
    except TypeError as e:
        raise CodecError(f"{kind} message has wrong fields ({e})") from None


@dataclass(frozen=True)
class Presence:
    device_id: str
    online: bool
    num_samples: int = 0
    agent_version: str = ""

    def encode(self) -> bytes:
        return _dump("presence", self)

    @classmethod
    def decode(cls, data: bytes) -> "Presence":
        p = _build(cls, _load(data, "presence"), "presence")
        if not isinstance(p.num_samples, int) or p.num_samples < 0:
            raise CodecError("presence.num_samples must be a non-negative integer")
        return p


@dataclass(frozen=True)
class Architecture:
    """The model, sent once: Keras JSON config plus the flat weight layout it implies."""

    model_json: str
    digest: str
    shapes: list[list[int]]
    names: list[str]

    def encode(self) -> bytes:
        return _dump("architecture", self)

    @classmethod
    def decode(cls, data: bytes) -> "Architecture":
        return _build(cls, _load(data, "architecture", max_bytes=16 << 20), "architecture")


@dataclass(frozen=True)
class RoundAnnouncement:
    round: int
    attempt: int
    selected: list[str]
    deadline_unix: float
    state: str = "open"  # "open" | "closed" | "finished"

    def encode(self) -> bytes:
        return _dump("round", self)

    @classmethod
    def decode(cls, data: bytes) -> "RoundAnnouncement":
        return _build(cls, _load(data, "round"), "round")


@dataclass(frozen=True)
class Ack:
    round: int
    device_id: str
    accepted: bool
    reason: str = ""

    def encode(self) -> bytes:
        return _dump("ack", self)

    @classmethod
    def decode(cls, data: bytes) -> "Ack":
        return _build(cls, _load(data, "ack"), "ack")


# --- binary messages -----------------------------------------------------------------------------


@dataclass
class TrainTask:
    """Aggregator to one device: the global model of a round and how to train it."""

    round: int
    attempt: int
    architecture_digest: str
    weights: list[np.ndarray]
    masks: list[np.ndarray | None]
    training: dict[str, Any]  # local_epochs, batch_size, optimizer, learning_rate
    uplink_precision: str
    deadline_s: float
    downlink_precision: str = "float32"
    # Random per aggregator process: a resumed aggregator re-sends a round with a new session, so
    # devices that already trained it for the crashed process train it again.
    session: str = ""


def encode_task(task: TrainTask) -> bytes:
    masked = [i for i, m in enumerate(task.masks) if m is not None]
    header = {
        "round": task.round,
        "attempt": task.attempt,
        "arch": task.architecture_digest,
        "training": task.training,
        "uplink": task.uplink_precision,
        "downlink": task.downlink_precision,
        "deadline_s": task.deadline_s,
        "session": task.session,
        "masked": masked,
        "mask_digest": mask_digest(task.masks),
    }
    mask_bytes = encode_masks(task.masks)
    header["mask_bytes"] = len(mask_bytes)
    body = mask_bytes + encode_values(task.weights, task.masks, task.downlink_precision)
    return pack_frame(Kind.TASK, header, body)


def decode_task(data: bytes, shapes: Sequence[Sequence[int]], max_bytes: int) -> TrainTask:
    kind, h, body = unpack_frame(data, max_bytes)
    if kind != Kind.TASK:
        raise CodecError(f"expected a task frame, got kind {kind}")
    try:
        shapes_t = [tuple(int(d) for d in s) for s in shapes]
        mask_len = int(h["mask_bytes"])
        if not 0 <= mask_len <= len(body):
            raise CodecError("mask_bytes out of range")
        masks = decode_masks(body[:mask_len], shapes_t, [int(i) for i in h["masked"]])
        if mask_digest(masks) != h["mask_digest"]:
            raise CodecError("mask digest does not match the mask bits")
        if h["uplink"] not in PRECISION_BYTES or h["downlink"] not in PRECISION_BYTES:
            raise CodecError("unknown precision")
        weights = decode_values(body[mask_len:], shapes_t, masks, h["downlink"])
        return TrainTask(
            round=int(h["round"]),
            attempt=int(h["attempt"]),
            architecture_digest=str(h["arch"]),
            weights=weights,
            masks=masks,
            training=dict(h["training"]),
            uplink_precision=h["uplink"],
            deadline_s=float(h["deadline_s"]),
            downlink_precision=h["downlink"],
            session=str(h.get("session", "")),
        )
    except CodecError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"task header is malformed ({type(e).__name__}: {e})") from None


@dataclass
class Update:
    """Device to aggregator: the weight delta of local training against the task's global model.

    ``delta`` is None when the device reports a failure (``error`` says what failed).
    """

    round: int
    attempt: int
    device_id: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    delta: list[np.ndarray] | None = None
    mask_digest: str = ""
    precision: str = "int8"
    error: str = ""


def encode_update(update: Update, masks: Sequence[np.ndarray | None]) -> bytes:
    header = {
        "round": update.round,
        "attempt": update.attempt,
        "device": update.device_id,
        "n": update.num_samples,
        "metrics": update.metrics,
        "mask_digest": mask_digest(masks),
        "precision": update.precision,
        "error": update.error,
    }
    body = b"" if update.delta is None else encode_values(update.delta, masks, update.precision)
    return pack_frame(Kind.UPDATE, header, body)


def peek_update(data: bytes, max_bytes: int) -> tuple[dict[str, Any], memoryview]:
    """Check the frame of an update and return its header and body, before the tensors are decoded."""
    kind, h, body = unpack_frame(data, max_bytes)
    if kind != Kind.UPDATE:
        raise CodecError(f"expected an update frame, got kind {kind}")
    for key, typ in (("round", int), ("attempt", int), ("device", str), ("n", int), ("precision", str),
                     ("mask_digest", str), ("error", str), ("metrics", dict)):
        if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
            raise CodecError(f"update header field {key!r} is missing or not {typ.__name__}")
    return h, body


def decode_update(
    data: bytes, shapes: Sequence[Sequence[int]], masks: Sequence[np.ndarray | None], max_bytes: int
) -> Update:
    """Decode an update against the receiver's mask; a different mask digest is an error."""
    h, body = peek_update(data, max_bytes)
    if h["n"] < 1 and not h["error"]:
        raise CodecError(f"update reports {h['n']} samples; must be >= 1")
    delta = None
    if not h["error"]:
        if h["mask_digest"] != mask_digest(masks):
            raise CodecError("update was made against another mask (mask digest mismatch)")
        if h["precision"] not in PRECISION_BYTES:
            raise CodecError(f"unknown precision {h['precision']!r}")
        delta = decode_values(body, [tuple(s) for s in shapes], masks, h["precision"])
    metrics = {str(k): _finite_float(v) for k, v in h["metrics"].items() if isinstance(v, (int, float))}
    return Update(
        round=h["round"], attempt=h["attempt"], device_id=h["device"], num_samples=h["n"],
        metrics=metrics, delta=delta, mask_digest=h["mask_digest"], precision=h["precision"],
        error=h["error"],
    )


def _finite_float(v: float) -> float:
    try:
        f = float(v)
    except OverflowError:
        return float("nan")
    return f if np.isfinite(f) else float("nan")


def update_size_bound(shapes: Sequence[Sequence[int]], masks: Sequence[np.ndarray | None], precision: str) -> int:
    """Body bytes of a values-only update: the kept count times the value width (+ int8 scales)."""
    return values_body_size(kept_counts([tuple(s) for s in shapes], masks), precision)

"""The fedprune MQTT protocol, version 4: topics and message envelopes.

See docs/protocol.md for the full description. All messages use QoS 1. Small control messages are
UTF-8 JSON objects carrying ``"v": PROTOCOL_VERSION``; model-carrying messages are binary frames
(``fedprune.converters.frame``): a task has a JSON header and a self-describing tensor section, an update
a compact binary header and (by default) a values-only tensor section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import numpy as np

from fedprune.converters.codec import (
    Compression,
    DecodeLimits,
    DEFAULT_LIMITS,
    MaskLayout,
    compress,
    decode_self_describing,
    decode_values_only,
    decompress,
    encode_self_describing,
    encode_values_only,
    self_describing_bound,
    values_only_size,
)
from fedprune.converters.errors import CodecError
from fedprune.converters.frame import FRAME_OVERHEAD, ByteReader, pack_frame, pack_varint, unpack_frame
from fedprune.converters.gradient_reports import (
    decode_gradient_report,
    encode_gradient_report,
    gradient_report_bound,
)
from fedprune.converters.mask_coding import mask_digest
from fedprune.converters.quantize import Precision, precision_named, precision_with_wire_id

PROTOCOL_VERSION = 4
# The topic layout did not change with version 2, so the root keeps its name: peers of different
# versions still meet, and each refuses the other's messages with a message saying so.
TOPIC_ROOT = "fedprune/v1"


class Kind(IntEnum):
    TASK = 1  # aggregator -> one device: train this global model for this round
    UPDATE = 2  # device -> aggregator: the result of that training
    CHUNK = 3  # one piece of a message larger than the payload limit (fedprune.converters.chunking)
    TRAINABLE_MODEL = 4  # aggregator -> all: the trainable TFLite file of an architecture (model_messages)
    FINAL_MODEL = 5  # aggregator -> all: the exported global model after the last round (model_messages)
    SIGNED = 6  # an aggregator message in a signed envelope (fedprune.converters.signing)


class Topics:
    """Topic names of one federation; ``federation`` namespaces several on one broker."""

    def __init__(self, federation: str) -> None:
        if not isinstance(federation, str) or not valid_device_id(federation):  # the same rule: one topic level
            raise ValueError(f"federation id must be 1-128 bytes of printable characters without '/', '+', "
                             f"'#': {federation!r}")
        self.root = f"{TOPIC_ROOT}/{federation}"

    # device -> all (retained, with a retained last will): online/offline and sample count
    def presence(self, device_id: str) -> str:
        return f"{self.root}/presence/{device_id}"

    # aggregator -> all (retained): the model architecture, sent once per run
    @property
    def architecture(self) -> str:
        return f"{self.root}/model/architecture"

    # aggregator -> all (retained, chunks retained too): the trainable TFLite file that devices
    # without TensorFlow train with, for the current architecture
    @property
    def trainable_model(self) -> str:
        return f"{self.root}/model/trainable"

    # aggregator -> all (retained, chunks retained too): the final global model as a sparse TFLite
    # file of one precision ("int8" or "float32"), after the last round
    def final_model(self, precision: str) -> str:
        return f"{self.root}/model/final/{precision}"

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
        if topic.startswith(self.root + "/"):
            rest = topic[len(self.root) + 1 :].split("/")
            if len(rest) == 2 and rest[0] == "presence" and valid_device_id(rest[1]):
                return rest[1]
            if len(rest) == 3 and rest[0] == "device" and valid_device_id(rest[1]) and rest[2] in ("task", "update",
                                                                                                    "ack"):
                return rest[1]
        raise ValueError(f"topic {topic!r} names no device")


def valid_device_id(device_id: str) -> bool:
    return (0 < len(device_id.encode()) <= 128 and not any(c in device_id for c in "/+#\x00")
            and device_id.isprintable())


# --- JSON control messages -----------------------------------------------------------------------


def _dump(kind: str, obj: Any) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "type": kind, **asdict(obj)}, separators=(",", ":")).encode()


def _load(data: bytes, kind: str, max_bytes: int = 1 << 20) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise CodecError(f"{kind} message of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CodecError(f"{kind} message is not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("type") != kind:
        raise CodecError(f"not a {kind} message")
    if obj.get("v") != PROTOCOL_VERSION:
        raise CodecError(f"{kind} message speaks protocol version {str(obj.get('v'))[:20]}, this side speaks "
                         f"{PROTOCOL_VERSION}; upgrade the side that sent it (fedprune-agent and "
                         "fedprune-aggregator must speak the same version)")
    obj.pop("v"), obj.pop("type")
    return obj


def _build(cls: type, obj: dict[str, Any], kind: str) -> Any:
    try:
        return cls(**obj)
    except TypeError as e:
        raise CodecError(f"{kind} message has wrong fields ({e})") from None


#: What a device can train with: Keras (TensorFlow, in its training child), a trainable TFLite
#: file in a TFLite runtime (no TensorFlow), or nothing. A presence without the field comes from
#: an agent older than it, which could train with Keras only.
TRAINERS = ("keras", "litert", "none")


@dataclass(frozen=True)
class Presence:
    device_id: str
    online: bool
    num_samples: int = 0
    agent_version: str = ""
    trainer: str = "keras"  # one of TRAINERS
    runtime: str = ""  # the device's TFLite runtime and its version, e.g. "ai-edge-litert 2.3.0"; "" none
    # The digest of the mask list the device holds ("" none), which a values-only task may use;
    # None (the key absent): a device that takes self-describing tasks only (every agent before it).
    mask_digest: str | None = None

    def encode(self) -> bytes:
        body = {"v": PROTOCOL_VERSION, "type": "presence", **asdict(self)}
        if self.mask_digest is None:  # what an agent without values-only tasks sends, byte for byte
            body.pop("mask_digest")
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Presence":
        p = _build(cls, _load(data, "presence"), "presence")
        if not isinstance(p.num_samples, int) or isinstance(p.num_samples, bool) or p.num_samples < 0:
            raise CodecError("presence.num_samples must be a non-negative integer")
        if not isinstance(p.online, bool) or not isinstance(p.device_id, str):
            raise CodecError("presence.online must be a boolean and device_id a string")
        if p.trainer not in TRAINERS:
            raise CodecError(f"presence.trainer must be one of {list(TRAINERS)}, got {p.trainer!r}")
        for key in ("agent_version", "runtime"):
            value = getattr(p, key)
            if not isinstance(value, str) or len(value) > 200:
                raise CodecError(f"presence.{key} must be a string of at most 200 characters")
        if p.mask_digest is not None and not _is_digest(p.mask_digest, allow_empty=True):
            raise CodecError("presence.mask_digest must be \"\" or 32 lowercase hex digits")
        return p


def _is_digest(value: object, allow_empty: bool = False) -> bool:
    if not isinstance(value, str):
        return False
    return (allow_empty and value == "") or (len(value) == 32 and all(c in "0123456789abcdef" for c in value))


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
        a = _build(cls, _load(data, "architecture", max_bytes=16 << 20), "architecture")
        ok = (isinstance(a.shapes, list) and isinstance(a.names, list) and len(a.shapes) == len(a.names)
              and all(isinstance(n, str) for n in a.names)
              and all(isinstance(s, list) and len(s) <= 8
                      and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in s)
                      and math.prod(max(d, 1) for d in s) <= DEFAULT_LIMITS.max_elements for s in a.shapes))
        if not ok:
            raise CodecError("architecture shapes/names are malformed")
        return a


@dataclass(frozen=True)
class RoundAnnouncement:
    round: int
    attempt: int
    selected: list[str]
    deadline_unix: float
    state: str = "open"  # "open" | "finished"

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


# --- task: aggregator -> device --------------------------------------------------------------------

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainingSettings:
    """How a device trains in one round: the task's ``training`` object (docs/protocol.md,
    section 12). Checked on construction; ``ValueError`` names the key."""

    local_epochs: int
    batch_size: int
    optimizer: str  # one of OPTIMIZERS
    learning_rate: float
    # DP-FedAvg with privacy.clip_on_device: the device clips its update to this L2 norm before
    # error feedback and quantization; None: no clipping on the device
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        for key in ("local_epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"training.{key} must be an integer >= 1, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"training.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        # Numbers are kept as given (not converted to float) so that the task's JSON is the same.
        _check_positive("training.learning_rate", self.learning_rate)
        if self.clip_norm is not None:
            _check_positive("training.clip_norm", self.clip_norm)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "TrainingSettings":
        """The settings in ``d`` (a task header's ``training`` object, or the dict an aggregator
        builds); ``ValueError`` naming a missing, unknown or bad key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"training must be an object of settings, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(f"training has unknown key {unknown[0]!r}; it takes {known}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"training has no key {missing[0]!r}")
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of a task header: these keys in this order, ``clip_norm`` only when set."""
        out = {"local_epochs": self.local_epochs, "batch_size": self.batch_size, "optimizer": self.optimizer,
               "learning_rate": self.learning_rate}
        if self.clip_norm is not None:
            out["clip_norm"] = self.clip_norm
        return out


def _check_positive(key: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a finite real number > 0 (an int too large for a float is not)."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")


@dataclass
class TrainTask:
    """Aggregator to one device: the global model of a round and how to train and send it back."""

    round: int
    attempt: int
    architecture_digest: str
    weights: list[np.ndarray]
    masks: list[np.ndarray | None]
    # A mapping given here is parsed into TrainingSettings (the aggregator passes a dict).
    training: TrainingSettings
    uplink_precision: str
    deadline_s: float
    downlink_precision: str = "float32"
    # Random per aggregator process: a resumed aggregator re-sends a round with a new session, so
    # devices that already trained it for the crashed process train it again.
    session: str = ""
    update_content: str = "delta"  # "delta" | "weights": what the device sends back
    error_feedback: bool = True
    stochastic_rounding: bool = False
    compression: str = "none"  # lossless stage for the update: "none" | "zlib" | "zstd"
    # Device-side pruning: prune locally to this sparsity and send the device's own mask
    # (a self-describing update); None when the aggregator owns the mask.
    device_sparsity: float | None = None
    # Regrowth: report the loss gradient at the largest-gradient pruned positions, this fraction of
    # each masked tensor's kept count (None: do not report).
    gradient_fraction: float | None = None
    # Sparsified updates: the config of a registered sparsifier (fedprune.sparsify), e.g.
    # {"sparsifier": "top_k", "fraction": 0.01}: the device sends only the positions it chooses,
    # self-describing, and carries the rest in its error-feedback residual. None: not sparsified.
    uplink_sparsifier: dict[str, Any] | None = None
    # When the aggregator issued this task, in microseconds since the epoch, and later than any
    # task it issued before (``FederationState.issue``): a device refuses a task issued before
    # the newest it took, an older task replayed on its topic (docs/protocol.md, section 12.3).
    # None: not sent (an aggregator from before it).
    issued_us: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.training, TrainingSettings):
            self.training = TrainingSettings.from_mapping(self.training)


_TASK_FIELDS = ("round", "attempt", "architecture_digest", "training", "uplink_precision", "deadline_s",
                "downlink_precision", "session", "update_content", "error_feedback",
                "stochastic_rounding", "compression", "device_sparsity", "gradient_fraction")


MAX_ATTEMPT = 2**16 - 1  # an update carries its attempt in a u16: a task must not name a larger one
_HEX = frozenset("0123456789abcdef")

#: Task header ``section_encoding``: the body is a values-only section for the mask list the task's
#: ``mask_digest`` names, which the device already holds (absent: a self-describing section).
VALUES_ONLY_TASK = "values-only"


def encode_task(task: TrainTask, names: Sequence[str], compression: str = "none", *, values_only: bool = False,
                digest: str | None = None) -> bytes:
    """The task frame. ``values_only``: only the kept values travel, for a device that holds the
    task's masks (it said so in its presence); ``digest``: ``mask_digest(task.masks)``, if known."""
    if not 0 <= task.round < 2**32 or not 0 <= task.attempt <= MAX_ATTEMPT:
        raise ValueError(f"task round {task.round} / attempt {task.attempt} out of range: the update that answers "
                         f"carries the round up to 2**32 - 1 and the attempt up to {MAX_ATTEMPT}")
    if values_only:
        section = encode_values_only(task.weights, task.masks, task.downlink_precision)
    else:
        section = encode_self_describing(task.weights, task.masks, names, task.downlink_precision)
    used, packed = compress(section, compression)
    header = {k: getattr(task, k) for k in _TASK_FIELDS}
    header["training"] = task.training.as_dict()
    if task.uplink_sparsifier is not None:  # absent otherwise: the header every earlier task had
        header["uplink_sparsifier"] = dict(task.uplink_sparsifier)
    if task.issued_us is not None:
        header["issued_us"] = int(task.issued_us)
    header.update(mask_digest=digest or mask_digest(task.masks), section_compression=int(used),
                  section_bytes=len(section))
    if values_only:
        header["section_encoding"] = VALUES_ONLY_TASK
    return pack_frame(Kind.TASK, header, packed)


def task_mask_digest(data: bytes, max_bytes: int) -> tuple[str, bool]:
    """The ``mask_digest`` of a task frame and whether its body is values-only (no decoding)."""
    kind, h, _ = unpack_frame(data, max_bytes)
    if kind != Kind.TASK:
        raise CodecError(f"expected a task frame, got kind {kind}")
    return str(h.get("mask_digest", "")), h.get("section_encoding") == VALUES_ONLY_TASK


def decode_task(
    data: bytes, names: Sequence[str], shapes: Sequence[Sequence[int]], max_bytes: int,
    limits: DecodeLimits = DEFAULT_LIMITS, *, held_masks: Sequence[np.ndarray | None] | None = None,
) -> TrainTask:
    """Decode a task for the architecture the device holds (names and shapes must match).

    ``held_masks``: the mask list the device holds, which a values-only task's values align with
    (a values-only task for any other mask list is refused).

    Every header value must have its JSON type (docs/protocol.md, section 12): an integer is not
    a boolean, a number is not a string; nothing is converted from another type.
    """
    kind, h, body = unpack_frame(data, max_bytes)
    if kind != Kind.TASK:
        raise CodecError(f"expected a task frame, got kind {kind}")
    missing = [k for k in (*_TASK_FIELDS, "mask_digest", "section_compression", "section_bytes") if k not in h]
    if missing:
        raise CodecError(f"task header has no {missing[0]!r}")
    fields = {k: h[k] for k in _TASK_FIELDS}
    _check_integer(fields, "round", 0, 2**32 - 1)
    _check_integer(fields, "attempt", 0, MAX_ATTEMPT)
    for k in ("architecture_digest", "session", "uplink_precision", "downlink_precision", "update_content",
              "compression"):
        if not isinstance(fields[k], str):
            raise CodecError(f"task {k} must be a string")
    if not _is_hex(h["mask_digest"], 32):
        raise CodecError("task mask_digest must be 32 lowercase hex digits")
    for k in ("error_feedback", "stochastic_rounding"):
        if not isinstance(fields[k], bool):
            raise CodecError(f"task {k} must be true or false")
    try:
        fields["training"] = TrainingSettings.from_mapping(fields["training"])
    except ValueError as e:
        raise CodecError(f"task {e}") from None
    for k in ("uplink_precision", "downlink_precision"):
        try:
            precision_named(fields[k])
        except ValueError as e:
            raise CodecError(f"task {k}: {e}") from None
    if fields["update_content"] not in ("delta", "weights"):
        raise CodecError("task update_content must be 'delta' or 'weights'")
    if fields["compression"] not in ("none", "zlib", "zstd"):
        raise CodecError("task compression must be none, zlib or zstd")
    fields["deadline_s"] = _number(fields, "deadline_s")
    if fields["gradient_fraction"] is not None:
        fields["gradient_fraction"] = _number(fields, "gradient_fraction")
        if not 0.0 < fields["gradient_fraction"] <= 1.0:
            raise CodecError("task gradient_fraction must be in (0, 1]")
    if fields["device_sparsity"] is not None:
        fields["device_sparsity"] = _number(fields, "device_sparsity")
        if not 0.0 <= fields["device_sparsity"] < 1.0:
            raise CodecError("task device_sparsity must be in [0, 1)")
    sparsifier = fields["uplink_sparsifier"] = h.get("uplink_sparsifier")  # absent: updates are not sparsified
    if sparsifier is not None and not (isinstance(sparsifier, dict) and isinstance(sparsifier.get("sparsifier"), str)
                                       and all(isinstance(v, (int, float, str, bool)) for v in sparsifier.values())):
        raise CodecError("task uplink_sparsifier must be null or an object with a string 'sparsifier' and "
                         "scalar parameters")
    fields["issued_us"] = issued_us_of(h)
    method = _check_integer(h, "section_compression", 0, len(Compression) - 1)
    raw_bytes = _check_integer(h, "section_bytes", 0, 2**63)
    encoding = h.get("section_encoding")
    if encoding is not None and encoding != VALUES_ONLY_TASK:
        raise CodecError(f"task section_encoding must be {VALUES_ONLY_TASK!r} or absent, got {encoding!r}")
    if encoding == VALUES_ONLY_TASK:
        layout = _held_layout(h["mask_digest"], shapes, held_masks)
        section = decompress(body, method, raw_bytes, layout.section_size(fields["downlink_precision"]))
        weights = decode_values_only(section, shapes, held_masks, fields["downlink_precision"], layout=layout)
        return TrainTask(weights=weights, masks=list(held_masks), **fields)
    section = decompress(body, method, raw_bytes, self_describing_bound(names, shapes))
    decoded = decode_self_describing(section, limits, expected=list(zip(names, shapes)))
    if mask_digest(decoded.masks) != h["mask_digest"]:
        raise CodecError("mask digest does not match the mask bits")
    return TrainTask(weights=decoded.tensors, masks=decoded.masks, **fields)


def issued_us_of(header: Mapping[str, Any], what: str = "task") -> int | None:
    """The ``issued_us`` of a task's or a final model's header (None where absent or null);
    ``CodecError`` naming ``what`` if it is not an integer in [0, 2**63 - 1]."""
    return None if header.get("issued_us") is None else _check_integer(header, "issued_us", 0, 2**63 - 1, what)


def _check_integer(h: Mapping[str, Any], key: str, low: int, high: int, what: str = "task") -> int:
    value = h[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CodecError(f"{what} {key} must be an integer in [{low}, {high}]")
    return value


def _number(h: Mapping[str, Any], key: str) -> float:
    """A JSON number (not a boolean, not a string) as a finite float."""
    value = h[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"task {key} must be a number")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise CodecError(f"task {key} must be a finite number")
    return out


def _is_hex(value: Any, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and set(value) <= _HEX


def _held_layout(digest: object, shapes: Sequence[Sequence[int]],
                 held_masks: Sequence[np.ndarray | None] | None) -> MaskLayout:
    """The layout of a values-only task: the device's held masks, which must be the ones named."""
    if held_masks is None:
        raise CodecError(f"values-only task for masks {digest}, and this device holds no masks; it needs a "
                         "self-describing task (its presence says which masks it holds)")
    layout = MaskLayout.of(shapes, held_masks)
    if layout.digest != digest:
        raise CodecError(f"values-only task for masks {digest}, and this device holds {layout.digest}")
    return layout


# --- update: device -> aggregator ------------------------------------------------------------------


class Encoding(IntEnum):
    VALUES_ONLY = 0  # the receiver's mask, named by digest, gives the layout
    SELF_DESCRIBING = 1  # the update carries its own masks (device-side pruning)


@dataclass
class Update:
    """Device to aggregator: the result of local training.

    ``tensors`` is the weight delta against the task's weights (``content == "delta"``) or the
    trained weights themselves; None when the device reports a failure (``error`` says which).
    With ``Encoding.SELF_DESCRIBING`` the update carries ``masks`` of its own. ``device_id`` does
    not travel: the update's topic names the device, and a receiver passes it to the decoder.
    """

    round: int
    attempt: int
    device_id: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: list[np.ndarray] | None = None
    content: str = "delta"
    precision: str = "int8"
    encoding: Encoding = Encoding.VALUES_ONLY
    compression: str = "none"
    masks: list[np.ndarray | None] | None = None
    mask_digest: str = ""
    error: str = ""
    # Regrowth: the loss gradient at some pruned positions, where the task asked for it (zeros
    # elsewhere), and which positions those are; travels as a gradient report
    # (fedprune.converters.gradient_reports): magnitudes only, on an 8-bit logarithmic grid, so a
    # decoded update holds the magnitudes as the aggregator ranks them.
    gradients: list[np.ndarray] | None = None
    gradient_masks: list[np.ndarray] | None = None


_CONTENT = ("delta", "weights")
# The flags byte of an update's header: content, encoding, what follows the metrics, compression.
_WEIGHTS = 0x01  # content "weights" (clear: "delta")
_SELF_DESCRIBING = 0x02  # the tensor section is self-describing (clear: values-only)
_HAS_GRADIENTS = 0x04  # a gradient report precedes the tensor section
_HAS_ERROR = 0x08  # an error text follows the metrics (training failed)
_COMPRESSION_SHIFT = 4  # bits 4-5: the lossless stage (Compression); bits 6-7 are zero
_KNOWN_FLAGS = 0x3F
_DIGEST_BYTES = 16
_MAX_ERROR_BYTES = 65535
#: Metric keys that travel as one byte, their index + 1 (0: the key follows as text). Appending is a
#: protocol change like any other: a receiver refuses an id it does not know.
METRIC_KEYS = ("loss", "accuracy", "train_s", "last_epoch_s", "train_peak_rss_mb", "child_result_s", "compute_s",
               "sim_wait_s")
_METRIC_ID = {k: i + 1 for i, k in enumerate(METRIC_KEYS)}
_F32 = struct.Struct("<f")


def encode_update(
    update: Update,
    masks: Sequence[np.ndarray | None],
    *,
    names: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
    stochastic: bool = False,
) -> bytes:
    """Frame an update. ``masks`` are the task's (values-only) or the device's own (self-describing)."""
    precision = precision_named(update.precision)
    if not 0 <= update.round < 2**32 or not 0 <= update.attempt <= MAX_ATTEMPT:
        raise ValueError(f"update round {update.round} / attempt {update.attempt} out of range (u32 / u16)")
    if not 0 <= update.num_samples < 2**32:
        raise ValueError(f"update num_samples {update.num_samples} out of range (u32)")
    section = b""
    if update.tensors is not None:
        if update.encoding == Encoding.SELF_DESCRIBING:
            if names is None:
                raise ValueError("a self-describing update needs the tensor names")
            section = encode_self_describing(update.tensors, masks, names, precision, stochastic=stochastic, rng=rng)
        else:
            section = encode_values_only(update.tensors, masks, precision, stochastic=stochastic, rng=rng)
    used, packed = compress(section, update.compression)
    error = _utf8_prefix(update.error, _MAX_ERROR_BYTES)
    flags = ((_WEIGHTS if _CONTENT.index(update.content) else 0)
             | (_SELF_DESCRIBING if update.encoding == Encoding.SELF_DESCRIBING else 0)
             | (_HAS_GRADIENTS if update.gradients is not None else 0) | (_HAS_ERROR if error else 0)
             | int(used) << _COMPRESSION_SHIFT)
    metrics = list(update.metrics.items())[:255]
    parts = [pack_varint(update.round), pack_varint(update.attempt), pack_varint(update.num_samples),
             bytes([flags, precision.wire_id]), bytes.fromhex(mask_digest(masks)), bytes([len(metrics)])]
    for key, value in metrics:
        if key in _METRIC_ID:
            parts.append(bytes([_METRIC_ID[key]]))
        else:
            raw = _utf8_prefix(key, 255)
            parts.append(b"\x00" + bytes([len(raw)]) + raw)
        parts.append(np.float32(value).astype("<f4").tobytes())  # 1e39 -> inf
    if error:
        parts += [pack_varint(len(error)), error]
    if used is not Compression.NONE:
        parts.append(pack_varint(len(section)))
    if update.gradients is not None:
        if update.gradient_masks is None:
            raise ValueError("gradients need the masks of the reported positions")
        report = encode_gradient_report(update.gradients, update.gradient_masks)
        parts += [pack_varint(len(report)), report]
    parts.append(packed)
    return pack_frame(Kind.UPDATE, None, b"".join(parts))


def _utf8_prefix(text: str, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of UTF-8, cut on a character boundary (a cut character would make the
    receiver reject the whole update)."""
    return text.encode()[:max_bytes].decode("utf-8", "ignore").encode()


@dataclass
class UpdateHeader:
    round: int
    attempt: int
    device_id: str  # the sender as its topic names it (the receiver's word: it does not travel)
    num_samples: int
    content: str
    encoding: Encoding
    precision: Precision
    compression: Compression
    mask_digest: str
    metrics: dict[str, float]
    error: str
    raw_section_bytes: int  # the section's size before the lossless stage
    gradient_section: memoryview | None = None  # the regrowth gradient report, if any


def peek_update(data: bytes, max_bytes: int, device_id: str = "") -> tuple[UpdateHeader, memoryview]:
    """Check the frame of an update and read its header; the tensors are not decoded yet.
    ``device_id``: the sender, as the update's topic names it."""
    kind, _, body = unpack_frame(data, max_bytes)
    if kind != Kind.UPDATE:
        raise CodecError(f"expected an update frame, got kind {kind}")
    r = ByteReader(body)
    rnd = r.varint(2**32 - 1, "update round")
    attempt = r.varint(MAX_ATTEMPT, "update attempt")
    n = r.varint(2**32 - 1, "update num_samples")
    flags, pid = r.byte(), r.byte()
    comp = flags >> _COMPRESSION_SHIFT & 0x3
    try:
        precision: Precision | None = precision_with_wire_id(pid)
    except ValueError:
        precision = None
    if flags & ~_KNOWN_FLAGS or precision is None or comp > max(Compression):
        raise CodecError("update header has unknown flags, precision or compression")
    digest = bytes(r.take(_DIGEST_BYTES)).hex()
    try:
        metrics: dict[str, float] = {}
        for _ in range(r.byte()):
            key_id = r.byte()
            if key_id > len(METRIC_KEYS):
                raise CodecError(f"update metric id {key_id} is not known (1..{len(METRIC_KEYS)}, or 0 and a key)")
            key = METRIC_KEYS[key_id - 1] if key_id else bytes(r.take(r.byte())).decode()
            if not key_id and key in _METRIC_ID:
                raise CodecError(f"update metric {key!r} is spelled out; it travels as id {_METRIC_ID[key]}")
            if key in metrics:
                raise CodecError(f"update metric {key!r} appears twice")
            metrics[key] = float(r.unpack(_F32)[0])
        error = ""
        if flags & _HAS_ERROR:
            error = bytes(r.take(r.varint(_MAX_ERROR_BYTES, "update error length"))).decode()
            if not error:
                raise CodecError("update says it carries an error text, and the text is empty")
    except UnicodeDecodeError:
        raise CodecError("update header text is not UTF-8") from None
    raw = r.varint(2**63, "update raw section length") if comp else None
    gradients = r.take(r.varint(r.remaining, "update gradient report length")) if flags & _HAS_GRADIENTS else None
    header = UpdateHeader(rnd, attempt, device_id, n, _CONTENT[flags & _WEIGHTS],
                          Encoding.SELF_DESCRIBING if flags & _SELF_DESCRIBING else Encoding.VALUES_ONLY,
                          precision, Compression(comp), digest, metrics, error,
                          r.remaining if raw is None else raw, gradients)
    return header, r.take(r.remaining)


def decode_update(
    data: bytes,
    shapes: Sequence[Sequence[int]],
    masks: Sequence[np.ndarray | None],
    max_bytes: int,
    *,
    names: Sequence[str] | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    layout: MaskLayout | None = None,
    peeked: tuple[UpdateHeader, memoryview] | None = None,
    out: Sequence[np.ndarray] | None = None,
    device_id: str = "",
) -> Update:
    """Decode an update against the receiver's layout.

    Values-only: ``masks`` are the receiver's; a different mask digest is an error, never a silent
    misalignment. Self-describing: the update's own masks are used, ``names`` and ``shapes`` must
    match its tensor table. A gradient report is decoded against ``shapes`` and ``masks`` (the
    receiver's: reported positions must be pruned there). ``layout``: ``MaskLayout.of(shapes,
    masks)``, for a receiver that decodes many updates against the same masks. ``peeked``: what
    ``peek_update(data, max_bytes, device_id)`` returned, for a receiver that has read the header
    already (the frame is then not checked twice). ``out``: arrays to decode a values-only update's
    tensors into (see ``decode_values_only``); a self-describing update ignores them.
    ``device_id``: the sender, as the update's topic names it (it does not travel).
    """
    h, section = peeked or peek_update(data, max_bytes, device_id)
    if h.num_samples < 1 and not h.error:
        raise CodecError(f"update reports {h.num_samples} samples; must be >= 1")
    tensors, own_masks = None, None
    if not h.error:
        if h.encoding == Encoding.VALUES_ONLY:
            digest = layout.digest if layout else mask_digest(masks)
            if h.mask_digest != digest:
                raise CodecError("update was made against another mask (mask digest mismatch)")
            layout = layout or MaskLayout.of(shapes, masks, digest)
            # Before decompressing: the stated length bounds what is inflated.
            largest = layout.check_section_length(h.raw_section_bytes, h.precision)
            raw = decompress(section, h.compression, h.raw_section_bytes, largest)
            tensors = decode_values_only(raw, shapes, masks, h.precision, layout=layout, out=out)
        else:
            if names is None:
                raise CodecError("self-describing update, but the receiver gave no tensor names")
            raw = decompress(section, h.compression, h.raw_section_bytes, self_describing_bound(names, shapes))
            decoded = decode_self_describing(raw, limits, expected=list(zip(names, shapes)))
            if mask_digest(decoded.masks) != h.mask_digest:
                raise CodecError("mask digest does not match the update's mask bits")
            tensors, own_masks = decoded.tensors, decoded.masks
    elif section or h.gradient_section is not None or h.compression is not Compression.NONE:
        raise CodecError("an update that reports an error carries no tensors")
    gradients = gradient_masks = None
    if h.gradient_section is not None:
        gradients, gradient_masks = decode_gradient_report(h.gradient_section, shapes, masks)
    return Update(
        round=h.round, attempt=h.attempt, device_id=h.device_id, num_samples=h.num_samples, metrics=h.metrics,
        tensors=tensors, content=h.content, precision=h.precision.name, encoding=h.encoding,
        compression=h.compression.name.lower(), masks=own_masks, mask_digest=h.mask_digest, error=h.error,
        gradients=gradients, gradient_masks=gradient_masks,
    )


def update_size_bound(shapes: Sequence[Sequence[int]], masks: Sequence[np.ndarray | None], precision: str) -> int:
    """The most bytes a values-only update's tensors take: kept values times the value width,
    plus scales and coding bytes (integer codes entropy-coded take fewer)."""
    return values_only_size(shapes, masks, precision)


#: The most an update's header takes before its metrics: the frame, three varints (round,
#: attempt, samples: at most 5 + 3 + 5 bytes), the flags and precision bytes, the mask digest and
#: the metric count.
UPDATE_OVERHEAD_BYTES = FRAME_OVERHEAD + 5 + 3 + 5 + 2 + _DIGEST_BYTES + 1

# The most an update's texts and lengths can add: 255 metrics with 255-byte keys, an error text and
# its length, the raw length of a compressed section and the length of a gradient report.
_UPDATE_TEXT_BOUND = 255 * (1 + 1 + 255 + 4) + (3 + _MAX_ERROR_BYTES) + 10 + 5


def largest_update_bytes(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """The most bytes a valid update for this layout can take: any precision, any mask, any texts,
    self-describing, with a regrowth gradient report. (A sender compresses only what shrinks.)"""
    return (UPDATE_OVERHEAD_BYTES + _UPDATE_TEXT_BOUND + self_describing_bound(names, shapes)
            + gradient_report_bound(shapes))

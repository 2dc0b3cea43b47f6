"""Messages that carry a whole TFLite file from the aggregator to every device.

Two kinds, both binary frames (``fedprune.converters.frame``) with a JSON header and the file as
the body (zlib-compressed when that is smaller), both published retained on a topic of their own
(``Topics.trainable_model``, ``Topics.final_model``) so a device that joins later gets them:

- ``TrainableModel`` (frame kind 4): the trainable TFLite file of one architecture and batch size
  (``fedprune.converters.trainable_tflite``), which a device without TensorFlow trains with.
- ``FinalModel`` (frame kind 5): the global model after the last round, exported as a sparse
  TFLite file of one precision: the file the run's report describes, byte for byte.

The header names the file's SHA-256 and size; a receiver checks both after decompressing, so a
file is never used unless it is exactly the one the aggregator sent. A message is one frame, so
whatever protects every aggregator-to-device frame (a signature over the frame) protects these.
See docs/protocol.md, section 19.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from fedprune.converters.codec import compress, decompress
from fedprune.converters.errors import CodecError
from fedprune.converters.frame import pack_frame, unpack_frame
from fedprune.converters.protocol import Kind, issued_us_of

#: The precisions of the final model's files (the aggregator exports both).
FINAL_PRECISIONS = ("float32", "int8")
#: The largest TFLite file a receiver accepts unless it says otherwise.
DEFAULT_MAX_FILE_BYTES = 256 << 20

_DIGEST = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TrainableModel:
    """The trainable TFLite file of the architecture ``architecture_digest``, built for batches of
    ``batch_size`` (``build_trainable_tflite``)."""

    architecture_digest: str
    batch_size: int
    content: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class FinalModel:
    """The global model after round ``round``, as the sparse TFLite file of ``precision`` the
    aggregator exported (and ran: ``accuracy`` on its held-out set, None if not measured)."""

    round: int
    precision: str  # one of FINAL_PRECISIONS
    sparsity: float  # share of zero weights in the pruned (masked) tensors
    accuracy: float | None
    architecture_digest: str
    content: bytes
    # When the aggregator issued it (as a task's ``issued_us``, protocol.md section 12.3): a device
    # refuses a final model issued before the newest it took, an earlier run's replayed. None: not sent.
    issued_us: int | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def encode_trainable_model(model: TrainableModel) -> bytes:
    return _pack(Kind.TRAINABLE_MODEL, {"architecture_digest": model.architecture_digest,
                                        "batch_size": model.batch_size}, model.content)


def decode_trainable_model(data: bytes, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> TrainableModel:
    header, content = _unpack(data, Kind.TRAINABLE_MODEL, "trainable model", max_file_bytes)
    try:
        digest, batch = header["architecture_digest"], header["batch_size"]
    except KeyError as e:
        raise CodecError(f"trainable model header has no {e.args[0]!r}") from None
    _check_digest(digest, "trainable model")
    if not _is_int(batch) or not 1 <= batch <= 1 << 16:
        raise CodecError(f"trainable model batch_size must be an integer in [1, 65536], got {batch!r}")
    return TrainableModel(digest, batch, content)


def encode_final_model(model: FinalModel) -> bytes:
    fields = {"round": model.round, "precision": model.precision, "sparsity": model.sparsity,
              "accuracy": model.accuracy, "architecture_digest": model.architecture_digest}
    if model.issued_us is not None:
        fields["issued_us"] = int(model.issued_us)
    return _pack(Kind.FINAL_MODEL, fields, model.content)


def decode_final_model(data: bytes, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> FinalModel:
    header, content = _unpack(data, Kind.FINAL_MODEL, "final model", max_file_bytes)
    try:
        round_, precision, sparsity = header["round"], header["precision"], header["sparsity"]
        accuracy, digest = header["accuracy"], header["architecture_digest"]
    except KeyError as e:
        raise CodecError(f"final model header has no {e.args[0]!r}") from None
    if not _is_int(round_) or not 0 <= round_ < 2**32:
        raise CodecError(f"final model round must be an integer in [0, 2**32), got {round_!r}")
    if precision not in FINAL_PRECISIONS:
        raise CodecError(f"final model precision must be one of {list(FINAL_PRECISIONS)}, got {precision!r}")
    if not _is_number(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise CodecError(f"final model sparsity must be a number in [0, 1], got {sparsity!r}")
    if accuracy is not None and (not _is_number(accuracy) or not 0.0 <= accuracy <= 1.0):
        raise CodecError(f"final model accuracy must be null or a number in [0, 1], got {accuracy!r}")
    _check_digest(digest, "final model")
    return FinalModel(round_, precision, float(sparsity), None if accuracy is None else float(accuracy), digest,
                      content, issued_us_of(header, "final model"))


# --- the shared frame: header fields of every model file, and the checks ------------------------


def _pack(kind: Kind, fields: dict[str, Any], content: bytes) -> bytes:
    if not content:
        raise ValueError("a model file message needs the file's bytes")
    used, body = compress(content, "zlib")  # no zstandard on 32-bit ARM boards: zlib reads everywhere
    header = {**fields, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
              "compression": int(used)}
    return pack_frame(kind, header, body)


def _unpack(data: bytes, kind: Kind, what: str, max_file_bytes: int) -> tuple[dict[str, Any], bytes]:
    # The compressed body is at most the file (compress() keeps the smaller), plus the frame.
    got, header, body = unpack_frame(data, max_file_bytes + (1 << 17))
    if got != kind:
        raise CodecError(f"expected a {what} frame (kind {int(kind)}), got kind {got}")
    size, sha256, compression = header.get("size"), header.get("sha256"), header.get("compression")
    if not _is_int(size) or not 1 <= size <= max_file_bytes:
        raise CodecError(f"{what} size must be an integer in [1, {max_file_bytes}], got {size!r}")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise CodecError(f"{what} sha256 must be 64 lowercase hex digits")
    if not _is_int(compression):
        raise CodecError(f"{what} compression must be an integer, got {compression!r}")
    content = decompress(body, compression, size, max_file_bytes)
    if len(content) != size:
        raise CodecError(f"{what} file is {len(content)} bytes, the header says {size}")
    if hashlib.sha256(content).hexdigest() != sha256:
        raise CodecError(f"{what} file does not match its sha256: damaged or mixed up")
    return header, content


def _check_digest(digest: Any, what: str) -> None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise CodecError(f"{what} architecture_digest must be 32 lowercase hex digits")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

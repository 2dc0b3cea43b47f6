"""The mask-aware tensor codec and the message frame.

Frame (all integers little-endian)::

    magic    4 bytes  b"FPRN"
    version  u8       FRAME_VERSION
    kind     u8       message kind (see converters.protocol.Kind)
    hlen     u32      length of the header
    header   hlen bytes of UTF-8 JSON (an object)
    body     the rest up to the checksum
    crc32    u32      zlib.crc32 of every byte before it

Tensor bodies are *values-only*: sender and receiver share the mask, so only the values at kept
positions travel, tensor by tensor, each in C order. With int8 the body starts with one float32
scale per tensor. Masks, when they travel, are ``np.packbits`` of each masked tensor (C order,
padded to whole bytes), concatenated.

The decoder trusts nothing: lengths are checked against the header and the expected layout before
any allocation, and every failure raises ``CodecError``.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Sequence

import numpy as np

MAGIC = b"FPRN"
FRAME_VERSION = 1
_PREFIX = struct.Struct("<4sBBI")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024

PRECISION_BYTES = {"float32": 4, "float16": 2, "int8": 1}
FLOAT16_MAX = 65504.0
_MAX_INT8_SCALE = float(np.finfo(np.float32).max) / 127.0
Masks = Sequence["np.ndarray | None"]


class CodecError(ValueError):
    """Bytes that cannot be decoded; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- frame ---------------------------------------------------------------------------------------


def pack_frame(kind: int, header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    data = _PREFIX.pack(MAGIC, FRAME_VERSION, kind, len(head)) + head + body
    return data + _CRC.pack(zlib.crc32(data))


def unpack_frame(data: bytes, max_bytes: int) -> tuple[int, dict[str, Any], memoryview]:
    """Check and split a frame; returns ``(kind, header, body)``."""
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _PREFIX.size + _CRC.size:
        raise CodecError(f"payload of {len(data)} bytes is shorter than a frame")
    magic, version, kind, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("not a fedprune frame (bad magic)")
    if version != FRAME_VERSION:
        raise CodecError(f"frame version {version} not supported (this side speaks {FRAME_VERSION})")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen + _CRC.size > len(data):
        raise CodecError(f"header length {hlen} does not fit a {len(data)}-byte payload")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    view = memoryview(data)
    if zlib.crc32(view[: len(data) - _CRC.size]) != crc:
        raise CodecError("checksum mismatch (payload corrupted or truncated)")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + hlen]))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, 5000-digit ints, deep nesting
        raise CodecError(f"header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    return kind, header, view[_PREFIX.size + hlen : len(data) - _CRC.size]


# --- values-only tensors -------------------------------------------------------------------------


def kept_counts(shapes: Sequence[tuple[int, ...]], masks: Masks) -> list[int]:
    return [int(np.prod(s)) if m is None else int(m.sum()) for s, m in zip(shapes, masks, strict=True)]


def values_body_size(counts: Sequence[int], precision: str) -> int:
    scales = 4 * len(counts) if precision == "int8" else 0
    return scales + PRECISION_BYTES[precision] * sum(counts)


def encode_values(tensors: Sequence[np.ndarray], masks: Masks, precision: str) -> bytes:
    """Values at kept positions of each tensor, quantized to ``precision``.

    int8 is symmetric per tensor, its scale taken from the kept values only (the zeros at pruned
    positions would otherwise say nothing and the scale would be right only by accident).
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISION_BYTES)}")
    kept = [
        np.asarray(t, dtype=np.float32).ravel() if m is None else np.asarray(t, np.float32)[m]
        for t, m in zip(tensors, masks, strict=True)
    ]
    for v in kept:
        if not np.all(np.isfinite(v)):
            raise ValueError("cannot encode NaN or Inf values")
    flat = np.concatenate(kept) if kept else np.zeros(0, np.float32)
    if precision == "float32":
        return flat.astype("<f4").tobytes()
    if precision == "float16":
        if flat.size and np.abs(flat).max() > FLOAT16_MAX:
            raise ValueError(
                f"a value of magnitude {np.abs(flat).max():.3g} does not fit float16 "
                f"(max {FLOAT16_MAX}); use float32 or int8 transport"
            )
        return flat.astype("<f2").tobytes()
    scales = np.array([np.abs(v).max() / 127.0 if v.size else 0.0 for v in kept], dtype="<f4")
    q = [
        np.zeros(v.size, np.int8) if s == 0 else np.clip(np.rint(v / s), -127, 127).astype(np.int8)
        for v, s in zip(kept, scales)
    ]
    return scales.tobytes() + (np.concatenate(q) if q else np.zeros(0, np.int8)).tobytes()


def decode_values(
    body: bytes | memoryview,
    shapes: Sequence[tuple[int, ...]],
    masks: Masks,
    precision: str,
) -> list[np.ndarray]:
    """Inverse of ``encode_values``; pruned positions decode to exact zeros."""
    if precision not in PRECISION_BYTES:
        raise CodecError(f"unknown precision {precision!r}")
    for s, m in zip(shapes, masks, strict=True):
        if m is not None and tuple(m.shape) != tuple(s):
            raise CodecError(f"mask shape {m.shape} does not match tensor shape {s}")
    counts = kept_counts(shapes, masks)
    expected = values_body_size(counts, precision)
    if len(body) != expected:
        raise CodecError(
            f"values section is {len(body)} bytes, expected {expected} for "
            f"{sum(counts)} {precision} values"
        )
    offset = 0
    if precision == "int8":
        scales = np.frombuffer(body, dtype="<f4", count=len(counts))
        if not np.all(np.isfinite(scales)) or np.any(scales < 0) or np.any(scales > _MAX_INT8_SCALE):
            raise CodecError("int8 scale is negative, NaN, Inf or so large that values overflow")
        offset = 4 * len(counts)
        values = np.frombuffer(body, dtype=np.int8, offset=offset).astype(np.float32)
    else:
        values = np.frombuffer(body, dtype="<f4" if precision == "float32" else "<f2").astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise CodecError("values contain NaN or Inf")
    out: list[np.ndarray] = []
    pos = 0
    for i, (shape, mask, n) in enumerate(zip(shapes, masks, counts)):
        v = values[pos : pos + n]
        if precision == "int8":
            v = v * scales[i]
        pos += n
        if mask is None:
            out.append(v.reshape(shape))
        else:
            t = np.zeros(shape, dtype=np.float32)
            t[mask] = v
            out.append(t)
    return out


# --- masks ---------------------------------------------------------------------------------------


def encode_masks(masks: Masks) -> bytes:
    return b"".join(np.packbits(m.ravel()).tobytes() for m in masks if m is not None)


def decode_masks(
    body: bytes | memoryview, shapes: Sequence[tuple[int, ...]], masked: Sequence[int]
) -> list[np.ndarray | None]:
    """Masks for the tensors listed in ``masked``; ``None`` for the others."""
    if len(set(masked)) != len(masked) or any(not 0 <= i < len(shapes) for i in masked):
        raise CodecError(f"masked tensor indices {list(masked)[:8]} are invalid for {len(shapes)} tensors")
    sizes = [int(np.prod(shapes[i])) for i in masked]
    expected = sum((n + 7) // 8 for n in sizes)
    if len(body) != expected:
        raise CodecError(f"mask section is {len(body)} bytes, expected {expected}")
    masks: list[np.ndarray | None] = [None] * len(shapes)
    pos = 0
    for i, n in zip(masked, sizes):
        nbytes = (n + 7) // 8
        bits = np.unpackbits(np.frombuffer(body, np.uint8, count=nbytes, offset=pos), count=n)
        masks[i] = bits.astype(bool).reshape(shapes[i])
        pos += nbytes
    return masks

"""The regrowth gradient report of an update: which pruned positions a device reports, and the
magnitude of the loss gradient there, at the few bits a ranking needs.

The aggregator only ranks the reports: it sums ``num_samples * |gradient|`` over the devices per
position and revives the largest sums (``fedprune.pruning.regrowth``). So a report carries no sign,
no tensor names or shapes (the receiver knows its layout) and its magnitudes on a logarithmic grid
between the largest and the smallest reported one of each tensor (with 8 bits, 255 steps: a
magnitude is off by at most half a step, 0.4 % when they span a factor of 7). Layout (section 21
of docs/protocol.md)::

    bits       u8        bits of each magnitude code, 1..8
    per tensor of the weight list, in order:
      count    varint    reported positions (0: none; the rest of the entry is absent)
      method   u8        the positions' mask coding (fedprune.converters.mask_coding), over the
      length   varint    tensor's n positions with count kept
      mask     length bytes
      largest  f32       the largest and the smallest reported magnitude: finite, 0 < smallest
      smallest f32       <= largest
      codes    ceil(count * bits / 8) bytes: one code q per position in C order, most significant
                         bit first, zero padding; magnitude = largest * (smallest / largest) **
                         (q / (2**bits - 1)), so q = 0 is the largest (every q is 0 when they are
                         equal)

The decoder checks every count, length and byte against the receiver's masks before it allocates
more than the tensors' size: a report at a kept position, or for a tensor without a mask, is
refused, as is anything left over. Every failure is a ``CodecError``.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import numpy as np

from fedprune.converters.errors import CodecError
from fedprune.converters.frame import ByteReader, pack_varint
from fedprune.converters.golomb import fixed_width_bits, read_fixed_width
from fedprune.converters.mask_coding import decode_mask, encode_mask

__all__ = ["REPORT_BITS", "decode_gradient_report", "encode_gradient_report", "gradient_report_bound"]

#: Bits of each magnitude code the reference device sends. At 8 the aggregator chose exactly the
#: positions it chose from float16 reports in every regrowth turn of three breast-cancer seeds (and
#: 0.1 % other positions on digits); at 6, 0.8 % others, at 4, 3.6 % (docs/benchmarks.md, issue 19).
REPORT_BITS = 8
_RANGE = struct.Struct("<ff")


def encode_gradient_report(gradients: Sequence[np.ndarray], reported: Sequence[np.ndarray],
                           bits: int = REPORT_BITS) -> bytes:
    """The report of ``gradients`` at the positions ``reported`` marks (one bool array per tensor of
    the weight list, each of its tensor's shape). ``ValueError`` for a non-finite magnitude, a zero
    one (a zero gradient ranks nowhere: leave it out), or ``bits`` outside 1..8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"gradient report bits must be in 1..8, got {bits}")
    if len(gradients) != len(reported):
        raise ValueError(f"{len(gradients)} gradients for {len(reported)} position masks")
    top = (1 << bits) - 1
    parts = [bytes([bits])]
    for g, chosen in zip(gradients, reported):
        flat = np.asarray(chosen, bool).ravel()
        if flat.size != np.size(g):
            raise ValueError(f"reported positions of shape {np.shape(chosen)} for a gradient of shape {np.shape(g)}")
        k = int(flat.sum())
        parts.append(pack_varint(k))
        if k == 0:
            continue
        magnitudes = np.abs(np.asarray(g, np.float32).ravel()[flat]).astype(np.float64)
        if not np.isfinite(magnitudes).all() or (magnitudes == 0).any():
            raise ValueError("reported gradient magnitudes must be finite and non-zero")
        largest, smallest = float(np.float32(magnitudes.max())), float(np.float32(magnitudes.min()))
        if largest > smallest:
            q = np.rint(top * np.log(largest / magnitudes) / math.log(largest / smallest))
            codes = np.clip(q, 0, top).astype(np.uint8)
        else:
            codes = np.zeros(k, np.uint8)
        method, mask_bytes = encode_mask(flat)
        parts += [bytes([int(method)]), pack_varint(len(mask_bytes)), mask_bytes,
                  _RANGE.pack(largest, smallest), np.packbits(fixed_width_bits(codes, bits)).tobytes()]
    return b"".join(parts)


def _unpack_codes(data: memoryview, count: int, bits: int, what: str) -> np.ndarray:
    stream = np.unpackbits(np.frombuffer(data, np.uint8))
    if stream[count * bits:].any():
        raise CodecError(f"{what}: padding bits after the magnitude codes are not zero")
    return read_fixed_width(stream, count, bits)


def decode_gradient_report(body: bytes | memoryview, shapes: Sequence[Sequence[int]],
                           masks: Sequence[np.ndarray | None]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inverse of ``encode_gradient_report`` against the receiver's layout and masks: per tensor the
    reported magnitudes (float32, zero elsewhere) and the positions reported."""
    if len(shapes) != len(masks):
        raise CodecError(f"{len(masks)} masks for {len(shapes)} tensors")
    r = ByteReader(memoryview(body))
    bits = r.byte()
    if not 1 <= bits <= 8:
        raise CodecError(f"gradient report: {bits} bits a magnitude; must be 1..8")
    top = (1 << bits) - 1
    gradients, reported = [], []
    for i, (shape, mask) in enumerate(zip(shapes, masks)):
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        what = f"gradient report, tensor {i}"
        k = r.varint(n, f"{what}: count")
        values = np.zeros(n, np.float32)
        chosen = np.zeros(n, bool)
        if k:
            if mask is None:
                raise CodecError(f"{what}: {k} positions reported for a tensor without a mask")
            method = r.byte()
            mask_bytes = r.take(r.varint(r.remaining, f"{what}: mask length"))
            chosen = decode_mask(method, mask_bytes, n, k)
            if (chosen & np.asarray(mask, bool).ravel()).any():
                raise CodecError(f"{what}: a reported position is kept, not pruned")
            largest, smallest = r.unpack(_RANGE)
            if not (math.isfinite(largest) and 0 < smallest <= largest):
                raise CodecError(f"{what}: magnitude range {smallest!r}..{largest!r} is not 0 < smallest <= largest")
            q = _unpack_codes(r.take((k * bits + 7) // 8), k, bits, what)
            if largest == smallest and q.any():
                raise CodecError(f"{what}: codes other than 0 for magnitudes that are all equal")
            ratio = smallest / largest if largest > smallest else 1.0
            values[chosen] = (largest * ratio ** (q / top)).astype(np.float32)
        gradients.append(values.reshape(shape))
        reported.append(chosen.reshape(shape))
    if r.remaining:
        raise CodecError(f"gradient report: {r.remaining} bytes left over after the last tensor")
    return gradients, reported


def gradient_report_bound(shapes: Sequence[Sequence[int]]) -> int:
    """Most bytes a gradient report for this layout can take (every position reported, 8 bits)."""
    total = 1
    for shape in shapes:
        n = math.prod(int(d) for d in shape)
        total += 5 + 1 + 5 + (n + 7) // 8 + _RANGE.size + n
    return total

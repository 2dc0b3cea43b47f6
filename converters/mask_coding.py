"""Lossless coding of a pruning mask: a flat boolean array, True = kept.

The tensor table already carries ``n`` (positions) and ``kept`` (True values), so a coded mask is
just ``(method, bytes)``; neither ``n`` nor ``kept`` is repeated inside the bytes.

Minority symbol
    The sparse methods (INDEX_LIST and the three gap codes) code the positions of the *minority*
    symbol: the kept positions when ``2 * kept <= n``, else the pruned ones; ``count`` = number of
    minority positions = ``min(kept, n - kept)``. A *flag* bit (1 = the positions are the pruned
    ones) repeats that choice, so a table whose ``kept`` was swapped for ``n - kept`` is caught
    instead of yielding the complement mask.

Gaps
    The gap codes code ``count + 1`` gaps, all ``>= 0``: ``g_i = p_i - p_{i-1} - 1`` for the
    minority positions ``p_0 < ... < p_{count-1}`` (with ``p_{-1} = -1``), then the closing run
    ``n - 1 - p_{count-1}``. The closing gap costs one codeword and makes the gaps add up to
    ``n - count``: a table with a wrong ``n`` is caught, as is most damage to the quotients.

Methods (bit streams are in ``np.packbits`` order, most significant bit first)
    ALL_KEPT, NONE_KEPT   no bytes.
    BITMAP                ``np.packbits(mask)``: ``ceil(n / 8)`` bytes, padding bits zero.
    INDEX_LIST            the flag byte (0 or 1), then the minority positions, strictly increasing,
                          as little-endian uint8 (``n <= 2**8``), uint16 (``n <= 2**16``) or uint32.
    RICE_GAPS             one byte ``flag << 7 | k`` (``k`` in 0..31), then the Golomb bit layout
                          below with ``m = 2**k``.
    GOLOMB_GAPS           a little-endian uint32 ``flag << 31 | m`` (``m`` in 1..2**31 - 1),
                          then the Golomb bit layout. Usually the winner for i.i.d. masks: ``m``
                          need not be a power of two, which brings sparsity 0.8-0.99 within about
                          1 % of the entropy bound (Rice alone: up to 2.3 %).
    ELIAS_GAMMA_GAPS      the flag bit, then Elias gamma of ``g + 1`` as two streams: for each gap
                          ``L = floor(log2(g + 1))`` zeros then a one (all gaps), then for each gap
                          the ``L`` low bits of ``g + 1`` (all gaps), then zero padding to a byte.

Golomb bit layout
    ``fedprune.converters.golomb``'s layout of the ``count + 1`` gaps with parameter ``m`` (fixed
    remainder bits, extra bits of the truncated binary, quotients in unary), then zero padding to
    a whole byte. Each stream decodes with whole-array NumPy operations; no loop runs per element.

Strictness
    Every byte must be consumed, padding bits must be zero, the mask must have exactly ``kept``
    True values, and a method other than BITMAP/ALL_KEPT/NONE_KEPT needs ``count >= 1`` and at most
    ``ceil(n / 8)`` bytes (the encoder picks the smallest coding, so it never emits a sparse coding
    larger than the bitmap). That last rule bounds the decoder's memory by a small multiple of
    ``n`` bytes whatever the input says. A wrong ``kept`` fails every sparse method (flag, count
    of codewords) and BITMAP (popcount); a wrong ``n`` fails the gap codes, and BITMAP/INDEX_LIST
    where it changes the length or leaves a position outside the mask. Every failure raises
    ``CodecError``.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence
from enum import IntEnum

import numpy as np

from fedprune.converters.errors import CodecError
from fedprune.converters.golomb import golomb_bits, golomb_packed, read_golomb, unary_bits

__all__ = [
    "MAX_POSITIONS",
    "MaskMethod",
    "decode_mask",
    "encode_mask",
    "encoded_size",
    "mask_entropy_bits",
]

MAX_POSITIONS = 2**31
"""Largest ``n`` a coded mask may describe."""

_MAX_K = 31
_MAX_M = 2**31 - 1  # bit 31 of the parameter word is the flag
_GOLOMB_HEADER = 4
_RICE_HEADER = 1


class MaskMethod(IntEnum):
    """How a mask is coded; the value travels in the tensor table."""

    ALL_KEPT = 0
    NONE_KEPT = 1
    BITMAP = 2
    RICE_GAPS = 3
    ELIAS_GAMMA_GAPS = 4
    INDEX_LIST = 5
    GOLOMB_GAPS = 6


# --- sizes ----------------------------------------------------------------------------------------


def mask_entropy_bits(n: int, kept: int) -> float:
    """``n * H(kept / n)``: the information bound, in bits, for an i.i.d. mask of that density."""
    if not 0 <= kept <= n:
        raise ValueError(f"kept={kept} outside 0..n={n}")
    if kept in (0, n):
        return 0.0
    p = kept / n
    return n * -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


def _index_width(n: int) -> int:
    return 1 if n <= 2**8 else 2 if n <= 2**16 else 4


def _gamma_lengths(gaps: np.ndarray) -> np.ndarray:
    """``floor(log2(g + 1))`` exactly (frexp is exact for integers below 2**53)."""
    return (np.frexp((gaps + 1).astype(np.float64))[1] - 1).astype(np.int64)


def _gamma_size(gaps: np.ndarray) -> int:
    """Bytes of ELIAS_GAMMA_GAPS: the flag bit, one unary bit and two per length bit of each gap."""
    return _nbytes(1 + gaps.size + 2 * int(np.sum(_gamma_lengths(gaps), dtype=np.int64)))


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


def _minority(mask: np.ndarray) -> tuple[bool, np.ndarray]:
    """``(coding_kept, positions)`` for the minority symbol of a flat bool mask."""
    kept = int(np.count_nonzero(mask))
    coding_kept = 2 * kept <= mask.size
    pos = np.flatnonzero(mask) if coding_kept else np.flatnonzero(~mask)
    return coding_kept, pos.astype(np.int64, copy=False)


def _gaps(pos: np.ndarray, n: int) -> np.ndarray:
    """``len(pos) + 1`` gaps: before each position, then the closing run up to ``n``."""
    gaps = np.empty(pos.size + 1, dtype=np.int64)
    if pos.size:
        gaps[0] = pos[0]
        np.subtract(pos[1:], pos[:-1], out=gaps[1:-1])
        gaps[1:-1] -= 1
    gaps[-1] = n - 1 - (int(pos[-1]) if pos.size else -1)
    return gaps


def _candidates(n: int, kept: int, gaps: np.ndarray) -> list[tuple[int, MaskMethod, int]]:
    """``(bytes, method, parameter)`` for every coding worth trying; sizes computed, not encoded."""
    if kept == n:
        return [(0, MaskMethod.ALL_KEPT, 0)]
    if kept == 0:
        return [(0, MaskMethod.NONE_KEPT, 0)]
    count = gaps.size - 1
    out = [
        (_nbytes(n), MaskMethod.BITMAP, 0),
        (1 + count * _index_width(n), MaskMethod.INDEX_LIST, 0),
    ]
    gap_sum = int(np.sum(gaps, dtype=np.int64))
    # Golomb: the optimal m for a geometric source of this mean gap (Gallager & van Voorhis):
    # P(gap = j) = (1 - theta) theta**j, m = ceil(log(1 + theta) / -log(theta)).
    theta = gap_sum / (gap_sum + count)
    m0 = 1 if theta == 0.0 else max(1, math.ceil(math.log1p(theta) / -math.log(theta)))
    # Rice: k from the mean gap, its neighbours, and the powers of two around m0.
    k0 = max(0, round(math.log2(gap_sum / count * math.log(2)))) if gap_sum else 0
    ks = {k0 - 1, k0, k0 + 1, (m0 - 1).bit_length(), m0.bit_length() - 1}
    for k in sorted({min(_MAX_K, max(0, k)) for k in ks}):
        out.append((_RICE_HEADER + _nbytes(golomb_bits(gaps, 1 << k)), MaskMethod.RICE_GAPS, k))
    for m in sorted({min(_MAX_M, max(1, m)) for m in (m0 - 1, m0, m0 + 1)}):
        # a power of two is also offered, though Rice codes it with a shorter header and wins
        out.append((_GOLOMB_HEADER + _nbytes(golomb_bits(gaps, m)), MaskMethod.GOLOMB_GAPS, m))
    out.append((_gamma_size(gaps), MaskMethod.ELIAS_GAMMA_GAPS, 0))
    return out


def _flat_bool(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"a mask must be a bool array, got {arr.dtype}")
    if arr.size > MAX_POSITIONS:
        raise ValueError(f"a mask of {arr.size} positions exceeds {MAX_POSITIONS}")
    return arr.reshape(-1)


def encoded_size(method: int, mask: np.ndarray) -> int:
    """Bytes ``method`` takes for ``mask`` with the best parameter the encoder tries for it.

    ``encoded_size(*encode_mask(m)[:1], m) == len(encode_mask(m)[1])``. ValueError where the
    method cannot code the mask (ALL_KEPT for a mask with a pruned position, a sparse method for a
    mask without a minority position).
    """
    flat = _flat_bool(mask)
    n, kept = flat.size, int(np.count_nonzero(flat))
    method = MaskMethod(method)
    if method is MaskMethod.BITMAP:
        return _nbytes(n)
    if method is MaskMethod.ALL_KEPT or method is MaskMethod.NONE_KEPT:
        if kept != (n if method is MaskMethod.ALL_KEPT else 0):
            raise ValueError(f"{method.name} does not describe a mask with {kept} of {n} kept")
        return 0
    count = min(kept, n - kept)
    if count == 0:
        raise ValueError(f"{method.name} needs at least one minority position")
    gaps = _gaps(_minority(flat)[1], n)
    return min(s for s, meth, _ in _candidates(n, kept, gaps) if meth is method)


# --- encoding -------------------------------------------------------------------------------------


def _encode_gamma(gaps: np.ndarray, flag: int) -> bytes:
    vals = gaps + 1
    lengths = _gamma_lengths(gaps)
    total = int(lengths.sum())
    payload = np.zeros(total, dtype=np.uint8)
    if total:
        owner = np.repeat(np.arange(vals.size), lengths)
        ends = np.cumsum(lengths)  # one past each value's last payload bit
        shift = ends[owner] - 1 - np.arange(total)  # LSB is the last bit of each value
        payload = ((vals[owner] >> shift) & 1).astype(np.uint8)
    head = np.array([flag], dtype=np.uint8)
    return np.packbits(np.concatenate([head, unary_bits(lengths), payload])).tobytes()


def encode_mask(mask: np.ndarray) -> tuple[MaskMethod, bytes]:
    """Flat bool mask -> ``(method, bytes)``, picking the smallest coding for this mask.

    Sizes of all candidates (bitmap, index list, Rice and Golomb around the parameter that fits the
    mean gap, Elias gamma) are computed arithmetically; only the winner is encoded. Ties go to the
    earlier candidate (bitmap first). Any shape is accepted and read in C order.
    """
    flat = _flat_bool(mask)
    n, kept = flat.size, int(np.count_nonzero(flat))
    if kept == n:
        return MaskMethod.ALL_KEPT, b""
    if kept == 0:
        return MaskMethod.NONE_KEPT, b""
    _, pos = _minority(flat)
    gaps = _gaps(pos, n)
    _, method, param = min(_candidates(n, kept, gaps), key=operator.itemgetter(0))
    return method, _encode_with(flat, method, param, pos, gaps)


def _encode_with(
    flat: np.ndarray, method: MaskMethod, param: int, pos: np.ndarray, gaps: np.ndarray
) -> bytes:
    """The bytes of BITMAP or of a sparse ``method`` with its parameter (``k`` or ``m``).

    ``pos`` are the minority positions and ``gaps`` their gaps (see ``_minority``).
    """
    if method is MaskMethod.BITMAP:
        return np.packbits(flat).tobytes()
    flag = int(2 * int(np.count_nonzero(flat)) > flat.size)  # 1: the positions are the pruned ones
    if method is MaskMethod.INDEX_LIST:
        return bytes([flag]) + pos.astype(f"<u{_index_width(flat.size)}").tobytes()
    if method is MaskMethod.RICE_GAPS:
        return bytes([param | flag << 7]) + golomb_packed(gaps, 1 << param)
    if method is MaskMethod.GOLOMB_GAPS:
        return (param | flag << 31).to_bytes(4, "little") + golomb_packed(gaps, param)
    if method is MaskMethod.ELIAS_GAMMA_GAPS:
        return _encode_gamma(gaps, flag)
    raise ValueError(f"{method.name} is not encoded through _encode_with")


# --- decoding -------------------------------------------------------------------------------------


def _check_tail(buf: np.ndarray, used_bits: int, what: str) -> None:
    """The streams end at ``used_bits``: so must the bytes (callers check the padding bits)."""
    if _nbytes(used_bits) != buf.size:
        raise CodecError(f"{what}: {buf.size} bytes, the streams end after {_nbytes(used_bits)}")


def _positions_from_gaps(gaps_plus_one: np.ndarray, n: int, what: str) -> np.ndarray:
    """Positions from ``count + 1`` values ``gap + 1``, which must add up to exactly ``n + 1``.

    Callers bound each value so that the int64 sum cannot overflow.
    """
    pos = np.cumsum(gaps_plus_one)
    if int(pos[-1]) != n + 1:
        raise CodecError(f"{what}: the gaps span {int(pos[-1]) - 1} positions, not n={n}")
    pos = pos[:-1]
    pos -= 1
    return pos


def _decode_golomb(payload: np.ndarray, count: int, m: int, n: int, what: str) -> np.ndarray:
    """Minority positions from the Golomb layout of ``count`` gaps (the last one closes at n).

    ``count`` here is the number of codewords: the minority positions plus the closing gap.
    """
    bits = np.unpackbits(payload)
    q, r, used = read_golomb(bits, count, m, what)
    if bits[used:].any():
        raise CodecError(f"{what}: nonzero bits after the last of {count} unary terminators")
    _check_tail(payload, used, what)
    sum_q = int(q.sum())
    # The gaps add up to n - (count - 1) and each is at least q * m: checked before multiplying.
    if sum_q * m > n + 1 - count:
        raise CodecError(f"{what}: quotients sum to {sum_q}, more than {n} positions allow")
    q *= m
    q += r
    q += 1  # now gap + 1, each <= n + m
    return _positions_from_gaps(q, n, what)


def _decode_gamma(buf: np.ndarray, count: int, n: int, what: str) -> np.ndarray:
    """Minority positions from flag bit + Elias gamma of ``count`` gaps (the last closes at n).

    ``count`` here is the number of codewords: the minority positions plus the closing gap.
    """
    bits = np.unpackbits(buf)[1:]  # the first bit is the flag, already checked
    ones = np.flatnonzero(bits.view(bool))
    if ones.size < count:
        raise CodecError(f"{what}: {ones.size} length terminators where {count} are expected")
    ends = ones[:count].astype(np.int64, copy=False)
    lengths = np.diff(ends, prepend=-1)
    lengths -= 1
    if int(lengths.max()) > 31:
        raise CodecError(f"{what}: a gap of {int(lengths.max())} bits exceeds n")
    start = int(ends[-1]) + 1
    total = int(lengths.sum())
    used = start + total
    if used > bits.size:
        raise CodecError(f"{what}: {total} payload bits do not fit")
    if ones.size > count and int(ones[-1]) >= used:
        raise CodecError(f"{what}: nonzero padding bits")
    _check_tail(buf, 1 + used, what)
    # Each payload (at most 31 bits, at any bit offset) lies within the 5 bytes from its first
    # byte: gather those as a 40-bit window per value, then shift and mask. O(count) memory.
    offset = np.cumsum(lengths) - lengths + (1 + start)  # bit offset in buf, after the flag bit
    padded = np.concatenate([buf, np.zeros(5, dtype=np.uint8)])
    first = offset >> 3
    window = np.zeros(count, dtype=np.int64)
    for j in range(5):
        window <<= 8
        window |= padded[first + j]
    vals = window >> (40 - (offset & 7) - lengths)
    one = np.left_shift(1, lengths)
    vals &= one - 1
    vals |= one  # the leading 1 of g + 1
    return _positions_from_gaps(vals, n, what)


def _decode_index_list(buf: np.ndarray, count: int, n: int, what: str) -> np.ndarray:
    width = _index_width(n)
    if buf.size != count * width:
        raise CodecError(f"{what}: {buf.size} bytes where {count} x {width} are expected")
    pos = buf.view(f"<u{width}").astype(np.int64)
    if count > 1 and not bool(np.all(pos[1:] > pos[:-1])):
        raise CodecError(f"{what}: positions not strictly increasing")
    if int(pos[-1]) >= n:
        raise CodecError(f"{what}: position {int(pos[-1])} beyond n={n}")
    return pos


def _as_int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise CodecError(f"{name} is not an integer") from None


def decode_mask(method: int, data: bytes | memoryview, n: int, kept: int) -> np.ndarray:
    """Inverse of ``encode_mask``: a flat bool array of ``n`` positions with ``kept`` True.

    ``n`` and ``kept`` come from the tensor table. Raises ``CodecError`` for an unknown method,
    bytes left over or missing, nonzero padding bits, a position beyond ``n``, or a mask whose
    True count is not ``kept``. Memory stays within a small multiple of ``n`` bytes and no loop
    runs per element, whatever the bytes say.
    """
    method = _as_int(method, "method")
    n = _as_int(n, "n")
    kept = _as_int(kept, "kept")
    if not 0 <= n <= MAX_POSITIONS:
        raise CodecError(f"mask of {n} positions outside 0..{MAX_POSITIONS}")
    if not 0 <= kept <= n:
        raise CodecError(f"kept={kept} outside 0..n={n}")
    try:
        meth = MaskMethod(method)
    except ValueError:
        raise CodecError(f"unknown mask method {method}") from None
    try:
        buf = np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        raise CodecError("mask data is not a contiguous byte buffer") from None
    what = meth.name

    if meth is MaskMethod.ALL_KEPT or meth is MaskMethod.NONE_KEPT:
        want = n if meth is MaskMethod.ALL_KEPT else 0
        if kept != want:
            raise CodecError(f"{what} with kept={kept} of n={n}")
        if buf.size:
            raise CodecError(f"{what} carries {buf.size} unexpected bytes")
        return np.full(n, meth is MaskMethod.ALL_KEPT, dtype=bool)

    if meth is MaskMethod.BITMAP:
        if buf.size != _nbytes(n):
            raise CodecError(f"{what}: {buf.size} bytes where {_nbytes(n)} are expected")
        pad = 8 * buf.size - n
        if pad and int(buf[-1]) & ((1 << pad) - 1):
            raise CodecError(f"{what}: nonzero padding bits")
        mask = np.unpackbits(buf, count=n).view(bool)
        got = int(np.count_nonzero(mask))
        if got != kept:
            raise CodecError(f"{what}: {got} positions kept where the table says {kept}")
        return mask

    coding_kept = 2 * kept <= n
    count = kept if coding_kept else n - kept
    if count == 0:
        raise CodecError(f"{what} for a mask with no minority position")
    if buf.size > _nbytes(n):
        raise CodecError(f"{what}: {buf.size} bytes, more than the {_nbytes(n)}-byte bitmap")
    header = _GOLOMB_HEADER if meth is MaskMethod.GOLOMB_GAPS else 1  # Elias gamma: first bit
    if buf.size < header:
        raise CodecError(f"{what}: {buf.size} bytes, shorter than its header")
    word = int.from_bytes(buf[:header].tobytes(), "little")
    if meth is MaskMethod.INDEX_LIST:
        if word > 1:
            raise CodecError(f"{what}: flag byte {word} is not 0 or 1")
        flag, param = word, 0
    else:
        top = 8 * header - 1
        flag, param = word >> top, word & ((1 << top) - 1)
    if flag != int(not coding_kept):  # the flag repeats what kept says: a wrong kept is caught here
        side = "pruned" if flag else "kept"
        raise CodecError(f"{what} codes the {side} positions, but kept={kept} of n={n} disagrees")

    if meth is MaskMethod.INDEX_LIST:
        pos = _decode_index_list(buf[1:], count, n, what)
    elif meth is MaskMethod.ELIAS_GAMMA_GAPS:
        pos = _decode_gamma(buf, count + 1, n, what)
    else:
        if meth is MaskMethod.RICE_GAPS:
            if param > _MAX_K:  # also refuses bits 5 and 6 of the k byte
                raise CodecError(f"{what}: parameter k={param} exceeds {_MAX_K}")
            m = 1 << param
        else:
            if not 1 <= param <= _MAX_M:
                raise CodecError(f"{what}: parameter m={param} outside 1..{_MAX_M}")
            m = param
        pos = _decode_golomb(buf[header:], count + 1, m, n, what)

    mask = np.zeros(n, dtype=bool) if coding_kept else np.ones(n, dtype=bool)
    mask[pos] = coding_kept
    return mask


def mask_digest(masks: Sequence["np.ndarray | None"]) -> str:
    """SHA-256 (hex, first 16 bytes) naming a mask list: which tensors are masked, their shapes, bits.

    Devices and the aggregator compare digests so a values-only update can never be aligned
    against the wrong mask.
    """
    h = hashlib.sha256()
    for i, m in enumerate(masks):
        if m is None:
            continue
        h.update(f"{i}:{'x'.join(map(str, m.shape))};".encode())
        h.update(np.packbits(m.ravel()).tobytes())
    return h.hexdigest()[:32]

"""Golomb coding of arrays of non-negative integers, as whole-array NumPy operations.

Shared by the mask coder (``fedprune.converters.mask_coding``: the gaps between kept positions)
and the value coder (``fedprune.converters.value_coding``: quantized values), and its fixed-width
fields by the regrowth reports (``fedprune.converters.gradient_reports``); each caller frames
the stream (parameter, flag, sign bits, padding) and bounds what it decodes.

Bit layout of ``count`` values with parameter ``m >= 1`` (``q = v // m``, ``r = v % m``,
``b = ceil(log2 m)``, ``c = 2**b - m``), in ``np.packbits`` order (most significant bit first):
the remainder is in truncated binary: with ``c == 0`` (``m`` a power of two: Rice) every ``r``
takes ``w = b`` bits; otherwise ``w = b - 1`` bits hold ``u = r`` when ``r < c`` and
``u = (r + c) >> 1`` otherwise, plus one *extra* bit ``(r + c) & 1`` for each ``u >= c``. The
streams, concatenated: the ``count * w`` fixed remainder bits, then the extra bits (their number
is known once the fixed bits are read), then the quotients in unary (``q`` zeros then a one, for
every value). No loop runs per value, encoding or decoding.
"""

from __future__ import annotations

import functools

import numpy as np

from fedprune.converters.errors import CodecError

__all__ = [
    "fixed_width_bits",
    "golomb_bits",
    "golomb_length_table",
    "golomb_packed",
    "golomb_shape",
    "golomb_stream",
    "read_fixed_width",
    "read_golomb",
    "unary_bits",
]


def golomb_shape(m: int) -> tuple[int, int, int]:
    """``(w, c, b)``: fixed remainder bits, truncated-binary cutoff (0 = no extra bits), ``b``."""
    b = (m - 1).bit_length()  # ceil(log2 m); 0 for m == 1
    c = (1 << b) - m
    return (b if c == 0 else b - 1), c, b


def golomb_bits(values: np.ndarray, m: int) -> int:
    """Exact number of bits of the layout of ``values`` (int64, >= 0) with parameter ``m``."""
    count = values.size
    w, c, _ = golomb_shape(m)
    if m & (m - 1) == 0:  # power of two: shifts, no extra bits
        k = m.bit_length() - 1
        return count * (k + 1) + int(np.sum(values >> k, dtype=np.int64))
    q = values // m
    r = values - q * m
    extra = int(np.count_nonzero(r >= c))
    return count * (w + 1) + int(np.sum(q, dtype=np.int64)) + extra


@functools.lru_cache(maxsize=16)
def golomb_length_table(largest_value: int, largest_m: int) -> np.ndarray:
    """``table[m - 1, v]``: bits the layout spends on value ``v`` with parameter ``m``, for
    ``v`` in 0..largest_value and ``m`` in 1..largest_m (read-only). With a histogram ``h`` of a
    small alphabet, ``table @ h`` is every parameter's exact size at once."""
    m = np.arange(1, largest_m + 1, dtype=np.int64)[:, None]
    v = np.arange(largest_value + 1, dtype=np.int64)[None, :]
    b = np.array([golomb_shape(int(x))[2] for x in m[:, 0]], dtype=np.int64)[:, None]
    c = (1 << b) - m
    w = np.where(c == 0, b, b - 1)
    q, r = v // m, v % m
    table = q + 1 + w + ((c > 0) & (r >= c))
    table.setflags(write=False)
    return table


def fixed_width_bits(values: np.ndarray, width: int) -> np.ndarray:
    """``(len(values) * width,)`` uint8 bits, each value MSB first."""
    if width == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if width <= 8:
        return np.unpackbits(_fixed_width_bytes(values, width))[: values.size * width]
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)


def _fixed_width_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """``fixed_width_bits`` packed (``1 <= width <= 8``; at least one value), zero-padded to
    whole bytes, without making the bits: eight values fill ``width`` bytes, so they are shifted
    together in a uint64 and its low ``width`` bytes taken."""
    if width == 8:
        return values.astype(np.uint8)
    count, groups = values.size, -(-values.size // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = values
    padded = padded.reshape(groups, 8)
    together = padded[:, 0] << np.uint64(7 * width)
    for j in range(1, 8):
        together |= padded[:, j] << np.uint64((7 - j) * width)
    big_endian = together.astype(">u8").view(np.uint8).reshape(groups, 8)[:, 8 - width :]  # any host's order
    return big_endian.reshape(-1)[: -(-count * width // 8)]


def unary_bits(q: np.ndarray) -> np.ndarray:
    """``q_i`` zeros then a one, for each ``q_i`` (non-negative integers), as uint8 bits."""
    ends = q.astype(np.intp)  # the one of value i ends sum(q[:i + 1] + 1) - 1; summed in place
    ends += 1
    np.cumsum(ends, out=ends)
    ends -= 1
    bits = np.zeros(int(ends[-1]) + 1 if ends.size else 0, dtype=bool)  # bool: the scatter is 40 % faster
    bits[ends] = True  # intp indices: NumPy would convert any other type first
    return bits.view(np.uint8)


def golomb_stream(values: np.ndarray, m: int) -> np.ndarray:
    """The layout of ``values`` (non-negative integers of a dtype that holds ``2 m``; not
    modified) as uint8 bits, not yet packed (``golomb_packed`` packs it, faster)."""
    fields, w, rest = _golomb_parts(values, m)
    return np.concatenate([fixed_width_bits(fields, w), *rest])


def golomb_packed(values: np.ndarray, m: int, trailer: np.ndarray | None = None) -> bytes:
    """``np.packbits`` of ``golomb_stream(values, m)`` followed by the bits ``trailer`` (uint8
    0/1: the value coder's signs), zero-padded to a whole byte. The remainder fields, most of the
    stream, go to bytes directly instead of becoming bits only to be packed again."""
    fields, w, rest = _golomb_parts(values, m)
    if trailer is not None:
        rest.append(trailer)
    if not 1 <= w <= 8 or fields.size == 0:
        return np.packbits(np.concatenate([fixed_width_bits(fields, w), *rest])).tobytes()
    head = _fixed_width_bytes(fields, w)
    whole, left = divmod(fields.size * w, 8)  # the last byte's `left` bits go on with the rest
    if left:
        rest.insert(0, np.unpackbits(head[whole:])[:left])
    return head[:whole].tobytes() + np.packbits(np.concatenate(rest)).tobytes()


def _golomb_parts(values: np.ndarray, m: int) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """``(remainder fields, their width, [extra bits, unary bits])`` of the layout. Small values
    given as uint8 (the value coder's) take NumPy's SIMD paths, division by a constant among them:
    several times faster than in int64. np.where and assigning through index arrays are avoided
    for the same reason."""
    w, c, _ = golomb_shape(m)
    if c == 0:
        k = m.bit_length() - 1
        return values & (m - 1), w, [unary_bits(values >> k)]
    q = values // m
    u = values - q * m
    high = u >= c
    shifted = u + c  # below 2 m
    pick = u.dtype.type(0) - high.astype(u.dtype)  # all ones where high
    return (u ^ ((u ^ (shifted >> 1)) & pick), w,
            [np.compress(high, shifted & 1).astype(np.uint8, copy=False), unary_bits(q)])


def read_fixed_width(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """``count`` unsigned MSB-first ``width``-bit values from the start of ``bits``."""
    return _read_fields(bits, count, width).astype(np.int64, copy=False)


def _read_fields(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """``read_fixed_width``'s values, as uint8 for ``width <= 8``, else int64. Narrower fields are
    packed back into bytes and cut out of big-endian uint64 words, eight fields (``width`` bytes)
    a word (the inverse of ``fixed_width_bits``), not gathered bit plane by bit plane."""
    if width == 8:
        return np.packbits(bits[: count * 8])
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.uint8 if width < 8 else np.int64)
    if width < 8:
        groups = -(-count // 8)
        packed = np.packbits(bits[: count * width])  # the last byte zero-padded
        words = np.zeros((groups, 8), dtype=np.uint8)
        spread = np.zeros(groups * width, dtype=np.uint8)
        spread[: packed.size] = packed
        words[:, 8 - width :] = spread.reshape(groups, width)
        together = words.view(">u8").reshape(groups).astype(np.uint64)  # any host's order
        out = np.empty((groups, 8), dtype=np.uint8)
        low = np.uint64((1 << width) - 1)
        for j in range(8):
            out[:, j] = (together >> np.uint64((7 - j) * width)) & low
        return out.reshape(-1)[:count]
    out = np.zeros(count, dtype=np.int64)
    planes = bits[: count * width].reshape(count, width)
    for j in range(width):  # one pass per bit plane, not per element
        out <<= 1
        out |= planes[:, j]
    return out


def read_golomb(bits: np.ndarray, count: int, m: int, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(quotients, remainders, bits used)`` of ``count >= 1`` values at the start of ``bits``
    (uint8 0/1, e.g. ``np.unpackbits``); what follows them is not read. ``CodecError`` naming
    ``what`` when the streams do not fit. The caller bounds ``quotients * m + remainders``
    (each quotient is below ``bits.size``) and checks what follows."""
    w, c, _ = golomb_shape(m)
    fixed = count * w
    if fixed > bits.size:
        raise CodecError(f"{what}: {fixed} remainder bits do not fit {bits.size}")
    # A remainder below 256 is read and fixed in int16 (the value coder's case): a quarter of int64's traffic.
    r = _read_fields(bits, count, w).astype(np.int16 if m <= 256 else np.int64, copy=False)
    start = fixed
    if c:
        high = np.flatnonzero(r >= c)  # indices: several times faster than assigning through a boolean mask
        n_extra = high.size
        if start + n_extra > bits.size:
            raise CodecError(f"{what}: {n_extra} extra remainder bits do not fit")
        r[high] = 2 * r[high] + bits[start : start + n_extra] - c
        start += n_extra
    ones = np.flatnonzero(bits[start:].view(bool))  # bits are 0/1; bool nonzero is several times faster
    if ones.size < count:
        raise CodecError(f"{what}: {ones.size} unary terminators where {count} are expected")
    ones = ones[:count]
    q = np.empty(count, dtype=np.int64)  # ones[i] - ones[i - 1] - 1; np.diff's prepend costs a copy
    q[0] = ones[0] + 1
    np.subtract(ones[1:], ones[:-1], out=q[1:])
    q -= 1
    return q, r, start + int(ones[-1]) + 1

"""Quantization of the kept (unpruned) values of one tensor for transport.

A *value section* holds the kept values of one tensor, in C order, at one ``Precision``::

    scales   float32 little-endian: 1 for int8 and int4, n_channels for int8-channel, none for
             float32 and float16
    values   float32: 4 bytes LE each; float16: 2 bytes LE each; int8 and int8-channel: one
             signed byte each, in [-127, 127]; int4: two per byte, low nibble first, each a 4-bit
             two's complement in [-7, 7], the high nibble of the last byte 0 when count is odd

Integer precisions are symmetric: ``value = q * scale``, ``scale = max|v| / qmax`` over the values
of the tensor (or of the output channel, for int8-channel) that are *kept*: the caller passes only
kept values, so pruned zeros never shrink the resolution. A tensor or channel with no values, or
only zeros, has scale 0.

The section itself carries neither its count nor its precision nor the channel of each value:
sender and receiver know them from the header and the shared mask. The decoder trusts nothing
else: the length is checked against the expected layout before anything is allocated, and every
failure raises ``CodecError``.
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import Any

import numpy as np

from fedprune.converters.errors import CodecError

__all__ = [
    "FLOAT16_MAX",
    "PRECISION_IDS",
    "Precision",
    "decode_values",
    "encode_values",
    "quantization_error_bound",
    "value_bits",
    "value_section_size",
]


class Precision(str, Enum):
    """How kept values travel; the value is the name used in config files and headers."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"  # symmetric, one scale per tensor
    INT8_CHANNEL = "int8-channel"  # symmetric, one scale per output channel (last axis)
    INT4 = "int4"  # symmetric, one scale per tensor, [-7, 7], two values per byte

    def __str__(self) -> str:
        return self.value


# Stable ids for binary headers: never renumber, only append.
PRECISION_IDS: dict[Precision, int] = {
    Precision.FLOAT32: 0,
    Precision.FLOAT16: 1,
    Precision.INT8: 2,
    Precision.INT8_CHANNEL: 3,
    Precision.INT4: 4,
}

FLOAT16_MAX = 65504.0
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
_QMAX = {Precision.INT8: 127, Precision.INT8_CHANNEL: 127, Precision.INT4: 7}
_BITS = {
    Precision.FLOAT32: 32.0,
    Precision.FLOAT16: 16.0,
    Precision.INT8: 8.0,
    Precision.INT8_CHANNEL: 8.0,
    Precision.INT4: 4.0,
}
_FLOAT_DTYPE = {Precision.FLOAT32: np.dtype("<f4"), Precision.FLOAT16: np.dtype("<f2")}
_SCALE_DTYPE = np.dtype("<f4")


# --- helpers -------------------------------------------------------------------------------------


def _precision(precision: Precision | str) -> Precision:
    """``Precision`` from a member or its name; ``ValueError`` for anything else."""
    if isinstance(precision, Precision):
        return precision
    if isinstance(precision, str):
        try:
            return Precision(precision)
        except ValueError:
            pass
    raise ValueError(f"unknown precision {precision!r}; use one of {[p.value for p in Precision]}")


def _nonneg_int(x: Any, name: str) -> int:
    """``x`` as a Python int >= 0 (bools and non-integers refused); ``ValueError`` otherwise."""
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, not a bool")
    try:
        n = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(x).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _n_scales(precision: Precision, count: int, n_channels: int) -> int:
    if precision is Precision.INT8_CHANNEL:
        if n_channels == 0 and count > 0:
            raise ValueError(f"{count} values cannot belong to 0 channels")
        return n_channels
    return 1 if precision in _QMAX else 0


def _scales_for(maxabs: np.ndarray, qmax: int) -> np.ndarray:
    """float32 scales ``max|v| / qmax``, rounded to nearest, then nudged by one ulp where needed
    so that (a) ``qmax * scale`` never overflows float32 on decode and (b) a scale in the
    subnormal range, where rounding loses relative precision, never falls below ``max|v|/qmax``
    (which would clip the largest values far from where they were)."""
    m = maxabs.astype(np.float64)
    s = (m / qmax).astype(np.float32)
    s64 = s.astype(np.float64)
    up = (s64 < _F32_TINY) & (s64 * qmax < m)
    if up.any():
        s[up] = np.nextafter(s[up], np.float32(np.inf))
    down = s.astype(np.float64) * qmax > _F32_MAX
    if down.any():
        s[down] = np.nextafter(s[down], np.float32(0))
    return s


def _channel_index(
    channels: np.ndarray | None, count: int, n_channels: int, error: type[Exception]
) -> np.ndarray | None:
    """Validated channel of each value, or ``None`` for the dense layout (index % n_channels)."""
    if channels is None:
        return None
    try:
        ch = np.asarray(channels)
    except Exception:  # noqa: BLE001 - anything that is not array-like
        raise error("channels is not an array") from None
    if ch.dtype.kind not in "iu":
        raise error(f"channels must be integers, got dtype {ch.dtype}")
    if ch.shape != (count,):
        raise error(f"channels has shape {ch.shape}, expected ({count},)")
    if count and (int(ch.min()) < 0 or int(ch.max()) >= n_channels):
        raise error(f"channels out of range [0, {n_channels})")
    return ch


def _group_maxabs(
    a: np.ndarray, precision: Precision, ch: np.ndarray | None, n_channels: int
) -> np.ndarray:
    """max|v| per scale group (one group, or one per channel); 0 for an empty group."""
    if precision is not Precision.INT8_CHANNEL:
        return np.array([a.max() if a.size else 0.0], dtype=np.float32)
    out = np.zeros(n_channels, dtype=np.float32)
    if a.size == 0:
        return out
    if ch is None:
        if a.size % n_channels == 0:
            return a.reshape(-1, n_channels).max(axis=0)
        ch = np.arange(a.size) % n_channels
    np.maximum.at(out, ch, a)
    return out


def _per_value(scales: np.ndarray, ch: np.ndarray | None, count: int) -> np.ndarray:
    """Per-channel ``scales`` spread to one per value (dense layout when ``ch`` is None)."""
    if count == 0:
        return np.zeros(0, dtype=np.float32)
    if ch is None:
        n = scales.size
        if count % n == 0:
            return np.broadcast_to(scales, (count // n, n)).reshape(-1)
        ch = np.arange(count) % n
    return scales[ch]


def _float16_half_ulp(m: float) -> float:
    """Largest error of round-to-nearest float16 for values of magnitude <= m (m <= 65504)."""
    if m == 0:
        return 0.0
    _, e = np.frexp(m)  # m = f * 2**e, f in [0.5, 1)
    return float(2.0 ** (max(int(e) - 1, -14) - 11))


_F16_MIN_NORMAL = 2.0**-14


def _stochastic_float16_grid(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 values on the float16 grid, each the float16 just below or just above ``v`` with
    the probabilities that make it ``v`` on average (``|v| <= 65504``, finite).

    Normal float16 range: float16 keeps the top 10 of float32's 23 mantissa bits; adding a
    uniform 13-bit integer to the magnitude bits and truncating rounds up with probability
    (dropped bits) / 2**13, carrying into the exponent where needed. It never passes 65504, whose
    dropped bits are 0. Subnormal float16 range: a fixed grid of 2**-24, ``floor(v*2**24 + u)``.
    """
    bits = v.view(np.uint32)
    r = rng.integers(0, 1 << 13, size=v.size, dtype=np.uint32)
    out = ((bits + r) & np.uint32(0xFFFFE000)).view(np.float32)
    small = np.abs(v) < _F16_MIN_NORMAL
    if small.any():
        x = v[small].astype(np.float64) * 2.0**24 + rng.random(int(small.sum()))
        out[small] = np.floor(x) * 2.0**-24
    return out


def _prepare(values: Any) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (the kept values in C order), got shape {v.shape}")
    if v.dtype.kind not in "fiu":
        raise ValueError(f"values must be real numbers, got dtype {v.dtype}")
    v = v.astype(np.float32, copy=False)
    if not np.isfinite(v).all():
        raise ValueError("cannot encode NaN or Inf values (or values beyond float32)")
    return v


# --- public API ----------------------------------------------------------------------------------


def value_bits(precision: Precision | str) -> float:
    """Bits per value, scales excluded: 32, 16, 8, 8, 4."""
    return _BITS[_precision(precision)]


def value_section_size(count: int, precision: Precision | str, n_channels: int = 1) -> int:
    """Exact byte length of the value section of ``count`` values (scales included).

    ``n_channels`` matters only for int8-channel. ``ValueError`` on a bad argument.
    """
    p = _precision(precision)
    count = _nonneg_int(count, "count")
    n_channels = _nonneg_int(n_channels, "n_channels")
    scales = 4 * _n_scales(p, count, n_channels)
    if p is Precision.INT4:
        return scales + (count + 1) // 2
    return scales + int(_BITS[p]) // 8 * count


def encode_values(
    values: np.ndarray,
    precision: Precision | str,
    *,
    channels: np.ndarray | None = None,
    n_channels: int = 1,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> bytes:
    """The value section of the kept values of one tensor.

    ``values``: 1-D float32, the kept values of a tensor in C order. ``channels``: for
    int8-channel only, the channel (0..n_channels-1) of each value, i.e. flat index % n_channels
    for a C-order tensor whose last axis has ``n_channels`` entries; ``None`` means every value is
    kept, so the channel is the position % n_channels. ``channels``/``n_channels`` are ignored
    for the other precisions.

    Layout: scales first (float32 LE: one for int8/int4, ``n_channels`` for int8-channel, none for
    the float precisions), then the values. The scale is ``max|v| / qmax`` over the given (kept)
    values only; a tensor/channel with no values or only zeros has scale 0.

    Rounding is round-half-to-even unless ``stochastic``, which uses unbiased stochastic rounding
    ``floor(v/s + u)``, ``u ~ U[0, 1)`` drawn from ``rng`` (required then), so that the decoded
    value equals ``v`` in expectation (float16 rounds to one of the two neighbouring float16
    values with the same property; float32 is exact and draws nothing).

    ``ValueError`` for NaN/Inf values (any precision), finite values beyond float16
    (``|v| > 65504``) with float16, or bad arguments.
    """
    p = _precision(precision)
    v = _prepare(values)
    if stochastic and rng is None:
        raise ValueError("stochastic rounding needs an rng (np.random.Generator)")
    n = v.size

    if p is Precision.FLOAT32:
        return v.astype("<f4", copy=False).tobytes()

    if p is Precision.FLOAT16:
        a = np.abs(v)
        if n and float(a.max()) > FLOAT16_MAX:
            raise ValueError(
                f"a value of magnitude {float(a.max()):.6g} does not fit float16 "
                f"(max {FLOAT16_MAX}); use float32 or an int precision"
            )
        if stochastic and n:
            assert rng is not None
            v = _stochastic_float16_grid(v, rng)
        return v.astype("<f2").tobytes()

    # integer precisions
    n_channels = _nonneg_int(n_channels, "n_channels")
    _n_scales(p, n, n_channels)  # 0 channels with values
    ch = _channel_index(channels, n, n_channels, ValueError) if p is Precision.INT8_CHANNEL else None
    qmax = _QMAX[p]
    a = np.abs(v)
    scales = _scales_for(_group_maxabs(a, p, ch, n_channels), qmax)
    safe = np.where(scales == 0, np.float32(1), scales)  # a zero scale means only zeros there
    div = safe[0] if p is not Precision.INT8_CHANNEL else _per_value(safe, ch, n)
    if stochastic:
        assert rng is not None
        x = v.astype(np.float64) / np.asarray(div, dtype=np.float64)
        x += rng.random(n)
        q = np.floor(x, out=x)
    else:
        q = np.divide(v, div, dtype=np.float32)
        np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    qi = q.astype(np.int8)
    head = scales.astype(_SCALE_DTYPE).tobytes()
    if p is Precision.INT4:
        nib = qi.view(np.uint8) & np.uint8(0x0F)
        if n % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        packed = nib[0::2] | (nib[1::2] << np.uint8(4))
        return head + packed.tobytes()
    return head + qi.tobytes()


def decode_values(
    data: bytes | memoryview,
    count: int,
    precision: Precision | str,
    *,
    channels: np.ndarray | None = None,
    n_channels: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of ``encode_values`` -> a new 1-D float32 array of length ``count``, or ``out``
    (1-D float32 of that length, written in place: a receiver that reuses its buffers).

    Every argument may come from the network: a bad ``count``, ``precision``, ``n_channels`` or
    ``channels`` (wrong shape, dtype or out of range), a length other than exactly
    ``value_section_size(...)`` (checked before any allocation), a scale that is negative, NaN,
    Inf or so large that a value would overflow float32, a NaN/Inf float value, an int8 byte of
    -128, an int4 nibble of -8 or nonzero padding: all raise ``CodecError``.
    """
    try:
        p = _precision(precision)
        count = _nonneg_int(count, "count")
        n_channels = _nonneg_int(n_channels, "n_channels")
        expected = value_section_size(count, p, n_channels)
    except ValueError as e:
        raise CodecError(str(e)) from None
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise TypeError("not contiguous")
        if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
    except (TypeError, ValueError):
        raise CodecError("value section is not a contiguous byte buffer") from None
    if view.nbytes != expected:
        raise CodecError(
            f"value section is {view.nbytes} bytes, expected {expected} for {count} {p.value} values"
        )

    if p in _FLOAT_DTYPE:
        raw = np.frombuffer(view, dtype=_FLOAT_DTYPE[p], count=count)
        # NaN/Inf have an all-ones exponent; checking the bits is ~6x faster than isfinite(f16)
        bits = raw.view("<u4" if p is Precision.FLOAT32 else "<u2")
        exp = 0x7F800000 if p is Precision.FLOAT32 else 0x7C00
        if count and int((bits & exp).max()) == exp:
            raise CodecError("values contain NaN or Inf")
        return _into(raw, out)

    qmax = _QMAX[p]
    ch = None
    if p is Precision.INT8_CHANNEL:
        ch = _channel_index(channels, count, n_channels, CodecError)
    n_scales = _n_scales(p, count, n_channels)
    scales = np.frombuffer(view, dtype=_SCALE_DTYPE, count=n_scales).astype(np.float32)
    if n_scales and not (
        np.isfinite(scales).all()
        and not np.signbit(scales).any()
        and float(scales.max()) * qmax <= _F32_MAX
    ):
        raise CodecError(f"{p.value} scale is negative, NaN, Inf or so large that values overflow")
    off = 4 * n_scales

    if p is Precision.INT4:
        packed = np.frombuffer(view, dtype=np.uint8, offset=off)
        nib = np.empty((packed.size, 2), dtype=np.uint8)
        np.bitwise_and(packed, 0x0F, out=nib[:, 0])
        np.right_shift(packed, 4, out=nib[:, 1])
        if (nib == 8).any():
            raise CodecError("int4 nibble -8 is outside the symmetric range [-7, 7]")
        if count % 2 and nib[-1, 1] != 0:
            raise CodecError("int4 padding nibble is not zero")
        q = (nib.reshape(-1)[:count] ^ np.uint8(8)).view(np.int8) - np.int8(8)
        values = _into(q, out)
        values *= scales[0]
        return values

    q = np.frombuffer(view, dtype=np.int8, offset=off)
    if q.size and q.min() == -128:  # a reduction, not a temporary array of comparisons
        raise CodecError("int8 byte -128 is outside the symmetric range [-127, 127]")
    values = _into(q, out)
    if p is Precision.INT8:
        values *= scales[0]
    else:
        values *= _per_value(scales, ch, count)
    return values


def _into(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``values`` as a new float32 array, or copied into ``out`` (checked: float32, 1-D, same length)."""
    if out is None:
        return values.astype(np.float32)
    if out.dtype != np.float32 or out.shape != values.shape:
        raise ValueError(f"out must be float32 of shape {values.shape}, got {out.dtype} {out.shape}")
    np.copyto(out, values, casting="unsafe")  # int8/int4/float16 -> float32 is exact
    return out


def quantization_error_bound(
    values: np.ndarray,
    precision: Precision | str,
    channels: np.ndarray | None = None,
    n_channels: int = 1,
) -> float:
    """Largest ``|decoded - v|`` that deterministic rounding of ``values`` can give.

    0 for float32; the float16 half-ulp at ``max|v|`` for float16; for the int precisions
    ``scale / 2`` (the largest scale over channels for int8-channel) plus a hair
    (``qmax * 2**-22 * scale``) for float32 rounding in the division and the decode product.
    Stochastic rounding can be off by up to a whole ``scale`` instead.
    """
    p = _precision(precision)
    v = _prepare(values)
    if p is Precision.FLOAT32:
        return 0.0
    a = np.abs(v)
    if p is Precision.FLOAT16:
        m = float(a.max()) if a.size else 0.0
        if m > FLOAT16_MAX:
            raise ValueError(f"a value of magnitude {m:.6g} does not fit float16")
        return _float16_half_ulp(m)
    n_channels = _nonneg_int(n_channels, "n_channels")
    _n_scales(p, v.size, n_channels)
    ch = _channel_index(channels, v.size, n_channels, ValueError) if p is Precision.INT8_CHANNEL else None
    qmax = _QMAX[p]
    scales = _scales_for(_group_maxabs(a, p, ch, n_channels), qmax)
    s = float(scales.max()) if scales.size else 0.0
    return s * (0.5 + qmax * 2.0**-22)

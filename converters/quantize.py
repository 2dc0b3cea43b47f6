"""Value precisions: how the kept (unpruned) values of one tensor travel.

A *value section* holds the kept values of one tensor, in C order, at one precision::

    scales   float32 little-endian: 1 for int8 and int4, n_channels for int8-channel, none for
             float32 and float16
    coding   integer precisions only: one byte, 0 when the codes are packed as below, else
             the Golomb coding of ``fedprune.converters.value_coding`` (protocol version 4)
    values   float32: 4 bytes LE each; float16: 2 bytes LE each; packed int8 and int8-channel:
             one signed byte each, in [-127, 127]; packed int4: two per byte, low nibble first,
             each a 4-bit two's complement in [-7, 7], the high nibble of the last byte 0 when
             count is odd; Golomb-coded codes: strictly fewer bytes than packed ones

Integer precisions are symmetric: ``value = q * scale``, ``scale = max|v| / qmax`` over the values
of the tensor (or of the output channel, for int8-channel) that are *kept*: the caller passes only
kept values, so pruned zeros never shrink the resolution. A tensor or channel with no values, or
only zeros, has scale 0.

The section itself carries neither its count nor its precision nor the channel of each value:
sender and receiver know them from the header and the shared mask. ``section_size`` is its
length packed, the most it can take (exact for the float precisions); the encoder entropy-codes
integer codes only where that is smaller. The decoder trusts nothing else: it reads no more than
``section_size`` bytes, checks every length before allocating, and every failure raises
``CodecError``.

Each precision is a small class behind one interface, ``Precision``: its config name (the string
in task files and headers), its wire id, its bits per value, its scales, the encoding and decoding
of its section, and its error bound. ``precision_named``, ``precision_with_wire_id`` and
``precision_from_config`` look the registered ones up; ``precision.get_config()`` gives
``{"precision": name}`` back.

To add a precision: write a subclass of ``Precision`` (of ``SymmetricInt`` for a symmetric integer
grid, of ``FloatPrecision`` for an IEEE float) that sets ``name``, ``wire_id`` (the next unused
one: ids are never renumbered or reused) and ``bits``, and implements ``_encode``, ``_decode`` (the
values and the bytes the section took) and ``_error_bound`` (a ``SymmetricInt`` sets ``qmax`` and
implements ``_pack`` and ``_unpack``: its coding byte and Golomb coding come with it); append an instance to ``_REGISTERED``; add its own test beside
``tests/test_quantize.py``'s conformance test, which already runs over every registered precision;
and add its row to the table of docs/protocol.md section 7.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedprune.converters.errors import CodecError
from fedprune.converters.value_coding import decode_codes, encode_codes

__all__ = [
    "FLOAT16_MAX",
    "PRECISIONS",
    "PRECISION_NAMES",
    "Float16",
    "Float32",
    "FloatPrecision",
    "Int4",
    "Int8",
    "Int8PerChannel",
    "Precision",
    "SymmetricInt",
    "decode_values",
    "encode_values",
    "precision_from_config",
    "precision_named",
    "precision_with_wire_id",
    "quantization_error_bound",
    "value_bits",
    "value_section_size",
]

FLOAT16_MAX = 65504.0
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
_F16_MIN_NORMAL = 2.0**-14
_SCALE_DTYPE = np.dtype("<f4")


# --- the interface -------------------------------------------------------------------------------


class Precision(ABC):
    """How kept values travel. The registered precisions are frozen dataclasses without fields
    (a precision has no parameters today); the public methods check their arguments, and the hooks
    (``_encode``, ``_decode``, ``_error_bound``) get them checked."""

    #: the name in task files, task headers and ``get_config``
    name: ClassVar[str]
    #: the id in binary headers: stable, never renumbered
    wire_id: ClassVar[int]
    #: bits per value, scales excluded
    bits: ClassVar[int]
    #: one scale per output channel, so the encoder and decoder need each value's channel
    per_channel: ClassVar[bool] = False
    #: decoding gives back exactly what was encoded (so error feedback has nothing to carry)
    exact: ClassVar[bool] = False
    #: bytes between the scales and the values: the coding byte of an integer precision
    coding_bytes: ClassVar[int] = 0

    def __str__(self) -> str:
        return self.name

    def get_config(self) -> dict[str, Any]:
        """``{"precision": name}``; ``precision_from_config(p.get_config()) == p``."""
        return {"precision": self.name}

    def n_scales(self, count: int, n_channels: int) -> int:
        """float32 scales at the start of a section of ``count`` values of a tensor with
        ``n_channels`` output channels; ``ValueError`` if such a section cannot exist."""
        return 0

    def section_size(self, count: int, n_channels: int = 1) -> int:
        """Byte length of the section of ``count`` values with its codes packed (scales and
        coding byte included): the most a section takes, exactly what a float one takes;
        ``ValueError`` on a bad argument. ``n_channels`` matters only for per-channel precisions."""
        count = _nonneg_int(count, "count")
        n_channels = _nonneg_int(n_channels, "n_channels")
        return 4 * self.n_scales(count, n_channels) + self.coding_bytes + (count * self.bits + 7) // 8

    def encode(
        self,
        values: Any,
        *,
        channels: np.ndarray | None = None,
        n_channels: int = 1,
        stochastic: bool = False,
        rng: np.random.Generator | None = None,
    ) -> bytes:
        """The value section of the kept values of one tensor.

        ``values``: 1-D, the kept values of a tensor in C order. ``channels``: for per-channel
        precisions only, the channel (0..n_channels-1) of each value, i.e. flat index %
        n_channels for a C-order tensor whose last axis has ``n_channels`` entries; ``None``
        means every value is kept, so the channel is the position % n_channels.

        Rounding is round-half-to-even unless ``stochastic``, which rounds so that the decoded
        value equals ``v`` in expectation, drawing from ``rng`` (required then).

        ``ValueError`` for NaN/Inf values, values the precision cannot hold, or bad arguments.
        """
        if stochastic and rng is None:
            raise ValueError("stochastic rounding needs an rng (np.random.Generator)")
        v, ch, n_channels = self._checked(values, channels, n_channels)
        return self._encode(v, ch, n_channels, rng if stochastic else None)

    def round_trip(self, values: Any, *, channels: np.ndarray | None = None, n_channels: int = 1) -> np.ndarray:
        """What decoding ``encode(values, channels=..., n_channels=...)`` gives (round to nearest),
        bit for bit, without making the section: 1-D float32. Error feedback needs the values a
        receiver will decode, and an integer section's entropy coding is most of its cost."""
        v, ch, n_channels = self._checked(values, channels, n_channels)
        return self._round_trip(v, ch, n_channels)

    def _checked(self, values: Any, channels: np.ndarray | None,
                 n_channels: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """``(values, each value's channel or None, n_channels)`` checked as ``encode`` takes them."""
        v = _prepare(values)
        n_channels = _nonneg_int(n_channels, "n_channels")
        self.n_scales(v.size, n_channels)  # refuses a layout that cannot exist
        ch = _channel_index(channels, v.size, n_channels, ValueError) if self.per_channel else None
        return v, ch, n_channels

    def read(
        self,
        data: bytes | memoryview,
        count: int,
        *,
        channels: np.ndarray | None = None,
        n_channels: int = 1,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int]:
        """The section at the start of ``data``, which may go on with other bytes (the next
        tensor's, in a values-only section): ``(values, its length in bytes)``; the values a new
        1-D float32 array of length ``count``, or ``out`` (1-D float32 of that length, written in
        place: a receiver that reuses its buffers). Reads at most ``section_size(count,
        n_channels)`` bytes: an integer section's length is known once it is read.

        Every argument but ``out`` may come from the network: a bad ``count``, ``n_channels`` or
        ``channels``, a section that ends early, or bytes the precision never produces raise
        ``CodecError``, before anything larger than the section is allocated.
        """
        try:
            count = _nonneg_int(count, "count")
            n_channels = _nonneg_int(n_channels, "n_channels")
            largest = self.section_size(count, n_channels)
        except ValueError as e:
            raise CodecError(str(e)) from None
        view = _byte_view(data)[:largest]
        ch = _channel_index(channels, count, n_channels, CodecError) if self.per_channel else None
        return self._decode(view, count, ch, n_channels, out)

    def decode(self, data: bytes | memoryview, count: int, **where: Any) -> np.ndarray:
        """Inverse of ``encode``: ``data`` is exactly one section (a byte more or less is a
        ``CodecError``); ``where``: ``channels``, ``n_channels`` and ``out`` as for ``read``."""
        view = _byte_view(data)
        values, used = self.read(view, count, **where)
        if used != view.nbytes:
            raise CodecError(f"value section is {view.nbytes} bytes, expected {used} for {count} {self.name} values")
        return values

    def error_bound(
        self, values: Any, channels: np.ndarray | None = None, n_channels: int = 1, *,
        stochastic: bool = False,
    ) -> float:
        """Largest ``|decoded - v|`` that encoding ``values`` can give: with round-to-nearest,
        or with stochastic rounding (twice that: up to a whole step instead of half of one)."""
        v, ch, n_channels = self._checked(values, channels, n_channels)
        bound = self._error_bound(v, ch, n_channels)
        return 2 * bound if stochastic else bound

    @abstractmethod
    def _encode(self, v: np.ndarray, ch: np.ndarray | None, n_channels: int,
                rng: np.random.Generator | None) -> bytes:
        """The section of ``v`` (1-D float32, finite); ``rng`` set means stochastic rounding."""

    @abstractmethod
    def _decode(self, view: memoryview, count: int, ch: np.ndarray | None, n_channels: int,
                out: np.ndarray | None) -> tuple[np.ndarray, int]:
        """``(values, bytes used)`` of the section at the start of ``view``, which holds at most
        ``section_size`` bytes; ``CodecError`` for bytes the encoder never writes."""

    def _round_trip(self, v: np.ndarray, ch: np.ndarray | None, n_channels: int) -> np.ndarray:
        """``round_trip`` of checked values: through the section itself unless a precision knows better."""
        section = self._encode(v, ch, n_channels, None)
        return self._decode(memoryview(section), v.size, ch, n_channels, None)[0]

    @abstractmethod
    def _error_bound(self, v: np.ndarray, ch: np.ndarray | None, n_channels: int) -> float:
        """The round-to-nearest error bound for ``v`` (1-D float32, finite)."""


# --- float precisions ----------------------------------------------------------------------------


class FloatPrecision(Precision):
    """An IEEE float, no scales; decoding refuses NaN and Inf (an all-ones exponent)."""

    dtype: ClassVar[np.dtype]
    _bits_dtype: ClassVar[str]  # an unsigned integer as wide as the float
    _exponent_bits: ClassVar[int]

    def _decode(self, view, count, ch, n_channels, out):
        size = count * self.dtype.itemsize
        if view.nbytes < size:
            raise CodecError(f"value section is {view.nbytes} bytes, expected {size} for {count} {self.name} values")
        raw = np.frombuffer(view, dtype=self.dtype, count=count)
        # NaN/Inf have an all-ones exponent; checking the bits is ~6x faster than isfinite(f16)
        exponents = raw.view(self._bits_dtype) & self._exponent_bits
        if count and int(exponents.max()) == self._exponent_bits:
            raise CodecError("values contain NaN or Inf")
        return _into(raw, out), size


@dataclass(frozen=True)
class Float32(FloatPrecision):
    """Values as they are: exact, stochastic rounding draws nothing."""

    name: ClassVar[str] = "float32"
    wire_id: ClassVar[int] = 0
    bits: ClassVar[int] = 32
    exact: ClassVar[bool] = True
    dtype: ClassVar[np.dtype] = np.dtype("<f4")
    _bits_dtype: ClassVar[str] = "<u4"
    _exponent_bits: ClassVar[int] = 0x7F800000

    def _encode(self, v, ch, n_channels, rng):
        return v.astype("<f4", copy=False).tobytes()

    def _error_bound(self, v, ch, n_channels):
        return 0.0


@dataclass(frozen=True)
class Float16(FloatPrecision):
    """IEEE half precision, round to nearest even; ``|v| > 65504`` is refused, not clipped.
    Stochastic rounding picks one of the two neighbouring float16 values."""

    name: ClassVar[str] = "float16"
    wire_id: ClassVar[int] = 1
    bits: ClassVar[int] = 16
    dtype: ClassVar[np.dtype] = np.dtype("<f2")
    _bits_dtype: ClassVar[str] = "<u2"
    _exponent_bits: ClassVar[int] = 0x7C00

    def _encode(self, v, ch, n_channels, rng):
        a = np.abs(v)
        if v.size and float(a.max()) > FLOAT16_MAX:
            raise ValueError(
                f"a value of magnitude {float(a.max()):.6g} does not fit float16 "
                f"(max {FLOAT16_MAX}); use float32 or an int precision"
            )
        if rng is not None and v.size:
            v = _stochastic_float16_grid(v, rng)
        return v.astype("<f2").tobytes()

    def _error_bound(self, v, ch, n_channels):
        m = float(np.abs(v).max()) if v.size else 0.0
        if m > FLOAT16_MAX:
            raise ValueError(f"a value of magnitude {m:.6g} does not fit float16")
        return _float16_half_ulp(m)


# --- symmetric integer precisions ----------------------------------------------------------------


class SymmetricInt(Precision):
    """``value = q * scale`` with ``q`` in ``[-qmax, qmax]`` and one scale per tensor
    (``Int8PerChannel`` overrides the grouping); subclasses say how ``q`` is packed."""

    qmax: ClassVar[int]
    coding_bytes: ClassVar[int] = 1

    def n_scales(self, count, n_channels):
        return 1

    def _group_maxabs(self, a: np.ndarray, ch: np.ndarray | None, n_channels: int) -> np.ndarray:
        """max|v| per scale group; 0 for an empty group."""
        return np.array([a.max() if a.size else 0.0], dtype=np.float32)

    def _spread(self, scales: np.ndarray, ch: np.ndarray | None, count: int) -> Any:
        """Each value's scale: here the one scale, as a scalar."""
        return scales[0]

    @abstractmethod
    def _pack(self, q: np.ndarray) -> bytes:
        """The bytes of ``q`` (int8, each in ``[-qmax, qmax]``)."""

    @abstractmethod
    def _unpack(self, packed: np.ndarray, count: int) -> np.ndarray:
        """``count`` values of ``q`` (int8) from ``packed`` (uint8, exactly their packed bytes);
        ``CodecError`` for a code outside ``[-qmax, qmax]`` or bad padding."""

    def _encode(self, v, ch, n_channels, rng):
        codes, scales = self._quantize(v, ch, n_channels, rng)
        return scales.astype(_SCALE_DTYPE).tobytes() + encode_codes(codes, self.qmax, self._pack(codes))

    def _round_trip(self, v, ch, n_channels):
        # the codes and the scales as they travel, without the coding
        codes, scales = self._quantize(v, ch, n_channels, None)
        return self._values(codes, scales.astype(_SCALE_DTYPE).astype(np.float32), ch, None)

    def _values(self, codes: np.ndarray, scales: np.ndarray, ch: np.ndarray | None,
                out: np.ndarray | None) -> np.ndarray:
        """The float32 values of ``codes`` at ``scales``, new or in ``out``: what a receiver decodes."""
        values = _into(codes, out)
        values *= self._spread(scales, ch, codes.size)
        return values

    def _quantize(self, v, ch, n_channels, rng) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, scales)``: int8 codes in ``[-qmax, qmax]`` and float32 scales."""
        qmax, n = self.qmax, v.size
        scales = _scales_for(self._group_maxabs(np.abs(v), ch, n_channels), qmax)
        safe = np.where(scales == 0, np.float32(1), scales)  # a zero scale means only zeros there
        div = self._spread(safe, ch, n)
        if rng is not None:  # floor(v/s + u): the decoded value is v in expectation
            x = v.astype(np.float64) / np.asarray(div, dtype=np.float64)
            x += rng.random(n)
            q = np.floor(x, out=x)
        else:
            q = np.divide(v, div, dtype=np.float32)
            np.rint(q, out=q)
        np.clip(q, -qmax, qmax, out=q)
        return q.astype(np.int8), scales

    def _decode(self, view, count, ch, n_channels, out):
        n_scales = self.n_scales(count, n_channels)
        if view.nbytes < 4 * n_scales + 1:
            raise CodecError(f"value section is {view.nbytes} bytes, expected at least {4 * n_scales + 1} for "
                             f"{count} {self.name} values")
        scales = np.frombuffer(view, dtype=_SCALE_DTYPE, count=n_scales).astype(np.float32)
        if n_scales and not (
            np.isfinite(scales).all()
            and not np.signbit(scales).any()
            and float(scales.max()) * self.qmax <= _F32_MAX
        ):
            raise CodecError(f"{self.name} scale is negative, NaN, Inf or so large that values overflow")
        codes, used = decode_codes(np.frombuffer(view, dtype=np.uint8, offset=4 * n_scales), count, self.qmax,
                                   (count * self.bits + 7) // 8, lambda packed: self._unpack(packed, count),
                                   f"{self.name} section of {count} values")
        return self._values(codes, scales, ch, out), 4 * n_scales + used

    def _error_bound(self, v, ch, n_channels):
        # scale / 2, plus a hair for float32 rounding in the division and the decode product
        scales = _scales_for(self._group_maxabs(np.abs(v), ch, n_channels), self.qmax)
        s = float(scales.max()) if scales.size else 0.0
        return s * (0.5 + self.qmax * 2.0**-22)


@dataclass(frozen=True)
class Int8(SymmetricInt):
    """Symmetric int8, one scale per tensor, one signed byte per value (-128 is never sent)."""

    name: ClassVar[str] = "int8"
    wire_id: ClassVar[int] = 2
    bits: ClassVar[int] = 8
    qmax: ClassVar[int] = 127

    def _pack(self, q):
        return q.tobytes()

    def _unpack(self, packed, count):
        q = packed.view(np.int8)
        if q.size and q.min() == -128:  # a reduction, not a temporary array of comparisons
            raise CodecError("int8 byte -128 is outside the symmetric range [-127, 127]")
        return q


@dataclass(frozen=True)
class Int8PerChannel(Int8):
    """Int8 with one scale per output channel (the last axis of a kernel)."""

    name: ClassVar[str] = "int8-channel"
    wire_id: ClassVar[int] = 3
    per_channel: ClassVar[bool] = True

    def n_scales(self, count, n_channels):
        if n_channels == 0 and count > 0:
            raise ValueError(f"{count} values cannot belong to 0 channels")
        return n_channels

    def _group_maxabs(self, a, ch, n_channels):
        out = np.zeros(n_channels, dtype=np.float32)
        if a.size == 0:
            return out
        if ch is None:
            if a.size % n_channels == 0:
                return a.reshape(-1, n_channels).max(axis=0)
            ch = np.arange(a.size) % n_channels
        np.maximum.at(out, ch, a)
        return out

    def _spread(self, scales, ch, count):
        """Per-channel ``scales`` spread to one per value (dense layout when ``ch`` is None)."""
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        if ch is None:
            n = scales.size
            if count % n == 0:
                return np.broadcast_to(scales, (count // n, n)).reshape(-1)
            ch = np.arange(count) % n
        return scales[ch]


@dataclass(frozen=True)
class Int4(SymmetricInt):
    """Symmetric int4 in [-7, 7], one scale per tensor, two values per byte (low nibble first)."""

    name: ClassVar[str] = "int4"
    wire_id: ClassVar[int] = 4
    bits: ClassVar[int] = 4
    qmax: ClassVar[int] = 7

    def _pack(self, q):
        nib = q.view(np.uint8) & np.uint8(0x0F)
        if q.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        return (nib[0::2] | (nib[1::2] << np.uint8(4))).tobytes()

    def _unpack(self, packed, count):
        nib = np.empty((packed.size, 2), dtype=np.uint8)
        np.bitwise_and(packed, 0x0F, out=nib[:, 0])
        np.right_shift(packed, 4, out=nib[:, 1])
        if (nib == 8).any():
            raise CodecError("int4 nibble -8 is outside the symmetric range [-7, 7]")
        if count % 2 and nib[-1, 1] != 0:
            raise CodecError("int4 padding nibble is not zero")
        return (nib.reshape(-1)[:count] ^ np.uint8(8)).view(np.int8) - np.int8(8)


# --- the registry --------------------------------------------------------------------------------

# One line per precision. Wire ids are stable: never renumber one, never reuse a retired one.
_REGISTERED: tuple[Precision, ...] = (
    Float32(),
    Float16(),
    Int8(),
    Int8PerChannel(),
    Int4(),
)

#: every registered precision, in wire-id order
PRECISIONS: tuple[Precision, ...] = tuple(sorted(_REGISTERED, key=lambda p: p.wire_id))
#: their config names, for checking task files
PRECISION_NAMES: tuple[str, ...] = tuple(p.name for p in PRECISIONS)
_BY_NAME: dict[str, Precision] = {p.name: p for p in PRECISIONS}
_BY_WIRE_ID: dict[int, Precision] = {p.wire_id: p for p in PRECISIONS}
if len(_BY_NAME) != len(PRECISIONS) or len(_BY_WIRE_ID) != len(PRECISIONS):
    raise RuntimeError("two registered precisions share a name or a wire id")


def precision_named(precision: Precision | str) -> Precision:
    """The registered precision for a ``Precision`` or its config name; ``ValueError`` naming the
    known names for anything else."""
    if isinstance(precision, Precision):
        return precision
    if isinstance(precision, str) and precision in _BY_NAME:
        return _BY_NAME[precision]
    raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISION_NAMES)}")


def precision_with_wire_id(wire_id: int) -> Precision:
    """The registered precision whose binary-header id is ``wire_id``; ``ValueError`` otherwise."""
    try:
        return _BY_WIRE_ID[wire_id]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision id {wire_id!r}; known ids are {sorted(_BY_WIRE_ID)}") from None


def precision_from_config(d: Mapping[str, Any]) -> Precision:
    """Build a precision from ``{"precision": name}`` (precisions take no other keys).

    ``ValueError`` naming the offending key: not a mapping, no ``precision`` key, an unknown
    name, or any other key.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a precision config must be a mapping, got {type(d).__name__}")
    if "precision" not in d:
        raise ValueError(f"precision config has no 'precision' key: {dict(d)!r}")
    name = d["precision"]
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"unknown 'precision' {name!r}; expected one of {list(PRECISION_NAMES)}")
    extra = sorted(set(d) - {"precision"})
    if extra:
        raise ValueError(f"unknown key {extra[0]!r} for precision {name!r}; it takes no keys")
    return _BY_NAME[name]


# --- functions over a precision or its name ------------------------------------------------------


def value_bits(precision: Precision | str) -> float:
    """Bits per value, scales excluded: 32, 16, 8, 8, 4."""
    return float(precision_named(precision).bits)


def value_section_size(count: int, precision: Precision | str, n_channels: int = 1) -> int:
    """Exact byte length of the value section of ``count`` values (scales included).

    ``n_channels`` matters only for int8-channel. ``ValueError`` on a bad argument.
    """
    return precision_named(precision).section_size(count, n_channels)


def encode_values(
    values: np.ndarray,
    precision: Precision | str,
    *,
    channels: np.ndarray | None = None,
    n_channels: int = 1,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> bytes:
    """``precision``'s value section of ``values`` (see ``Precision.encode``)."""
    return precision_named(precision).encode(values, channels=channels, n_channels=n_channels,
                                             stochastic=stochastic, rng=rng)


def decode_values(
    data: bytes | memoryview,
    count: int,
    precision: Precision | str,
    *,
    channels: np.ndarray | None = None,
    n_channels: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of ``encode_values`` (see ``Precision.decode``); an unknown ``precision`` is a
    ``CodecError`` too, as it may come from the network."""
    try:
        p = precision_named(precision)
    except ValueError as e:
        raise CodecError(str(e)) from None
    return p.decode(data, count, channels=channels, n_channels=n_channels, out=out)


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
    return precision_named(precision).error_bound(values, channels, n_channels)


# --- helpers -------------------------------------------------------------------------------------


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


def _byte_view(data: Any) -> memoryview:
    """``data`` as a flat byte view without a copy; ``CodecError`` for anything else."""
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise TypeError("not contiguous")
        if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
    except (TypeError, ValueError):
        raise CodecError("value section is not a contiguous byte buffer") from None
    return view


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


def _float16_half_ulp(m: float) -> float:
    """Largest error of round-to-nearest float16 for values of magnitude <= m (m <= 65504)."""
    if m == 0:
        return 0.0
    _, e = np.frexp(m)  # m = f * 2**e, f in [0.5, 1)
    return float(2.0 ** (max(int(e) - 1, -14) - 11))


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


def _into(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``values`` as a new float32 array, or copied into ``out`` (checked: float32, 1-D, same length)."""
    if out is None:
        return values.astype(np.float32)
    if out.dtype != np.float32 or out.shape != values.shape:
        raise ValueError(f"out must be float32 of shape {values.shape}, got {out.dtype} {out.shape}")
    np.copyto(out, values, casting="unsafe")  # int8/int4/float16 -> float32 is exact
    return out

"""The tensor codec: how a list of pruned tensors becomes bytes, and back.

Two encodings of a tensor list (the model's weights in the layout of ``fedprune.models``):

- **values-only**: sender and receiver share the masks, so only the kept values travel, tensor
  after tensor, each a value section of ``fedprune.converters.quantize`` (scales, then values; an
  integer precision's codes packed or entropy-coded, whichever is smaller, so a section's length
  is known only once it is read). The masks are named elsewhere by their digest; nothing else is
  sent. This is the default uplink.
- **self-describing**: a tensor table (name, shape, dtype, precision, whether masked, mask coding,
  kept count, mask bytes) followed, per tensor, by its coded mask (``fedprune.converters.mask_coding``,
  the smallest of bitmap, Rice/Elias gaps or index list) and its value section. Used to broadcast
  a new mask, and by devices that prune on their own.

An optional lossless stage (zlib or zstd) is applied to a section only when it makes it smaller.

Decoding trusts nothing: every count, shape and length is checked against the table, the
expected layout and ``DecodeLimits`` before anything is allocated (a section's length against the
most its layout can take: its values packed); every failure is a ``CodecError``.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterator, Sequence

import numpy as np

from fedprune.converters.errors import CodecError
from fedprune.converters.frame import ByteReader
from fedprune.converters.mask_coding import MaskMethod, decode_mask, encode_mask
from fedprune.converters.mask_coding import mask_digest
from fedprune.converters.quantize import PRECISIONS, Precision, precision_named, precision_with_wire_id

__all__ = [
    "CodecError",
    "Compression",
    "DecodeLimits",
    "MaskLayout",
    "Precision",
    "compress",
    "decode_self_describing",
    "decode_values_only",
    "decompress",
    "encode_self_describing",
    "encode_values_only",
    "round_trip_tensors",
    "section_channels",
    "values_only_size",
]

Masks = Sequence["np.ndarray | None"]
_WIDEST_BITS = max(p.bits for p in PRECISIONS)  # bits per value of the widest registered precision


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds a decoder enforces before allocating anything."""

    max_tensors: int = 4096
    max_elements: int = 1 << 26  # dense elements over all tensors (256 MiB of float32)
    max_ndim: int = 8


DEFAULT_LIMITS = DecodeLimits()


def n_channels(shape: Sequence[int]) -> int:
    """Output channels: the last axis of a kernel (Dense: (in, out); Conv: (..., in, out))."""
    return int(shape[-1]) if len(shape) >= 2 and int(shape[-1]) > 0 else 1


def _keeps_all(mask: np.ndarray | None) -> bool:
    """A mask that prunes nothing lays values out as no mask does: every value, in order. (A
    prunable layer before its first pruning step has such a mask; taking the dense path for it
    spares an index of every position and a scatter through it.)"""
    return mask is None or bool(mask.all())


def _kept_positions(shape: Sequence[int], mask: np.ndarray | None) -> np.ndarray | None:
    """Flat indices of the kept positions; None when every position is kept."""
    return None if _keeps_all(mask) else np.flatnonzero(mask.ravel())


def section_channels(shape: Sequence[int], precision: Precision) -> int:
    """The ``n_channels`` of a tensor's value section: its output channels for a per-channel
    precision, else 1."""
    return n_channels(shape) if precision.per_channel else 1


def _channels(shape: Sequence[int], positions: np.ndarray | None, precision: Precision) -> tuple[np.ndarray | None, int]:
    """(channel of each kept value, channel count) for a per-channel precision; (None, 1) else."""
    if not precision.per_channel:
        return None, 1
    c = section_channels(shape, precision)
    size = int(np.prod(shape))
    pos = np.arange(size) if positions is None else positions
    return (pos % c).astype(np.int64), c


def _kept_values(t: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    flat = np.asarray(t, dtype=np.float32).ravel()
    return flat if _keeps_all(mask) else flat[mask.ravel()]


# --- values-only -----------------------------------------------------------------------------------


def encode_values_only(
    tensors: Sequence[np.ndarray],
    masks: Masks,
    precision: "Precision | str",
    *,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> bytes:
    """The kept values of every tensor, in order, each a value section; no layout, no masks."""
    p = precision_named(precision)
    return b"".join(p.encode(kept, channels=channels, n_channels=c, stochastic=stochastic, rng=rng)
                    for _, _, kept, channels, c in _kept_by_tensor(tensors, masks, p))


def round_trip_tensors(tensors: Sequence[np.ndarray], masks: Masks, precision: "Precision | str") -> list[np.ndarray]:
    """What a receiver decodes from ``tensors`` encoded under ``masks`` at ``precision`` (round to
    nearest; values-only or self-describing alike), bit for bit, without encoding them: float32,
    exact zeros at the masked-out positions. A device's error feedback needs these values, and
    making and decoding the integer sections again took a tenth of a simulated device's Python time."""
    p = precision_named(precision)
    return [_scatter(shape, positions, p.round_trip(kept, channels=channels, n_channels=c))
            for shape, positions, kept, channels, c in _kept_by_tensor(tensors, masks, p)]


def _kept_by_tensor(tensors: Sequence[np.ndarray], masks: Masks, p: Precision) -> Iterator[
        tuple[tuple[int, ...], np.ndarray | None, np.ndarray, np.ndarray | None, int]]:
    """Per tensor: its shape, kept positions (None: all), kept values, and their channels and
    channel count as ``p`` takes them; ValueError for a mask of another shape."""
    for t, m in zip(tensors, masks, strict=True):
        shape = np.shape(t)
        if m is not None and m.shape != shape:
            raise ValueError(f"mask shape {m.shape} differs from tensor shape {shape}")
        positions = _kept_positions(shape, m)
        channels, c = _channels(shape, positions, p)
        yield shape, positions, _kept_values(t, m), channels, c


@dataclass(frozen=True, eq=False)
class MaskLayout:
    """A receiver's masks, prepared once for decoding many values-only sections against them (the
    aggregator decodes every update of a round against one mask): each tensor's shape, its kept
    positions (None: dense) and kept count, and the masks' digest."""

    shapes: tuple[tuple[int, ...], ...]
    positions: tuple[np.ndarray | None, ...]
    counts: tuple[int, ...]
    digest: str

    @classmethod
    def of(cls, shapes: Sequence[Sequence[int]], masks: Masks, digest: str | None = None) -> "MaskLayout":
        """Raises CodecError if a mask's shape is not its tensor's. ``digest``: ``mask_digest(masks)``
        where the caller has it already."""
        dims = tuple(tuple(int(d) for d in s) for s in shapes)
        if len(masks) != len(dims):
            raise CodecError(f"{len(masks)} masks for {len(dims)} tensors")
        for shape, m in zip(dims, masks):
            if m is not None and tuple(m.shape) != shape:
                raise CodecError(f"mask shape {m.shape} does not match tensor shape {shape}")
        positions = tuple(_kept_positions(shape, m) for shape, m in zip(dims, masks))
        counts = tuple(int(np.prod(shape)) if pos is None else int(pos.size) for shape, pos in zip(dims, positions))
        return cls(dims, positions, counts, digest or mask_digest(masks))

    def section_size(self, precision: "Precision | str") -> int:
        """The most bytes a values-only section at ``precision`` takes for this layout (its
        integer codes packed; exact for float precisions)."""
        return _section_size(self.shapes, self.counts, precision)

    def check_section_length(self, length: int, precision: "Precision") -> int:
        """``section_size(precision)``, once ``length`` bytes can be a values-only section at
        ``precision`` for this layout: at most that (integer codes may be entropy-coded), exactly
        that for a float precision. CodecError otherwise."""
        largest = self.section_size(precision)
        if length > largest or (not precision.coding_bytes and length != largest):
            raise CodecError(f"values section is {length} bytes, expected {'at most ' if precision.coding_bytes else ''}"
                             f"{largest} for this mask and {precision.name}")
        return largest


def values_only_size(shapes: Sequence[Sequence[int]], masks: Masks, precision: "Precision | str") -> int:
    """The most bytes ``encode_values_only`` takes for this layout (integer codes packed; exact
    for float precisions)."""
    counts = [int(np.prod(s)) if m is None else int(m.sum()) for s, m in zip(shapes, masks, strict=True)]
    return _section_size(shapes, counts, precision)


def _section_size(shapes: Sequence[Sequence[int]], counts: Sequence[int], precision: "Precision | str") -> int:
    p = precision_named(precision)
    return sum(p.section_size(count, section_channels(shape, p)) for shape, count in zip(shapes, counts))


def decode_values_only(
    body: bytes | memoryview, shapes: Sequence[Sequence[int]], masks: Masks, precision: "Precision | str",
    *, layout: MaskLayout | None = None, out: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Inverse of ``encode_values_only``; pruned positions decode to exact zeros. ``layout``:
    ``MaskLayout.of(shapes, masks)``, when the caller decodes many sections against these masks.
    ``out``: one C-contiguous float32 array per tensor, of its shape, to decode into (and return)
    instead of new arrays; on a CodecError their contents are undefined."""
    try:
        p = precision_named(precision)
    except ValueError as e:
        raise CodecError(str(e)) from None
    layout = layout or MaskLayout.of(shapes, masks)
    layout.check_section_length(len(body), p)
    if out is not None:
        if len(out) != len(layout.shapes):
            raise ValueError(f"out has {len(out)} arrays for {len(layout.shapes)} tensors")
        for o, shape in zip(out, layout.shapes):
            if o.dtype != np.float32 or o.shape != shape or not o.flags.c_contiguous:
                raise ValueError(f"out arrays must be C-contiguous float32 of the tensors' shapes; got "
                                 f"{o.dtype} {o.shape} for {shape}")
    view = memoryview(body)
    tensors: list[np.ndarray] = []
    pos = 0
    for i, (shape, positions, count) in enumerate(zip(layout.shapes, layout.positions, layout.counts)):
        channels, c = _channels(shape, positions, p)
        target = None if out is None else out[i]
        if positions is None and target is not None:  # dense: straight into the caller's array
            _, used = p.read(view[pos:], count, channels=channels, n_channels=c, out=target.reshape(-1))
            tensors.append(target)
        else:
            values, used = p.read(view[pos:], count, channels=channels, n_channels=c)
            tensors.append(_scatter(shape, positions, values, out=target))
        pos += used
    if pos != len(body):
        raise CodecError(f"{len(body) - pos} bytes left over after the last tensor's values")
    return tensors


def _scatter(shape: tuple[int, ...], positions: np.ndarray | None, values: np.ndarray,
             out: np.ndarray | None = None) -> np.ndarray:
    """``values`` at ``positions`` (None: all, in order) of a zero tensor of ``shape``: a new one,
    or ``out`` (C-contiguous float32 of that shape), zeroed first."""
    if positions is None and out is None:
        return values.reshape(shape)
    if out is None:
        t = np.zeros(int(np.prod(shape)), dtype=np.float32)
    else:
        t = out.reshape(-1)
        t.fill(0.0)
    t[slice(None) if positions is None else positions] = values
    return t.reshape(shape) if out is None else out


# --- self-describing -------------------------------------------------------------------------------

_TABLE_HEAD = struct.Struct("<H")  # tensor count
_ENTRY_FIXED = struct.Struct("<BBBBII")  # dtype, precision id, flags, mask method, kept, mask bytes
_DTYPE_FLOAT32 = 0
_FLAG_MASKED = 1


def encode_self_describing(
    tensors: Sequence[np.ndarray],
    masks: Masks,
    names: Sequence[str],
    precision: "Precision | str",
    *,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Tensor table, then per tensor its coded mask and its value section."""
    p = precision_named(precision)
    if not (len(tensors) == len(masks) == len(names)):
        raise ValueError("tensors, masks and names must have the same length")
    if len(tensors) > 0xFFFF:
        raise ValueError("at most 65,535 tensors")
    table = [_TABLE_HEAD.pack(len(tensors))]
    data = []
    for t, m, name in zip(tensors, masks, names):
        shape = np.shape(t)
        if m is not None and m.shape != shape:
            raise ValueError(f"mask shape {m.shape} differs from tensor shape {shape} ({name})")
        raw_name = name.encode()
        if len(raw_name) > 255 or len(shape) > 255:
            raise ValueError(f"tensor name or rank too long: {name!r}")
        if m is None:
            method, mask_bytes, kept = MaskMethod.ALL_KEPT, b"", int(np.prod(shape))
        else:
            method, mask_bytes = encode_mask(m.ravel())
            kept = int(m.sum())
        channels, c = _channels(shape, _kept_positions(shape, m), p)
        values = p.encode(_kept_values(t, m), channels=channels, n_channels=c, stochastic=stochastic, rng=rng)
        table.append(bytes([len(raw_name)]) + raw_name + bytes([len(shape)])
                     + struct.pack(f"<{len(shape)}I", *shape)
                     + _ENTRY_FIXED.pack(_DTYPE_FLOAT32, p.wire_id, _FLAG_MASKED if m is not None else 0,
                                         int(method), kept, len(mask_bytes)))
        data.append(mask_bytes)
        data.append(values)
    return b"".join(table) + b"".join(data)


def self_describing_bound(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """Most bytes a self-describing section of this layout can take (any precision, any mask):
    bounds decompression by the layout the receiver expects, not by the generic limits."""
    total = _TABLE_HEAD.size
    for name, shape in zip(names, shapes, strict=True):
        n = int(np.prod(shape))
        total += 2 + len(name.encode()) + 4 * len(shape) + _ENTRY_FIXED.size  # table entry
        total += (n + 7) // 8 + 8  # mask: never larger than the bitmap plus its parameters
        # values: the widest precision, per-channel scales, a coding byte
        total += (n * _WIDEST_BITS + 7) // 8 + 4 * n_channels(shape) + 1
    return total


@dataclass
class DecodedTensors:
    names: list[str]
    tensors: list[np.ndarray]
    masks: list[np.ndarray | None]
    precision: Precision | None  # None when tensors use different precisions


def decode_self_describing(
    body: bytes | memoryview,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Sequence[tuple[str, Sequence[int]]] | None = None,
) -> DecodedTensors:
    """Inverse of ``encode_self_describing``.

    ``expected`` (name, shape) pairs, when given, must match the table exactly, so a receiver that
    knows the architecture never allocates for a layout it did not ask for.
    """
    view = memoryview(body)
    r = ByteReader(view)
    count = r.unpack(_TABLE_HEAD)[0]
    if count > limits.max_tensors:
        raise CodecError(f"{count} tensors exceed the limit of {limits.max_tensors}")
    if expected is not None and count != len(expected):
        raise CodecError(f"table lists {count} tensors, expected {len(expected)}")
    entries = []
    total_elements = 0
    data_bytes = least_bytes = 0
    for i in range(count):
        name_len = r.byte()
        try:
            name = bytes(r.take(name_len)).decode()
        except UnicodeDecodeError:
            raise CodecError(f"tensor {i}: name is not UTF-8") from None
        ndim = r.byte()
        if ndim > limits.max_ndim:
            raise CodecError(f"tensor {name!r}: rank {ndim} exceeds {limits.max_ndim}")
        shape = tuple(struct.unpack(f"<{ndim}I", r.take(4 * ndim)))
        dtype, pid, flags, method, kept, mask_len = r.unpack(_ENTRY_FIXED)
        size = nonzero = 1
        for d in shape:
            size *= d
            nonzero *= max(d, 1)
        if nonzero > limits.max_elements:  # also catches (0, 2**32-1, 2**32-1): size 0, unindexable
            raise CodecError(f"tensor {name!r}: shape {shape} holds more than {limits.max_elements} elements")
        total_elements += size
        if total_elements > limits.max_elements:
            raise CodecError(f"tensors hold more than {limits.max_elements} elements")
        if expected is not None and (name, shape) != (expected[i][0], tuple(int(d) for d in expected[i][1])):
            raise CodecError(f"tensor {i} is {name!r} {shape}, expected {expected[i][0]!r} {tuple(expected[i][1])}")
        if dtype != _DTYPE_FLOAT32:
            raise CodecError(f"tensor {name!r}: unknown dtype id {dtype}")
        try:
            p = precision_with_wire_id(pid)
        except ValueError:
            raise CodecError(f"tensor {name!r}: unknown precision id {pid}") from None
        if flags & ~_FLAG_MASKED:
            raise CodecError(f"tensor {name!r}: unknown flags {flags:#x}")
        if kept > size:
            raise CodecError(f"tensor {name!r}: {kept} kept of {size} positions")
        masked = bool(flags & _FLAG_MASKED)
        if not masked and (method != MaskMethod.ALL_KEPT or kept != size or mask_len):
            raise CodecError(f"tensor {name!r}: unmasked tensor with a mask")
        c = section_channels(shape, p)
        vsize = p.section_size(kept, c)
        entries.append((name, shape, size, p, masked, method, kept, mask_len))
        data_bytes += mask_len + vsize
        # at least: the mask, and the values' scales and coding byte (all of a float section)
        least_bytes += mask_len + (vsize if not p.coding_bytes else 4 * p.n_scales(kept, c) + p.coding_bytes)
    # Every length is checked before any mask or value is decoded (or allocated); value sections
    # may be entropy-coded, so the table bounds the data, and the tensors must then use it all.
    if least_bytes > r.remaining:
        raise CodecError(f"section ends early: the table needs at least {least_bytes} bytes of tensor data, "
                         f"{r.remaining} left")
    if data_bytes < r.remaining:
        raise CodecError(f"{r.remaining - data_bytes} bytes left over after the {data_bytes} the table allows")
    names, tensors, masks, precisions = [], [], [], set()
    for name, shape, size, p, masked, method, kept, mask_len in entries:
        mask_bytes = r.take(mask_len)
        if masked:
            flat = decode_mask(method, mask_bytes, size, kept)  # checks kept and every byte
            positions = None if kept == size else np.flatnonzero(flat)
        else:
            flat, positions = None, None
        channels, c = _channels(shape, positions, p)
        values, used = p.read(view[r.pos :], kept, channels=channels, n_channels=c)
        r.take(used)
        names.append(name)
        tensors.append(_scatter(shape, positions, values))
        masks.append(None if flat is None else flat.reshape(shape))
        precisions.add(p)
    if r.remaining:
        raise CodecError(f"{r.remaining} bytes left over after the last tensor")
    return DecodedTensors(names, tensors, masks, precisions.pop() if len(precisions) == 1 else None)


# --- lossless stage --------------------------------------------------------------------------------


class Compression(IntEnum):
    NONE = 0
    ZLIB = 1
    ZSTD = 2


def compress(section: bytes, method: "Compression | str") -> tuple[Compression, bytes]:
    """Compress when it makes the section smaller; returns what was used and the bytes."""
    m = Compression[method.upper()] if isinstance(method, str) else Compression(method)
    if m is Compression.NONE or not section:
        return Compression.NONE, section
    if m is Compression.ZLIB:
        packed = zlib.compress(section, 6)
    else:
        import zstandard

        packed = zstandard.ZstdCompressor(level=3).compress(section)
    return (m, packed) if len(packed) < len(section) else (Compression.NONE, section)


def decompress(data: bytes | memoryview, method: int, raw_len: int, max_len: int) -> bytes:
    """Inverse of ``compress``; refuses to produce more than ``raw_len`` (<= ``max_len``) bytes."""
    if raw_len > max_len:
        raise CodecError(f"decompressed size {raw_len} exceeds the limit of {max_len}")
    if raw_len < 0:
        raise CodecError(f"decompressed size {raw_len} is negative")
    try:
        if method == Compression.NONE:
            out = bytes(data)
        elif method == Compression.ZLIB:
            if raw_len == 0:
                raise CodecError("a compressed section cannot be empty")
            d = zlib.decompressobj()
            out = d.decompress(bytes(data), raw_len + 1)  # never more than one byte past the claim
            if not d.eof or d.unconsumed_tail or d.unused_data:
                raise CodecError("zlib stream is truncated or has trailing data")
        elif method == Compression.ZSTD:
            import zstandard

            # The frame must declare its size, equal to the claim; zstd checks the content against
            # it, so the output is bounded before anything is decompressed.
            if zstandard.frame_content_size(bytes(data[:18])) != raw_len:
                raise CodecError("zstd frame does not declare the claimed size")
            d = zstandard.ZstdDecompressor().decompressobj()
            out = d.decompress(bytes(data))
            if not d.eof or d.unused_data:
                raise CodecError("zstd stream is truncated or has trailing data")
        else:
            raise CodecError(f"unknown compression {method}")
    except (zlib.error, MemoryError) as e:
        raise CodecError(f"cannot decompress: {e}") from None
    except CodecError:
        raise
    except Exception as e:  # noqa: BLE001 - zstandard raises its own ZstdError
        raise CodecError(f"cannot decompress: {type(e).__name__}: {e}") from None
    if len(out) != raw_len:
        raise CodecError(f"decompressed {len(out)} bytes, header says {raw_len}")
    return out

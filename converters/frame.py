"""The message frame every binary fedprune message travels in.

Layout (integers little-endian)::

    magic    4 bytes  b"FPRN"
    version  u8       FRAME_VERSION
    kind     u8       what the message is (fedprune.converters.protocol.Kind)
    hlen     u32      length of the JSON header; 0 for kinds whose body starts with a binary header
    header   hlen bytes of UTF-8 JSON (an object)
    body     the rest up to the checksum
    crc32    u32      zlib.crc32 of every byte before it

The frame is checked (length limit, magic, version, header length, checksum) before anything in
it is interpreted.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from fedprune.converters.errors import CodecError

MAGIC = b"FPRN"
FRAME_VERSION = 4  # 4: entropy-coded integer values; 3: compact update header; 2: signed aggregator messages; any other version is refused
PREFIX = struct.Struct("<4sBBI")
CRC = struct.Struct("<I")
FRAME_OVERHEAD = PREFIX.size + CRC.size
MAX_HEADER_BYTES = 64 * 1024


def pack_frame(kind: int, header: dict[str, Any] | None, body: bytes = b"") -> bytes:
    head = b"" if header is None else json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    data = PREFIX.pack(MAGIC, FRAME_VERSION, kind, len(head)) + head + body
    return data + CRC.pack(zlib.crc32(data))


class SharedBodyFrames:
    """Header-less frames of one ``kind`` whose bodies all start with the same long ``shared``
    bytes and end with a short tail of their own: ``frame(tail) == pack_frame(kind, None, shared +
    tail)``. The shared part is checksummed once, not once per frame (a task signed for each of the
    devices a round selects: the same payload, then each device's signature)."""

    def __init__(self, kind: int, shared: bytes) -> None:
        self._prefix = PREFIX.pack(MAGIC, FRAME_VERSION, kind, 0)
        self._shared = bytes(shared)
        self._crc = zlib.crc32(self._shared, zlib.crc32(self._prefix))  # CRC-32 continues across parts

    def frame(self, tail: bytes) -> bytes:
        return b"".join((self._prefix, self._shared, tail, CRC.pack(zlib.crc32(tail, self._crc))))


def unpack_frame(data: bytes, max_bytes: int) -> tuple[int, dict[str, Any], memoryview]:
    """Check and split a frame; returns ``(kind, header, body)`` (header ``{}`` when absent)."""
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < FRAME_OVERHEAD:
        raise CodecError(f"payload of {len(data)} bytes is shorter than a frame")
    magic, version, kind, hlen = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("not a fedprune frame (bad magic)")
    if version != FRAME_VERSION:
        raise CodecError(f"frame version {version} not supported: this side speaks protocol version "
                         f"{FRAME_VERSION}; upgrade the side that sent it (fedprune-agent and "
                         "fedprune-aggregator must speak the same version)")
    if hlen > MAX_HEADER_BYTES or PREFIX.size + hlen + CRC.size > len(data):
        raise CodecError(f"header length {hlen} does not fit a {len(data)}-byte payload")
    (crc,) = CRC.unpack_from(data, len(data) - CRC.size)
    view = memoryview(data)
    if zlib.crc32(view[: len(data) - CRC.size]) != crc:
        raise CodecError("checksum mismatch (payload corrupted or truncated)")
    header: Any = {}
    if hlen:
        try:
            header = json.loads(bytes(view[PREFIX.size : PREFIX.size + hlen]))
        except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, 5000-digit ints, deep nesting
            raise CodecError(f"header is not JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise CodecError("header is not a JSON object")
    return kind, header, view[PREFIX.size + hlen : len(data) - CRC.size]


def peek_kind(data: bytes) -> int | None:
    """The kind byte of something that looks like a frame, else None (no checksum check)."""
    if len(data) >= FRAME_OVERHEAD and data[:4] == MAGIC:
        return data[5]
    return None


class ByteReader:
    """Reads a buffer front to back; asking for more than is left is a CodecError."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    @property
    def remaining(self) -> int:
        return len(self.view) - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CodecError(f"section ends early: {n} bytes needed at offset {self.pos}, {self.remaining} left")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def unpack(self, s: struct.Struct) -> tuple:
        return s.unpack(self.take(s.size))

    def varint(self, largest: int, what: str) -> int:
        """An unsigned LEB128 integer (``pack_varint``) of at most ``largest``; a CodecError names
        ``what`` when it is larger, runs past the end, or is not in its shortest form."""
        value = shift = 0
        start = self.pos
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if value > largest:
                raise CodecError(f"{what} at offset {start} exceeds {largest}")
            if not b & 0x80:
                if b == 0 and self.pos - start > 1:
                    raise CodecError(f"{what} at offset {start} is not in its shortest form")
                return value
            shift += 7


def pack_varint(value: int) -> bytes:
    """``value`` (>= 0) as unsigned LEB128: seven bits a byte, least significant first, the top bit
    set on every byte but the last (0-127 take one byte, up to 16,383 two)."""
    if value < 0:
        raise ValueError(f"a varint is unsigned, got {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)

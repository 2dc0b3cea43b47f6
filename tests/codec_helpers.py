"""Assertions shared by the codec and protocol tests: a decoder answers CodecError or nothing."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import strategies as st

from fedprune.converters.errors import CodecError


def expect_codec_error(fn, *args, match: str | None = None, **kwargs) -> CodecError:
    """``fn`` must refuse with a CodecError (whose reason contains ``match``), nothing else."""
    try:
        fn(*args, **kwargs)
    except CodecError as e:
        if match is not None:
            assert match in e.reason, e.reason
        return e
    except Exception as e:  # noqa: BLE001 - the point of the helper
        pytest.fail(f"{type(e).__name__} escaped {fn.__name__}: {e}")
    pytest.fail(f"{fn.__name__} accepted bad input")


def decode_or_codec_error(fn, *args, **kwargs):
    """The decoded value, or None when ``fn`` refused with a CodecError (any other error fails)."""
    try:
        return fn(*args, **kwargs)
    except CodecError:
        return None


def mutate(data: bytes, draw) -> bytes:
    """One random edit of ``data``: flip a byte, truncate, extend, splice or delete a run."""
    op = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "delete"]))
    n = len(data)
    if op == "flip":
        i = draw(st.integers(0, n - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if op == "truncate":
        return data[: draw(st.integers(0, n - 1))]
    if op == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    i = draw(st.integers(0, n - 1))
    j = draw(st.integers(i, min(n, i + 16)))
    if op == "delete":
        return data[:i] + data[j:]
    return data[:i] + draw(st.binary(max_size=16)) + data[j:]




def recrc(data: bytes) -> bytes:
    """``data`` with its trailing frame CRC recomputed (zlib.crc32 of all but the last 4 bytes, LE),
    so that an edit reaches the checks behind the checksum."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])) if len(data) >= 4 else data

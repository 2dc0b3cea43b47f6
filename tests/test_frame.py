"""Tests for fedprune.converters.frame: the binary message frame and ByteReader.

Every byte string handed to ``unpack_frame`` comes from the network: it either unpacks or raises
``CodecError`` (and nothing else), whichever check it fails.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.converters.errors import CodecError
from fedprune.converters.frame import (
    CRC,
    FRAME_OVERHEAD,
    FRAME_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX,
    ByteReader,
    pack_varint,
    pack_frame,
    peek_kind,
    unpack_frame,
)

PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX = 1 << 20


def raw_frame(kind: int, head: bytes, body: bytes = b"", *, magic: bytes = MAGIC,
              version: int = FRAME_VERSION, hlen: int | None = None) -> bytes:
    """A frame built by hand with a correct CRC, so that each later check is reached on its own."""
    data = PREFIX.pack(magic, version, kind, len(head) if hlen is None else hlen) + head + body
    return data + CRC.pack(zlib.crc32(data))


def unpack_codec_error(data: bytes, max_bytes: int = MAX, match: str | None = None) -> CodecError:
    """unpack_frame must raise exactly CodecError (not a subclass, not anything else)."""
    try:
        unpack_frame(data, max_bytes)
    except CodecError as e:
        assert type(e) is CodecError
        assert e.reason == str(e) and e.reason
        if match is not None:
            assert match in e.reason, e.reason
        return e
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__} escaped unpack_frame: {e}")
    pytest.fail("unpack_frame accepted a bad frame")


# --------------------------------------------------------------------------- layout and round trips


def test_constants_and_overhead():
    assert MAGIC == b"FPRN" and FRAME_VERSION == 4
    assert PREFIX.size == 10 and CRC.size == 4 and FRAME_OVERHEAD == 14
    assert issubclass(CodecError, ValueError)
    e = CodecError("why")
    assert e.reason == "why" and str(e) == "why"


def test_layout_is_the_documented_one():
    header = {"a": 1}
    data = pack_frame(7, header, b"BODY")
    head = json.dumps(header, separators=(",", ":")).encode()
    assert data[:4] == MAGIC and data[4] == FRAME_VERSION and data[5] == 7
    assert struct.unpack_from("<I", data, 6)[0] == len(head)
    assert data[10 : 10 + len(head)] == head
    assert data[10 + len(head) : -4] == b"BODY"
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    assert len(data) == FRAME_OVERHEAD + len(head) + 4


def test_round_trip_with_header():
    header = {"a": 1, "b": [1, 2, "x"], "c": {"d": None}, "e": 0.5, "f": "ünï"}
    data = pack_frame(7, header, b"\x00\x01body")
    kind, h, body = unpack_frame(data, len(data))  # exactly at the limit is fine
    assert kind == 7 and h == header and bytes(body) == b"\x00\x01body"
    assert isinstance(body, memoryview)


def test_round_trip_empty_header_object_and_empty_body():
    data = pack_frame(2, {})
    kind, h, body = unpack_frame(data, MAX)
    assert (kind, h, bytes(body)) == (2, {}, b"")
    assert struct.unpack_from("<I", data, 6)[0] == 2  # "{}" travels


@pytest.mark.parametrize("body", [b"", b"x", bytes(range(256)) * 5])
def test_header_less_frames(body):
    data = pack_frame(3, None, body)
    assert struct.unpack_from("<I", data, 6)[0] == 0
    assert len(data) == FRAME_OVERHEAD + len(body)
    kind, h, got = unpack_frame(data, MAX)
    assert (kind, h, bytes(got)) == (3, {}, body)


def test_body_that_looks_like_json_is_not_parsed_when_hlen_is_zero():
    kind, h, body = unpack_frame(pack_frame(1, None, b"[1, 2"), MAX)
    assert h == {} and bytes(body) == b"[1, 2"


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 255])
def test_every_kind_byte_travels(kind):
    assert unpack_frame(pack_frame(kind, None), MAX)[0] == kind
    assert peek_kind(pack_frame(kind, {"x": 1})) == kind


def test_peek_kind():
    assert peek_kind(b"") is None
    assert peek_kind(MAGIC + b"\x01\x02") is None  # shorter than a frame
    assert peek_kind(b"XPRN" + bytes(10)) is None
    assert peek_kind(raw_frame(9, b"", version=77)) == 9  # no version or checksum check
    assert peek_kind(pack_frame(4, None)[:-1] + b"\x00") == 4


def test_header_at_the_size_limit_is_accepted_and_one_more_byte_is_refused():
    pad = MAX_HEADER_BYTES - len(json.dumps({"x": ""}, separators=(",", ":")))
    data = pack_frame(1, {"x": "y" * pad})
    assert struct.unpack_from("<I", data, 6)[0] == MAX_HEADER_BYTES
    assert unpack_frame(data, MAX)[1] == {"x": "y" * pad}
    with pytest.raises(ValueError):
        pack_frame(1, {"x": "y" * (pad + 1)})


# --------------------------------------------------------------------------- rejections


VALID = pack_frame(2, {"k": "v"}, b"payload")


@pytest.mark.parametrize(
    "data,max_bytes,match",
    [
        pytest.param(VALID, len(VALID) - 1, "exceeds the limit", id="too-long"),
        pytest.param(VALID, 0, "exceeds the limit", id="too-long-zero-limit"),
        pytest.param(b"", MAX, "shorter than a frame", id="empty"),
        pytest.param(VALID[:FRAME_OVERHEAD - 1], MAX, "shorter than a frame", id="too-short"),
        pytest.param(MAGIC, MAX, "shorter than a frame", id="magic-only"),
        pytest.param(raw_frame(2, b"{}", magic=b"XPRN"), MAX, "bad magic", id="bad-magic"),
        pytest.param(raw_frame(2, b"{}", magic=b"fprn"), MAX, "bad magic", id="magic-case"),
        pytest.param(bytes(FRAME_OVERHEAD), MAX, "bad magic", id="zeros"),
        pytest.param(raw_frame(2, b"{}", version=0), MAX, "version 0", id="version-0"),
        pytest.param(raw_frame(2, b"{}", version=1), MAX, "version 1 not supported: this side speaks protocol "
                     "version 4; upgrade the side that sent it", id="version-1"),
        pytest.param(raw_frame(2, b"{}", version=2), MAX, "version 2 not supported: this side speaks protocol "
                     "version 4; upgrade the side that sent it", id="version-2"),
        pytest.param(raw_frame(2, b"{}", version=3), MAX, "version 3 not supported: this side speaks protocol "
                     "version 4; upgrade the side that sent it", id="version-3"),
        pytest.param(raw_frame(2, b"{}", version=FRAME_VERSION + 1), MAX, "version 5", id="version-5"),
        pytest.param(raw_frame(2, b"{}", version=255), MAX, "version 255", id="version-255"),
        pytest.param(raw_frame(2, b"{}", hlen=3), MAX, "header length 3", id="hlen-past-end"),
        pytest.param(raw_frame(2, b"", hlen=1), MAX, "header length 1", id="hlen-1-empty"),
        pytest.param(raw_frame(2, b"{}" * 40000, hlen=MAX_HEADER_BYTES + 1), MAX, "header length",
                     id="hlen-over-max-but-fits"),
        pytest.param(raw_frame(2, b"{}", hlen=0xFFFFFFFF), MAX, "header length", id="hlen-u32-max"),
        pytest.param(VALID[:-1] + bytes([VALID[-1] ^ 1]), MAX, "checksum", id="crc-bit"),
        pytest.param(VALID[:12] + bytes([VALID[12] ^ 0x20]) + VALID[13:], MAX, "checksum", id="header-bit"),
        pytest.param(VALID[:-5] + VALID[-4:], MAX, "checksum", id="body-byte-deleted"),
        pytest.param(VALID[:-4] + b"\x00" * 4, MAX, "checksum", id="crc-zeroed"),
        pytest.param(VALID + b"\x00", MAX, "checksum", id="byte-appended"),
        pytest.param(raw_frame(2, b"{not json"), MAX, "not JSON", id="not-json"),
        pytest.param(raw_frame(2, b"\xff\xfe\x00"), MAX, "not JSON", id="not-utf8"),
        pytest.param(raw_frame(2, b'{"a": 1} x'), MAX, "not JSON", id="trailing-garbage"),
        pytest.param(raw_frame(2, b"{", b"}"), MAX, "not JSON", id="header-split-from-body"),
        pytest.param(raw_frame(2, b"[1, 2]"), MAX, "not a JSON object", id="array"),
        pytest.param(raw_frame(2, b'"text"'), MAX, "not a JSON object", id="string"),
        pytest.param(raw_frame(2, b"null"), MAX, "not a JSON object", id="null"),
        pytest.param(raw_frame(2, b"42"), MAX, "not a JSON object", id="number"),
        pytest.param(raw_frame(2, b"NaN"), MAX, "not a JSON object", id="nan"),
        pytest.param(raw_frame(2, b"[" * 60000), MAX, "not JSON", id="deep-unclosed"),
        pytest.param(raw_frame(2, b"[" * 30000 + b"]" * 30000), MAX, "not JSON", id="deep-nesting"),
        pytest.param(raw_frame(2, b'{"a":' * 10000 + b"1" + b"}" * 10000), MAX, "not JSON",
                     id="deep-objects"),
        pytest.param(raw_frame(2, b'{"round":' + b"9" * 5000 + b"}"), MAX, "not JSON", id="huge-int"),
        pytest.param(raw_frame(2, b'{"x":-' + b"1" * 50000 + b"}"), MAX, "not JSON", id="huger-int"),
    ],
)
def test_unpack_frame_rejections_raise_only_codec_error(data, max_bytes, match):
    unpack_codec_error(data, max_bytes, match)


def test_checks_run_in_the_documented_order():
    # too long wins over everything; the checksum is checked before the header is parsed
    assert "exceeds" in unpack_codec_error(b"XXXX" * 10, 8).reason
    assert "magic" in unpack_codec_error(b"XPRN" + bytes([0]) + bytes(20)).reason
    assert "version" in unpack_codec_error(raw_frame(2, b"{}", version=9)[:-1] + b"\x00").reason
    assert "header length" in unpack_codec_error(raw_frame(2, b"", hlen=9)[:-1] + b"\x00").reason
    assert "checksum" in unpack_codec_error(raw_frame(2, b"not json")[:-1] + b"\x00").reason


def test_huge_int_header_is_refused_fast():
    import time

    data = raw_frame(2, b'{"x":' + b"7" * 60000 + b"}")
    t = time.perf_counter()
    unpack_codec_error(data, MAX, "not JSON")
    assert time.perf_counter() - t < 2.0


# --------------------------------------------------------------------------- ByteReader


def test_byte_reader_reads_front_to_back():
    r = ByteReader(memoryview(b"\x01\x02\x03\x04\x05\x06\x07"))
    assert r.remaining == 7 and r.pos == 0
    assert r.byte() == 1
    assert bytes(r.take(2)) == b"\x02\x03"
    assert r.unpack(struct.Struct("<H")) == (0x0504,)
    assert r.remaining == 2 and r.pos == 5
    assert bytes(r.take(0)) == b"" and r.pos == 5
    assert bytes(r.take(2)) == b"\x06\x07"
    assert r.remaining == 0
    assert bytes(r.take(0)) == b""


def test_byte_reader_returns_views_not_copies():
    buf = bytearray(b"abcdef")
    r = ByteReader(memoryview(buf))
    v = r.take(3)
    assert isinstance(v, memoryview)
    buf[0] = ord("z")
    assert bytes(v) == b"zbc"


@pytest.mark.parametrize(
    "n_before,op",
    [
        (0, lambda r: r.take(5)),
        (4, lambda r: r.take(1)),
        (4, lambda r: r.byte()),
        (3, lambda r: r.unpack(struct.Struct("<H"))),
        (0, lambda r: r.unpack(struct.Struct("<Q"))),
        (0, lambda r: r.take(-1)),
        (2, lambda r: r.take(-2)),
        (0, lambda r: r.take(2**62)),
    ],
)
def test_byte_reader_bounds(n_before, op):
    r = ByteReader(memoryview(b"\x01\x02\x03\x04"))
    r.take(n_before)
    with pytest.raises(CodecError, match="ends early") as info:
        op(r)
    assert type(info.value) is CodecError
    assert r.pos == n_before  # a failed read consumes nothing
    assert bytes(r.take(r.remaining)) == b"\x01\x02\x03\x04"[n_before:]


def test_byte_reader_on_an_empty_buffer():
    r = ByteReader(memoryview(b""))
    assert r.remaining == 0 and bytes(r.take(0)) == b""
    with pytest.raises(CodecError):
        r.byte()


# --------------------------------------------------------------------------- properties


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8) | st.floats(
    allow_nan=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@PROP
@given(kind=st.integers(0, 255), header=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=5),
       body=st.binary(max_size=300))
def test_round_trip_property(kind, header, body):
    data = pack_frame(kind, header, body)
    k, h, b = unpack_frame(data, len(data))
    assert k == kind and h == (header or {}) and bytes(b) == body


@PROP
@given(data=st.binary(max_size=200), max_bytes=st.integers(0, 400))
def test_random_bytes_unpack_or_raise_codec_error(data, max_bytes):
    try:
        unpack_frame(data, max_bytes)
    except CodecError:
        pass


@PROP
@given(kind=st.integers(0, 255), version=st.sampled_from([FRAME_VERSION, FRAME_VERSION, 0, 1, 2, 3, 5]),
       head=st.binary(max_size=64) | st.text(max_size=30).map(str.encode), body=st.binary(max_size=64),
       hlen_delta=st.integers(-3, 3))
def test_frames_with_valid_crc_unpack_or_raise_codec_error(kind, version, head, body, hlen_delta):
    data = raw_frame(kind, head, body, version=version, hlen=max(0, len(head) + hlen_delta))
    try:
        k, h, b = unpack_frame(data, MAX)
    except CodecError:
        return
    assert k == kind and isinstance(h, dict) and isinstance(b, memoryview)
    assert len(data) == FRAME_OVERHEAD + struct.unpack_from("<I", data, 6)[0] + len(b)


@PROP
@given(header=st.dictionaries(st.text(max_size=6), json_values, max_size=4), body=st.binary(max_size=64),
       data=st.data())
def test_any_single_corruption_is_detected(header, body, data):
    """Without recomputing the CRC, any change of one byte, truncation or extension fails."""
    frame = pack_frame(2, header, body)
    op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if op == "flip":
        i = data.draw(st.integers(0, len(frame) - 1))
        bad = frame[:i] + bytes([frame[i] ^ data.draw(st.integers(1, 255))]) + frame[i + 1:]
    elif op == "truncate":
        bad = frame[: data.draw(st.integers(0, len(frame) - 1))]
    else:
        bad = frame + data.draw(st.binary(min_size=1, max_size=8))
    unpack_codec_error(bad)


# --------------------------------------------------------------------------- varints


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"), (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"), (2**32 - 1, b"\xff\xff\xff\xff\x0f"),
])
def test_varints_are_leb128(value, encoded):
    assert pack_varint(value) == encoded
    r = ByteReader(memoryview(encoded + b"rest"))
    assert r.varint(2**32 - 1, "n") == value and r.remaining == 4


@pytest.mark.parametrize("data,largest,match", [
    (b"\x80\x00", 2**32, "not in its shortest form"),  # 0 in two bytes
    (b"\x81\x80\x00", 2**32, "not in its shortest form"),
    (b"\x80", 2**32, "ends early"),
    (b"", 10, "ends early"),
    (b"\x0b", 10, "exceeds 10"),
    (b"\x80\x80\x80\x80\x10", 2**32 - 1, "exceeds 4294967295"),
    (b"\xff" * 100000, 2**63, "exceeds"),  # stops at the limit, not at the end of the buffer
], ids=["overlong-0", "overlong-1", "truncated", "empty", "over-limit", "over-u32", "endless"])
def test_varints_that_are_refused(data, largest, match):
    with pytest.raises(CodecError, match=match):
        ByteReader(memoryview(data)).varint(largest, "n")


def test_pack_varint_refuses_negative_numbers():
    with pytest.raises(ValueError, match="unsigned"):
        pack_varint(-1)


@PROP
@given(value=st.integers(0, 2**64))
def test_varints_round_trip_in_their_shortest_form(value):
    data = pack_varint(value)
    assert len(data) == max(1, -(-value.bit_length() // 7))
    assert ByteReader(memoryview(data)).varint(2**64, "n") == value

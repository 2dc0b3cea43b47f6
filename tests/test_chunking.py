"""Tests for fedprune.converters.chunking: splitting oversize messages into chunk frames and reassembling.

Chunks come from the network: whatever arrives must reassemble, wait, or raise ``CodecError``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import struct
import threading
import zlib

import pytest
from codec_helpers import recrc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.converters.chunking import (
    CHUNK_KIND,
    CHUNK_OVERHEAD,
    Reassembler,
    is_chunk,
    split_message,
)
from fedprune.converters.errors import CodecError
from fedprune.converters.frame import pack_frame, unpack_frame

PROP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHUNK_HEADER = struct.Struct("<16sIIQ32s")
MAX_MSG = 1 << 16


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def parts(chunk: bytes) -> tuple[bytes, int, int, int, bytes, bytes]:
    """``(message_id, index, count, total, sha256, slice)`` of a chunk."""
    kind, _, body = unpack_frame(chunk, 1 << 30)
    assert kind == CHUNK_KIND
    return (*CHUNK_HEADER.unpack_from(body), bytes(body[CHUNK_HEADER.size :]))


def make_chunk(message_id: bytes, index: int, count: int, total: int, digest: bytes, data: bytes) -> bytes:
    """A chunk built by hand (valid CRC), so each check can be reached on its own."""
    return pack_frame(CHUNK_KIND, None, CHUNK_HEADER.pack(message_id, index, count, total, digest) + data)


def reassemble(chunks: list[bytes], r: Reassembler | None = None, source: str = "dev") -> bytes | None:
    r = r or Reassembler(MAX_MSG)
    results = [r.add(source, c) for c in chunks]
    assert all(x is None for x in results[:-1])
    return results[-1]


# --------------------------------------------------------------------------- split + reassemble


def test_overhead_is_80_bytes() -> None:
    assert CHUNK_OVERHEAD == 78
    chunks = split_message(bytes(1000), 100 + CHUNK_OVERHEAD)
    assert all(len(c) == 100 + CHUNK_OVERHEAD for c in chunks)


@pytest.mark.parametrize("max_chunk", [CHUNK_OVERHEAD + 1, CHUNK_OVERHEAD + 7, 200, 1000])
@pytest.mark.parametrize("extra", [-1, 0, 1, 2])
def test_sizes_around_boundaries(max_chunk: int, extra: int) -> None:
    for size in (0, 1, max_chunk + extra, 2 * max_chunk + extra, 3 * max_chunk + extra):
        payload = os.urandom(size)
        chunks = split_message(payload, max_chunk)
        assert all(len(c) <= max_chunk for c in chunks)
        if size <= max_chunk:
            assert chunks == [payload] and chunks[0] is payload
            continue
        assert all(is_chunk(c) for c in chunks)
        assert len(chunks) == -(-size // (max_chunk - CHUNK_OVERHEAD))
        assert reassemble(chunks) == payload


def test_exactly_max_is_not_split_and_max_plus_one_is() -> None:
    payload = os.urandom(500)
    assert split_message(payload, 500) == [payload]
    chunks = split_message(payload, 499)
    assert len(chunks) == 2 and all(len(c) <= 499 for c in chunks)
    assert reassemble(chunks) == payload


def test_many_chunks_in_random_order() -> None:
    payload = os.urandom(20_000)
    chunks = split_message(payload, CHUNK_OVERHEAD + 37)
    assert len(chunks) == -(-20_000 // 37)
    rnd = random.Random(7)
    for _ in range(5):
        rnd.shuffle(chunks)
        assert reassemble(chunks) == payload


def test_chunk_metadata() -> None:
    payload = os.urandom(1000)
    mid = bytes(range(16))
    chunks = split_message(payload, 378, message_id=mid)
    digest = hashlib.sha256(payload).digest()
    for i, c in enumerate(chunks):
        m, index, count, total, sha, data = parts(c)
        assert (m, index, count, total, sha) == (mid, i, len(chunks), 1000, digest)
        assert data == payload[i * 300 : (i + 1) * 300]
    # random message ids otherwise
    assert parts(split_message(payload, 378)[0])[0] != parts(split_message(payload, 378)[0])[0]


def test_split_refuses_what_cannot_progress() -> None:
    for bad in (CHUNK_OVERHEAD, 10, 1):
        with pytest.raises(ValueError):
            split_message(bytes(1000), bad)
    for bad in (0, -5):
        with pytest.raises(ValueError):
            split_message(b"", bad)
    with pytest.raises(ValueError):
        split_message(bytes(1000), 200, message_id=b"short")
    assert split_message(b"abc", 3) == [b"abc"]  # fits: no room for a chunk header needed


def test_is_chunk() -> None:
    assert is_chunk(split_message(bytes(300), 100)[0])
    assert not is_chunk(b"")
    assert not is_chunk(b"FPRN")
    assert not is_chunk(pack_frame(2, {}, b"x"))
    assert not is_chunk(b'{"v": 1}')


# --------------------------------------------------------------------------- missing, duplicate, expiry


def test_missing_chunk_is_named_then_expires() -> None:
    clock = FakeClock()
    r = Reassembler(MAX_MSG, timeout_s=60, clock=clock)
    payload = os.urandom(1000)
    mid = os.urandom(16)
    chunks = split_message(payload, 178, message_id=mid)  # 10 chunks of 100 bytes
    assert len(chunks) == 10
    for i, c in enumerate(chunks):
        if i != 4:
            assert r.add("dev", c) is None
    assert r.missing("dev", mid) == [4]
    assert r.missing("other", mid) == []
    assert r.pending_bytes == 900
    clock.now = 59
    assert r.pending_bytes == 900 and r.expired == 0
    clock.now = 61
    assert r.pending_bytes == 0
    assert r.expired == 1
    assert r.missing("dev", mid) == []
    # the late chunk now opens a new message that waits for the other nine
    assert r.add("dev", chunks[4]) is None
    assert r.missing("dev", mid) == [i for i in range(10) if i != 4]


def test_duplicate_chunk_raises_and_keeps_the_message() -> None:
    r = Reassembler(MAX_MSG)
    payload = os.urandom(1000)
    chunks = split_message(payload, 378)
    assert r.add("dev", chunks[0]) is None
    with pytest.raises(CodecError, match="^duplicate chunk"):
        r.add("dev", chunks[0])
    assert r.add("dev", chunks[1]) is None
    assert r.add("dev", chunks[2]) is None
    assert r.add("dev", chunks[3]) == payload
    # a duplicate after completion is still a duplicate, not a new message
    r2 = Reassembler(MAX_MSG)
    assert reassemble(chunks, r2) == payload
    with pytest.raises(CodecError, match="^duplicate chunk"):
        r2.add("dev", chunks[1])
    assert r2.pending_bytes == 0


def test_completion_returns_payload_once() -> None:
    r = Reassembler(MAX_MSG)
    payload = os.urandom(1000)
    chunks = split_message(payload, 378)
    results = [r.add("dev", c) for c in chunks]
    assert results == [None] * (len(chunks) - 1) + [payload]
    assert r.pending_bytes == 0 and r.completed == 1


# --------------------------------------------------------------------------- conflicting / invalid


def test_conflicting_metadata_raises() -> None:
    payload = os.urandom(1000)
    mid = os.urandom(16)
    digest = hashlib.sha256(payload).digest()
    first = make_chunk(mid, 0, 4, 1000, digest, payload[:300])
    conflicts = {
        "chunk count": make_chunk(mid, 1, 5, 1000, digest, payload[300:500]),  # fits 5 x 200
        "total length": make_chunk(mid, 1, 4, 1100, digest, payload[300:600]),
        "sha256": make_chunk(mid, 1, 4, 1000, os.urandom(32), payload[300:600]),
        "slice size": make_chunk(mid, 1, 4, 1000, digest, payload[300:550]),  # 4 x 250 also fits
    }
    for what, chunk in conflicts.items():
        r = Reassembler(MAX_MSG)
        r.add("dev", first)
        with pytest.raises(CodecError, match=f"conflicting {what}"):
            r.add("dev", chunk)
        assert r.pending_bytes == 300  # the bad chunk changed nothing
        assert r.missing("dev", mid) == [1, 2, 3]


@pytest.mark.parametrize(
    "index,count,total,size,why",
    [
        (4, 4, 1000, 100, "out of range"),
        (0, 0, 1000, 100, "out of range"),
        (0, 4, 1000, 0, "does not fit"),  # empty slice
        (0, 1, 1000, 999, "does not fit"),  # single chunk must carry everything
        (0, 4, 1000, 200, "does not fit"),  # 200-byte slices would need 5 chunks
        (3, 4, 1000, 101, "does not fit"),  # last slice: (1000-101)/3 not whole
        (3, 4, 1000, 400, "does not fit"),  # last slice larger than the others would be
        (0, 4, 100, 200, "does not fit"),  # slice longer than the message
    ],
)
def test_geometry_checked(index: int, count: int, total: int, size: int, why: str) -> None:
    r = Reassembler(MAX_MSG)
    with pytest.raises(CodecError, match=why):
        r.add("dev", make_chunk(os.urandom(16), index, count, total, bytes(32), bytes(size)))
    assert r.pending_bytes == 0 and r.pending_messages == 0


def test_last_chunk_first_fixes_slice_size() -> None:
    payload = os.urandom(1000)
    chunks = split_message(payload, 378)  # 300, 300, 300, 100
    r = Reassembler(MAX_MSG)
    assert r.add("dev", chunks[-1]) is None
    assert reassemble(chunks[:-1], r) == payload


def test_oversize_total_refused_before_buffering() -> None:
    r = Reassembler(max_message_bytes=1000)
    chunks = split_message(os.urandom(1001), 200)
    for c in chunks:
        with pytest.raises(CodecError, match="exceeds the limit"):
            r.add("dev", c)
    assert r.pending_bytes == 0 and r.pending_messages == 0
    # a lie about the total is refused from its header alone, however small the chunk
    with pytest.raises(CodecError, match="exceeds the limit"):
        r.add("dev", make_chunk(os.urandom(16), 0, 2**32 - 1, 2**64 - 1, bytes(32), b"x"))
    assert r.pending_bytes == 0
    assert reassemble(split_message(os.urandom(1000), 200), r) is not None  # exactly the limit is fine


def test_hash_mismatch_raises_and_drops() -> None:
    payload = os.urandom(1000)
    mid = os.urandom(16)
    chunks = split_message(payload, 378, message_id=mid)
    # flip a byte of the slice of chunk 2 and recompute the frame CRC: only the SHA-256 can tell
    tampered = bytearray(chunks[2])
    tampered[-10] ^= 0xFF
    tampered[-4:] = struct.pack("<I", zlib.crc32(bytes(tampered[:-4])))
    unpack_frame(bytes(tampered), 1 << 20)  # a valid frame
    r = Reassembler(MAX_MSG)
    r.add("dev", chunks[0])
    r.add("dev", chunks[1])
    r.add("dev", chunks[3])
    with pytest.raises(CodecError, match="hash mismatch"):
        r.add("dev", bytes(tampered))
    assert r.pending_bytes == 0 and r.pending_messages == 0 and r.missing("dev", mid) == []


def test_chunks_of_two_messages_with_the_same_id_do_not_mix() -> None:
    """Two versions of a message under one id (a sender bug or an attacker): never a hybrid."""
    mid = os.urandom(16)
    a, b = os.urandom(1000), os.urandom(1000)
    ca, cb = split_message(a, 378, message_id=mid), split_message(b, 378, message_id=mid)
    r = Reassembler(MAX_MSG)
    r.add("dev", ca[0])
    with pytest.raises(CodecError, match="conflicting sha256"):
        r.add("dev", cb[1])


def test_non_chunk_frames_refused() -> None:
    r = Reassembler(MAX_MSG)
    with pytest.raises(CodecError, match="not a chunk"):
        r.add("dev", pack_frame(2, {}, bytes(100)))
    with pytest.raises(CodecError, match="shorter than its"):
        r.add("dev", pack_frame(CHUNK_KIND, {}, bytes(63)))
    with pytest.raises(CodecError):
        r.add("dev", b"")
    with pytest.raises(CodecError, match="checksum"):
        chunk = split_message(bytes(300), 100)[0]
        r.add("dev", chunk[:-1] + bytes([chunk[-1] ^ 1]))  # (a zeroed byte was already 0 once in 256 runs)


# --------------------------------------------------------------------------- sources, eviction, threads


def test_two_sources_same_message_id_do_not_mix() -> None:
    mid = os.urandom(16)
    a, b = os.urandom(1000), os.urandom(1000)
    ca, cb = split_message(a, 378, message_id=mid), split_message(b, 378, message_id=mid)
    r = Reassembler(MAX_MSG)
    out = {}
    for x, y in zip(ca, cb):
        out["a"] = r.add("dev-a", x)
        out["b"] = r.add("dev-b", y)
    assert out == {"a": a, "b": b}
    # and the same chunks from another source are not duplicates
    assert reassemble(ca, r, source="dev-c") == a


def test_eviction_bounds_memory(caplog: pytest.LogCaptureFixture) -> None:
    r = Reassembler(max_message_bytes=1000, max_pending_per_source=3, max_source_bytes=3000)
    ids = [os.urandom(16) for _ in range(10)]
    msgs = [split_message(os.urandom(1000), 378, message_id=m) for m in ids]
    with caplog.at_level(logging.WARNING, logger="fedprune.converters.chunking"):
        for chunks in msgs:
            for c in chunks[:-1]:  # never complete
                assert r.add("dev", c) is None
            assert r.pending_messages <= 3
            assert r.pending_bytes <= 3 * 1000
    assert r.pending_messages == 3 and r.evicted == 7
    assert r.pending_bytes == 3 * 900
    assert sum("evicted" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING) == 7
    assert "more than 3 of its messages in progress" in caplog.text
    assert r.missing("dev", ids[0]) == []  # the oldest went first
    assert r.missing("dev", ids[-1]) == [3]
    assert r.add("dev", msgs[-1][-1]) is not None  # the newest still completes


def test_no_source_evicts_another_and_all_together_stay_bounded() -> None:
    """A device that opens message after message evicts only its own; when all sources together
    are full, a new message is refused, and the partial messages of others complete."""
    r = Reassembler(max_message_bytes=1000, max_pending_per_source=2, max_pending_bytes=1600)
    honest = split_message(os.urandom(1000), 378)  # 4 chunks
    assert r.add("honest", honest[0]) is None
    for _ in range(20):  # the flooder's messages: first chunk only, never complete
        try:
            r.add("flooder", split_message(os.urandom(1000), 378)[0])
        except CodecError:
            pass
        assert r.pending_bytes <= 1600
    assert r.evicted == 18 and r.missing("honest", honest[0][10:26]) == [1, 2, 3]
    assert [r.add("honest", c) for c in honest[1:3]] == [None, None] and r.add("honest", honest[3]) is not None
    for source in ("third", "fourth", "fifth"):  # 600 + 3 x 300 bytes: full
        assert r.add(source, split_message(os.urandom(1000), 378)[0]) is None
    with pytest.raises(CodecError, match="all sources together"):
        r.add("sixth", split_message(os.urandom(1000), 378)[0])
    assert r.refused == 1 and r.pending_bytes == 1500


def test_concurrent_sources() -> None:
    r = Reassembler(MAX_MSG)
    payloads = {f"dev{i}": os.urandom(5000) for i in range(8)}
    results: dict[str, bytes | None] = {}
    errors: list[BaseException] = []

    def feed(source: str) -> None:
        try:
            chunks = split_message(payloads[source], 178)
            random.Random(source).shuffle(chunks)
            for c in chunks:
                out = r.add(source, c)
            results[source] = out
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=feed, args=(s,)) for s in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == payloads
    assert r.pending_bytes == 0


def test_constructor_validates() -> None:
    for kwargs in ({"max_message_bytes": 0}, {"max_message_bytes": 10, "max_pending_messages": 0},
                   {"max_message_bytes": 10, "max_pending_per_source": 0}, {"max_message_bytes": 10, "timeout_s": 0},
                   {"max_message_bytes": 10, "max_source_bytes": 9},
                   {"max_message_bytes": 10, "max_source_bytes": 20, "max_pending_bytes": 19}):
        with pytest.raises(ValueError):
            Reassembler(**kwargs)


# --------------------------------------------------------------------------- untrusted bytes


@PROP
@given(payload=st.binary(max_size=3000), slice_size=st.integers(1, 400), seed=st.integers(0, 2**32))
def test_roundtrip_any_order(payload: bytes, slice_size: int, seed: int) -> None:
    chunks = split_message(payload, slice_size + CHUNK_OVERHEAD)
    assert all(len(c) <= slice_size + CHUNK_OVERHEAD for c in chunks)
    if len(payload) <= slice_size + CHUNK_OVERHEAD:
        assert chunks == [payload]
        return
    random.Random(seed).shuffle(chunks)
    assert reassemble(chunks) == payload


_VALID = split_message(bytes(range(256)) * 4, 378, message_id=bytes(16))  # 1024 bytes, 4 chunks


@st.composite
def mutated_chunk(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "field"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "field" and len(data) >= 12 + CHUNK_HEADER.size:
            # overwrite index/count/total with extreme or random values: past the CRC check
            off = 12 + 16 + draw(st.sampled_from([0, 4, 8]))
            width = 8 if off == 12 + 16 + 8 else 4
            value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 2 ** (8 * width) - 1, 1023, 1024, 1025, 10**6]))
            data[off : off + width] = value.to_bytes(width, "little")
    return recrc(bytes(data)) if draw(st.booleans()) else bytes(data)


@PROP
@given(items=st.lists(st.one_of(st.binary(max_size=200), mutated_chunk(), st.sampled_from(_VALID)), max_size=12))
def test_untrusted_bytes_raise_only_codec_error(items: list[bytes]) -> None:
    r = Reassembler(max_message_bytes=2048, max_pending_per_source=2, timeout_s=10)
    for item in items:
        is_chunk(item)
        try:
            out = r.add("dev", item)
        except CodecError:
            continue
        assert out is None or len(out) <= 2048
    assert 0 <= r.pending_bytes <= 2 * 2048

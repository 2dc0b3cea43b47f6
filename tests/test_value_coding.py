"""Entropy-coded integer values (fedprune.converters.value_coding, protocol version 4): exact round
trips, never larger than packed, both mappings chosen where they win, strict decoding."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.converters.errors import CodecError
from fedprune.converters.golomb import golomb_bits, golomb_length_table, golomb_packed, golomb_stream, read_golomb
from fedprune.converters.quantize import Int4, Int8, Int8PerChannel, decode_values, encode_values
from fedprune.converters.value_coding import REFLECTED, decode_codes, encode_codes

INTS = [Int8(), Int8PerChannel(), Int4()]
PROP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kw(p, n_channels=3):
    return {"n_channels": n_channels} if p.per_channel else {}


def coding_byte(p, data, n_channels=3):
    return data[4 * (n_channels if p.per_channel else 1)]


DISTRIBUTIONS = {
    "gaussian": lambda r, n: r.standard_normal(n),
    "laplace": lambda r, n: r.laplace(size=n),
    "uniform": lambda r, n: r.uniform(-1, 1, n),
    # Adam-like deltas: most near the largest magnitude (breast cancer's pruned updates)
    "near-max": lambda r, n: np.sign(r.standard_normal(n)) * (1 - 0.1 * r.exponential(size=n)),
    "sparse": lambda r, n: r.standard_normal(n) * (r.random(n) < 0.05),
}


@pytest.mark.parametrize("p", INTS, ids=lambda p: p.name)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("count", [1, 2, 9, 100, 3001])
def test_coded_sections_decode_to_exactly_the_packed_values(p, dist, count):
    """Lossless: the decoded values equal, bit for bit, those of the same codes packed; and a
    section is never larger than packed."""
    v = DISTRIBUTIONS[dist](np.random.default_rng(count), count).astype(np.float32)
    data = encode_values(v, p, **kw(p))
    assert len(data) <= p.section_size(count, 3 if p.per_channel else 1)
    n_scales = 3 if p.per_channel else 1
    out = decode_values(data, count, p, **kw(p))
    # the same section with its codes packed
    q = np.rint(out / np.where(_spread(data, p, count) == 0, 1, _spread(data, p, count))).astype(np.int8)
    packed = data[: 4 * n_scales] + b"\0" + p._pack(q)
    assert len(packed) == p.section_size(count, n_scales)
    assert np.array_equal(decode_values(packed, count, p, **kw(p)), out)
    assert np.abs(out - v).max() <= p.error_bound(v, None, n_scales)


def _spread(data, p, count):
    n = 3 if p.per_channel else 1
    scales = np.frombuffer(data[: 4 * n], dtype="<f4")
    return scales[np.arange(count) % n] if p.per_channel else np.full(count, scales[0])


def test_both_mappings_win_where_they_should_and_save_bytes():
    r = np.random.default_rng(0)
    near_max = DISTRIBUTIONS["near-max"](r, 2000).astype(np.float32)
    heavy = r.laplace(size=2000).astype(np.float32)
    flat = r.uniform(-1, 1, 2000).astype(np.float32)
    for p in (Int8(), Int4()):
        size = p.section_size(2000)
        a, b, c = (encode_values(x, p) for x in (near_max, heavy, flat))
        assert coding_byte(p, a) & REFLECTED and len(a) < 0.9 * size
        assert 0 < coding_byte(p, b) < REFLECTED and len(b) < 0.9 * size
        assert coding_byte(p, c) == 0 and len(c) == size  # uniform codes: packing is best


def test_the_encoder_picks_the_smallest_parameter_exactly():
    """The histogram table gives every m's exact size: the coding chosen is the smallest of all."""
    q = np.clip(np.rint(np.random.default_rng(3).laplace(scale=9, size=500)), -127, 127).astype(np.int8)
    coded = encode_codes(q, 127, q.tobytes())
    m = coded[0] & 0x7F
    z = np.where(q >= 0, 2 * q.astype(np.int64), -2 * q.astype(np.int64) - 1)
    refl = 127 - np.abs(q.astype(np.int64))
    best = min(min(golomb_bits(z, k) for k in range(1, 128)),
               min(golomb_bits(refl, k) for k in range(1, 128)) + int(np.count_nonzero(q)))
    assert len(coded) - 1 == (best + 7) // 8 and m >= 1
    table = golomb_length_table(254, 127)
    assert [int(table[k - 1] @ np.bincount(z, minlength=255)) for k in (1, 5, 64)] == \
        [golomb_bits(z, k) for k in (1, 5, 64)]


@PROP
@given(codes=st.lists(st.integers(-127, 127), min_size=1, max_size=300))
def test_any_codes_round_trip_and_never_grow(codes):
    q = np.array(codes, dtype=np.int8)
    packed = q.tobytes()
    coded = encode_codes(q, 127, packed)
    assert len(coded) <= 1 + len(packed)
    buf = np.frombuffer(coded + b"\xff" * 3, dtype=np.uint8)  # whatever follows is not read
    out, used = decode_codes(buf, q.size, 127, len(packed), lambda b: b.view(np.int8), "t")
    assert used == len(coded) and np.array_equal(out, q)


def reference_section(q: np.ndarray, qmax: int, coding: int) -> bytes:
    """The layout as docs/protocol.md states it, from the generic int64 ``golomb_stream``: what the
    encoder's uint8 arithmetic must reproduce bit for bit."""
    q64 = q.astype(np.int64)
    if coding & REFLECTED:
        signs = (q64[q64 != 0] < 0).astype(np.uint8)
        stream = np.concatenate([golomb_stream(qmax - np.abs(q64), coding & 0x7F), signs])
    else:
        stream = golomb_stream(np.where(q64 >= 0, 2 * q64, -2 * q64 - 1), coding)
    return bytes([coding]) + np.packbits(stream).tobytes()


@PROP
@given(codes=st.lists(st.integers(-127, 127), min_size=1, max_size=300),
       near_max=st.booleans(), qmax=st.sampled_from([127, 7]))
def test_coded_sections_are_the_documented_layout(codes, near_max, qmax):
    q = np.clip(np.array(codes), -qmax, qmax)
    if near_max:  # the reflected mapping's case: codes crowd near +-qmax
        q = np.sign(q) * (qmax - np.abs(q) % 3)
    q = q.astype(np.int8)
    coded = encode_codes(q, qmax, q.tobytes())
    if coded[0] != 0:
        assert coded == reference_section(q, qmax, coded[0])


@PROP
@given(codes=st.lists(st.integers(-7, 7), min_size=1, max_size=300))
def test_int4_codes_round_trip_through_the_precision(codes):
    q = np.array(codes, dtype=np.float32)
    q[0] = 7  # scale = max|q| / 7 = 1: the codes are the values
    data = encode_values(q, "int4")
    assert len(data) <= Int4().section_size(q.size)
    assert np.array_equal(decode_values(data, q.size, "int4"), q)


def _coded(q: np.ndarray, qmax: int = 127) -> bytes:
    coded = encode_codes(q, qmax, q.tobytes())
    assert coded[0] != 0
    return coded


NEAR_MAX = np.array([127, -126, 125, 127, -127, 126, 120, -125] * 8, dtype=np.int8)
LAPLACE = np.array([0, 1, -1, 2, 0, -3, 5, 0] * 8, dtype=np.int8)


def _decode(coded: bytes, q: np.ndarray, qmax: int = 127):
    return decode_codes(np.frombuffer(coded, dtype=np.uint8), q.size, qmax, q.size, lambda b: b.view(np.int8), "t")


@pytest.mark.parametrize("q", [NEAR_MAX, LAPLACE], ids=["reflected", "zigzag"])
def test_malformed_coded_sections_are_refused(q):
    coded = _coded(q)
    assert np.array_equal(_decode(coded, q)[0], q)
    bad = {
        "truncated": coded[:-1] if coded[-1] else coded[:-2],
        "empty": b"",
        "coding 0x80": b"\x80" + coded[1:],
    }
    for name, data in bad.items():
        with pytest.raises(CodecError):
            _decode(data, q)
    # a coding as large as the packed codes is never read: the window ends before
    long = b"\x01" + b"\x00" * q.size  # m = 1, all quotients unterminated
    with pytest.raises(CodecError, match="unary terminators"):
        _decode(long, q)
    with pytest.raises(CodecError, match="without values"):
        decode_codes(np.frombuffer(coded, np.uint8), 0, 127, 0, lambda b: b.view(np.int8), "t")


def test_a_code_beyond_the_range_is_refused():
    # zigzag m=64: one value, quotient 3 (three zeros, a one), remainder 63 -> 255 > 254
    stream = np.concatenate([np.ones(6, np.uint8), np.array([0, 0, 0, 1], np.uint8)])
    data = bytes([64]) + np.packbits(stream).tobytes()
    with pytest.raises(CodecError, match="beyond 254"):
        decode_codes(np.frombuffer(data, np.uint8), 1, 127, 4, lambda b: b.view(np.int8), "t")
    # reflected m=8 for int4: 8 > qmax 7
    stream = np.array([0, 0, 0, 0, 1], np.uint8)  # remainder 0, quotient 1 -> 8
    data = bytes([REFLECTED | 8]) + np.packbits(stream).tobytes()
    with pytest.raises(CodecError, match="beyond 7"):
        decode_codes(np.frombuffer(data, np.uint8), 1, 7, 4, lambda b: b.view(np.int8), "t")


def test_nonzero_padding_is_refused():
    q = np.array([-7, -7, -7], dtype=np.int8)  # reflected, m=1: 3 terminators, 3 sign bits, 2 padding
    coded = encode_codes(q, 7, Int4()._pack(q)[:1] + b"\0")
    assert coded == bytes([REFLECTED | 1, 0b11111100])
    for bad in (0b11111101, 0b11111110):
        with pytest.raises(CodecError, match="padding"):
            decode_codes(np.frombuffer(bytes([coded[0], bad]), np.uint8), 3, 7, 3, lambda b: b, "t")


def test_missing_sign_bits_are_refused():
    q = np.array([-7, -7, -7, -7, -7, -7, -7, -7], dtype=np.int8)  # reflected, m=1: 8 ones, then 8 signs
    coded = encode_codes(q, 7, Int4()._pack(q))
    assert coded[0] == REFLECTED | 1 and coded[1:] == b"\xff\xff"
    buf = np.frombuffer(coded[:2], np.uint8)
    with pytest.raises(CodecError, match="sign bits"):
        decode_codes(buf, 8, 7, 4, lambda b: b, "t")


def test_golomb_reader_bounds_and_layout():
    v = np.array([0, 5, 17, 3], dtype=np.int64)
    for m in (1, 3, 4, 7):
        bits = golomb_stream(v.copy(), m)
        assert bits.size == golomb_bits(v, m)
        q, r, used = read_golomb(np.concatenate([bits, np.ones(9, np.uint8)]), v.size, m, "t")
        assert used == bits.size and np.array_equal(q * m + r, v)
    with pytest.raises(CodecError, match="remainder bits"):
        read_golomb(np.zeros(3, np.uint8), 4, 16, "t")


def test_the_packed_stream_is_the_bit_stream_packed_and_reads_back():
    """``golomb_packed`` writes the remainder fields straight to bytes; whatever the field width
    (0 for m = 1, 8 and over, and counts that end mid-byte), its bytes are the bit stream's, with
    the trailer after it, and ``read_golomb`` gives the values back."""
    rng = np.random.default_rng(3)
    for m in (1, 2, 3, 5, 63, 64, 127, 255, 256, 300, 1000):
        for count in (1, 7, 8, 9, 100, 1001):
            v = rng.geometric(1 / (m + 1), count) - 1
            trailer = rng.integers(0, 2, count % 5).astype(np.uint8)
            for values in (v.astype(np.int64), v.astype(np.uint8)) if v.max() < 2 * m <= 255 else (v.astype(np.int64),):
                bits = golomb_stream(values.copy(), m)
                expected = np.packbits(np.concatenate([bits, trailer])).tobytes()
                assert golomb_packed(values, m, trailer=trailer) == expected, (m, count, values.dtype)
                assert golomb_packed(values, m) == np.packbits(bits).tobytes()
                q, r, used = read_golomb(np.unpackbits(np.frombuffer(expected, np.uint8)), count, m, "t")
                assert used == bits.size and np.array_equal(q * m + r, v)


def test_a_section_is_refused_when_longer_than_packed():
    v = np.linspace(-1, 1, 50, dtype=np.float32)
    data = encode_values(v, "int8")
    with pytest.raises(CodecError, match="bytes, expected"):
        decode_values(data + b"\0", 50, "int8")
    with pytest.raises(CodecError):
        decode_values(struct.pack("<f", 1.0), 50, "int8")  # no coding byte

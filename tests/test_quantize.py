"""Tests for fedprune.converters.quantize: value sections of the kept values of one tensor.

Round trips stay within ``quantization_error_bound``; int scales come from the kept values only;
stochastic rounding is unbiased; the decoder, facing bytes and header fields from the network,
never raises anything but ``CodecError``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.converters.errors import CodecError
from fedprune.converters.quantize import (
    FLOAT16_MAX,
    PRECISION_NAMES,
    PRECISIONS,
    Float16,
    Float32,
    Int4,
    Int8,
    Int8PerChannel,
    Precision,
    decode_values,
    encode_values,
    precision_from_config,
    precision_named,
    precision_with_wire_id,
    quantization_error_bound,
    value_bits,
    value_section_size,
)

PROP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL = list(PRECISIONS)
FLOAT32, FLOAT16, INT8, INT8_CHANNEL, INT4 = Float32(), Float16(), Int8(), Int8PerChannel(), Int4()
INTS = [INT8, INT8_CHANNEL, INT4]
F32_MAX = float(np.finfo(np.float32).max)


def kw(precision: Precision, n_channels: int = 4, channels: np.ndarray | None = None) -> dict:
    """Channel arguments for a per-channel precision, nothing for the others."""
    if precision.per_channel:
        return {"n_channels": n_channels, "channels": channels}
    return {}


def roundtrip(values: np.ndarray, precision: Precision, **kwargs) -> np.ndarray:
    data = encode_values(values, precision, **kwargs)
    size = value_section_size(values.size, precision, kwargs.get("n_channels", 1))
    assert len(data) == size if not precision.coding_bytes else len(data) <= size
    out = decode_values(data, values.size, precision, **kwargs)
    assert out.dtype == np.float32 and out.shape == values.shape
    return out


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def scales_of(data: bytes, n: int) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4", count=n)


# --------------------------------------------------------------------------- names, ids, sizes


def test_names_ids_and_bits():
    assert PRECISION_NAMES == ("float32", "float16", "int8", "int8-channel", "int4")
    assert ALL == [FLOAT32, FLOAT16, INT8, INT8_CHANNEL, INT4]
    assert precision_named("int8-channel") == INT8_CHANNEL and precision_named(INT4) is INT4
    assert str(INT8) == "int8" and INT8.name == "int8"
    # the wire ids are in every binary header ever sent: never renumbered
    assert {p.name: p.wire_id for p in ALL} == {"float32": 0, "float16": 1, "int8": 2, "int8-channel": 3, "int4": 4}
    assert all(precision_with_wire_id(p.wire_id) == p for p in ALL)
    assert [value_bits(p) for p in ALL] == [32, 16, 8, 8, 4]
    assert value_bits("int4") == 4
    assert [p.per_channel for p in ALL] == [False, False, False, True, False]
    assert [p.exact for p in ALL] == [True, False, False, False, False]


@pytest.mark.parametrize("bad", ["int9", "INT8", "", None, 3, INT8.get_config()])
def test_unknown_precision_names_are_refused_with_the_known_ones(bad):
    with pytest.raises(ValueError, match="int8-channel"):
        precision_named(bad)


@pytest.mark.parametrize("bad", [5, -1, 255, None, "2", 2.5])
def test_unknown_wire_ids_are_refused(bad):
    with pytest.raises(ValueError, match="precision id"):
        precision_with_wire_id(bad)


@pytest.mark.parametrize(("config", "match"), [
    ({}, "'precision' key"),
    ({"precision": "int9"}, "unknown 'precision'"),
    ({"precision": 2}, "unknown 'precision'"),
    ({"precision": "int8", "bits": 8}, "unknown key 'bits'"),
    (["precision", "int8"], "mapping"),
])
def test_precision_from_config_names_the_bad_key(config, match):
    with pytest.raises(ValueError, match=match):
        precision_from_config(config)


# --------------------------------------------------------------------------- every precision


@pytest.mark.parametrize("precision", PRECISIONS, ids=PRECISION_NAMES)
def test_every_registered_precision_conforms(precision: Precision):
    """What the codec and the task file rely on, for every registered precision: its config
    round-trips; a section has at most ``section_size`` bytes (exactly, for a float precision)
    and round-trips within the stated error bound, with round-to-nearest and with stochastic
    rounding; a decoder refuses a section one byte short or long with ``CodecError``."""
    assert precision_from_config(precision.get_config()) == precision
    assert precision_from_config({"precision": precision.name}) is precision_named(precision.name)
    assert precision_with_wire_id(precision.wire_id) == precision
    rng = np.random.default_rng(precision.wire_id)
    for count, n_channels in ((0, 1), (1, 1), (7, 3), (1000, 4)):
        v = (rng.standard_normal(count) * 3).astype(np.float32)
        for stochastic in (False, True):
            data = precision.encode(v, n_channels=n_channels, stochastic=stochastic, rng=rng)
            size = precision.section_size(count, n_channels)
            assert len(data) == size if not precision.coding_bytes else len(data) <= size
            out = precision.decode(data, count, n_channels=n_channels)
            assert out.dtype == np.float32 and out.shape == (count,)
            assert max_err(out, v) <= precision.error_bound(v, None, n_channels, stochastic=stochastic)
            for wrong in ((data[:-1],) if data else ()) + (data + b"\0",):
                with pytest.raises(CodecError):
                    precision.decode(wrong, count, n_channels=n_channels)


@pytest.mark.parametrize(
    ("count", "precision", "n_channels", "size"),
    [
        # packed: scales, the coding byte (integer precisions), the values
        (10, "float32", 1, 40), (10, "float16", 1, 20), (10, "int8", 1, 15),
        (10, "int8-channel", 3, 23), (10, "int4", 1, 10), (11, "int4", 1, 11), (1, "int4", 1, 6),
        (0, "int4", 1, 5), (0, "int8", 1, 5), (0, "float32", 1, 0), (0, "int8-channel", 0, 1),
        (10, "int8", 99, 15),  # n_channels matters only for int8-channel
    ],
)
def test_value_section_size(count, precision, n_channels, size):
    assert value_section_size(count, precision, n_channels) == size


@pytest.mark.parametrize("bad", [(-1, "int8", 1), (3, "int9", 1), (3, "int8-channel", 0),
                                 (3, "int8-channel", -2), (2.0, "int8", 1), (True, "int8", 1)])
def test_value_section_size_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        value_section_size(*bad)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize("count", [1, 2, 7, 1000, 4097])
def test_roundtrip_within_bound(precision, count):
    rng = np.random.default_rng(count)
    v = (rng.standard_normal(count) * rng.choice([1e-3, 1.0, 50.0], size=count)).astype(np.float32)
    ch = np.sort(rng.integers(0, 4, size=count)) if precision == INT8_CHANNEL else None
    out = roundtrip(v, precision, **kw(precision, 4, ch))
    bound = quantization_error_bound(v, precision, ch, 4)
    assert max_err(out, v) <= bound
    if precision == FLOAT32:
        assert np.array_equal(out, v)
    if precision == INT8_CHANNEL:  # each channel within its own, tighter, bound
        for c in range(4):
            sel = ch == c
            assert max_err(out[sel], v[sel]) <= quantization_error_bound(v[sel], INT8)


finite32 = hnp.arrays(
    np.float32, st.integers(0, 64),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
)


@PROP
@given(v=finite32, precision=st.sampled_from(ALL), n_channels=st.integers(1, 5), data=st.data())
def test_roundtrip_property(v, precision, n_channels, data):
    """Any finite float32 (subnormals and ±float32 max included) stays within the bound."""
    if precision == FLOAT16:
        v = np.clip(v, -FLOAT16_MAX, FLOAT16_MAX)
    ch = None
    if precision == INT8_CHANNEL and data.draw(st.booleans()):
        ch = np.asarray(data.draw(st.lists(st.integers(0, n_channels - 1), min_size=v.size,
                                           max_size=v.size)), dtype=np.int64)
    out = roundtrip(v, precision, **kw(precision, n_channels, ch))
    assert np.isfinite(out).all()
    assert max_err(out, v) <= quantization_error_bound(v, precision, ch, n_channels)


def test_int8_channel_dense_default_is_index_mod_n():
    v = np.random.default_rng(0).standard_normal(24).astype(np.float32)
    explicit = encode_values(v, "int8-channel", n_channels=6, channels=np.arange(24) % 6)
    assert encode_values(v, "int8-channel", n_channels=6) == explicit
    assert np.array_equal(decode_values(explicit, 24, "int8-channel", n_channels=6),
                          decode_values(explicit, 24, "int8-channel", n_channels=6,
                                        channels=np.arange(24) % 6))
    # a count that is not a multiple of n_channels still works (index % n_channels)
    out = roundtrip(v[:23], INT8_CHANNEL, n_channels=6)
    assert max_err(out, v[:23]) <= quantization_error_bound(v[:23], "int8-channel", None, 6)


def test_exact_grid_values_roundtrip_exactly():
    q = np.arange(-127, 128, dtype=np.float32)
    assert np.array_equal(roundtrip(q * 0.5, INT8), q * 0.5)
    q4 = np.arange(-7, 8, dtype=np.float32)  # 15 values: odd count
    assert np.array_equal(roundtrip(q4 * 0.25, INT4), q4 * 0.25)


def test_extreme_magnitudes():
    huge = np.array([F32_MAX, -F32_MAX, 1.0, 0.0], dtype=np.float32)
    tiny = np.array([1e-45, -3e-45, 1e-40, 0.0], dtype=np.float32)  # float32 subnormals
    for p in INTS:
        for v in (huge, tiny):
            out = roundtrip(v, p, **kw(p, 1))
            assert np.isfinite(out).all()
            assert max_err(out, v) <= quantization_error_bound(v, p, None, 1)
    # max|v|/127 underflows float32: the scale becomes the smallest subnormal, never 0 (which
    # would zero every value), and these values lie on its grid
    few_ulps = np.array([1e-45, -3e-45, 0.0], dtype=np.float32)
    data = encode_values(few_ulps, "int8")
    assert scales_of(data, 1)[0] == np.float32(1e-45)
    assert np.array_equal(decode_values(data, 3, "int8"), few_ulps)


# --------------------------------------------------------------------------- scales


def test_channel_scale_is_max_of_kept_values_of_that_channel():
    """Pruned positions (here holding stale large weights) never reach the scale; a channel whose
    kept values are all zero, or which has no kept values, gets scale 0."""
    rng = np.random.default_rng(3)
    tensor = rng.standard_normal((6, 5)).astype(np.float32)
    mask = rng.random((6, 5)) < 0.6
    mask[:, 3] = False  # channel 3 fully pruned
    tensor[~mask] = 1000.0  # stale weights at pruned positions
    tensor[:, 4] = 0.0
    mask[:, 4] = True  # channel 4 kept but all zero
    idx = np.flatnonzero(mask.ravel())
    kept, ch = tensor.ravel()[idx], idx % 5
    data = encode_values(kept, "int8-channel", channels=ch, n_channels=5)
    scales = scales_of(data, 5)
    for c in range(5):
        sel = kept[ch == c]
        want = np.float32(np.abs(sel).max() / 127.0) if sel.size else 0.0
        assert scales[c] == pytest.approx(want, rel=1e-7, abs=0)
    assert scales[3] == 0 and scales[4] == 0
    assert scales.max() < 1000.0 / 127.0
    out = decode_values(data, kept.size, "int8-channel", channels=ch, n_channels=5)
    assert np.all(out[ch == 4] == 0)


@pytest.mark.parametrize(("precision", "qmax"), [(INT8, 127), (INT4, 7)])
def test_tensor_scale_is_max_over_values(precision, qmax):
    v = np.array([0.5, -2.5, 1.0], dtype=np.float32)
    assert scales_of(encode_values(v, precision), 1)[0] == np.float32(2.5 / qmax)


@pytest.mark.parametrize("precision", ALL)
def test_all_zero_and_empty(precision):
    for v in (np.zeros(9, np.float32), np.zeros(0, np.float32)):
        data = encode_values(v, precision, **kw(precision, 3))
        assert len(data) <= value_section_size(v.size, precision, 3)
        if precision in INTS:
            n = 3 if precision.per_channel else 1
            assert np.all(scales_of(data, n) == 0)
        out = decode_values(data, v.size, precision, **kw(precision, 3))
        assert out.dtype == np.float32 and out.shape == (v.size,) and np.all(out == 0)
        assert quantization_error_bound(v, precision, None, 3) == 0.0
    assert encode_values(np.zeros(0, np.float32), "int8-channel", n_channels=0) == b"\0"  # packed, nothing


@pytest.mark.parametrize("count", [1, 3, 5, 101])
def test_int4_odd_counts_pad_high_nibble_with_zero(count):
    v = np.full(count, -3.5, dtype=np.float32)  # every nibble -7 = 0x9
    packed = INT4._pack(np.full(count, -7, dtype=np.int8))
    assert len(packed) == (count + 1) // 2
    assert packed[-1] == 0x09  # low nibble -7, padding 0
    assert all(b == 0x99 for b in packed[:-1])
    data = struct.pack("<f", 0.5) + b"\0" + packed  # coding byte 0: packed
    assert np.array_equal(decode_values(data, count, "int4"), v)
    assert np.array_equal(decode_values(encode_values(v, "int4"), count, "int4"), v)  # Golomb-coded


def test_int4_low_nibble_first():
    v = np.array([1.0, -2.0, 7.0], dtype=np.float32)  # scale 1; too few values to code smaller
    assert encode_values(v, "int4") == struct.pack("<f", 1.0) + bytes([0, 0xE1, 0x07])


def test_half_to_even_rounding():
    v = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -2.5], dtype=np.float32)  # scale 1
    out = decode_values(encode_values(v, "int8"), 6, "int8")
    assert out.tolist() == [127.0, 0.0, 2.0, 2.0, -0.0, -2.0]


# --------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("precision", [INT8, INT8_CHANNEL, INT4, FLOAT16])
def test_stochastic_rounding_is_unbiased(precision):
    rng = np.random.default_rng(42)
    v = rng.uniform(-1, 1, 64).astype(np.float32)
    v[0] = 1.0  # fixes the int scales to 1/qmax
    v[1] = np.float32(0.3 / 7)  # 0.3 of an int4 step: deterministic rounding always gives 0
    reps = 2000
    dec = np.stack([
        decode_values(encode_values(v, precision, stochastic=True, rng=rng, **kw(precision, 2)),
                      v.size, precision, **kw(precision, 2))
        for _ in range(reps)
    ]).astype(np.float64)
    step = precision.error_bound(v, None, 2, stochastic=True)  # one quantum (an ulp for fp16)
    assert step == 2 * quantization_error_bound(v, precision, None, 2)
    # each draw is within one step; the mean of `reps` draws has std <= step / (2 sqrt(reps))
    assert np.all(np.abs(dec - v) <= step * 1.0001)
    tol = 6 * step / (2 * np.sqrt(reps))
    assert np.all(np.abs(dec.mean(axis=0) - v) <= tol)
    determ = decode_values(encode_values(v, precision, **kw(precision, 2)), v.size, precision,
                           **kw(precision, 2))
    if precision == INT4:
        assert determ[1] == 0 and abs(dec[:, 1].mean() - v[1]) <= tol  # the bias that goes away



def test_float16_stochastic_subnormals_and_binade_edge():
    ulp = 2.0**-24  # the float16 subnormal spacing
    v = (np.array([0.3, -0.7, 1023.6, 5.5, 3.0]) * ulp).astype(np.float32)  # 1024 ulp = 2**-14
    edge = np.array([2.0 - 0.3 * 2**-10, -(1.0 + 0.25 * 2**-10), FLOAT16_MAX], dtype=np.float32)
    rng = np.random.default_rng(5)
    reps = 3000
    edge_steps = np.array([2**-10, 2**-10, 32.0])  # float16 gaps around each edge value
    for vals, steps in ((v, np.full(v.size, ulp)), (edge, edge_steps)):
        dec = np.stack([decode_values(encode_values(vals, "float16", stochastic=True, rng=rng),
                                      vals.size, "float16") for _ in range(reps)]).astype(np.float64)
        assert np.all(np.abs(dec - vals) <= steps)
        assert np.all(np.abs(dec.mean(axis=0) - vals) <= 6 * steps / (2 * np.sqrt(reps)))
    assert dec[:, 2].max() == FLOAT16_MAX  # exactly representable: never moves, never overflows
    assert dec[:, 2].min() == FLOAT16_MAX


def test_stochastic_rng_controls_the_bytes():
    v = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    for p in (INT8, INT4, FLOAT16, INT8_CHANNEL):
        a = encode_values(v, p, stochastic=True, rng=np.random.default_rng(1), **kw(p, 4))
        b = encode_values(v, p, stochastic=True, rng=np.random.default_rng(2), **kw(p, 4))
        c = encode_values(v, p, stochastic=True, rng=np.random.default_rng(1), **kw(p, 4))
        assert a != b and a == c
        assert len(a) <= value_section_size(v.size, p, 4)
    with pytest.raises(ValueError, match="rng"):
        encode_values(v, "int8", stochastic=True)
    # float32 is exact: stochastic changes nothing
    f = encode_values(v, "float32", stochastic=True, rng=np.random.default_rng(1))
    assert f == encode_values(v, "float32")


# --------------------------------------------------------------------------- encoder errors


def test_float16_overflow_raises():
    ok = np.array([FLOAT16_MAX, -FLOAT16_MAX], dtype=np.float32)
    assert np.array_equal(roundtrip(ok, FLOAT16), ok)
    for bad in (65505.0, -70000.0, 1e30):
        with pytest.raises(ValueError, match="float16"):
            encode_values(np.array([1.0, bad], dtype=np.float32), "float16")


@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_raises(precision, bad):
    with pytest.raises(ValueError):
        encode_values(np.array([1.0, bad], dtype=np.float32), precision, **kw(precision, 2))


def test_encoder_argument_errors():
    v = np.ones(4, np.float32)
    with pytest.raises(ValueError):
        encode_values(v, "int9")
    with pytest.raises(ValueError):
        encode_values(v.reshape(2, 2), "int8")
    with pytest.raises(ValueError):
        encode_values(v, "int8-channel", n_channels=2, channels=np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError):
        encode_values(v, "int8-channel", n_channels=2, channels=np.array([0, 1, 0]))
    with pytest.raises(ValueError):
        encode_values(v, "int8-channel", n_channels=0)


# --------------------------------------------------------------------------- decoder checks


@pytest.mark.parametrize("precision", ALL)
def test_decode_length_must_be_exact(precision):
    v = np.random.default_rng(0).standard_normal(9).astype(np.float32)
    data = encode_values(v, precision, **kw(precision, 3))
    for bad in (data[:-1], data + b"\0", b"", data + data):
        with pytest.raises(CodecError, match="bytes, expected"):
            decode_values(bad, 9, precision, **kw(precision, 3))
    with pytest.raises(CodecError):  # int4 packs 9 and 10 values alike: try 11
        decode_values(data, 11, precision, **kw(precision, 3))


def test_decode_huge_count_fails_before_allocating():
    for p in ALL:
        with pytest.raises(CodecError):
            decode_values(b"\0" * 16, 1 << 62, p, n_channels=1 << 40)


def test_decode_accepts_memoryview_and_bytearray():
    v = np.array([0, 127, -127, 1, 2, -3, 4, 5], dtype=np.float32)  # scale 1: exact
    data = encode_values(v, "int8")
    for buf in (memoryview(data), bytearray(data), memoryview(b"xx" + data)[2:]):
        assert np.array_equal(decode_values(buf, 8, "int8"), v)
    wide = np.frombuffer(encode_values(v, "float32"), dtype=np.float32)
    assert np.array_equal(decode_values(memoryview(wide), 8, "float32"), v)  # cast to bytes
    with pytest.raises(CodecError):
        decode_values(memoryview(data)[::2], 4, "int8")
    with pytest.raises(CodecError):
        decode_values(12345, 8, "int8")  # type: ignore[arg-type]


def with_scale(scale: float, rest: bytes) -> bytes:
    return struct.pack("<f", scale) + rest


@pytest.mark.parametrize(
    ("data", "count", "precision", "match"),
    [
        (with_scale(1.0, b"\x00\x01\x80"), 2, "int8", "-128"),
        (with_scale(1.0, b"\x00\x08"), 2, "int4", "-8"),
        (with_scale(1.0, b"\x00\x81"), 2, "int4", "-8"),
        (with_scale(1.0, b"\x00\x01\x10"), 3, "int4", "padding"),
        (with_scale(-1.0, b"\x00\x01"), 1, "int8", "scale"),
        (with_scale(-0.0, b"\x00\x01"), 1, "int8", "scale"),
        (with_scale(float("nan"), b"\x00\x01"), 1, "int8", "scale"),
        (with_scale(float("inf"), b"\x00\x01"), 1, "int4", "scale"),
        (with_scale(F32_MAX / 100, b"\x00\x01"), 1, "int8", "scale"),
        (with_scale(F32_MAX / 6, b"\x00\x01"), 1, "int4", "scale"),
        (struct.pack("<f", float("nan")), 1, "float32", "NaN"),
        (b"\x00\x7c", 1, "float16", "NaN"),  # float16 +inf
        (b"", 0, "int8", "expected"),  # the scale is always there
        (b"\0\0\0\0", 1, "float64", "precision"),
        (b"\0\0\0\0", -1, "float32", "count"),
        (b"\0\0\0\0", 1.0, "float32", "count"),
    ],
)
def test_decode_rejects(data, count, precision, match):
    with pytest.raises(CodecError, match=match):
        decode_values(data, count, precision)


def test_decode_accepts_largest_safe_scale():
    s = np.nextafter(np.float32(F32_MAX / 127), np.float32(0))
    out = decode_values(with_scale(float(s), b"\x00\x7f\x81"), 2, "int8")
    assert np.isfinite(out).all()


def test_decode_channel_checks():
    v = np.array([0, 1, 2, 127, -127, 127], dtype=np.float32)  # scales 1: exact
    ch = np.array([0, 1, 2, 0, 1, 2])
    data = encode_values(v, "int8-channel", channels=ch, n_channels=3)
    assert np.array_equal(decode_values(data, 6, "int8-channel", channels=ch, n_channels=3), v)
    for bad in (np.array([0, 1, 3, 0, 1, 2]), np.array([0, 1, -1, 0, 1, 2]), ch[:5],
                ch.astype(np.float32), ch.reshape(2, 3), np.array([0, 1, 2, 0, 1, 2**40])):
        with pytest.raises(CodecError, match="channels"):
            decode_values(data, 6, "int8-channel", channels=bad, n_channels=3)
    with pytest.raises(CodecError):
        decode_values(data, 6, "int8-channel", channels=ch, n_channels=0)
    with pytest.raises(CodecError):
        decode_values(data, 6, "int8-channel", channels=ch, n_channels=-3)


# --------------------------------------------------------------------------- fuzzing the decoder

precisions = st.one_of(st.sampled_from(ALL), st.sampled_from(PRECISION_NAMES),
                       st.text(max_size=8), st.none(), st.integers())
counts = st.one_of(st.integers(0, 40), st.integers(-5, 1 << 64), st.sampled_from([None, 1.5, True]))
channel_arrays = st.one_of(
    st.none(),
    hnp.arrays(st.sampled_from([np.int8, np.int64, np.uint16, np.float64, np.bool_]),
               st.integers(0, 40)),
)


def check_decode(data, count, precision, channels, n_channels):
    try:
        out = decode_values(data, count, precision, channels=channels, n_channels=n_channels)
    except CodecError:
        return
    assert out.dtype == np.float32 and out.shape == (count,)
    assert np.isfinite(out).all()


@PROP
@given(data=st.binary(max_size=80), count=counts, precision=precisions, channels=channel_arrays,
       n_channels=st.one_of(st.integers(-2, 12), st.just(1 << 70)))
def test_decode_random_bytes_only_raises_codec_error(data, count, precision, channels, n_channels):
    check_decode(data, count, precision, channels, n_channels)


@PROP
@given(
    v=hnp.arrays(np.float32, st.integers(0, 30),
                 elements=st.floats(-1e4, 1e4, width=32, allow_nan=False)),
    precision=st.sampled_from(ALL), n_channels=st.integers(1, 5),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=4),
    cut=st.integers(-2, 2), count_delta=st.sampled_from([0, 0, 0, -1, 1]),
    channel_noise=st.lists(st.integers(-1, 6), max_size=3),
)
def test_decode_mutated_sections_only_raises_codec_error(v, precision, n_channels, flips, cut,
                                                         count_delta, channel_noise):
    ch = np.arange(v.size) % n_channels
    data = bytearray(encode_values(v, precision, channels=ch, n_channels=n_channels))
    for pos, x in flips:
        if data:
            data[pos % len(data)] ^= x
    if cut > 0:
        data += bytes(cut)
    elif cut < 0:
        del data[cut:]
    for i, c in enumerate(channel_noise):
        if ch.size:
            ch[i % ch.size] = c
    check_decode(bytes(data), v.size + count_delta, precision, ch, n_channels)

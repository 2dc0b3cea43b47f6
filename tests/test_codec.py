"""Tests for fedprune.converters.codec: values-only and self-describing tensor sections, DecodeLimits and
the lossless stage.

Value sections (fedprune.converters.quantize) and mask codings (fedprune.converters.mask_coding) have their own
tests; here they are only exercised through the tensor codec. The decoders face bytes from the
network: whatever arrives must decode or raise ``CodecError``, and a claim of a huge layout must
be refused before anything of that size is allocated.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from codec_helpers import decode_or_codec_error, expect_codec_error, mutate
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.converters.codec import (
    DEFAULT_LIMITS,
    Compression,
    DecodeLimits,
    MaskLayout,
    compress,
    decode_self_describing,
    decode_values_only,
    decompress,
    encode_self_describing,
    encode_values_only,
    n_channels,
    round_trip_tensors,
    values_only_size,
)
from fedprune.converters.errors import CodecError
from fedprune.converters.mask_coding import mask_digest
from fedprune.converters.mask_coding import MaskMethod, encode_mask
from fedprune.converters.quantize import (
    PRECISIONS,
    Float16,
    Float32,
    Int4,
    Int8,
    Int8PerChannel,
    Precision,
    encode_values,
    quantization_error_bound,
    value_section_size,
)

PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL = list(PRECISIONS)
FLOAT32, FLOAT16, INT8, INT8_CHANNEL, INT4 = Float32(), Float16(), Int8(), Int8PerChannel(), Int4()
MB = 1 << 20

SHAPES = [(6, 5), (5,), (2, 3, 2, 4), (4,), (7, 3)]
NAMES = ["dense/kernel", "dense/bias", "conv/kernel", "conv/bias", "out/kernel"]


def example_masks(seed: int = 0) -> list[np.ndarray | None]:
    rng = np.random.default_rng(seed)
    return [rng.random(SHAPES[0]) > 0.4, None, rng.random(SHAPES[2]) > 0.8, None, rng.random(SHAPES[4]) > 0.1]


def example_tensors(seed: int = 1, scale: float = 1.0) -> list[np.ndarray]:
    """Dense tensors: nonzero at pruned positions too, which must not travel."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def assert_decoded(orig: np.ndarray, out: np.ndarray, mask: np.ndarray | None, precision: Precision) -> None:
    """Shape and dtype kept; pruned positions exact +0.0; kept values within the quantization bound."""
    assert out.shape == orig.shape and out.dtype == np.float32
    sel = np.ones(orig.shape, bool) if mask is None else mask
    pruned = out[~sel]
    assert np.all(pruned == 0.0) and not np.any(np.signbit(pruned))
    kept = orig[sel].astype(np.float32)
    ch, c = None, 1
    if precision.per_channel:
        c = n_channels(orig.shape)
        ch = np.flatnonzero(sel.ravel()) % c
    bound = quantization_error_bound(kept, precision, ch, c)
    err = np.abs(out[sel].astype(np.float64) - kept.astype(np.float64))
    assert float(err.max(initial=0.0)) <= bound
    if precision.exact:
        assert np.array_equal(out[sel], kept)


def peak_bytes(fn, *args, **kwargs) -> tuple[int, float, BaseException | None]:
    """(peak traced allocation, seconds, exception raised) of one call."""
    tracemalloc.start()
    t = time.perf_counter()
    err = None
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001
        err = e
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, dt, err


# A self-describing section built by hand, so that every table field can be set on its own.
def table_entry(name: bytes, shape, pid: int, flags: int, method: int, kept: int, mask_len: int,
                dtype: int = 0) -> bytes:
    return (bytes([len(name)]) + name + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<BBBBII", dtype, pid, flags, method, kept, mask_len))


def section(entries: list[bytes], data: bytes = b"", count: int | None = None) -> bytes:
    return struct.pack("<H", len(entries) if count is None else count) + b"".join(entries) + data


# --------------------------------------------------------------------------- values-only


@pytest.mark.parametrize("precision", ALL)
def test_values_only_round_trip_with_masks(precision):
    masks, ts = example_masks(), example_tensors(scale=3.0)
    body = encode_values_only(ts, masks, precision)
    assert len(body) <= values_only_size(SHAPES, masks, precision)  # integer codes: coded when smaller
    out = decode_values_only(body, SHAPES, masks, precision)
    assert len(out) == len(ts)
    for t, o, m in zip(ts, out, masks):
        assert_decoded(t, o, m, precision)
    # the precision may be given as a name or as the object
    assert encode_values_only(ts, masks, precision.name) == body
    out2 = decode_values_only(memoryview(body), SHAPES, masks, precision.name)
    assert all(np.array_equal(a, b) for a, b in zip(out, out2))


@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize("seed", range(4))
def test_round_trip_tensors_are_what_decoding_gives_bit_for_bit(precision, seed):
    masks = example_masks(seed) if seed % 2 else [None] * len(SHAPES)
    rng = np.random.default_rng(seed)
    ts = [(rng.standard_t(2, size=s) * 10.0 ** rng.integers(-6, 3)).astype(np.float32) for s in SHAPES]
    ts[1][:] = 0.0  # an all-zero tensor: a zero scale
    got = round_trip_tensors(ts, masks, precision)
    names = [f"t{i}" for i in range(len(ts))]
    for decoded in (decode_values_only(encode_values_only(ts, masks, precision), SHAPES, masks, precision),
                    decode_self_describing(encode_self_describing(ts, masks, names, precision)).tensors):
        for g, d in zip(got, decoded):
            assert g.dtype == np.float32 and g.shape == d.shape
            assert np.array_equal(g.view(np.uint32), np.asarray(d, np.float32).view(np.uint32))  # -0.0 too


@pytest.mark.parametrize("precision", ALL)
def test_a_mask_layout_prepared_once_decodes_as_the_masks_do(precision):
    masks, ts = example_masks(), example_tensors(scale=2.0)
    layout = MaskLayout.of(SHAPES, masks)
    body = encode_values_only(ts, masks, precision)
    assert layout.section_size(precision) == values_only_size(SHAPES, masks, precision) >= len(body)
    assert layout.digest == mask_digest(masks)
    with_layout = decode_values_only(body, SHAPES, masks, precision, layout=layout)
    for a, b in zip(with_layout, decode_values_only(body, SHAPES, masks, precision)):
        assert a.shape == b.shape and np.array_equal(a, b)
    with pytest.raises(CodecError, match="does not match tensor shape"):
        MaskLayout.of(SHAPES, [np.ones((5, 6), bool), *masks[1:]])
    with pytest.raises(CodecError, match="masks for"):
        MaskLayout.of(SHAPES, masks[:-1])


@pytest.mark.parametrize("precision", ALL)
def test_values_only_round_trip_without_masks(precision):
    ts = example_tensors(seed=5)
    masks = [None] * len(ts)
    body = encode_values_only(ts, masks, precision)
    assert len(body) <= values_only_size(SHAPES, masks, precision)
    for t, o in zip(ts, decode_values_only(body, SHAPES, masks, precision)):
        assert_decoded(t, o, None, precision)


@pytest.mark.parametrize("precision", ALL)
def test_values_only_fully_pruned_and_all_kept_masks(precision):
    shapes = [(3, 4), (3, 4), (2,)]
    masks = [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.array([False, True])]
    ts = [np.full(s, 7.0, np.float32) for s in shapes]
    body = encode_values_only(ts, masks, precision)
    out = decode_values_only(body, shapes, masks, precision)
    assert np.array_equal(out[0], np.zeros((3, 4))) and not np.signbit(out[0]).any()
    assert_decoded(ts[1], out[1], masks[1], precision)
    assert out[2][0] == 0.0 and out[2][1] == pytest.approx(7.0, rel=0.1)


@pytest.mark.parametrize("precision", ALL)
def test_values_only_decodes_into_given_arrays_as_into_new_ones(precision):
    masks, ts = example_masks(), example_tensors(scale=2.5)
    body = encode_values_only(ts, masks, precision)
    fresh = decode_values_only(body, SHAPES, masks, precision)
    out = [np.full(s, 9.0, np.float32) for s in SHAPES]  # stale contents: pruned positions must be zeroed
    got = decode_values_only(body, SHAPES, masks, precision, out=out)
    assert all(g is o for g, o in zip(got, out))
    for a, b in zip(got, fresh):
        assert np.array_equal(a, b) and not np.signbit(a[b == 0]).any()
    with pytest.raises(ValueError, match="arrays for"):
        decode_values_only(body, SHAPES, masks, precision, out=out[:-1])
    with pytest.raises(ValueError, match="float32"):
        decode_values_only(body, SHAPES, masks, precision, out=[o.astype(np.float64) for o in out])
    with pytest.raises(ValueError, match="C-contiguous"):  # a view that reshape(-1) would copy
        decode_values_only(body, SHAPES, masks, precision, out=[np.asfortranarray(out[0]), *out[1:]])


@pytest.mark.parametrize("precision", ALL)
def test_a_mask_that_keeps_everything_codes_as_no_mask(precision):
    # A prunable layer before its first pruning step: same bytes as unmasked, decoded through the
    # dense path (the layout holds no positions to scatter through), self-describing too.
    ts = example_tensors(seed=3)
    full = [np.ones(np.shape(t), bool) for t in ts]
    unmasked = [None] * len(ts)
    assert encode_values_only(ts, full, precision) == encode_values_only(ts, unmasked, precision)
    layout = MaskLayout.of(SHAPES, full)
    assert all(p is None for p in layout.positions) and layout.digest == mask_digest(full) != mask_digest(unmasked)
    body = encode_values_only(ts, full, precision)
    for a, b in zip(decode_values_only(body, SHAPES, full, precision, layout=layout),
                    decode_values_only(body, SHAPES, unmasked, precision)):
        assert np.array_equal(a, b)
    names = [f"t{i}" for i in range(len(ts))]
    decoded = decode_self_describing(encode_self_describing(ts, full, names, precision))
    assert all(m is not None and m.all() for m in decoded.masks)
    for t, o in zip(ts, decoded.tensors):
        assert_decoded(t, o, None, precision)


def test_values_only_empty_list():
    assert encode_values_only([], [], "int8") == b""
    assert values_only_size([], [], "int8") == 0
    assert decode_values_only(b"", [], [], "int8") == []


def test_values_only_pruned_positions_never_travel():
    """Huge or non-finite values at pruned positions neither fail nor spoil the scale."""
    m = np.array([[True, False, True], [False, True, False]])
    t = np.array([[0.01, 1e30, -0.02], [np.nan, 0.005, np.inf]], np.float32)
    for p in ALL:
        body = encode_values_only([t], [m], p)
        (o,) = decode_values_only(body, [(2, 3)], [m], p)
        assert np.all(o[~m] == 0.0)
        np.testing.assert_allclose(o[m], t[m], atol=0.02 / 7)
    (o,) = decode_values_only(encode_values_only([t], [m], "int8"), [(2, 3)], [m], "int8")
    np.testing.assert_allclose(o[m], t[m], atol=0.02 / 127 / 2 * 1.001)


def test_values_only_bytes_are_the_value_sections_in_order():
    masks, ts = example_masks(), example_tensors()
    p = INT8_CHANNEL
    parts = []
    for t, m in zip(ts, masks):
        sel = np.ones(t.shape, bool) if m is None else m
        c = n_channels(t.shape)
        parts.append(encode_values(t[sel], p, channels=np.flatnonzero(sel.ravel()) % c, n_channels=c))
    assert encode_values_only(ts, masks, p) == b"".join(parts)


def test_values_only_size_exact():
    shapes = [(4, 3), (5,), (2, 2, 3), (3, 0), ()]
    masks = [np.array([[1, 0, 1]] * 4, bool), None, np.zeros((2, 2, 3), bool), None, None]
    kept = [8, 5, 0, 0, 1]
    expected = {
        "float32": 4 * sum(kept),
        "float16": 2 * sum(kept),
        "int8": sum(4 + 1 + k for k in kept),  # scale, coding byte, codes packed
        "int4": sum(4 + 1 + (k + 1) // 2 for k in kept),
        # one scale per output channel: last axis of a kernel, else 1
        "int8-channel": (4 * 3 + 1 + 8) + (4 + 1 + 5) + (4 * 3 + 1 + 0) + (4 + 1 + 0) + (4 + 1 + 1),
    }
    for p, size in expected.items():
        assert values_only_size(shapes, masks, p) == size, p
        ts = [np.arange(np.prod(s), dtype=np.float32).reshape(s) % 7 - 3 for s in shapes]  # too few to code
        body = encode_values_only(ts, masks, p)
        assert len(body) == size, p
        out = decode_values_only(body, shapes, masks, p)
        assert [o.shape for o in out] == shapes


@pytest.mark.parametrize("precision", ALL)
def test_values_only_rejects_wrong_lengths(precision):
    masks, ts = example_masks(), example_tensors()
    body = encode_values_only(ts, masks, precision)
    for bad in (body[:-1], body + b"\0", b"", body[1:]):
        expect_codec_error(decode_values_only, bad, SHAPES, masks, precision)
    expect_codec_error(decode_values_only, body + bytes(values_only_size(SHAPES, masks, precision)), SHAPES, masks,
                       precision, match="values section is")


def test_values_only_rejects_unknown_precision_and_bad_values():
    masks, ts = example_masks(), example_tensors()
    body = encode_values_only(ts, masks, "float32")
    expect_codec_error(decode_values_only, body, SHAPES, masks, "float64", match="unknown precision")
    nan = np.array([np.nan], "<f4").tobytes()
    expect_codec_error(decode_values_only, nan, [(1,)], [None], "float32", match="NaN")
    expect_codec_error(decode_values_only, struct.pack("<f", -1.0) + b"\0\x01", [(1,)], [None], "int8",
                       match="scale")


def test_values_only_against_another_layout_with_the_same_size():
    """Values-only bytes carry no layout: decoding against another layout of the same byte size is
    not detectable here (the mask digest guards that in the protocol)."""
    ts = [np.arange(6, dtype=np.float32)]
    m1 = [np.array([1, 1, 1, 0, 0, 0], bool)]
    m2 = [np.array([0, 0, 0, 1, 1, 1], bool)]
    (o,) = decode_values_only(encode_values_only(ts, m1, "float32"), [(6,)], m2, "float32")
    assert o.tolist() == [0, 0, 0, 0, 1, 2]


def test_encode_values_only_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mask shape"):
        encode_values_only([np.ones((2, 3), np.float32)], [np.ones((3, 2), bool)], "int8")
    with pytest.raises(ValueError):
        encode_values_only([np.ones(2, np.float32)], [None, None], "int8")
    with pytest.raises(ValueError, match="unknown precision"):
        encode_values_only([np.ones(2, np.float32)], [None], "bfloat16")
    with pytest.raises(ValueError):
        encode_values_only([np.array([1.0, np.nan], np.float32)], [None], "float32")
    with pytest.raises(ValueError):
        encode_values_only([np.array([7e4], np.float32)], [None], "float16")


def test_decode_values_only_rejects_masks_that_do_not_fit_the_shapes():
    m = [np.ones((3, 4), bool)]
    body = encode_values_only([np.ones((3, 4), np.float32)], m, "float32")
    for shapes in ([(2,)], [(4, 3)]):
        with pytest.raises(CodecError):
            decode_values_only(body, shapes, m, "float32")


def test_values_only_stochastic_rounding_uses_the_rng():
    masks, ts = example_masks(), example_tensors()
    a = encode_values_only(ts, masks, "int8", stochastic=True, rng=np.random.default_rng(1))
    b = encode_values_only(ts, masks, "int8", stochastic=True, rng=np.random.default_rng(1))
    c = encode_values_only(ts, masks, "int8", stochastic=True, rng=np.random.default_rng(2))
    assert a == b != c and max(len(a), len(c)) <= values_only_size(SHAPES, masks, "int8")
    for t, o, m in zip(ts, decode_values_only(a, SHAPES, masks, "int8"), masks):
        sel = np.ones(t.shape, bool) if m is None else m
        bound = 2 * quantization_error_bound(t[sel], "int8")  # stochastic: up to a whole step
        assert np.abs(o[sel] - t[sel]).max() <= bound
        assert np.all(o[~sel] == 0.0)
    with pytest.raises(ValueError):
        encode_values_only(ts, masks, "int8", stochastic=True)


# --------------------------------------------------------------------------- self-describing


@pytest.mark.parametrize("precision", ALL)
def test_self_describing_round_trip(precision):
    masks, ts = example_masks(), example_tensors(scale=2.0)
    body = encode_self_describing(ts, masks, NAMES, precision)
    d = decode_self_describing(body, expected=list(zip(NAMES, SHAPES)))
    assert d.names == NAMES and d.precision is precision
    for t, o, m_in, m_out in zip(ts, d.tensors, masks, d.masks):
        assert_decoded(t, o, m_in, precision)
        if m_in is None:
            assert m_out is None
        else:
            assert m_out.dtype == np.bool_ and m_out.shape == m_in.shape and np.array_equal(m_out, m_in)
    # without an expected layout the table is taken as it is
    d2 = decode_self_describing(bytes(body))
    assert d2.names == NAMES and all(np.array_equal(a, b) for a, b in zip(d.tensors, d2.tensors))


@pytest.mark.parametrize("precision", ALL)
def test_self_describing_without_masks(precision):
    ts = example_tensors(seed=9)
    d = decode_self_describing(encode_self_describing(ts, [None] * 5, NAMES, precision))
    assert d.masks == [None] * 5
    for t, o in zip(ts, d.tensors):
        assert_decoded(t, o, None, precision)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 0.97, 1.0])
def test_self_describing_masks_of_every_density_round_trip(density):
    rng = np.random.default_rng(int(density * 1000))
    shape = (40, 50)
    m = rng.random(shape) < density
    t = rng.standard_normal(shape).astype(np.float32)
    body = encode_self_describing([t], [m], ["k"], "int4")
    d = decode_self_describing(body, expected=[("k", shape)])
    assert d.masks[0] is not None and np.array_equal(d.masks[0], m)  # all-kept stays a mask, not None
    assert_decoded(t, d.tensors[0], m, INT4)
    method, mask_bytes = encode_mask(m.ravel())
    values = len(body) - (2 + 1 + 1 + 1 + 8 + 12) - len(mask_bytes)
    assert 5 <= values <= value_section_size(int(m.sum()), "int4")  # Gaussian int4 codes: Golomb-coded
    assert values < value_section_size(int(m.sum()), "int4") or m.sum() < 100


def test_self_describing_layout_is_the_documented_one():
    m = np.array([[True, False], [False, True], [True, True]])
    t = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([1.5, -2.0], np.float32)
    body = encode_self_describing([t, b], [m, None], ["w", "bias"], "float16")
    method, mask_bytes = encode_mask(m.ravel())
    want = section(
        [table_entry(b"w", (3, 2), FLOAT16.wire_id, 1, method, 4, len(mask_bytes)),
         table_entry(b"bias", (2,), FLOAT16.wire_id, 0, MaskMethod.ALL_KEPT, 2, 0)],
        mask_bytes + encode_values(t[m], "float16") + encode_values(b, "float16"))
    assert body == want


def test_self_describing_edge_shapes():
    shapes = [(), (0,), (3, 0), (0, 4), (1, 1, 1, 1, 1, 1, 1, 1)]
    ts = [np.full(s, 2.5, np.float32) for s in shapes]
    masks = [None, np.zeros((0,), bool), None, np.zeros((0, 4), bool), np.ones((1,) * 8, bool)]
    names = ["scalar", "empty", "empty2", "empty3", "rank8"]
    for p in ALL:
        d = decode_self_describing(encode_self_describing(ts, masks, names, p), expected=list(zip(names, shapes)))
        assert [o.shape for o in d.tensors] == shapes
        assert d.tensors[0] == pytest.approx(2.5, rel=0.1)
        body = encode_values_only(ts, masks, p)
        assert [o.shape for o in decode_values_only(body, shapes, masks, p)] == shapes


def test_self_describing_names_may_be_unicode_and_255_bytes():
    names = ["é" * 127, "x" * 255, ""]
    ts = [np.ones(2, np.float32)] * 3
    d = decode_self_describing(encode_self_describing(ts, [None] * 3, names, "float32"))
    assert d.names == names
    with pytest.raises(ValueError):
        encode_self_describing(ts[:1], [None], ["x" * 256], "float32")


def test_self_describing_mixed_precisions_report_none():
    v1, v2 = np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)
    body = section(
        [table_entry(b"a", (2,), FLOAT32.wire_id, 0, 0, 2, 0),
         table_entry(b"b", (1,), INT8.wire_id, 0, 0, 1, 0)],
        encode_values(v1, "float32") + encode_values(v2, "int8"))
    d = decode_self_describing(body)
    assert d.precision is None and d.tensors[0].tolist() == [1.0, 2.0]
    assert d.tensors[1][0] == pytest.approx(3.0)


def test_self_describing_empty_list():
    body = encode_self_describing([], [], [], "int8")
    assert body == b"\x00\x00"
    d = decode_self_describing(body, expected=[])
    assert (d.names, d.tensors, d.masks) == ([], [], [])


def test_encode_self_describing_rejects_bad_arguments():
    t = [np.ones((2, 2), np.float32)]
    with pytest.raises(ValueError):
        encode_self_describing(t, [None], ["a", "b"], "int8")
    with pytest.raises(ValueError, match="mask shape"):
        encode_self_describing(t, [np.ones(4, bool)], ["a"], "int8")
    with pytest.raises(ValueError):
        encode_self_describing(t, [None], ["a"], "int2")


@pytest.mark.parametrize(
    "expected,match",
    [
        ([("dense/kernel", (6, 5))], "expected 1"),
        (list(zip(NAMES, SHAPES)) + [("extra", (1,))], "expected 6"),
        ([("dense/kernelX", (6, 5))] + list(zip(NAMES[1:], SHAPES[1:])), "expected 'dense/kernelX'"),
        ([("dense/kernel", (5, 6))] + list(zip(NAMES[1:], SHAPES[1:])), "expected 'dense/kernel'"),
        (list(zip(NAMES, SHAPES[:-1] + [(7, 3, 1)])), "out/kernel"),
        (list(zip(NAMES[::-1], SHAPES[::-1])), "tensor 0"),
    ],
)
def test_self_describing_expected_layout_mismatch_is_rejected(expected, match):
    body = encode_self_describing(example_tensors(), example_masks(), NAMES, "int8")
    expect_codec_error(decode_self_describing, body, expected=expected, match=match)


def test_self_describing_expected_accepts_list_shapes():
    body = encode_self_describing(example_tensors(), example_masks(), NAMES, "int8")
    d = decode_self_describing(body, expected=[(n, list(s)) for n, s in zip(NAMES, SHAPES)])
    assert d.names == NAMES


def test_self_describing_leftover_and_missing_bytes():
    body = encode_self_describing(example_tensors(), example_masks(), NAMES, "int8")
    expect_codec_error(decode_self_describing, body + b"\0", match="left over")
    expect_codec_error(decode_self_describing, body + b"\0" * 100, match="left over")
    for cut in (1, 2, 10, len(body) - 2, len(body) - 1):
        expect_codec_error(decode_self_describing, body[: len(body) - cut])
    expect_codec_error(decode_self_describing, b"", match="ends early")
    expect_codec_error(decode_self_describing, b"\x01", match="ends early")


F32 = FLOAT32.wire_id


@pytest.mark.parametrize(
    "body,match",
    [
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 2, 0, dtype=1)], b"\0" * 8), "dtype",
                     id="dtype"),
        pytest.param(section([table_entry(b"a", (2,), 5, 0, 0, 2, 0)], b"\0" * 8), "precision id",
                     id="precision-5"),
        pytest.param(section([table_entry(b"a", (2,), 255, 0, 0, 2, 0)], b"\0" * 8), "precision id",
                     id="precision-255"),
        pytest.param(section([table_entry(b"a", (2,), F32, 2, 0, 2, 0)], b"\0" * 8), "flags", id="flags-2"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0x81, 0, 2, 0)], b"\0" * 8), "flags",
                     id="flags-81"),
        pytest.param(section([table_entry(b"a", (2,), F32, 1, MaskMethod.BITMAP, 3, 1)], b"\x80" + b"\0" * 12),
                     "3 kept of 2", id="kept>size"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, MaskMethod.BITMAP, 2, 0)], b"\0" * 8),
                     "unmasked tensor with a mask", id="unmasked-method"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 1, 0)], b"\0" * 4),
                     "unmasked tensor with a mask", id="unmasked-kept"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 2, 1)], b"\0" * 9),
                     "unmasked tensor with a mask", id="unmasked-mask-bytes"),
        pytest.param(section([table_entry(b"\xff\xfe", (2,), F32, 0, 0, 2, 0)], b"\0" * 8), "not UTF-8",
                     id="name-not-utf8"),
        pytest.param(section([table_entry(b"a", (2,), F32, 1, 9, 1, 0)], b"\0" * 4), "unknown mask method",
                     id="mask-method-9"),
        pytest.param(section([table_entry(b"a", (8,), F32, 1, MaskMethod.BITMAP, 1, 1)], b"\x03" + b"\0" * 4),
                     "BITMAP", id="bitmap-popcount"),
        pytest.param(section([table_entry(b"a", (2,), F32, 1, MaskMethod.NONE_KEPT, 1, 0)], b"\0" * 4),
                     "NONE_KEPT", id="none-kept-with-kept"),
        pytest.param(section([table_entry(b"a", (2,), F32, 1, MaskMethod.BITMAP, 1, 50)], b"\x80" + b"\0" * 4),
                     "ends early", id="mask-len-past-end"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 2, 0)], b"\0" * 7), "ends early",
                     id="values-short"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 2, 0)], b"\0\0\xc0\x7f" + b"\0" * 4), "NaN",
                     id="values-nan"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 2, 0)], b"\0" * 8, count=2), "ends early",
                     id="count-too-large"),
        pytest.param(section([table_entry(b"a", (2,), F32, 0, 0, 2, 0)], b"\0" * 8, count=0), "left over",
                     id="count-too-small"),
    ],
)
def test_self_describing_table_checks(body, match):
    expect_codec_error(decode_self_describing, body, match=match)


def test_hand_built_section_decodes():
    """Sanity check of the hand-built sections above."""
    d = decode_self_describing(section([table_entry(b"a", (2,), F32, 0, 0, 2, 0)],
                                       struct.pack("<2f", 1.0, -2.0)))
    assert d.names == ["a"] and d.tensors[0].tolist() == [1.0, -2.0] and d.masks == [None]
    d = decode_self_describing(section([table_entry(b"a", (8,), F32, 1, MaskMethod.BITMAP, 2, 1)],
                                       b"\x81" + struct.pack("<2f", 1.0, -2.0)))
    assert d.tensors[0].tolist() == [1.0, 0, 0, 0, 0, 0, 0, -2.0]


# --------------------------------------------------------------------------- DecodeLimits


def test_default_limits():
    assert DEFAULT_LIMITS == DecodeLimits()
    assert (DEFAULT_LIMITS.max_tensors, DEFAULT_LIMITS.max_elements, DEFAULT_LIMITS.max_ndim) == (4096, 1 << 26, 8)


def assert_refused_fast(body: bytes, match: str, limits: DecodeLimits = DEFAULT_LIMITS, **kw) -> None:
    peak, dt, err = peak_bytes(decode_self_describing, body, limits, **kw)
    assert type(err) is CodecError, repr(err)
    assert match in err.reason, err.reason
    assert peak < 2 * MB and dt < 2.0, (peak, dt)


@pytest.mark.parametrize("method,kept", [(MaskMethod.NONE_KEPT, 0), (MaskMethod.ALL_KEPT, 2**31),
                                         (MaskMethod.BITMAP, 5)])
def test_huge_tensor_claims_are_refused_before_allocation(method, kept):
    body = section([table_entry(b"w", (2**31,), F32, 1, method, kept, 0)])
    assert_refused_fast(body, "more than 67108864 elements")
    body = section([table_entry(b"w", (2**16, 2**16), F32, 0, 0, 2**32 - 1, 0)])
    assert_refused_fast(body, "more than 67108864 elements")
    body = section([table_entry(b"w", (2**32 - 1,) * 8, F32, 1, method, 0, 0)])
    assert_refused_fast(body, "more than 67108864 elements")


def test_element_limit_counts_all_tensors():
    entry = table_entry(b"w", (2**25,), F32, 1, MaskMethod.NONE_KEPT, 0, 0)
    assert_refused_fast(section([entry] * 3), "more than 67108864 elements")
    small = DecodeLimits(max_elements=10)
    ok = section([table_entry(b"a", (5,), F32, 1, MaskMethod.NONE_KEPT, 0, 0)] * 2)
    assert [t.tolist() for t in decode_self_describing(ok, small).tensors] == [[0.0] * 5] * 2
    assert_refused_fast(section([table_entry(b"a", (5,), F32, 1, MaskMethod.NONE_KEPT, 0, 0)] * 2
                                + [table_entry(b"b", (1,), F32, 1, MaskMethod.NONE_KEPT, 0, 0)]),
                        "more than 10 elements", small)


def test_tensor_count_limit():
    assert_refused_fast(section([], count=4097), "4097 tensors exceed the limit of 4096")
    assert_refused_fast(section([], count=0xFFFF), "exceed the limit")
    limits = DecodeLimits(max_tensors=2)
    t = [np.ones(1, np.float32)] * 3
    body = encode_self_describing(t, [None] * 3, ["a", "b", "c"], "float32")
    assert_refused_fast(body, "3 tensors exceed the limit of 2", limits)
    assert len(decode_self_describing(body, DecodeLimits(max_tensors=3)).tensors) == 3


def test_rank_limit():
    assert_refused_fast(section([table_entry(b"w", (1,) * 9, F32, 0, 0, 1, 0)], b"\0" * 4), "rank 9 exceeds 8")
    assert_refused_fast(section([table_entry(b"w", (1,) * 255, F32, 0, 0, 1, 0)]), "rank 255")
    body = encode_self_describing([np.ones((1, 1, 1), np.float32)], [None], ["w"], "int8")
    assert_refused_fast(body, "rank 3 exceeds 2", DecodeLimits(max_ndim=2))


def test_expected_count_is_checked_before_the_table_is_read():
    assert_refused_fast(section([], count=4000), "expected 1", expected=[("w", (2,))])


@pytest.mark.parametrize("entry", [
    pytest.param(table_entry(b"w", (2**11, 2**11), INT8_CHANNEL.wire_id, 0, 0, 2**22, 0),
                 id="int8-channel-unmasked"),
    pytest.param(table_entry(b"w", (2**22,), F32, 1, MaskMethod.ALL_KEPT, 2**22, 0), id="masked-all-kept"),
])
def test_table_without_its_data_is_refused_before_allocation(entry):
    # 2**22 elements: within the limits, but the value bytes the table promises are missing.
    assert_refused_fast(section([entry]), "ends early")


# --------------------------------------------------------------------------- lossless stage


def test_compress_only_when_smaller():
    raw = bytes(1000)
    for m in (Compression.ZLIB, Compression.ZSTD, "zlib", "ZSTD", "Zlib"):
        used, packed = compress(raw, m)
        assert used in (Compression.ZLIB, Compression.ZSTD) and len(packed) < len(raw)
        assert decompress(packed, used, len(raw), len(raw)) == raw
    noise = np.random.default_rng(0).bytes(1000)
    for m in (Compression.ZLIB, Compression.ZSTD):
        assert compress(noise, m) == (Compression.NONE, noise)
    assert compress(raw, Compression.NONE) == (Compression.NONE, raw)
    assert compress(raw, "none") == (Compression.NONE, raw)
    for m in Compression:
        assert compress(b"", m) == (Compression.NONE, b"")
    assert compress(b"a", "zlib") == (Compression.NONE, b"a")
    assert [int(c) for c in Compression] == [0, 1, 2]


@pytest.mark.parametrize("method", [Compression.ZLIB, Compression.ZSTD])
def test_compress_round_trips_a_tensor_section(method):
    body = encode_self_describing(example_tensors(), example_masks(), NAMES, "int8")
    body = body + bytes(500)  # make it compressible for sure
    used, packed = compress(body, method)
    assert used is method and len(packed) < len(body)
    assert decompress(packed, int(used), len(body), len(body)) == body
    assert decompress(memoryview(packed), used, len(body), 10 * len(body)) == body


def test_decompress_none_checks_the_length():
    assert decompress(b"abc", Compression.NONE, 3, 3) == b"abc"
    expect_codec_error(decompress, b"abc", Compression.NONE, 2, 10, match="header says 2")
    expect_codec_error(decompress, b"abc", Compression.NONE, 4, 10, match="header says 4")
    expect_codec_error(decompress, b"abc", Compression.NONE, 3, 2, match="exceeds the limit")


@pytest.mark.parametrize("method", [3, 255, -1])
def test_decompress_unknown_method(method):
    expect_codec_error(decompress, b"abc", method, 3, 10, match="unknown compression")


RAW = b"fedprune " * 200
ZLIB = zlib.compress(RAW)
ZSTD = zstandard.ZstdCompressor().compress(RAW)


@pytest.mark.parametrize("method,packed", [(Compression.ZLIB, ZLIB), (Compression.ZSTD, ZSTD)])
def test_decompress_rejects_damaged_streams(method, packed):
    assert decompress(packed, method, len(RAW), len(RAW)) == RAW
    for cut in (1, 4, len(packed) // 2, len(packed) - 1):
        expect_codec_error(decompress, packed[:-cut], method, len(RAW), 10 * len(RAW))
    expect_codec_error(decompress, b"", method, len(RAW), 10 * len(RAW))
    expect_codec_error(decompress, b"\x00" * 40, method, len(RAW), 10 * len(RAW))
    expect_codec_error(decompress, np.random.default_rng(1).bytes(200), method, len(RAW), 10 * len(RAW))
    # a raw length other than the stream's, either way
    expect_codec_error(decompress, packed, method, len(RAW) - 1, 10 * len(RAW))
    expect_codec_error(decompress, packed, method, len(RAW) + 1, 10 * len(RAW))
    expect_codec_error(decompress, packed, method, 0, 10 * len(RAW))
    # the limit applies whatever the stream says
    expect_codec_error(decompress, packed, method, len(RAW), len(RAW) - 1, match="exceeds the limit")
    # the other method's stream
    other = ZSTD if method is Compression.ZLIB else ZLIB
    expect_codec_error(decompress, other, method, len(RAW), 10 * len(RAW))


def test_decompress_zlib_rejects_trailing_data():
    expect_codec_error(decompress, ZLIB + b"\0", Compression.ZLIB, len(RAW), 10 * len(RAW), match="trailing")
    expect_codec_error(decompress, ZLIB + ZLIB, Compression.ZLIB, len(RAW), 10 * len(RAW), match="trailing")


@pytest.mark.parametrize("tail", [b"\0", b"garbage", ZSTD], ids=["zero-byte", "garbage", "second-frame"])
def test_decompress_zstd_rejects_trailing_data(tail):
    expect_codec_error(decompress, ZSTD + tail, Compression.ZSTD, len(RAW), 10 * len(RAW))


BOMB_RAW = 50_000_000


@pytest.fixture(scope="module")
def bombs() -> dict[Compression, bytes]:
    """50 MB of zeros, compressed by both methods, built without holding 50 MB at once."""
    chunk = bytes(1 << 20)
    z = zlib.compressobj(9)
    parts = [z.compress(chunk) for _ in range(BOMB_RAW // len(chunk))]
    parts.append(z.compress(bytes(BOMB_RAW % len(chunk))))
    parts.append(z.flush())
    zs = zstandard.ZstdCompressor(level=3).compressobj()
    zparts = [zs.compress(chunk) for _ in range(BOMB_RAW // len(chunk))]
    zparts.append(zs.compress(bytes(BOMB_RAW % len(chunk))))
    zparts.append(zs.flush())
    out = {Compression.ZLIB: b"".join(parts), Compression.ZSTD: b"".join(zparts)}
    assert all(len(b) < 100_000 for b in out.values())
    return out


@pytest.mark.parametrize("method", [Compression.ZLIB, Compression.ZSTD])
@pytest.mark.parametrize("raw_len,max_len,match", [
    (1000, 1000, ""),  # claimed small: at most raw_len + 1 bytes are produced
    (0, 1000, ""),
    (BOMB_RAW, BOMB_RAW - 1, "exceeds the limit"),  # claimed large, over the limit: nothing is decompressed
    (2**40, 2**20, "exceeds the limit"),
])
def test_zip_bombs_are_refused_without_allocating(bombs, method, raw_len, max_len, match):
    peak, dt, err = peak_bytes(decompress, bombs[method], method, raw_len, max_len)
    assert type(err) is CodecError, repr(err)
    assert match in err.reason
    assert peak < 2 * MB, peak
    assert dt < 2.0


def test_zip_bomb_with_negative_raw_len_is_refused_without_allocating(bombs):
    peak, dt, err = peak_bytes(decompress, bombs[Compression.ZLIB], Compression.ZLIB, -1, 1000)
    assert type(err) is CodecError, repr(err)
    assert peak < 2 * MB, peak


@pytest.mark.parametrize("method", list(Compression))
@pytest.mark.parametrize("raw_len", [-1, -2, -(2**40)])
def test_negative_raw_len_is_a_codec_error(method, raw_len):
    packed = {Compression.NONE: RAW, Compression.ZLIB: ZLIB, Compression.ZSTD: ZSTD}[method]
    expect_codec_error(decompress, packed, method, raw_len, 10 * len(RAW))


# --------------------------------------------------------------------------- properties


@st.composite
def layouts(draw, max_tensors: int = 4):
    n = draw(st.integers(0, max_tensors))
    shapes, masks, tensors = [], [], []
    for _ in range(n):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
        shapes.append(tuple(shape))
        if draw(st.booleans()):
            masks.append(None)
        else:
            density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
            seed = draw(st.integers(0, 2**32 - 1))
            masks.append(np.random.default_rng(seed).random(shape) < density)
        tensors.append(draw(hnp.arrays(
            np.float32, shape,
            elements=st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=32))))
    return shapes, masks, tensors


@PROP
@given(layout=layouts(), precision=st.sampled_from(ALL))
def test_random_layouts_round_trip(layout, precision):
    shapes, masks, tensors = layout
    body = encode_values_only(tensors, masks, precision)
    assert len(body) <= values_only_size(shapes, masks, precision)  # never larger than packed
    out = decode_values_only(body, shapes, masks, precision)
    for t, o, m in zip(tensors, out, masks):
        assert_decoded(t, o, m, precision)
    names = [f"t{i}" for i in range(len(shapes))]
    d = decode_self_describing(encode_self_describing(tensors, masks, names, precision),
                               expected=list(zip(names, shapes)))
    assert d.names == names
    for t, o, m_in, m_out in zip(tensors, d.tensors, masks, d.masks):
        assert_decoded(t, o, m_in, precision)
        assert (m_in is None and m_out is None) or np.array_equal(m_in, m_out)
    # both encodings carry the same values
    assert all(np.array_equal(a, b) for a, b in zip(out, d.tensors))


SMALL = DecodeLimits(max_tensors=16, max_elements=4096, max_ndim=4)


@PROP
@given(data=st.binary(max_size=300))
def test_random_bytes_self_describing_decode_or_codec_error(data):
    decode_or_codec_error(decode_self_describing, data, SMALL)
    decode_or_codec_error(decode_self_describing, data, SMALL, expected=[("a", (3,))])


@st.composite
def random_tables(draw):
    """Sections that parse as far as the table: random (mostly plausible) entries and random data."""
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([b"a", b"", b"\xff", b"kernel"]))
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        size = int(np.prod(shape))
        pid = draw(st.integers(0, 5))
        flags = draw(st.sampled_from([0, 1, 1, 2]))
        method = draw(st.integers(0, 7))
        kept = draw(st.integers(0, size + 1) | st.just(size))
        mask_len = draw(st.integers(0, 4) | st.just((size + 7) // 8))
        entries.append(table_entry(name, shape, pid, flags, method, kept, mask_len))
    return section(entries, draw(st.binary(max_size=120)))


@PROP
@given(body=random_tables())
def test_random_tables_decode_or_codec_error(body):
    d = decode_or_codec_error(decode_self_describing, body, SMALL)
    if d is not None:
        for t, m in zip(d.tensors, d.masks):
            assert t.dtype == np.float32 and np.isfinite(t).all()
            if m is not None:
                assert m.shape == t.shape and np.all(t[~m] == 0.0)


@PROP
@given(layout=layouts(max_tensors=3), precision=st.sampled_from(ALL), data=st.data())
def test_random_bytes_values_only_decode_or_codec_error(layout, precision, data):
    shapes, masks, _ = layout
    size = values_only_size(shapes, masks, precision)
    n = data.draw(st.sampled_from([size, size, max(0, size - 1), size + 1, 0]))
    body = data.draw(st.binary(min_size=n, max_size=n))
    out = decode_or_codec_error(decode_values_only, body, shapes, masks, precision)
    if out is not None:
        assert len(body) <= size
        for o, s, m in zip(out, shapes, masks):
            assert o.shape == s and o.dtype == np.float32 and np.isfinite(o).all()
            if m is not None:
                assert np.all(o[~m] == 0.0)
    elif len(body) == size:
        pass  # random scales/values may be refused (NaN, negative scale, -128, ...)
    else:
        assert out is None


SD_BODIES = {
    p: encode_self_describing(example_tensors(), example_masks(), NAMES, p) for p in ALL
}


@PROP
@given(precision=st.sampled_from(ALL), expect=st.booleans(), data=st.data())
def test_mutated_self_describing_sections_decode_or_codec_error(precision, expect, data):
    original = SD_BODIES[precision]
    mutated = original
    for _ in range(data.draw(st.integers(1, 3))):
        mutated = mutate(mutated, data.draw) if mutated else mutated
    kw = {"expected": list(zip(NAMES, SHAPES))} if expect else {}
    d = decode_or_codec_error(decode_self_describing, mutated, SMALL, **kw)
    if d is not None:
        assert all(np.isfinite(t).all() for t in d.tensors)
        if expect:
            assert [t.shape for t in d.tensors] == SHAPES


@PROP
@given(method=st.sampled_from(list(Compression) + [3]), data=st.binary(max_size=200),
       raw_len=st.integers(-2, 3000), seed_stream=st.sampled_from([b"", ZLIB, ZSTD]), cut=st.integers(0, 50))
def test_decompress_random_input_or_codec_error(method, data, raw_len, seed_stream, cut):
    stream = seed_stream[: max(0, len(seed_stream) - cut)] + data if seed_stream else data
    out = decode_or_codec_error(decompress, stream, method, raw_len, 2000)
    if out is not None:
        assert len(out) == raw_len <= 2000


@pytest.mark.parametrize("body_hex", [
    "010001610300000000ffffffffffffffff000000000000000000000000",  # (0, 2**32-1, 2**32-1)
    "0100016103ffffffffffffffff00000000000000000000000000000000",  # (2**32-1, 2**32-1, 0)
])
def test_zero_sized_tensor_with_huge_dimensions_is_refused(body_hex):
    # Found by scripts/fuzz_codec.py: size 0 passed the element limit, then numpy's reshape failed.
    expect_codec_error(decode_self_describing, bytes.fromhex(body_hex), match="more than")

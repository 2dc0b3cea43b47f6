"""Tests for converters.codec (values-only tensors, frames) and converters.protocol (task/update).

The decoders face bytes from the network: whatever arrives must decode or raise ``CodecError``.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from converters import codec
from converters.codec import (
    FRAME_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    CodecError,
    decode_values,
    encode_values,
    pack_frame,
    unpack_frame,
)
from converters.protocol import (
    Kind,
    TrainTask,
    Update,
    decode_task,
    decode_update,
    encode_task,
    encode_update,
    update_size_bound,
)
from fedprune.pruning.masks import mask_digest

PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX = 1 << 20
PREFIX = struct.Struct("<4sBBI")


def raw_frame(kind: int, head: bytes, body: bytes = b"", magic: bytes = MAGIC,
              version: int = FRAME_VERSION, hlen: int | None = None) -> bytes:
    """A frame built by hand with a correct CRC, so each check can be reached on its own."""
    data = PREFIX.pack(magic, version, kind, len(head) if hlen is None else hlen) + head + body
    return data + struct.pack("<I", zlib.crc32(data))


def recrc(data: bytes) -> bytes:
    """Replace the trailing CRC of ``data`` (assumed >= 4 bytes) with the correct one."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


# --------------------------------------------------------------------------- fixtures / helpers

SHAPES = [(3, 4), (4,), (2, 2, 3), (5,)]


def example_masks(seed: int = 0) -> list[np.ndarray | None]:
    rng = np.random.default_rng(seed)
    return [rng.random((3, 4)) > 0.4, None, rng.random((2, 2, 3)) > 0.7, None]


def example_tensors(masks, seed: int = 1, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]
    return [t if m is None else np.where(m, t, 0.0).astype(np.float32) for t, m in zip(ts, masks)]


def make_update(precision: str = "int8", error: str = "", seed: int = 0):
    masks = example_masks(seed)
    delta = None if error else example_tensors(masks, seed + 1, scale=0.01)
    u = Update(round=3, attempt=1, device_id="dev-7", num_samples=42,
               metrics={"loss": 0.25, "accuracy": 0.9}, delta=delta, precision=precision, error=error)
    return u, masks


def make_task(downlink: str = "float32"):
    masks = example_masks(3)
    return TrainTask(
        round=5, attempt=0, architecture_digest="abc123", weights=example_tensors(masks, 4),
        masks=masks, training={"local_epochs": 2, "batch_size": 16, "optimizer": "adam",
                               "learning_rate": 0.002},
        uplink_precision="int8", deadline_s=120.0, downlink_precision=downlink, session="s-1f2e",
    )


# --------------------------------------------------------------------------- values round trips


def test_float32_round_trip_is_exact_and_pruned_positions_are_zero():
    masks = example_masks()
    ts = [t + 0.5 for t in example_tensors(masks)]  # nonzero at pruned positions too
    out = decode_values(encode_values(ts, masks, "float32"), SHAPES, masks, "float32")
    for t, o, m in zip(ts, out, masks):
        assert o.shape == t.shape and o.dtype == np.float32
        if m is None:
            assert np.array_equal(o, t)  # None mask carries all values
        else:
            assert np.array_equal(o[m], t[m])
            assert np.all(o[~m] == 0.0) and not np.any(np.signbit(o[~m]))


def test_float16_round_trip_within_fp16_precision():
    masks = example_masks()
    ts = example_tensors(masks, scale=30.0)
    out = decode_values(encode_values(ts, masks, "float16"), SHAPES, masks, "float16")
    for t, o, m in zip(ts, out, masks):
        sel = np.ones(t.shape, bool) if m is None else m
        np.testing.assert_allclose(o[sel], t[sel], rtol=2.0**-11, atol=2.0**-24)
        assert np.all(o[~sel] == 0.0)


def _int8_error_ok(t, o, m) -> None:
    sel = np.ones(t.shape, bool) if m is None else m
    if not sel.any():
        assert np.all(o == 0.0)
        return
    scale = np.float32(np.abs(t[sel]).max() / np.float32(127.0))
    err = np.abs(o[sel].astype(np.float64) - t[sel].astype(np.float64))
    assert err.max() <= float(scale) / 2 * (1 + 1e-5) + 1e-30
    assert np.all(o[~sel] == 0.0)


def test_int8_round_trip_error_at_most_half_a_step():
    masks = example_masks()
    ts = example_tensors(masks, scale=3.0)
    out = decode_values(encode_values(ts, masks, "int8"), SHAPES, masks, "int8")
    for t, o, m in zip(ts, out, masks):
        _int8_error_ok(t, o, m)


def test_int8_scale_comes_from_kept_values_only():
    m = np.array([True, False, True, False, True, False])
    t = np.array([0.01, 1e6, -0.02, -1e6, 0.005, 1e6], np.float32)  # huge values at pruned slots
    body = encode_values([t], [m], "int8")
    (scale,) = struct.unpack_from("<f", body)
    assert scale == pytest.approx(0.02 / 127, rel=1e-6)
    (o,) = decode_values(body, [(6,)], [m], "int8")
    np.testing.assert_allclose(o[m], t[m], atol=0.02 / 127 / 2 * 1.0001)
    assert np.all(o[~m] == 0.0)


def test_int8_all_zero_tensor_and_fully_pruned_tensor():
    masks = [None, np.zeros(4, bool)]
    ts = [np.zeros(3, np.float32), np.arange(4, dtype=np.float32)]
    out = decode_values(encode_values(ts, masks, "int8"), [(3,), (4,)], masks, "int8")
    assert np.array_equal(out[0], np.zeros(3)) and np.array_equal(out[1], np.zeros(4))


@pytest.mark.parametrize("precision,width", [("float32", 4), ("float16", 2), ("int8", 1)])
def test_values_body_size_is_kept_count_times_width(precision, width):
    masks = example_masks()
    body = encode_values(example_tensors(masks), masks, precision)
    kept = sum(int(np.prod(s)) if m is None else int(m.sum()) for s, m in zip(SHAPES, masks))
    extra = 4 * len(SHAPES) if precision == "int8" else 0
    assert len(body) == kept * width + extra
    assert update_size_bound(SHAPES, masks, precision) == kept * width + extra


def test_encode_values_rejects_nan_and_unknown_precision():
    with pytest.raises(ValueError):
        encode_values([np.array([1.0, np.nan])], [None], "float32")
    with pytest.raises(ValueError):
        encode_values([np.array([1.0, np.inf])], [None], "int8")
    # NaN at a pruned position does not travel, so it is fine
    encode_values([np.array([1.0, np.nan])], [np.array([True, False])], "float32")
    with pytest.raises(ValueError):
        encode_values([np.ones(2)], [None], "bfloat16")


def test_decode_values_rejects_wrong_length_shape_precision_and_nonfinite():
    masks = example_masks()
    body = encode_values(example_tensors(masks), masks, "float32")
    for bad in (body[:-1], body + b"\0", b""):
        with pytest.raises(CodecError, match="expected"):
            decode_values(bad, SHAPES, masks, "float32")
    with pytest.raises(CodecError):
        decode_values(body, SHAPES, masks, "float64")
    with pytest.raises(CodecError, match="mask shape"):
        decode_values(body, [(4, 3)] + SHAPES[1:], masks, "float32")
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode_values(np.array([np.nan], "<f4").tobytes(), [(1,)], [None], "float32")
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode_values(np.array([np.inf], "<f2").tobytes(), [(1,)], [None], "float16")
    for bad_scale in (-1.0, np.nan, np.inf):
        with pytest.raises(CodecError, match="scale"):
            decode_values(struct.pack("<f", bad_scale) + b"\x01", [(1,)], [None], "int8")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_int8_decode_never_yields_non_finite_values():
    body = struct.pack("<f", 3e38) + bytes([127])
    try:
        (out,) = decode_values(body, [(1,)], [None], "int8")
    except CodecError:
        return
    assert np.all(np.isfinite(out)), out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_float16_encode_of_out_of_range_value_is_refused_or_round_trips():
    t = np.array([70000.0, 1.0], np.float32)
    try:
        body = encode_values([t], [None], "float16")
    except ValueError:
        return
    decode_values(body, [(2,)], [None], "float16")


# --------------------------------------------------------------------------- frame


def test_pack_unpack_frame_round_trip():
    header = {"a": 1, "b": [1, 2, "x"], "c": {"d": None}, "e": 0.5}
    data = pack_frame(7, header, b"\x00\x01body")
    kind, h, body = unpack_frame(data, len(data))
    assert kind == 7 and h == header and bytes(body) == b"\x00\x01body"
    kind, h, body = unpack_frame(pack_frame(2, {}), MAX)
    assert (kind, h, bytes(body)) == (2, {}, b"")


def test_pack_frame_rejects_oversized_header():
    with pytest.raises(CodecError):
        pack_frame(1, {"x": "y" * MAX_HEADER_BYTES})


VALID = pack_frame(2, {"k": "v"}, b"payload")


@pytest.mark.parametrize(
    "data,max_bytes,match",
    [
        (VALID, len(VALID) - 1, "exceeds"),
        (VALID[:9], MAX, "shorter"),
        (b"", MAX, "shorter"),
        (raw_frame(2, b"{}", magic=b"XPRN"), MAX, "magic"),
        (raw_frame(2, b"{}", version=FRAME_VERSION + 1), MAX, "version"),
        (raw_frame(2, b"{}", version=0), MAX, "version"),
        (raw_frame(2, b"{}", hlen=3), MAX, "header length"),
        (raw_frame(2, b"{}", hlen=MAX_HEADER_BYTES + 1), MAX, "header length"),
        (raw_frame(2, b"{}", hlen=0xFFFFFFFF), MAX, "header length"),
        (VALID[:-1] + bytes([VALID[-1] ^ 1]), MAX, "checksum"),
        (VALID[:12] + bytes([VALID[12] ^ 0x20]) + VALID[13:], MAX, "checksum"),
        (VALID[:-5] + VALID[-4:], MAX, "checksum"),
        (raw_frame(2, b"{not json"), MAX, "not JSON"),
        (raw_frame(2, b"\xff\xfe\x00"), MAX, "not JSON"),
        (raw_frame(2, b"[1, 2]"), MAX, "not a JSON object"),
        (raw_frame(2, b'"text"'), MAX, "not a JSON object"),
        (raw_frame(2, b"null"), MAX, "not a JSON object"),
    ],
)
def test_unpack_frame_failures_raise_codec_error(data, max_bytes, match):
    with pytest.raises(CodecError, match=match) as info:
        unpack_frame(data, max_bytes)
    assert type(info.value) is CodecError
    assert info.value.reason == str(info.value)


def test_unpack_frame_deeply_nested_header_raises_codec_error():
    with pytest.raises(CodecError):
        unpack_frame(raw_frame(2, b"[" * 60000), MAX)


def test_unpack_frame_huge_integer_in_header_raises_codec_error():
    data = raw_frame(2, b'{"round":' + b"9" * 5000 + b"}")
    try:
        unpack_frame(data, MAX)
    except CodecError:
        pass
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__} escaped: {e}")


# --------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("downlink", ["float32", "float16", "int8"])
def test_task_round_trip(downlink):
    task = make_task(downlink)
    data = encode_task(task)
    got = decode_task(data, SHAPES, MAX)
    assert (got.round, got.attempt, got.architecture_digest) == (5, 0, "abc123")
    assert got.training == task.training
    assert got.session == "s-1f2e"
    assert (got.uplink_precision, got.downlink_precision, got.deadline_s) == ("int8", downlink, 120.0)
    assert mask_digest(got.masks) == mask_digest(task.masks)
    for m_in, m_out in zip(task.masks, got.masks):
        assert (m_in is None and m_out is None) or np.array_equal(m_in, m_out)
    for w, o, m in zip(task.weights, got.weights, task.masks):
        if downlink == "float32":
            assert np.array_equal(o, w)
        elif downlink == "float16":
            np.testing.assert_allclose(o, w, rtol=2.0**-11, atol=2.0**-24)
        else:
            _int8_error_ok(w, o, m)
    with pytest.raises(CodecError):
        decode_task(data, SHAPES, len(data) - 1)


def test_decode_task_rejects_update_frames_and_mask_tampering():
    u, masks = make_update()
    with pytest.raises(CodecError, match="task"):
        decode_task(encode_update(u, masks), SHAPES, MAX)
    task = make_task()
    kind, h, body = unpack_frame(encode_task(task), MAX)
    bad = dict(h, mask_digest="0" * 32)
    with pytest.raises(CodecError, match="digest"):
        decode_task(pack_frame(kind, bad, bytes(body)), SHAPES, MAX)
    for key in ("round", "masked", "training", "mask_bytes"):
        missing = {k: v for k, v in h.items() if k != key}
        with pytest.raises(CodecError):
            decode_task(pack_frame(kind, missing, bytes(body)), SHAPES, MAX)
    with pytest.raises(CodecError):
        decode_task(pack_frame(kind, dict(h, mask_bytes=len(body) + 1), bytes(body)), SHAPES, MAX)
    with pytest.raises(CodecError):
        decode_task(pack_frame(kind, dict(h, masked=[0, 0]), bytes(body)), SHAPES, MAX)
    with pytest.raises(CodecError):
        decode_task(pack_frame(kind, dict(h, downlink="float64"), bytes(body)), SHAPES, MAX)


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_update_round_trip(precision):
    u, masks = make_update(precision)
    data = encode_update(u, masks)
    got = decode_update(data, SHAPES, masks, MAX)
    assert (got.round, got.attempt, got.device_id, got.num_samples) == (3, 1, "dev-7", 42)
    assert got.metrics == u.metrics and got.precision == precision and got.error == ""
    assert got.mask_digest == mask_digest(masks)
    for d, o, m in zip(u.delta, got.delta, masks):
        if precision == "float32":
            assert np.array_equal(o, d)
        elif precision == "float16":
            np.testing.assert_allclose(o, d, rtol=2.0**-11, atol=2.0**-24)
        else:
            _int8_error_ok(d, o, m)
    _, _, body = unpack_frame(data, MAX)
    assert len(body) == update_size_bound(SHAPES, masks, precision)


def test_error_update_has_no_delta_and_skips_mask_check():
    u, masks = make_update(error="out of memory")
    data = encode_update(u, masks)
    got = decode_update(data, SHAPES, [None] * len(SHAPES), MAX)
    assert got.delta is None and got.error == "out of memory"


def test_decode_update_with_another_mask_names_the_digest():
    u, masks = make_update()
    data = encode_update(u, masks)
    other = [m if m is None else m.copy() for m in masks]
    other[0].flat[0] = not other[0].flat[0]
    with pytest.raises(CodecError, match="digest"):
        decode_update(data, SHAPES, other, MAX)


def test_decode_update_rejects_bad_fields():
    u, masks = make_update("float32")
    kind, h, body = unpack_frame(encode_update(u, masks), MAX)
    body = bytes(body)
    cases = [
        dict(h, n=0), dict(h, round="3"), dict(h, round=True), dict(h, precision="int4"),
        dict(h, metrics=[1]), {k: v for k, v in h.items() if k != "device"},
    ]
    for bad in cases:
        with pytest.raises(CodecError):
            decode_update(pack_frame(kind, bad, body), SHAPES, masks, MAX)
    with pytest.raises(CodecError, match="update"):
        decode_update(pack_frame(Kind.TASK, h, body), SHAPES, masks, MAX)
    with pytest.raises(CodecError, match="expected"):
        decode_update(pack_frame(kind, h, body[:-1]), SHAPES, masks, MAX)
    # non-numeric metrics are dropped, numeric ones kept
    got = decode_update(pack_frame(kind, dict(h, metrics={"a": "x", "b": 2}), body), SHAPES, masks, MAX)
    assert got.metrics == {"b": 2.0}


def test_decode_update_huge_integer_metric_raises_codec_error():
    u, masks = make_update("float32")
    kind, h, body = unpack_frame(encode_update(u, masks), MAX)
    data = pack_frame(kind, dict(h, metrics={"loss": 10**400}), bytes(body))
    try:
        decode_update(data, SHAPES, masks, MAX)
    except CodecError:
        pass
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped: {e}")


@pytest.mark.parametrize("field", ["round", "attempt", "mask_bytes"])
def test_decode_task_infinite_number_raises_codec_error(field):
    kind, h, body = unpack_frame(encode_task(make_task()), MAX)
    data = pack_frame(kind, dict(h, **{field: float("inf")}), bytes(body))
    try:
        decode_task(data, SHAPES, MAX)
    except CodecError:
        pass
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped: {e}")


# --------------------------------------------------------------------------- property tests

UPDATE_MASKS = example_masks()
UPDATE_BYTES = {p: encode_update(make_update(p)[0], UPDATE_MASKS) for p in ("float32", "float16", "int8")}
TASK_BYTES = encode_task(make_task("int8"))


def _decodes_or_codec_error(fn, *args):
    try:
        fn(*args)
    except CodecError:
        pass


@PROP
@given(data=st.binary(max_size=512))
def test_random_bytes_decode_or_raise_codec_error(data):
    _decodes_or_codec_error(decode_update, data, SHAPES, UPDATE_MASKS, MAX)
    _decodes_or_codec_error(decode_task, data, SHAPES, MAX)


@PROP
@given(kind=st.integers(0, 255), version=st.sampled_from([FRAME_VERSION, FRAME_VERSION, 0, 2]),
       head=st.binary(max_size=64), body=st.binary(max_size=64), hlen_delta=st.integers(-3, 3))
def test_random_frames_with_valid_crc_decode_or_raise_codec_error(kind, version, head, body, hlen_delta):
    data = raw_frame(kind, head, body, version=version, hlen=max(0, len(head) + hlen_delta))
    _decodes_or_codec_error(decode_update, data, SHAPES, UPDATE_MASKS, MAX)
    _decodes_or_codec_error(decode_task, data, SHAPES, MAX)


def _mutate(data: bytes, draw) -> bytes:
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


TARGETS = [("update", p) for p in UPDATE_BYTES] + [("task", "int8")]


@PROP
@given(target=st.sampled_from(TARGETS), fix_crc=st.booleans(), data=st.data())
def test_mutated_messages_decode_or_raise_codec_error(target, fix_crc, data):
    what, precision = target
    original = UPDATE_BYTES[precision] if what == "update" else TASK_BYTES
    mutated = _mutate(original, data.draw)
    if fix_crc and len(mutated) >= 4:
        mutated = recrc(mutated)  # get past the checksum so header/length checks are reached
    assume(mutated != original)
    if what == "update":
        _decodes_or_codec_error(decode_update, mutated, SHAPES, UPDATE_MASKS, MAX)
    else:
        _decodes_or_codec_error(decode_task, mutated, SHAPES, MAX)


# JSON values for header fuzzing, non-finite floats and integers beyond 64 bits included.
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.integers() | st.text(max_size=8)
    | st.floats()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@PROP
@given(target=st.sampled_from(TARGETS), data=st.data())
def test_header_field_fuzz_decodes_or_raises_codec_error(target, data):
    what, precision = target
    original = UPDATE_BYTES[precision] if what == "update" else TASK_BYTES
    kind, h, body = unpack_frame(original, MAX)
    h = dict(h)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(h) + ["extra"]))
        if data.draw(st.booleans()) and key in h:
            del h[key]
        else:
            h[key] = data.draw(json_values)
    body = bytes(body)
    if data.draw(st.booleans()):
        body = _mutate(body, data.draw) if body else body
    frame = pack_frame(kind, h, body)
    if what == "update":
        _decodes_or_codec_error(decode_update, frame, SHAPES, UPDATE_MASKS, MAX)
    else:
        _decodes_or_codec_error(decode_task, frame, SHAPES, MAX)


@st.composite
def layouts(draw):
    n = draw(st.integers(0, 4))
    shapes, masks, tensors = [], [], []
    for _ in range(n):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
        shapes.append(shape)
        masks.append(draw(st.none() | hnp.arrays(np.bool_, shape)))
        tensors.append(draw(hnp.arrays(
            np.float32, shape,
            elements=st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=32))))
    return shapes, masks, tensors


@PROP
@given(layout=layouts(), precision=st.sampled_from(["float32", "float16", "int8"]))
def test_round_trip_random_layouts(layout, precision):
    shapes, masks, tensors = layout
    u = Update(round=1, attempt=0, device_id="d", num_samples=5, delta=tensors, precision=precision)
    data = encode_update(u, masks)
    got = decode_update(data, shapes, masks, MAX)
    _, _, body = unpack_frame(data, MAX)
    assert len(body) == update_size_bound(shapes, masks, precision)
    for t, o, m in zip(tensors, got.delta, masks):
        assert o.shape == t.shape
        sel = np.ones(t.shape, bool) if m is None else m
        assert np.all(o[~sel] == 0.0)
        if precision == "float32":
            assert np.array_equal(o[sel], t[sel])
        elif precision == "float16":
            np.testing.assert_allclose(o[sel], t[sel], rtol=2.0**-11, atol=2.0**-24)
        else:
            _int8_error_ok(t, o, m)
    # the same layout as a task (masks travel in the frame)
    task = TrainTask(round=2, attempt=1, architecture_digest="x", weights=tensors, masks=list(masks),
                     training={}, uplink_precision="int8", deadline_s=1.0, downlink_precision=precision)
    back = decode_task(encode_task(task), shapes, MAX)
    for m_in, m_out in zip(masks, back.masks):
        assert (m_in is None and m_out is None) or np.array_equal(m_in, m_out)


def test_codec_error_is_a_value_error_with_reason():
    e = CodecError("why")
    assert isinstance(e, ValueError) and e.reason == "why"
    assert codec.PRECISION_BYTES == {"float32": 4, "float16": 2, "int8": 1}

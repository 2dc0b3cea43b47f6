"""Tests for fedprune.converters.mask_coding: lossless, near the entropy bound, safe against any bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.converters import mask_coding as mc
from fedprune.converters.errors import CodecError
from fedprune.converters.mask_coding import (
    MaskMethod,
    decode_mask,
    encode_mask,
    encoded_size,
    mask_entropy_bits,
)

SPARSITIES = [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]
GAP_METHODS = [MaskMethod.RICE_GAPS, MaskMethod.GOLOMB_GAPS, MaskMethod.ELIAS_GAMMA_GAPS]


def iid_mask(n: int, sparsity: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) >= sparsity


@st.composite
def masks(draw: st.DrawFn, max_n: int = 100_000) -> np.ndarray:
    """i.i.d. masks of many densities, exact-count masks, and structured (row/run) masks."""
    n = draw(st.integers(1, min(max_n, 300)) | st.integers(1, max_n) | st.just(max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["iid", "count", "rows", "runs"]))
    if kind == "iid":
        return iid_mask(n, draw(st.sampled_from(SPARSITIES + [0.8, 0.95, 0.1, 0.01])), seed)
    if kind == "count":  # exactly 0, 1, n-1, n or a random number kept, at random places
        kept = draw(st.sampled_from([0, 1, max(0, n - 1), n, int(rng.integers(0, n + 1))]))
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=kept, replace=False)] = True
        return mask
    if kind == "rows":  # whole rows pruned, the rest i.i.d. or dense
        cols = draw(st.integers(1, 512))
        rows = max(1, n // cols)
        keep_rows = rng.random(rows) >= draw(st.sampled_from([0.0, 0.3, 0.5, 0.9]))
        inner = rng.random((rows, cols)) >= draw(st.sampled_from([0.0, 0.5, 0.9]))
        return (inner & keep_rows[:, None]).reshape(-1)
    run_lengths = rng.geometric(1.0 / draw(st.sampled_from([2, 20, 500])), size=n)
    values = np.resize(np.array([draw(st.booleans()), True ^ draw(st.booleans())]), n)
    return np.repeat(values, run_lengths)[:n]


def roundtrip(mask: np.ndarray) -> tuple[MaskMethod, bytes]:
    method, data = encode_mask(mask)
    n, kept = mask.size, int(np.count_nonzero(mask))
    out = decode_mask(method, data, n, kept)
    assert out.dtype == np.bool_ and out.shape == (n,)
    np.testing.assert_array_equal(out, mask)
    return method, data


def forced(mask: np.ndarray, method: MaskMethod, param: int = 0) -> bytes:
    """The bytes of ``method`` for ``mask`` even where another method is smaller."""
    _, pos = mc._minority(mask)
    return mc._encode_with(mask, method, param, pos, mc._gaps(pos, mask.size))


# --- round trips and sizes ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(masks())
def test_roundtrip_and_never_larger_than_bitmap(mask: np.ndarray) -> None:
    method, data = roundtrip(mask)
    assert len(data) <= (mask.size + 7) // 8
    assert len(data) == encoded_size(method, mask)
    assert isinstance(method, MaskMethod)


@settings(max_examples=100, deadline=None)
@given(masks(max_n=5_000), st.data())
def test_every_method_roundtrips_with_any_parameter(mask: np.ndarray, data: st.DataObject) -> None:
    """Each sparse coding decodes, whichever parameter the encoder would have picked."""
    n, kept = mask.size, int(np.count_nonzero(mask))
    if min(kept, n - kept) == 0:
        return
    cases = [
        (MaskMethod.BITMAP, 0),
        (MaskMethod.INDEX_LIST, 0),
        (MaskMethod.ELIAS_GAMMA_GAPS, 0),
        (MaskMethod.RICE_GAPS, data.draw(st.integers(0, 31), label="k")),
        (MaskMethod.GOLOMB_GAPS, data.draw(st.integers(1, 2 * n), label="m")),
    ]
    for method, param in cases:
        encoded = forced(mask, method, param)
        if method is not MaskMethod.BITMAP and len(encoded) > (n + 7) // 8:
            with pytest.raises(CodecError):  # larger than the bitmap: never emitted, refused
                decode_mask(method, encoded, n, kept)
            continue
        np.testing.assert_array_equal(decode_mask(method, encoded, n, kept), mask)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 256, 257, 65536, 65537])
def test_edges(n: int) -> None:
    for mask in (np.zeros(n, bool), np.ones(n, bool), np.eye(1, n, max(0, n - 1), dtype=bool)[0]):
        roundtrip(mask)
    assert encode_mask(np.ones(n, bool)) == (MaskMethod.ALL_KEPT, b"")
    if n:
        assert encode_mask(np.zeros(n, bool)) == (MaskMethod.NONE_KEPT, b"")


def test_structured_shapes_are_read_in_c_order() -> None:
    mask = iid_mask(600, 0.9, 3).reshape(20, 30)
    method, data = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask(method, data, 600, int(mask.sum())), mask.ravel())
    with pytest.raises(TypeError):
        encode_mask(np.zeros(10, dtype=np.uint8))


def test_memoryview_and_bytearray_inputs() -> None:
    mask = iid_mask(10_000, 0.95, 4)
    method, data = encode_mask(mask)
    kept = int(mask.sum())
    framed = b"xx" + data + b"yy"
    view = memoryview(framed)[2 : 2 + len(data)]
    np.testing.assert_array_equal(decode_mask(method, view, mask.size, kept), mask)
    np.testing.assert_array_equal(decode_mask(method, bytearray(data), mask.size, kept), mask)


@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95, 0.99])
def test_iid_masks_within_three_percent_of_entropy(sparsity: float) -> None:
    n = 1_000_000
    mask = iid_mask(n, sparsity, 11)
    kept = int(mask.sum())
    method, data = roundtrip(mask)
    assert method in GAP_METHODS
    assert len(data) <= 1.03 * mask_entropy_bits(n, kept) / 8


def test_entropy_bound() -> None:
    assert mask_entropy_bits(8, 4) == pytest.approx(8.0)
    assert mask_entropy_bits(10, 0) == mask_entropy_bits(10, 10) == 0.0
    with pytest.raises(ValueError):
        mask_entropy_bits(10, 11)


def test_dense_minority_codes_the_pruned_positions() -> None:
    """At 1 % sparsity the pruned positions are coded: as small as the 99 %-sparse mask."""
    mask = iid_mask(100_000, 0.99, 5)
    roundtrip(~mask)
    assert len(encode_mask(~mask)[1]) == len(encode_mask(mask)[1])


# --- hostile bytes --------------------------------------------------------------------------------


def check_decode(method: int, data: bytes, n: int, kept: int) -> None:
    """Decoding returns a mask of length n with exactly kept True, or raises CodecError."""
    try:
        out = decode_mask(method, data, n, kept)
    except CodecError:
        return
    assert out.dtype == np.bool_ and out.shape == (n,)
    assert int(np.count_nonzero(out)) == kept


@settings(max_examples=300, deadline=None)
@given(
    method=st.integers(-1, 8),
    data=st.binary(max_size=300),
    n=st.integers(0, 4000) | st.sampled_from([2**31, 2**31 + 1, -1]),
    kept_frac=st.floats(0, 1) | st.sampled_from([-0.1, 1.1]),
)
def test_random_bytes_decode_or_codec_error(
    method: int, data: bytes, n: int, kept_frac: float
) -> None:
    kept = int(kept_frac * n)
    for k in (kept, 1, n - 1, n // 2):
        if n > 10**6 and method in (MaskMethod.ALL_KEPT, MaskMethod.NONE_KEPT) and k in (0, n):
            continue  # a valid 2**31-position mask: correct, but 2 GiB to build
        check_decode(method, data, n, k)


@settings(max_examples=300, deadline=None)
@given(
    mask=masks(max_n=3_000),
    forced_method=st.sampled_from([None, *GAP_METHODS, MaskMethod.INDEX_LIST]),
    param=st.integers(0, 40),
    mutation=st.sampled_from(["flip", "truncate", "extend", "replace", "method", "kept", "n"]),
    where=st.integers(0, 2**31),
    byte=st.integers(0, 255),
)
def test_mutated_encodings_decode_or_codec_error(
    mask: np.ndarray,
    forced_method: MaskMethod | None,
    param: int,
    mutation: str,
    where: int,
    byte: int,
) -> None:
    n, kept = mask.size, int(np.count_nonzero(mask))
    if forced_method is None or min(kept, n - kept) == 0:
        method, encoded = encode_mask(mask)
    else:
        method = forced_method
        if method is MaskMethod.RICE_GAPS:
            param = min(param, 31)
        param = max(1, param) if method is MaskMethod.GOLOMB_GAPS else param
        encoded = forced(mask, method, param)
    data = bytearray(encoded)
    if mutation == "flip" and data:
        data[where % len(data)] ^= 1 << (byte % 8)
    elif mutation == "truncate":
        data = data[: where % (len(data) + 1)] if data else data
    elif mutation == "extend":
        data += bytes([byte]) * (1 + where % 3)
    elif mutation == "replace" and data:
        data[where % len(data)] = byte
    elif mutation == "method":
        method = byte % 8
    elif mutation == "kept":
        kept = (kept + 1 + where % max(1, n)) % (n + 1)
    elif mutation == "n":
        n = max(0, n + (where % 17) - 8)
    check_decode(method, bytes(data), n, kept)


def test_wrong_kept_or_n_for_valid_data() -> None:
    """Gap codes close with the run up to n, so any other n fails; so does any other kept."""
    for sparsity, n in [(0.9, 10_000), (0.999, 100_000), (0.3, 5_000), (0.9, 300), (0.1, 2_000)]:
        mask = iid_mask(n, sparsity, 7)
        kept = int(mask.sum())
        method, data = encode_mask(mask)
        assert method in GAP_METHODS
        for bad_kept in (kept - 1, kept + 1, n - kept, 0, n, -1, n + 1):
            with pytest.raises(CodecError):
                decode_mask(method, data, n, bad_kept)
        for bad_n in (n - 9, n - 1, n + 1, n + 8, n + 1000, -1):
            with pytest.raises(CodecError):
                decode_mask(method, data, bad_n, kept)
    for method in GAP_METHODS:
        for sparsity in (0.9, 0.1):
            mask = iid_mask(2_000, sparsity, 8)
            data, kept = forced(mask, method, 4), int(mask.sum())
            bad = [(kept + 1, 2_000), (2_000 - kept, 2_000), (kept, 2_001), (kept, 1_999)]
            for bad_kept, bad_n in bad:
                with pytest.raises(CodecError):
                    decode_mask(method, data, bad_n, bad_kept)


def test_wrong_kept_or_n_for_bitmap_and_index_list() -> None:
    """These carry no closing run: a wrong n is caught when it changes the length or a kept bit."""
    mask = iid_mask(1_000, 0.5, 9)
    kept = int(mask.sum())
    method, data = encode_mask(mask)
    assert method is MaskMethod.BITMAP
    for bad_kept in (kept - 1, kept + 1, 0, 1_000):
        with pytest.raises(CodecError):
            decode_mask(method, data, 1_000, bad_kept)
    for bad_n in (992, 1_001 + 8, 2_000):
        with pytest.raises(CodecError):
            decode_mask(method, data, bad_n, kept)
    mask = np.zeros(50_000, dtype=bool)
    mask[[7, 40_000]] = True
    method, data = encode_mask(mask)
    assert method is MaskMethod.INDEX_LIST
    for bad_kept, bad_n in [(1, 50_000), (3, 50_000), (2, 40_000), (49_998, 50_000), (2, 70_000)]:
        with pytest.raises(CodecError):
            decode_mask(method, data, bad_n, bad_kept)


def test_codec_errors_for_trivial_methods_and_bad_arguments() -> None:
    with pytest.raises(CodecError):
        decode_mask(MaskMethod.ALL_KEPT, b"", 10, 9)
    with pytest.raises(CodecError):
        decode_mask(MaskMethod.NONE_KEPT, b"\x00", 10, 0)
    with pytest.raises(CodecError):
        decode_mask(99, b"", 10, 0)
    with pytest.raises(CodecError):
        decode_mask(MaskMethod.BITMAP, b"\xff\x01", 9, 9)  # padding bit set
    with pytest.raises(CodecError):
        decode_mask("2", b"\x00", 8, 0)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode_mask(MaskMethod.BITMAP, "text", 8, 0)  # type: ignore[arg-type]


def test_huge_claims_fail_fast_without_allocating() -> None:
    """n up to 2**31 with a few bytes: refused before anything of size n is allocated."""
    big = 2**31
    for method in GAP_METHODS + [MaskMethod.INDEX_LIST]:
        for data in (b"", b"\x00", b"\x1f\xff\xff\xff\xff", b"\x00\x00\x00\x80\xff\xff"):
            with pytest.raises(CodecError):
                decode_mask(method, data, big, big // 2)
    with pytest.raises(CodecError):
        decode_mask(MaskMethod.BITMAP, b"\xff" * 16, big, 128)

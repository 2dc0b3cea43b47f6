"""Tests for fedprune.converters.gradient_reports: the regrowth gradient report of an update."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec_helpers import decode_or_codec_error, expect_codec_error
from fedprune.converters.gradient_reports import (
    REPORT_BITS,
    decode_gradient_report,
    encode_gradient_report,
    gradient_report_bound,
)
from fedprune.converters.protocol import Update, decode_update, encode_update
from fedprune.pruning.regrowth import gradient_scores, regrow, report_pruned_gradients

SHAPES = [(30, 16), (16,), (16, 8), (8,)]
PROP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def layout(seed: int = 0):
    """Masks (90 % pruned kernels, dense biases), a gradient per tensor and a device's report."""
    rng = np.random.default_rng(seed)
    masks = [rng.random(SHAPES[0]) < 0.1, None, rng.random(SHAPES[2]) < 0.1, None]
    grads = [rng.normal(0, 1e-3, s).astype(np.float32) for s in SHAPES]
    reported, chosen = report_pruned_gradients(SHAPES, grads, masks, 0.2)
    return masks, grads, reported, chosen


def test_round_trip_keeps_positions_and_magnitudes_within_half_a_step():
    masks, _, reported, chosen = layout()
    body = encode_gradient_report(reported, chosen)
    got, got_chosen = decode_gradient_report(body, SHAPES, masks)
    for g, c, r, rc in zip(got, got_chosen, reported, chosen):
        assert np.array_equal(c, rc) and g.dtype == np.float32 and g.shape == r.shape
        assert not g[~c].any()
        if c.any():
            m = np.abs(r[c]).astype(np.float64)
            step = math.log(m.max() / m.min()) / 255  # 8 bits: 255 steps between them
            assert np.abs(np.log(g[c] / m)).max() <= step / 2 + 1e-6
            assert g[c].max() == np.float32(m.max()) and g[c].min() == np.float32(m.min())


def test_the_report_has_no_table_and_the_documented_size():
    masks, _, reported, chosen = layout()
    body = encode_gradient_report(reported, chosen)
    from fedprune.converters.mask_coding import encode_mask
    size = 1  # bits
    for c in chosen:
        k = int(c.sum())
        size += 1  # count (< 128 here)
        if k:
            size += 1 + 1 + len(encode_mask(c.ravel())[1]) + 8 + k  # method, length, mask, range, codes
    assert REPORT_BITS == 8 and body[0] == 8 and len(body) == size
    assert len(body) <= gradient_report_bound(SHAPES)


def test_the_aggregator_chooses_the_same_positions_from_the_report_as_from_the_gradients():
    """What the report is for: regrowth's choice from devices' decoded reports is the choice from
    their exact gradients (the magnitudes are close enough to rank by)."""
    masks, _, _, _ = layout(1)
    weights = [np.random.default_rng(2).normal(size=s).astype(np.float32) for s in SHAPES]
    exact, decoded = [], []
    for device in range(5):
        grads = [np.random.default_rng(10 + device).lognormal(-7, 1, s).astype(np.float32) for s in SHAPES]
        reported, chosen = report_pruned_gradients(SHAPES, grads, masks, 0.2)
        exact.append((reported, 40 + device))
        decoded.append((decode_gradient_report(encode_gradient_report(reported, chosen), SHAPES, masks)[0],
                        40 + device))
    _, want, _ = regrow(weights, masks, gradient_scores(exact), 0.1)
    _, got, _ = regrow(weights, masks, gradient_scores(decoded), 0.1)
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(want, got))


def test_equal_magnitudes_and_fewer_bits():
    masks, _, _, _ = layout()
    grads = [np.zeros(s, np.float32) for s in SHAPES]
    chosen = [np.zeros(s, bool) for s in SHAPES]
    pos = np.flatnonzero(~masks[0].ravel())[:3]
    grads[0].ravel()[pos] = [-0.5, 0.5, 0.5]  # the sign does not travel
    chosen[0].ravel()[pos] = True
    got, _ = decode_gradient_report(encode_gradient_report(grads, chosen), SHAPES, masks)
    assert np.array_equal(got[0].ravel()[pos], [0.5, 0.5, 0.5])
    body = encode_gradient_report(grads, chosen, bits=1)
    assert body[0] == 1
    assert np.array_equal(decode_gradient_report(body, SHAPES, masks)[0][0], got[0])


def test_encoder_refuses_what_it_cannot_report():
    masks, grads, reported, chosen = layout()
    with pytest.raises(ValueError, match="1..8"):
        encode_gradient_report(reported, chosen, bits=9)
    with pytest.raises(ValueError, match="finite and non-zero"):
        bad = [r.copy() for r in reported]
        bad[0][chosen[0]] = 0.0
        encode_gradient_report(bad, chosen)
    with pytest.raises(ValueError, match="finite and non-zero"):
        bad = [r.copy() for r in reported]
        bad[0][chosen[0]] = np.inf
        encode_gradient_report(bad, chosen)
    with pytest.raises(ValueError, match="position masks"):
        encode_gradient_report(reported, chosen[:-1])


def _entry_offsets(body: bytes) -> tuple[int, int]:
    """(offset of the first tensor's mask method byte, offset of its range) in a report whose first
    count and mask length take one byte each."""
    method_at = 2
    return method_at, method_at + 2 + body[method_at + 1]


def test_decoder_refusals():
    masks, _, reported, chosen = layout()
    body = encode_gradient_report(reported, chosen)
    method_at, range_at = _entry_offsets(body)
    largest, smallest = struct.unpack_from("<ff", body, range_at)
    cases = {
        "bits 0": (b"\x00" + body[1:], "must be 1..8"),
        "bits 9": (b"\x09" + body[1:], "must be 1..8"),
        "left over": (body + b"\x00", "left over"),
        "short": (body[:-1], "ends early"),
        "range reversed": (body[:range_at] + struct.pack("<ff", smallest, largest) + body[range_at + 8:],
                           "is not 0 < smallest <= largest"),
        "range zero": (body[:range_at] + struct.pack("<ff", largest, 0.0) + body[range_at + 8:], "smallest"),
        "range nan": (body[:range_at] + struct.pack("<ff", math.nan, smallest) + body[range_at + 8:], "smallest"),
        "count past n": (b"\x08\xe1\x03" + body[2:], "exceeds 480"),
    }
    for name, (bad, match) in cases.items():
        expect_codec_error(decode_gradient_report, bad, SHAPES, masks, match=match)
    # reports at a kept position, or for a tensor without a mask
    kept = [m if m is None else ~m for m in masks]
    expect_codec_error(decode_gradient_report, body, SHAPES, kept, match="is kept, not pruned")
    expect_codec_error(decode_gradient_report, body, SHAPES, [None] * 4, match="without a mask")
    expect_codec_error(decode_gradient_report, body, SHAPES[:-1], masks[:-1], match="left over")
    expect_codec_error(decode_gradient_report, body, SHAPES, masks[:-1], match="3 masks for 4 tensors")


def test_padding_bits_and_codes_of_equal_magnitudes_are_checked():
    masks, _, _, _ = layout()
    grads = [np.zeros(s, np.float32) for s in SHAPES]
    chosen = [np.zeros(s, bool) for s in SHAPES]
    pos = np.flatnonzero(~masks[0].ravel())[:3]
    grads[0].ravel()[pos] = [1.0, 2.0, 4.0]
    chosen[0].ravel()[pos] = True
    body = encode_gradient_report(grads, chosen, bits=4)  # 3 codes of 4 bits: 2 bytes, 4 padding bits
    # codes in position order: 1.0 -> 15, 2.0 -> 7.5, rounded half to even: 8, 4.0 -> 0
    # (then the counts of the other three tensors: 0 each)
    assert body[-5:] == bytes([0xF8, 0x00, 0, 0, 0])
    expect_codec_error(decode_gradient_report, body[:-4] + b"\x01" + body[-3:], SHAPES, masks, match="padding bits")
    same = [np.where(c, 3.0, 0.0).astype(np.float32) for c in chosen]
    equal = encode_gradient_report(same, chosen, bits=4)
    assert equal[-5:] == bytes(5)
    expect_codec_error(decode_gradient_report, equal[:-5] + b"\x10" + equal[-4:], SHAPES, masks, match="all equal")


def test_an_update_carries_the_report_and_checks_it_against_the_receivers_masks():
    masks, _, reported, chosen = layout()
    tensors = [np.zeros(s, np.float32) for s in SHAPES]
    u = Update(round=4, attempt=1, device_id="d", num_samples=50, tensors=tensors, gradients=reported,
               gradient_masks=chosen)
    data = encode_update(u, masks)
    got = decode_update(data, SHAPES, masks, 1 << 20)
    assert all(np.array_equal(a, b) for a, b in zip(got.gradient_masks, chosen))
    plain = encode_update(Update(**{**u.__dict__, "gradients": None, "gradient_masks": None}), masks)
    report = encode_gradient_report(reported, chosen)
    assert len(report) < 128 and len(data) == len(plain) + 1 + len(report)  # its length (a varint), the report


def test_devices_report_no_zero_gradient():
    masks, grads, _, _ = layout()
    grads[0][...] = 0.0
    pruned = np.flatnonzero(~masks[0].ravel())
    grads[0].ravel()[pruned[:2]] = [1e-3, -2e-3]  # only two pruned positions have a gradient
    reported, chosen = report_pruned_gradients(SHAPES, grads, masks, 0.2)
    assert np.flatnonzero(chosen[0].ravel()).tolist() == pruned[:2].tolist()
    assert chosen[2].sum() == math.ceil(0.2 * masks[2].sum())
    decode_gradient_report(encode_gradient_report(reported, chosen), SHAPES, masks)


@PROP
@given(data=st.binary(max_size=200))
def test_random_bytes_decode_or_raise_codec_error(data):
    masks, _, _, _ = layout()
    decode_or_codec_error(decode_gradient_report, data, SHAPES, masks)


@PROP
@given(data=st.data())
def test_corrupted_reports_decode_or_raise_codec_error(data):
    masks, _, reported, chosen = layout(data.draw(st.integers(0, 3)))
    body = bytearray(encode_gradient_report(reported, chosen, bits=data.draw(st.integers(1, 8))))
    for _ in range(data.draw(st.integers(1, 3))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    decode_or_codec_error(decode_gradient_report, bytes(body), SHAPES, masks)

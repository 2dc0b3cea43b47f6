"""Entropy coding of the integer codes of a value section (protocol version 4).

In a section of an integer precision (int8, int8-channel, int4) one *coding* byte follows the
scales, then the codes ``q`` (each in ``[-qmax, qmax]``) in one of three forms:

    0          packed: the precision's fixed-width packing (int8 a byte each, int4 two a byte)
    1..127     zigzag Golomb with ``m`` = the byte: ``z = 2q`` for ``q >= 0``, ``-2q - 1`` for
               ``q < 0``, every ``z`` in ``fedprune.converters.golomb``'s layout, then zero
               padding to a whole byte
    129..255   reflected Golomb with ``m`` = the byte - 128: ``a = qmax - |q|`` in the Golomb
               layout, then one sign bit for each ``q != 0`` in order (1: negative), then zero
               padding to a whole byte
    (128 is never sent; nor is a Golomb form for a section without values)

Why two mappings: codes that crowd around 0 (heavy-tailed values: top-k updates, weights) suit
zigzag; codes that crowd near ``±qmax`` suit the reflection. Adam's deltas are of the second kind:
every kept weight moves by about the learning rate each step, so after a round most of a tensor's
deltas sit near its largest (breast cancer's pruned-90 updates: 64 % of the int8 codes have
``|q| >= 64``, the mode is 126).

The encoder computes the exact size of every ``m`` in 1..127 under both mappings from the codes'
histogram (at most 255 symbols: one small matrix product) and sends the smallest, a Golomb form
only when it is *strictly smaller* than the packed codes. A decoder holds it to that: it reads a
Golomb form within ``packed_size - 1`` bytes of the coding byte, so decoding never touches more
bytes or memory than the packed form would, whatever the bytes say; a value beyond the mapping's
range, a sign or padding bit missing or nonzero padding is a ``CodecError``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedprune.converters.errors import CodecError
from fedprune.converters.golomb import golomb_length_table, golomb_packed, read_golomb

__all__ = ["LARGEST_M", "PACKED", "REFLECTED", "decode_codes", "encode_codes"]

PACKED = 0
REFLECTED = 0x80  # bit of the coding byte: the reflected mapping; the low 7 bits are m
LARGEST_M = 0x7F


def encode_codes(q: np.ndarray, qmax: int, packed: bytes) -> bytes:
    """The coding byte and the codes ``q`` (int8, in ``[-qmax, qmax]``): Golomb-coded where that
    is strictly smaller than ``packed`` (the precision's packing of ``q``), else packed."""
    if q.size == 0:
        return bytes([PACKED]) + packed
    # One histogram of the codes gives both mappings' (each relabels the alphabet), and from them
    # every m's exact size under each.
    q = np.ascontiguousarray(q, dtype=np.int8)
    by_byte = np.bincount(q.view(np.uint8), minlength=256)  # by q's two's-complement byte
    by_code = np.concatenate([by_byte[256 - qmax :], by_byte[: qmax + 1]])  # by q + qmax
    alphabet = np.arange(-qmax, qmax + 1)
    z_hist = np.zeros(2 * qmax + 1, dtype=np.int64)
    z_hist[np.where(alphabet >= 0, 2 * alphabet, -2 * alphabet - 1)] = by_code  # zigzag is one-to-one
    r_hist = np.zeros(qmax + 1, dtype=np.int64)
    np.add.at(r_hist, qmax - np.abs(alphabet), by_code)
    n_signs = q.size - int(by_code[qmax])
    z_bits = golomb_length_table(2 * qmax, LARGEST_M) @ z_hist
    r_bits = golomb_length_table(qmax, LARGEST_M) @ r_hist + n_signs
    z_m, r_m = int(np.argmin(z_bits)) + 1, int(np.argmin(r_bits)) + 1
    if z_bits[z_m - 1] <= r_bits[r_m - 1]:
        bits, coding = int(z_bits[z_m - 1]), z_m
    else:
        bits, coding = int(r_bits[r_m - 1]), REFLECTED | r_m
    if (bits + 7) // 8 >= len(packed):
        return bytes([PACKED]) + packed
    if coding & REFLECTED:
        return bytes([coding]) + golomb_packed((qmax - np.abs(q)).view(np.uint8), r_m,
                                               trailer=(q[q != 0] < 0).view(np.uint8))
    # zigzag in uint8: 2q, or -2q - 1 for q < 0 (q >> 7 is all ones then)
    return bytes([coding]) + golomb_packed((q.view(np.uint8) << 1) ^ (q >> 7).view(np.uint8), z_m)


def decode_codes(
    buf: np.ndarray, count: int, qmax: int, packed_size: int,
    unpack: Callable[[np.ndarray], np.ndarray], what: str,
) -> tuple[np.ndarray, int]:
    """``(codes, bytes used)`` from the coding byte at the start of ``buf`` (uint8; whatever
    follows the section is not read). ``unpack``: the precision's unpacking of ``packed_size``
    packed bytes (it checks them). ``CodecError`` naming ``what`` for anything the encoder never
    writes."""
    if buf.size < 1:
        raise CodecError(f"{what}: the section ends before its coding byte")
    coding = int(buf[0])
    if coding == PACKED:
        if buf.size < 1 + packed_size:
            raise CodecError(f"{what}: {buf.size} bytes, expected {1 + packed_size} after the scales (coding "
                             f"byte 0: {count} values packed)")
        return unpack(buf[1 : 1 + packed_size]), 1 + packed_size
    m = coding & LARGEST_M
    if m == 0:
        raise CodecError(f"{what}: coding byte {coding:#x} is not known")
    if count == 0:
        raise CodecError(f"{what}: a Golomb coding for a section without values")
    # A Golomb form is strictly smaller than the packed one: nothing past that is read.
    bits = np.unpackbits(buf[1:packed_size])
    quotients, remainders, used = read_golomb(bits, count, m, what)
    largest = qmax if coding & REFLECTED else 2 * qmax
    if int(quotients.max()) > largest // m:  # checked before multiplying
        raise CodecError(f"{what}: a code beyond {largest}")
    values = quotients.astype(np.int16)  # below 255 once checked: int16 and uint8 from here, not int64
    values *= m
    values += remainders
    if int(values.max()) > largest:
        raise CodecError(f"{what}: a code beyond {largest}")
    if coding & REFLECTED:
        codes = (qmax - values).astype(np.int8)
        n_signs = int(np.count_nonzero(codes))
        if used + n_signs > bits.size:
            raise CodecError(f"{what}: {n_signs} sign bits do not fit")
        if n_signs == count:  # Adam's deltas: no zero code, so the sign bits line up with the codes
            negative = bits[used : used + count]
        else:
            negative = np.zeros(count, dtype=np.uint8)
            negative[np.flatnonzero(codes)] = bits[used : used + n_signs]
        flip = -negative.view(np.int8)  # 0 or -1: (c ^ -1) + 1 == -c; thirty times faster than np.where
        codes ^= flip
        codes -= flip
        used += n_signs
    else:  # zigzag back in uint8: z >> 1, all bits flipped for odd z
        z = values.astype(np.uint8)
        codes = ((z >> 1) ^ (np.uint8(0) - (z & 1))).view(np.int8)
    nbytes = (used + 7) // 8
    if bits[used : 8 * nbytes].any():
        raise CodecError(f"{what}: nonzero padding bits")
    return codes, 1 + nbytes

"""Signed aggregator messages: what opens, and the one error everything else raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.converters.errors import CodecError
from fedprune.converters.frame import pack_frame
from fedprune.converters.signing import (
    SIGNED_KIND,
    SIGNED_OVERHEAD,
    SignatureError,
    SignedPayload,
    SigningKey,
    VerifyKey,
    is_signed,
    open_signed,
    sign_message,
)
from signing_helpers import AGGREGATOR_KEY, VERIFY_KEY

TOPIC = "fedprune/v1/fed/device/pi-01/task"
CRC_AND_SIGNATURE = 4 + 64
PAYLOAD = b'{"v":2,"type":"ack","round":1,"device_id":"pi-01","accepted":true,"reason":""}'


def test_a_signed_message_opens_to_its_payload_with_the_overhead_documented():
    data = sign_message(TOPIC, PAYLOAD, AGGREGATOR_KEY)
    assert is_signed(data) and len(data) == len(PAYLOAD) + SIGNED_OVERHEAD == len(PAYLOAD) + 86
    assert open_signed(TOPIC, data, VERIFY_KEY, 1 << 20) == PAYLOAD
    assert sign_message(TOPIC, PAYLOAD, AGGREGATOR_KEY) == data  # Ed25519 is deterministic
    assert open_signed(TOPIC, sign_message(TOPIC, b"", AGGREGATOR_KEY), VERIFY_KEY, 1 << 20) == b""
    # One task for many devices: digested and checksummed once, the same envelope for each topic.
    signed = SignedPayload(PAYLOAD, AGGREGATOR_KEY)
    assert signed.for_topic(TOPIC) == data
    other = TOPIC.replace("pi-01", "pi-02")
    assert signed.for_topic(other) == sign_message(other, PAYLOAD, AGGREGATOR_KEY)
    assert open_signed(other, signed.for_topic(other), VERIFY_KEY, 1 << 20) == PAYLOAD
    with pytest.raises(SignatureError, match="does not match"):
        open_signed(TOPIC, signed.for_topic(other), VERIFY_KEY, 1 << 20)
    # The envelope is the frame pack_frame makes of the same body, checksum included.
    body = VERIFY_KEY.key_id + PAYLOAD + data[-CRC_AND_SIGNATURE:-4]
    assert data == pack_frame(SIGNED_KIND, None, body)


@pytest.mark.parametrize("make,match", [
    (lambda: PAYLOAD, "unsigned JSON message"),
    (lambda: pack_frame(1, {"round": 1}, b"body"), "unsigned message"),
    (lambda: sign_message(TOPIC, PAYLOAD, SigningKey.from_seed(b"\x01" * 32)), "signed by another key"),
    (lambda: sign_message(TOPIC.replace("pi-01", "pi-02"), PAYLOAD, AGGREGATOR_KEY), "does not match"),
    (lambda: pack_frame(SIGNED_KIND, None, VERIFY_KEY.key_id + b"x" * 20), "too short"),
    (lambda: _altered(20), "does not match"),  # a payload byte, CRC refitted
    (lambda: _altered(-10), "does not match"),  # a signature byte
    (lambda: sign_message(TOPIC, PAYLOAD, AGGREGATOR_KEY)[:-1] + b"\x00", "checksum"),
    (lambda: b"FPRN\x01" + sign_message(TOPIC, PAYLOAD, AGGREGATOR_KEY)[5:], "frame version 1 not supported"),
])
def test_anything_else_is_refused_with_a_reason(make, match):
    with pytest.raises(CodecError, match=match) as raised:
        open_signed(TOPIC, make(), VERIFY_KEY, 1 << 20)
    assert "checksum" in match or "version" in match or isinstance(raised.value, SignatureError)


def _altered(offset: int) -> bytes:
    from codec_helpers import recrc

    data = bytearray(sign_message(TOPIC, PAYLOAD, AGGREGATOR_KEY))
    data[offset - 4 if offset < 0 else offset] ^= 0x01
    return recrc(bytes(data))


def test_keys_travel_as_text_and_pem():
    assert VerifyKey.from_text(VERIFY_KEY.text) == VERIFY_KEY and VERIFY_KEY.text.startswith("ed25519:")
    assert len(VERIFY_KEY.text) == len("ed25519:") + 44
    assert SigningKey.from_pem(AGGREGATOR_KEY.to_pem()).public == VERIFY_KEY
    for bad in ("", "ed25519:", "ed25519:AAAA", "rsa:" + VERIFY_KEY.text[8:], VERIFY_KEY.text + "=="):
        with pytest.raises(ValueError, match="looks like 'ed25519:'"):
            VerifyKey.from_text(bad)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        SigningKey.from_pem(b"-----BEGIN NOTHING-----")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(0, 200), flip=st.integers(0, 10_000))
def test_random_and_mutated_bytes_raise_codec_error_only(data, cut, flip):
    good = bytearray(sign_message(TOPIC, data, AGGREGATOR_KEY))
    good[flip % len(good)] ^= 1 << (flip % 8)
    for candidate in (data, bytes(good), bytes(good[:cut])):
        try:
            out = open_signed(TOPIC, candidate, VERIFY_KEY, 1 << 20)
        except CodecError:
            continue
        assert out == data  # only an untouched message opens (a flip in the CRC's own bytes is caught)

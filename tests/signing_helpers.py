"""One aggregator key for the tests that play the aggregator's part without running one."""

from __future__ import annotations

from fedprune.converters.signing import SigningKey, sign_message

AGGREGATOR_KEY = SigningKey.from_seed(bytes(range(32)))
VERIFY_KEY = AGGREGATOR_KEY.public


def signed(topic: str, payload: bytes) -> bytes:
    """``payload`` as the aggregator would publish it on ``topic``."""
    return sign_message(topic, payload, AGGREGATOR_KEY)


def content(envelope: bytes) -> bytes:
    """What a signed envelope carries, unchecked: for spies that read the aggregator's traffic
    (they do not trust it; devices do, after ``open_signed``)."""
    from fedprune.converters.frame import unpack_frame
    from fedprune.converters.signing import KEY_ID_BYTES, SIGNATURE_BYTES, SIGNED_KIND

    if not envelope:
        return envelope
    kind, _, body = unpack_frame(envelope, 1 << 31)
    assert kind == SIGNED_KIND, f"not a signed envelope: kind {kind}"
    return bytes(body[KEY_ID_BYTES:len(body) - SIGNATURE_BYTES])

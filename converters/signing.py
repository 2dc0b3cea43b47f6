"""Signed messages: every message the aggregator sends to devices travels in a signed envelope.

A device trusts one aggregator key (Ed25519, RFC 8032), given to it out of band (its connection
file, a flag, or in-process); it opens every message it receives with :func:`open_signed` and
refuses anything unsigned, signed by another key, signed for another topic, or altered. The
aggregator wraps every message it publishes with :func:`sign_message`. These two functions are
the only place a signature is made or checked: a new aggregator-to-device message is signed by
publishing ``sign_message(topic, payload, key)`` and verified because the device opens every
message it receives before it looks at the topic.

The envelope is a frame (``fedprune.converters.frame``) of kind ``SIGNED_KIND`` with no JSON
header, whose body is::

    key_id     8 bytes   the first 8 bytes of SHA-256 over the signer's raw 32-byte public key
    payload    n bytes   the message itself: a JSON message, or a frame of another kind
    signature  64 bytes  Ed25519 over SIGNED_CONTEXT + u16 topic length + topic (UTF-8)
                         + SHA-256(payload)

Why the topic is signed: the same task bytes go to every selected device; without the topic, a
task signed for one device could be replayed onto another device's task topic, or an
architecture onto a task topic. Why a digest of the payload rather than the payload: Ed25519
reads its message twice, and a task of 64 MB is signed once per selected device; the signature
then costs the same for any size, and the digest is computed once per task (``SignedPayload``,
which ``DevicePublisher`` keeps for the same payload again).

What a signature does not stop: replaying an earlier message the aggregator signed for the same
topic (docs/security.md, threat model).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedprune.converters.errors import CodecError
from fedprune.converters.frame import FRAME_OVERHEAD, SharedBodyFrames, unpack_frame

__all__ = ["SIGNED_KIND", "SIGNED_OVERHEAD", "SignatureError", "SigningKey", "VerifyKey", "is_signed",
           "open_signed", "payload_digest", "sign_message", "SignedPayload"]

SIGNED_KIND = 6  # frame kind byte of a signed envelope (fedprune.converters.protocol.Kind.SIGNED)
SIGNED_CONTEXT = b"fedprune signed message v2\x00"  # so a signature means this and nothing else
KEY_ID_BYTES = 8
SIGNATURE_BYTES = 64
SIGNED_OVERHEAD = FRAME_OVERHEAD + KEY_ID_BYTES + SIGNATURE_BYTES  # 86 bytes around the payload
KEY_PREFIX = "ed25519:"
_TOPIC_LENGTH = struct.Struct("<H")


class SignatureError(CodecError):
    """A message that is not signed by the key this side trusts, for this topic; ``reason`` says
    which of these it is."""


@dataclass(frozen=True)
class VerifyKey:
    """The aggregator's public key, as a device holds it. Its text form, ``ed25519:`` and the
    base64 of the 32 raw bytes, is what connection files, configs and flags carry."""

    raw: bytes
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        object.__setattr__(self, "_key", Ed25519PublicKey.from_public_bytes(self.raw))

    @classmethod
    def from_text(cls, text: str) -> "VerifyKey":
        """Parse ``ed25519:<base64 of 32 bytes>``; ``ValueError`` saying what it should look like."""
        stripped = text.strip() if isinstance(text, str) else ""
        try:
            if not stripped.startswith(KEY_PREFIX):
                raise ValueError
            raw = base64.b64decode(stripped[len(KEY_PREFIX):], validate=True)
            return cls(raw)
        except ValueError:
            shown = stripped[:60] + ("..." if len(stripped) > 60 else "")
            raise ValueError(f"an aggregator key looks like 'ed25519:' followed by 44 base64 characters "
                             f"(the aggregator prints it, and writes it to aggregator.pub); got {shown!r}") from None

    @property
    def text(self) -> str:
        return KEY_PREFIX + base64.b64encode(self.raw).decode()

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(self.raw).digest()[:KEY_ID_BYTES]

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """The aggregator's private key. ``to_pem``/``from_pem``: PKCS#8, unencrypted (the file that
    holds it is readable by its owner only)."""

    _key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "SigningKey":
        """The key of a 32-byte seed (RFC 8032's private key): for worked examples and tests."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> "SigningKey":
        """``ValueError`` when ``data`` is not an unencrypted PKCS#8 Ed25519 private key."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @functools.cached_property  # derived once: every acknowledgement the aggregator signs names it
    def public(self) -> VerifyKey:
        return VerifyKey(self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def payload_digest(payload: bytes | memoryview) -> bytes:
    """The SHA-256 of a payload, as the signature covers it."""
    return hashlib.sha256(payload).digest()


def _signed_bytes(topic: str, digest: bytes) -> bytes:
    """What the signature covers: the context, the topic, and the payload's SHA-256."""
    name = topic.encode()
    if len(name) > 0xFFFF:
        raise ValueError(f"topic of {len(name)} bytes is longer than MQTT allows")
    return SIGNED_CONTEXT + _TOPIC_LENGTH.pack(len(name)) + name + digest


def sign_message(topic: str, payload: bytes, key: SigningKey) -> bytes:
    """``payload`` in a signed envelope for ``topic``: what the aggregator publishes on ``topic``."""
    return SignedPayload(payload, key).for_topic(topic)


class SignedPayload:
    """One payload, signed for each topic it goes to (a task for each selected device): its digest,
    the envelope's copy of it and its checksum are made once, and each topic costs a signature."""

    def __init__(self, payload: bytes, key: SigningKey) -> None:
        self.payload, self._key = payload, key
        self._digest = payload_digest(payload)
        self._frames = SharedBodyFrames(SIGNED_KIND, key.public.key_id + bytes(payload))

    def for_topic(self, topic: str) -> bytes:
        """The envelope of the payload for ``topic``."""
        return self._frames.frame(self._key.sign(_signed_bytes(topic, self._digest)))


def is_signed(data: bytes) -> bool:
    """Whether ``data`` looks like a signed envelope (magic and kind only; no check)."""
    return len(data) >= FRAME_OVERHEAD and data[:4] == b"FPRN" and data[5] == SIGNED_KIND


def open_signed(topic: str, data: bytes, key: VerifyKey, max_bytes: int) -> bytes:
    """The payload of a signed envelope that ``key`` signed for ``topic``.

    Raises ``SignatureError`` for anything else: a message that is not an envelope (unsigned, or
    from an aggregator that speaks protocol version 1), one signed by another key, for another
    topic, or altered after it was signed; ``CodecError`` for a frame that does not check
    (size over ``max_bytes``, checksum, another frame version).
    """
    if data[:1] == b"{":
        raise SignatureError("an unsigned JSON message: this side speaks protocol version 4, where every "
                             "aggregator message is signed (since version 2: an aggregator of version 1, "
                             "or a forgery)")
    kind, _, body = unpack_frame(data, max_bytes)
    if kind != SIGNED_KIND:
        raise SignatureError(f"an unsigned message (frame kind {kind}); every aggregator message is signed")
    if len(body) < KEY_ID_BYTES + SIGNATURE_BYTES:
        raise SignatureError(f"a signed envelope of {len(body)} bytes is too short to hold a key id and a signature")
    key_id = bytes(body[:KEY_ID_BYTES])
    if key_id != key.key_id:
        raise SignatureError(f"signed by another key (id {key_id.hex()}); this side trusts {key.text} "
                             f"(id {key.key_id.hex()}): a new aggregator key needs the new key on every device")
    payload = body[KEY_ID_BYTES:len(body) - SIGNATURE_BYTES]
    signature = bytes(body[len(body) - SIGNATURE_BYTES:])
    if not key.verify(signature, _signed_bytes(topic, payload_digest(payload))):
        raise SignatureError("the signature does not match: the message was altered, or signed for another topic")
    return bytes(payload)

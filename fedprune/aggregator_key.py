"""The aggregator's signing key on disk, and the public key devices are given.

The private key is a PEM file readable by its owner only (``aggregator.key``); beside it,
``aggregator.pub`` holds the public key's one-line text form (``ed25519:...``), which is what a
device is given: in its connection file (``init-broker`` writes it there), with
``fedprune-agent --aggregator-key``, or in its config (``broker.aggregator_key``).
"""

from __future__ import annotations

import stat
from pathlib import Path

from fedprune.converters.signing import SigningKey, VerifyKey
from fedprune.fileio import atomic_write_bytes

__all__ = ["KeyFileError", "load_or_create_signing_key", "load_signing_key", "parse_aggregator_key",
           "public_key_file", "write_key_pair"]


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and what to do."""


def public_key_file(private_key_file: str | Path) -> Path:
    """Where the public key of ``private_key_file`` is written: the same name ending in ``.pub``."""
    return Path(private_key_file).with_suffix(".pub")


def write_key_pair(path: str | Path, key: SigningKey | None = None) -> SigningKey:
    """Write ``key`` (a new one by default) to ``path`` (mode 600) and its public key to
    :func:`public_key_file`; refuses to replace an existing private key (every device would need
    the new public key)."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists; a new aggregator key needs the new public key on every device, "
                           "so remove the old file first if that is what you want")
    key = key or SigningKey.generate()
    atomic_write_bytes(path, key.to_pem(), mode=0o600)
    atomic_write_bytes(public_key_file(path), (key.public.text + "\n").encode(), mode=0o644)
    return key


def load_signing_key(path: str | Path) -> SigningKey:
    """The private key in ``path``; ``KeyFileError`` when it is missing, unreadable, readable by
    other users, or not an Ed25519 key."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read the aggregator's signing key {path}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"the aggregator's signing key {path} is readable by other users; chmod 600 {path}")
    try:
        return SigningKey.from_pem(data)
    except ValueError as e:
        raise KeyFileError(f"{path} is not the aggregator's signing key: {e}") from None


def load_or_create_signing_key(path: str | Path) -> tuple[SigningKey, bool]:
    """The key in ``path``, or a new one written there (with its ``.pub``); whether it is new."""
    path = Path(path)
    if path.exists():
        key = load_signing_key(path)
        pub = public_key_file(path)
        if not pub.exists():  # a copied private key without its public half: devices need it
            atomic_write_bytes(pub, (key.public.text + "\n").encode(), mode=0o644)
        return key, False
    return write_key_pair(path), True


def parse_aggregator_key(value: str) -> VerifyKey:
    """A device's trusted aggregator key from ``ed25519:...`` or the path of a ``.pub`` file that
    holds it; ``KeyFileError`` saying what was wrong."""
    text = value.strip()
    if not text.startswith("ed25519:"):
        p = Path(text)
        try:
            text = p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"the aggregator key {value!r} is neither 'ed25519:...' nor a readable .pub file "
                               f"({getattr(e, 'strerror', None) or e})") from None
    try:
        return VerifyKey.from_text(text)
    except ValueError as e:
        raise KeyFileError(str(e)) from None

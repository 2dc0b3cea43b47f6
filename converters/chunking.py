"""Splitting messages that exceed the MQTT payload limit into chunks, and putting them back.

MQTT brokers cap the packet size (Mosquitto 2.1: 2,000,000 bytes by default) and paho ignores the
cap, so fedprune bounds every publish to ``max_payload_bytes`` (``fedprune.transport``). A message
over that bound (a big model's weights) travels as chunks, each a normal fedprune frame
(``fedprune.converters.frame``) of kind ``CHUNK_KIND`` with no JSON header, whose body is::

    message_id  16 bytes  random per message; chunks of one message share it
    index       u32       0 .. count-1
    count       u32       number of chunks, >= 1
    total       u64       length of the whole payload
    sha256      32 bytes  SHA-256 of the whole payload
    slice       the rest: payload[index * S : (index + 1) * S], S = the slice size of the message

All integers are little-endian. Every slice but the last is exactly ``S`` bytes and the last one
``1 .. S`` bytes, so each chunk alone fixes ``S`` (for the last one, ``S = (total - len) /
(count - 1)``) and the receiver can check every slice against the geometry of the message
without trusting any chunk more than another.

The manifest (count, total, sha256) is repeated in every chunk, not only in chunk 0: QoS 1 does
not keep chunks in order, so whichever chunk arrives first must be enough to size the message,
refuse it when it is too large, and check every later chunk against; and the 44 bytes it costs
are nothing next to a slice of a megabyte or two. The frame CRC already guards each chunk
against corruption; the SHA-256 guards the whole against chunks of different messages, or of a
different version of one message, being mixed.

Per-chunk overhead is ``CHUNK_OVERHEAD`` = 78 bytes: 10 (frame prefix)
+ 64 (chunk header) + 4 (CRC).

Messages that fit are sent as they are: ``split_message`` returns ``[payload]`` and the receiver
tells the two apart with ``is_chunk``.

**Retained chunks.** A broker keeps one retained message per topic, so the chunks of a message
that must be retained (a file every device needs, whenever it joins) each get a topic of their
own: chunk 0 on the message's topic, chunk ``i`` on ``<topic>/chunk/<i>`` (``retained_chunk_topics``).
A receiver subscribes to both (``retained_subscriptions``) and reassembles every chunk under the
message's topic (``chunk_source``). A new message on the topic, or an empty payload that clears
it, replaces chunk 0, so the chunks an older message left on ``<topic>/chunk/<i>`` can never be
completed again: they expire in the receiver's ``Reassembler``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from fedprune.converters.errors import CodecError
from fedprune.converters.frame import CRC as _CRC
from fedprune.converters.frame import MAGIC, MAX_HEADER_BYTES, pack_frame, unpack_frame
from fedprune.converters.frame import PREFIX as _PREFIX
from fedprune.converters.log_rate import worth_logging

log = logging.getLogger(__name__)

CHUNK_KIND = 3  # frame kind byte of a chunk (fedprune.converters.protocol.Kind: TASK=1, UPDATE=2)
MESSAGE_ID_BYTES = 16
_CHUNK_HEADER = struct.Struct("<16sIIQ32s")  # message_id, index, count, total, sha256
CHUNK_OVERHEAD = _PREFIX.size + _CHUNK_HEADER.size + _CRC.size  # 78 bytes
_MAX_COUNT = 0xFFFFFFFF


# --- sender --------------------------------------------------------------------------------------


def split_message(payload: bytes, max_chunk_bytes: int, message_id: bytes | None = None) -> list[bytes]:
    """``[payload]`` itself when it fits in ``max_chunk_bytes``; otherwise chunk frames, each at
    most ``max_chunk_bytes`` long, that ``Reassembler`` puts back together.

    ``message_id`` (16 bytes) defaults to 16 random bytes. Raises ``ValueError`` when
    ``max_chunk_bytes`` leaves no room for a slice after the ``CHUNK_OVERHEAD`` bytes of framing,
    or the message would need more than 2**32 - 1 chunks.
    """
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")
    if message_id is None:
        message_id = os.urandom(MESSAGE_ID_BYTES)
    elif not isinstance(message_id, (bytes, bytearray)) or len(message_id) != MESSAGE_ID_BYTES:
        raise ValueError(f"message_id must be {MESSAGE_ID_BYTES} bytes")
    if len(payload) <= max_chunk_bytes:
        return [payload]
    slice_size = max_chunk_bytes - CHUNK_OVERHEAD
    if slice_size < 1:
        raise ValueError(
            f"max_chunk_bytes={max_chunk_bytes} leaves no room for data: a chunk needs "
            f"{CHUNK_OVERHEAD} bytes of framing plus at least 1 byte of payload"
        )
    total = len(payload)
    count = -(-total // slice_size)
    if count > _MAX_COUNT:
        raise ValueError(f"a {total}-byte payload would need {count} chunks of {slice_size} bytes")
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    chunks = []
    for index in range(count):
        piece = view[index * slice_size : (index + 1) * slice_size]
        head = _CHUNK_HEADER.pack(bytes(message_id), index, count, total, digest)
        chunks.append(pack_frame(CHUNK_KIND, None, head + piece))
    return chunks


#: The topic level under a message's topic that holds its retained chunks 1 .. count-1.
RETAINED_CHUNK_LEVEL = "chunk"


def retained_chunk_topics(topic: str, count: int) -> list[str]:
    """The topic of each of ``count`` retained chunks of a message on ``topic``: chunk 0 on
    ``topic`` itself (so replacing or clearing the message there orphans the older chunks), chunk
    ``i`` on ``<topic>/chunk/<i>``."""
    return [topic] + [f"{topic}/{RETAINED_CHUNK_LEVEL}/{i}" for i in range(1, count)]


def retained_subscriptions(topic: str) -> list[str]:
    """The filters that receive a retained message on ``topic`` whatever its size."""
    return [topic, f"{topic}/{RETAINED_CHUNK_LEVEL}/+"]


def chunk_source(topic: str) -> str:
    """The message's topic of a retained chunk's topic (``<topic>/chunk/<i>`` -> ``<topic>``);
    any other topic unchanged."""
    head, _, index = topic.rpartition("/")
    parent, _, level = head.rpartition("/")
    if level == RETAINED_CHUNK_LEVEL and parent and index.isdigit() and index.isascii():
        return parent
    return topic


def is_chunk(payload: bytes) -> bool:
    """Whether ``payload`` looks like a chunk (magic and kind only; ``Reassembler.add`` checks
    the rest)."""
    return len(payload) >= _PREFIX.size and payload[:4] == MAGIC and payload[5] == CHUNK_KIND


# --- receiver ------------------------------------------------------------------------------------


@dataclass
class _Pending:
    count: int
    total: int
    digest: bytes
    slice_size: int
    started: float
    slices: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # bytes buffered


@dataclass(frozen=True)
class _Chunk:
    message_id: bytes
    index: int
    count: int
    total: int
    digest: bytes
    slice_size: int
    data: bytes


class Reassembler:
    """Collects chunks per ``(source, message_id)`` and returns the whole payload when complete
    and verified.

    Memory is bounded, and no source can take another's room:

    - a source (the topic a chunk came on: one device's on a secured broker) has at most
      ``max_pending_per_source`` messages in progress and ``max_source_bytes`` buffered; beyond
      either, its own oldest message is evicted (counted in ``evicted``), never another's;
    - all sources together hold at most ``max_pending_messages`` messages and
      ``max_pending_bytes`` bytes; a chunk beyond those is refused and the message it belongs to
      dropped (counted in ``refused``), again without touching anyone else's;
    - only the bytes actually received are held, and a message whose first chunk arrived more
      than ``timeout_s`` ago is dropped (counted in ``expired``).

    Thread-safe.
    """

    def __init__(
        self,
        max_message_bytes: int,
        max_pending_per_source: int = 2,
        max_source_bytes: int | None = None,
        max_pending_messages: int = 1024,
        max_pending_bytes: int | None = None,
        timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_source_bytes`` defaults to ``max_message_bytes`` (one whole message per source);
        ``max_pending_bytes`` to four times that."""
        max_source_bytes = max_message_bytes if max_source_bytes is None else max_source_bytes
        max_pending_bytes = 4 * max_source_bytes if max_pending_bytes is None else max_pending_bytes
        if min(max_message_bytes, max_pending_per_source, max_pending_messages) < 1 or not timeout_s > 0:
            raise ValueError("max_message_bytes, max_pending_per_source, max_pending_messages and timeout_s "
                             "must be positive")
        if not max_message_bytes <= max_source_bytes <= max_pending_bytes:
            raise ValueError(f"need max_message_bytes ({max_message_bytes}) <= max_source_bytes ({max_source_bytes}) "
                             f"<= max_pending_bytes ({max_pending_bytes}): a whole message must fit")
        self.max_message_bytes = max_message_bytes
        self.max_pending_per_source = max_pending_per_source
        self.max_source_bytes = max_source_bytes
        self.max_pending_messages = max_pending_messages
        self.max_pending_bytes = max_pending_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[tuple[str, bytes], _Pending] = OrderedDict()  # oldest first
        self._source_bytes: dict[str, int] = {}  # bytes buffered per source with a message in progress
        self._source_messages: dict[str, int] = {}
        # Recently completed messages, so a late (QoS 1 re-delivered) chunk of one is reported as
        # the duplicate it is instead of opening a message that can never complete.
        self._done: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._max_done = max(64, 4 * max_pending_per_source)
        self._pending_bytes = 0
        self.expired = 0
        self.evicted = 0
        self.refused = 0
        self.completed = 0
        # the largest chunk frame that can be valid: any JSON header, a full-size slice
        self._max_chunk_frame = (
            _PREFIX.size + MAX_HEADER_BYTES + _CHUNK_HEADER.size + max_message_bytes + _CRC.size
        )

    @property
    def pending_bytes(self) -> int:
        """Bytes of slices buffered for incomplete messages."""
        with self._lock:
            self._expire(self._clock())
            return self._pending_bytes

    @property
    def pending_messages(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._pending)

    def missing(self, source: str, message_id: bytes) -> list[int]:
        """Indices not yet received of a message in progress; ``[]`` when no such message is in
        progress (never started, completed, dropped or expired)."""
        with self._lock:
            self._expire(self._clock())
            entry = self._pending.get((source, bytes(message_id)))
            if entry is None:
                return []
            return [i for i in range(entry.count) if i not in entry.slices]

    def add(self, source: str, chunk: bytes) -> bytes | None:
        """Take one chunk from ``source``; the whole payload once every chunk is in and its
        SHA-256 matches, else ``None``.

        Raises ``CodecError`` for a malformed chunk, a total over ``max_message_bytes`` (before
        anything is buffered), a slice that does not fit the declared geometry, a chunk whose
        count/total/hash/slice size disagree with earlier chunks of its message, a duplicate
        chunk, a chunk for which all sources together have no room left (its message is dropped),
        and a complete message whose hash does not match (that message is dropped). A chunk that
        raises for any other reason changes nothing: the message it claims to belong to keeps going.
        """
        c = self._parse(chunk)
        key = (source, c.message_id)
        mid = c.message_id.hex()
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._pending.get(key)
            if entry is None:
                if key in self._done:
                    raise CodecError(
                        f"duplicate chunk {c.index} of message {mid} from {source!r}, "
                        "which was already reassembled"
                    )
                entry = _Pending(c.count, c.total, c.digest, c.slice_size, now)
                while self._source_messages.get(source, 0) >= self.max_pending_per_source:
                    self._evict_oldest_of(source, key, f"more than {self.max_pending_per_source} of its messages "
                                                       "in progress")
                if len(self._pending) >= self.max_pending_messages:
                    self.refused += 1
                    raise CodecError(f"no room for message {mid} from {source!r}: {len(self._pending)} messages "
                                     "from all sources are in progress")
                self._pending[key] = entry
                self._source_messages[source] = self._source_messages.get(source, 0) + 1
                self._source_bytes.setdefault(source, 0)
            else:
                self._check_consistent(entry, c, mid)
                if c.index in entry.slices:
                    raise CodecError(f"duplicate chunk {c.index} of message {mid} from {source!r}")
            n = len(c.data)
            while self._source_bytes[source] + n > self.max_source_bytes:
                self._evict_oldest_of(source, key, f"more than {self.max_source_bytes} bytes of its messages "
                                                   "in progress")
            if self._pending_bytes + n > self.max_pending_bytes:
                self._drop(key)
                self.refused += 1
                raise CodecError(f"no room for message {mid} from {source!r}: all sources together have "
                                 f"{self._pending_bytes} bytes in progress (at most {self.max_pending_bytes}); "
                                 "the message is dropped")
            entry.slices[c.index] = c.data
            entry.received += n
            self._pending_bytes += n
            self._source_bytes[source] += n
            if len(entry.slices) < entry.count:
                return None
            self._drop(key)
        # complete: join and verify outside the lock
        payload = b"".join(entry.slices[i] for i in range(entry.count))
        if len(payload) != entry.total or hashlib.sha256(payload).digest() != entry.digest:
            raise CodecError(f"hash mismatch: message {mid} from {source!r} reassembled to other bytes")
        with self._lock:
            self._done[key] = self._clock()
            while len(self._done) > self._max_done:
                self._done.popitem(last=False)
            self.completed += 1
        return payload

    def _drop(self, key: tuple[str, bytes]) -> _Pending:
        """Forget a message in progress and give back its room (call with the lock held)."""
        entry = self._pending.pop(key)
        source = key[0]
        self._pending_bytes -= entry.received
        self._source_bytes[source] -= entry.received
        self._source_messages[source] -= 1
        if not self._source_messages[source]:
            del self._source_messages[source], self._source_bytes[source]
        return entry

    def _evict_oldest_of(self, source: str, keep: tuple[str, bytes], why: str) -> None:
        """Drop ``source``'s oldest message in progress other than ``keep`` (lock held)."""
        old_key = next(k for k in self._pending if k[0] == source and k != keep)
        old = self._drop(old_key)
        self.evicted += 1
        if worth_logging(self.evicted):
            log.warning("evicted incomplete message %s from %r (%d of %d chunks): %s (%d evicted so far)",
                        old_key[1].hex(), source, len(old.slices), old.count, why, self.evicted)

    # -- internals --

    def _parse(self, chunk: bytes) -> _Chunk:
        kind, _header, body = unpack_frame(chunk, self._max_chunk_frame)
        if kind != CHUNK_KIND:
            raise CodecError(f"frame of kind {kind} is not a chunk (kind {CHUNK_KIND})")
        if len(body) < _CHUNK_HEADER.size:
            raise CodecError(f"chunk body of {len(body)} bytes is shorter than its {_CHUNK_HEADER.size}-byte header")
        message_id, index, count, total, digest = _CHUNK_HEADER.unpack_from(body)
        n = len(body) - _CHUNK_HEADER.size
        if count < 1 or index >= count:
            raise CodecError(f"chunk index {index} is out of range for {count} chunks")
        if total > self.max_message_bytes:
            raise CodecError(
                f"message of {total} bytes exceeds the limit of {self.max_message_bytes} (max_message_bytes)"
            )
        if n < 1 or n > total:
            raise CodecError(f"slice of {n} bytes does not fit a {total}-byte message")
        if index < count - 1:
            slice_size = n
        elif count == 1:
            slice_size = n
        else:  # the last of several: total = (count - 1) * S + n with 1 <= n <= S
            slice_size, rest = divmod(total - n, count - 1)
            if rest:
                slice_size = 0
        if slice_size < n or -(-total // slice_size) != count or (
            index == count - 1 and total - (count - 1) * slice_size != n
        ):
            raise CodecError(
                f"slice {index} of {n} bytes does not fit a {total}-byte message in {count} chunks"
            )
        return _Chunk(message_id, index, count, total, digest, slice_size, bytes(body[_CHUNK_HEADER.size :]))

    @staticmethod
    def _check_consistent(entry: _Pending, c: _Chunk, mid: str) -> None:
        for name, ours, theirs in (
            ("chunk count", entry.count, c.count),
            ("total length", entry.total, c.total),
            ("slice size", entry.slice_size, c.slice_size),
        ):
            if ours != theirs:
                raise CodecError(
                    f"conflicting {name} in chunk {c.index} of message {mid}: {theirs}, earlier chunks said {ours}"
                )
        if entry.digest != c.digest:
            raise CodecError(f"conflicting sha256 in chunk {c.index} of message {mid}")

    def _expire(self, now: float) -> None:
        """Drop messages in progress for longer than ``timeout_s`` (call with the lock held)."""
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if now - entry.started <= self.timeout_s:
                break
            self._drop(key)
            self.expired += 1
            log.warning(
                "dropped incomplete message %s from %r after %.0f s: %d of %d chunks arrived",
                key[1].hex(), key[0], now - entry.started, len(entry.slices), entry.count,
            )
        while self._done:
            key, when = next(iter(self._done.items()))
            if now - when <= self.timeout_s:
                break
            del self._done[key]

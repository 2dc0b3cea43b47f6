"""One MQTT session (paho-mqtt 2) with what both sides need: reconnection, resubscription,
a last will, and an application payload limit.

Why the limit lives here: paho ignores the broker's maximum packet size, so an oversize publish
"succeeds", the broker drops the connection, and paho resends it forever. We refuse it instead.
MQTT 3.1.1 is used because the embedded broker (amqtt) speaks nothing newer.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlencode, urlparse

import paho.mqtt.client as mqtt

from fedprune.converters.chunking import (
    Reassembler,
    chunk_source,
    is_chunk,
    retained_chunk_topics,
    split_message,
)
from fedprune.converters.errors import CodecError
from fedprune.converters.text import one_line
from fedprune.converters.log_rate import worth_logging

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
# Called on the network thread with (topic, payload size) before a message is buffered anywhere;
# False drops it there (the caller counts what it drops).
AdmitCheck = Callable[[str, int], bool]
OUTBOX_POLL_S = 0.01


class PayloadTooLarge(ValueError):
    """A message over the application limit; raise the limit or shrink the model."""


class OutboxFull(RuntimeError):
    """A publish that waited ``outbox_wait_s`` for room in a full outbox (the broker has not
    acknowledged the messages before it: it is gone or far too slow)."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in. ``ca_file``: the CA that signed the broker's TLS
    certificate (None: the system's trusted CAs)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    @property
    def url(self) -> str:
        """The address without credentials: safe to log and print."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def full_url(self) -> str:
        """The address with credentials and CA: what :func:`parse_broker_url` reads back. Holds the
        password: pass it to a session, never to a log or a command line."""
        cred = ""
        if self.username is not None:
            cred = quote(self.username, safe="")
            if self.password is not None:
                cred += ":" + quote(self.password, safe="")
            cred += "@"
        query = "?" + urlencode({"ca": self.ca_file}) if self.ca_file else ""
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{cred}{rest}{query}"


def parse_broker_url(
    url: str, *, username: str | None = None, password: str | None = None, ca_file: str | None = None
) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` (default 1883) or ``mqtts://...[?ca=CA_FILE]``
    (default 8883, TLS). Explicit ``username``/``password``/``ca_file`` override the URL's."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:port or mqtts://host:port, got {url!r}")
    tls = parsed.scheme == "mqtts"
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    query = parse_qs(parsed.query)
    if set(query) - {"ca"}:
        raise ValueError(f"broker URL {parsed.scheme}://{parsed.hostname}:{port} has unknown options "
                         f"{sorted(set(query) - {'ca'})}; the only one is ?ca=CA_FILE")
    ca_file = ca_file or (query["ca"][-1] if "ca" in query else None)
    if ca_file and not tls:
        raise ValueError(f"a CA file ({ca_file}) needs a TLS broker URL: mqtts://, not mqtt://")
    return BrokerAddress(
        host=parsed.hostname,
        port=port,
        tls=tls,
        username=username if username is not None else (unquote(parsed.username) if parsed.username else None),
        password=password if password is not None else (unquote(parsed.password) if parsed.password else None),
        ca_file=ca_file,
    )


class MqttSession:
    """A paho client that reconnects by itself and resubscribes after every (re)connection.

    ``on_message(topic, payload)`` runs on paho's network thread: it must be quick (enqueue work).
    ``on_connected()`` runs after each (re)connection, e.g. to republish presence. ``admit(topic,
    size)``, if given, runs first for every message, before chunks are buffered: False drops it.

    The outbox (messages published and not yet acknowledged by the broker) holds at most
    ``max_queued_messages``: paho's own queue is unbounded by default, and a peer that made us
    answer each of its messages filled it until the aggregator ran out of memory (issue 16). When
    it is full, a ``best_effort`` publish is dropped (counted in ``outbox_dropped``); any other
    waits for room, at most ``outbox_wait_s``.
    """

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        *,
        subscriptions: list[str] | None = None,
        on_message: MessageHandler | None = None,
        on_connected: Callable[[], None] | None = None,
        admit: AdmitCheck | None = None,
        will: tuple[str, bytes, bool] | None = None,
        max_payload_bytes: int = 1_000_000,
        max_message_bytes: int = 64_000_000,
        clean_session: bool = True,
        keepalive_s: int = 30,
        reconnect_max_delay_s: int = 30,
        max_queued_messages: int = 1000,
        outbox_wait_s: float = 300.0,
        reassembler: Reassembler | None = None,
    ) -> None:
        """``reassembler``: where chunks are put back together (default: one sized by
        ``max_message_bytes`` with its default bounds)."""
        if max_queued_messages < 1:
            raise ValueError(f"max_queued_messages must be at least 1, got {max_queued_messages}")
        self.address = parse_broker_url(broker_url)
        self.client_id = client_id
        self.max_payload_bytes = max_payload_bytes
        self.max_message_bytes = max(max_message_bytes, max_payload_bytes)
        self.reassembler = reassembler or Reassembler(self.max_message_bytes)
        self.chunk_errors = 0
        self._admit = admit
        self.outbox_wait_s = outbox_wait_s
        self.outbox_dropped = 0
        self._subscriptions = list(dict.fromkeys(subscriptions or []))
        self._live = False  # connected, and the subscriptions sent
        self._on_message = on_message
        self._on_connected = on_connected
        self._keepalive = keepalive_s
        self._reconnect_delays = (1, reconnect_max_delay_s)
        self.failed_attempts = 0  # connection attempts that failed since the last connection
        self.last_failure: str | None = None  # why the last one failed
        self.connected = threading.Event()
        self.refused: str | None = None  # the broker's reason when it refused the last CONNECT
        self._connect_answered = threading.Event()  # CONNACK (accepted or refused) seen
        self._stopping = False
        self.oversize_dropped = 0
        self.bytes_published = 0
        self.bytes_received = 0
        self._lock = threading.Lock()
        self._retained_chunks: dict[str, int] = {}  # topic -> chunks of the last publish_retained

        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(max_queued_messages)
        c.reconnect_delay_set(min_delay=self._reconnect_delays[0], max_delay=reconnect_max_delay_s)
        if self.address.username:
            c.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            if self.address.ca_file and not Path(self.address.ca_file).is_file():
                raise ValueError(f"CA file {self.address.ca_file} for {self.address.url} does not exist")
            c.tls_set(ca_certs=self.address.ca_file)  # verifies the broker's certificate and host name
        if will:
            topic, payload, retain = will
            c.will_set(topic, payload, qos=1, retain=retain)
        c.on_connect = self._handle_connect
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        self.client = c

    # -- lifecycle --
    def start(self, timeout_s: float | None = 30.0) -> "MqttSession":
        """Connect and start the network thread.

        Waits for the first CONNACK and raises ConnectionError if none comes within ``timeout_s``;
        with ``timeout_s=None`` returns at once and paho keeps retrying until the broker is up.
        """
        try:
            self.client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        except (OSError, ValueError) as e:
            raise ConnectionError(f"cannot reach MQTT broker at {self.address.url}: {e}") from None
        self.client.loop_start()
        if timeout_s is None:
            return self
        deadline = time.monotonic() + timeout_s
        while not self.connected.is_set() and self.refused is None and time.monotonic() < deadline:
            self._connect_answered.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        if self.connected.is_set():
            return self
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        if self.refused is not None:
            raise ConnectionError(
                f"the MQTT broker at {self.address.url} refused {self.address.username or 'an anonymous client'}: "
                f"{self.refused}; check the username and password (the connection file written by "
                "fedprune-aggregator init-broker)"
            )
        hint = (" For mqtts://, is the port the broker's TLS listener, and does the CA file "
                "sign its certificate for this host name?" if self.address.tls else "")
        raise ConnectionError(
            f"no connection to the MQTT broker at {self.address.url} within {timeout_s:.0f} s; "
            f"is it running and reachable (host, port, credentials)?{hint}"
        )

    def stop(self, publish_first: tuple[str, bytes, bool] | None = None) -> None:
        """Disconnect cleanly (the broker then does not send the last will)."""
        if self._stopping:
            return
        self._stopping = True
        if publish_first and self.connected.is_set():
            try:
                self.publish(*publish_first).wait_for_publish(5)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # -- subscriptions --
    @property
    def subscriptions(self) -> list[str]:
        """The topic filters subscribed to now (and again after every reconnection)."""
        with self._lock:
            return list(self._subscriptions)

    def subscribe(self, topics: list[str]) -> None:
        """Add topic filters (QoS 1). Sent at once when connected: a message this client publishes
        afterwards reaches the broker after the subscription, so an answer to it is delivered."""
        with self._lock:
            new = [t for t in dict.fromkeys(topics) if t not in self._subscriptions]
            self._subscriptions += new
            live = self._live
        if new and live:
            self.client.subscribe([(t, 1) for t in new])

    def unsubscribe(self, topics: list[str]) -> None:
        """Drop topic filters: the broker routes no more of their messages here (those already
        queued for this client still come). Safe to call from ``on_message`` or ``admit``."""
        with self._lock:
            gone = [t for t in dict.fromkeys(topics) if t in self._subscriptions]
            self._subscriptions = [t for t in self._subscriptions if t not in gone]
            live = self._live
        if gone and live:
            self.client.unsubscribe(gone)

    # -- messaging --
    def publish(self, topic: str, payload: bytes, retain: bool = False, *,
                best_effort: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish at QoS 1; a message over ``max_payload_bytes`` goes as chunks (never retained:
        a broker keeps only the last retained message of a topic). Returns the last publish's info,
        or None for a ``best_effort`` message dropped because the outbox was full."""
        if len(payload) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"message of {len(payload)} bytes for {topic} exceeds the limit of "
                f"{self.max_message_bytes} bytes (transport.max_message_bytes)"
            )
        pieces = split_message(payload, self.max_payload_bytes)
        if len(pieces) > 1 and retain:
            log.debug("%s: a %d-byte message goes in %d chunks, not retained", topic, len(payload), len(pieces))
        info = None
        for piece in pieces:
            info = self._publish_piece(topic, piece, retain and len(pieces) == 1, best_effort)
            if info is None:
                return None
        with self._lock:
            self.bytes_published += sum(len(p) for p in pieces)
        return info

    def publish_retained(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        """Publish at QoS 1, retained whatever its size: a message over ``max_payload_bytes`` goes
        as chunks, chunk 0 retained on ``topic`` and chunk ``i`` on ``<topic>/chunk/<i>``
        (``fedprune.converters.chunking``); receivers subscribe with ``retained_subscriptions``.
        Chunk topics this session filled for an earlier, longer message are cleared. An empty
        ``payload`` clears the message. Returns the last publish's info."""
        if len(payload) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"message of {len(payload)} bytes for {topic} exceeds the limit of "
                f"{self.max_message_bytes} bytes (transport.max_message_bytes)"
            )
        pieces = split_message(payload, self.max_payload_bytes)
        topics = retained_chunk_topics(topic, len(pieces))
        with self._lock:
            before = self._retained_chunks.get(topic, 1)
            self._retained_chunks[topic] = len(pieces)
        stale = retained_chunk_topics(topic, before)[len(pieces):]
        for chunk_topic, piece in zip(topics + stale, pieces + [b""] * len(stale)):
            info = self._publish_piece(chunk_topic, piece, True, False)
        with self._lock:
            self.bytes_published += sum(len(p) for p in pieces)
        return info

    def _publish_piece(self, topic: str, piece: bytes, retain: bool, best_effort: bool) -> mqtt.MQTTMessageInfo | None:
        deadline = time.monotonic() + self.outbox_wait_s
        while True:
            info = self.client.publish(topic, piece, qos=1, retain=retain)
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                return info
            if best_effort:
                with self._lock:
                    self.outbox_dropped += 1
                return None
            if self._stopping or time.monotonic() > deadline:
                raise OutboxFull(f"no room in the outbox for {topic} within {self.outbox_wait_s:.0f} s: the broker at "
                                 f"{self.address.url} has not acknowledged the messages before it")
            time.sleep(OUTBOX_POLL_S)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            self._connect_answered.set()
            log.error("broker %s refused the connection of %s: %s", self.address.url,
                      self.address.username or "an anonymous client", reason_code)
            return
        self.refused = None
        self.failed_attempts, self.last_failure = 0, None
        with self._lock:
            topics = list(self._subscriptions)
            self._live = True  # from here on, subscribe() sends what it adds
        if topics:
            client.subscribe([(topic, 1) for topic in topics])
        self.connected.set()
        self._connect_answered.set()
        log.info("connected to %s as %s", self.address.url, self.client_id)
        if self._on_connected:
            self._on_connected()

    def _handle_connect_fail(self, client, userdata) -> None:
        """A connection attempt failed before MQTT began (refused, unreachable, a name that does
        not resolve): say why, and when paho tries again.

        paho calls this from inside its ``except OSError`` around the attempt, so the exception is
        ``sys.exc_info()``'s. Its wait before the next attempt doubles the last one up to the
        maximum (``reconnect_delay_set``); after the very first attempt (no wait yet) it waits
        the minimum and then twice that before trying again (measured with paho 2.1: attempts at
        0, 3, 7, 15, 31 s).
        """
        error = sys.exc_info()[1]
        reason = f"{type(error).__name__}: {error}" if error is not None else "no reason given"
        low, high = self._reconnect_delays
        last = getattr(self.client, "_reconnect_delay", None)  # paho's own, private: the wait it last used
        delay = 3 * low if last is None else min(2 * last, high)
        self.failed_attempts += 1
        self.last_failure = reason
        log.warning("cannot connect to the MQTT broker at %s (%s); retrying in %d s", self.address.url, reason, delay)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._live = False
        self.connected.clear()
        if not self._stopping:
            log.warning("lost connection to %s (%s); reconnecting", self.address.url, reason_code)

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        payload = msg.payload
        if self._admit is not None and not self._admit(msg.topic, len(payload)):
            return
        if len(payload) > self.max_payload_bytes:
            self.oversize_dropped += 1
            if worth_logging(self.oversize_dropped):
                log.warning("dropped %d-byte message on %s: over the %d-byte limit (%d dropped so far)",
                            len(payload), one_line(msg.topic), self.max_payload_bytes, self.oversize_dropped)
            return
        with self._lock:
            self.bytes_received += len(payload)
        topic = chunk_source(msg.topic)  # a retained chunk's topic names its message's topic
        if is_chunk(payload):
            try:
                payload = self.reassembler.add(topic, payload)
            except CodecError as e:
                self.chunk_errors += 1
                if worth_logging(self.chunk_errors):
                    log.warning("dropped a chunk on %s: %s (%d dropped so far)", one_line(msg.topic), e.reason,
                                self.chunk_errors)
                return
            if payload is None:
                return  # more chunks to come
        elif topic != msg.topic:
            return  # a cleared retained chunk (empty), or something that is no chunk where only chunks go
        if self._on_message:
            try:
                self._on_message(topic, payload)
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler failed for a message on %s", topic)

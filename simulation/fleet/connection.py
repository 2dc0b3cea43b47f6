"""One asyncio MQTT connection (aiomqtt) with what ``fedprune.transport.MqttSession`` gives a
paho client: QoS 1, a last will, the application payload limit, and chunking of large messages.

paho's own network loop uses ``select()`` and stops at about 340 clients per process; aiomqtt
drives paho from the asyncio event loop (epoll), so one process holds a thousand connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import TracebackType

import aiomqtt
import paho.mqtt.client as mqtt

from fedprune.converters.chunking import Reassembler, chunk_source, is_chunk, split_message
from fedprune.converters.errors import CodecError
from fedprune.transport import PayloadTooLarge, parse_broker_url

log = logging.getLogger(__name__)

MqttError = aiomqtt.MqttError


class _Client(aiomqtt.Client):
    """aiomqtt's client with paho's housekeeping (``loop_misc``: keep-alive pings, their timeout)
    every ``keepalive / 6`` seconds instead of every second. aiomqtt runs one such timer per
    connection: 5,000 idle connections took 5.4 % of a core for it, 0.5 % at 10 s. A ping is then
    at most ``keepalive / 6`` late, well inside the broker's ``1.5 * keepalive``."""

    async def _misc_loop(self) -> None:  # aiomqtt's, with the period changed
        period = max(1.0, self._client.keepalive / 6)
        while self._client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(period)


class AsyncConnection:
    """``async with AsyncConnection(...) as conn``: connected and subscribed; leaving the block
    disconnects cleanly (the broker does not send the will)."""

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        *,
        subscriptions: list[str],
        will: tuple[str, bytes, bool] | None = None,
        max_payload_bytes: int = 1_000_000,
        max_message_bytes: int = 64_000_000,
        keepalive_s: int = 60,
        timeout_s: float = 30.0,
    ) -> None:
        self.address = parse_broker_url(broker_url)
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.will = will
        self.max_payload_bytes = max_payload_bytes
        self.max_message_bytes = max(max_message_bytes, max_payload_bytes)
        self.keepalive_s = keepalive_s
        self.timeout_s = timeout_s
        self._reassembler: Reassembler | None = None  # made on the first chunk: most messages fit one
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> "AsyncConnection":
        will = aiomqtt.Will(self.will[0], self.will[1], qos=1, retain=self.will[2]) if self.will else None
        tls = aiomqtt.TLSParameters() if self.address.tls else None
        client = _Client(
            self.address.host, self.address.port, identifier=self.client_id,
            username=self.address.username, password=self.address.password,
            protocol=aiomqtt.ProtocolVersion.V311, clean_session=True, will=will,
            keepalive=self.keepalive_s, timeout=self.timeout_s, tls_params=tls,
            logger=log,
        )
        await client.__aenter__()
        try:
            for topic in self.subscriptions:
                await client.subscribe(topic, qos=1)
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        self._client = client
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.__aexit__(exc_type, exc, tb)
            except MqttError as e:  # already gone: nothing to close
                log.debug("%s: disconnect: %s", self.client_id, e)

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement; a message over
        ``max_payload_bytes`` goes as chunks (never retained)."""
        if self._client is None:
            raise MqttError(f"{self.client_id}: not connected")
        if len(payload) > self.max_message_bytes:
            raise PayloadTooLarge(f"message of {len(payload)} bytes for {topic} exceeds the limit of "
                                  f"{self.max_message_bytes} bytes (transport.max_message_bytes)")
        pieces = split_message(payload, self.max_payload_bytes)
        for piece in pieces:
            await self._client.publish(topic, piece, qos=1, retain=retain and len(pieces) == 1)

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """Whole messages as they arrive (chunks put back together); ends with ``MqttError`` when
        the connection drops."""
        if self._client is None:
            raise MqttError(f"{self.client_id}: not connected")
        async for msg in self._client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload or b"")
            topic = str(msg.topic)
            if len(payload) > self.max_payload_bytes:
                log.warning("%s: dropped %d-byte message on %s: over the %d-byte limit",
                            self.client_id, len(payload), topic, self.max_payload_bytes)
                continue
            source = chunk_source(topic)  # a retained chunk's topic names its message's topic
            if is_chunk(payload):
                if self._reassembler is None:
                    self._reassembler = Reassembler(self.max_message_bytes)
                try:
                    whole = self._reassembler.add(source, payload)
                except CodecError as e:
                    log.warning("%s: dropped a chunk on %s: %s", self.client_id, topic, e.reason)
                    continue
                if whole is None:
                    continue
                payload = whole
            elif source != topic:
                continue  # a cleared retained chunk
            yield source, payload

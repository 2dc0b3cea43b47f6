"""Everything the aggregator sends to devices, signed: the one way out of the aggregator.

Devices accept only messages signed with the aggregator's key for the topic they arrive on
(``fedprune.converters.signing``). Publishing through ``DevicePublisher.publish`` is what makes a
message signed; a new kind of message to devices needs nothing else.
"""

from __future__ import annotations

from paho.mqtt.client import MQTTMessageInfo

from fedprune.converters.signing import SignedPayload, SigningKey, VerifyKey, sign_message
from fedprune.transport import MqttSession


class DevicePublisher:
    """Signs and publishes the aggregator's messages on ``session``."""

    def __init__(self, session: MqttSession, key: SigningKey) -> None:
        self.session, self._key = session, key
        self.verify_key: VerifyKey = key.public
        self._last: SignedPayload | None = None  # a round's task goes to many devices: signed for each

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                best_effort: bool = False) -> MQTTMessageInfo | None:
        """Sign ``payload`` for ``topic`` and publish it; the publish's info. ``best_effort``: for
        what may be lost (acknowledgements), dropped (None) when the outbox is full; anything else
        waits for room."""
        last = self._last
        if last is None or last.payload is not payload:
            last = self._last = SignedPayload(payload, self._key)
        return self.session.publish(topic, last.for_topic(topic), retain=retain, best_effort=best_effort)

    def publish_retained(self, topic: str, payload: bytes) -> MQTTMessageInfo:
        """Sign ``payload`` for ``topic`` and publish it retained whatever its size (a model file:
        ``MqttSession.publish_retained`` chunks it; the device verifies the reassembled whole)."""
        return self.session.publish_retained(topic, sign_message(topic, payload, self._key))

    def clear(self, topic: str) -> None:
        """Remove the retained message of ``topic``, and its chunks if ``publish_retained`` chunked
        it: an empty payload, which carries nothing to sign."""
        self.session.publish_retained(topic, b"")

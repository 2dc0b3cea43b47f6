"""The MQTT session: payload limit, and reconnection after the broker restarts."""

from __future__ import annotations

import threading
import time

import pytest

from fedprune.transport import MqttSession, PayloadTooLarge, parse_broker_url


def test_parse_broker_url():
    a = parse_broker_url("mqtt://user:p%40ss@host:1999")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("host", 1999, False, "user", "p@ss")
    assert parse_broker_url("mqtts://h").port == 8883
    assert parse_broker_url("mqtt://h").port == 1883
    for bad in ("http://h:1", "h:1883", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)


def test_oversize_payload_is_refused_before_it_reaches_the_broker(embedded_broker_url):
    s = MqttSession(embedded_broker_url, "limit-test", max_payload_bytes=1000).start(10)
    try:
        with pytest.raises(PayloadTooLarge, match="exceeds the limit of 1000 bytes"):
            s.publish("t/x", b"x" * 1001)
        s.publish("t/x", b"x" * 1000).wait_for_publish(5)
    finally:
        s.stop()


def test_connection_error_names_the_broker():
    from brokers import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=url):
        MqttSession(url, "nobody").start(timeout_s=2)


def test_session_reconnects_and_resubscribes_after_a_broker_restart(mosquitto_broker):
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(topic, payload):
        got.append(payload)
        arrived.set()

    sub = MqttSession(mosquitto_broker.url, "sub", subscriptions=["t/restart"], on_message=on_message,
                      reconnect_max_delay_s=2).start(10)
    pub = MqttSession(mosquitto_broker.url, "pub", reconnect_max_delay_s=2).start(10)
    try:
        mosquitto_broker.restart()
        deadline = time.monotonic() + 20
        while not (sub.connected.is_set() and pub.connected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sub.connected.is_set() and pub.connected.is_set(), "no reconnection within 20 s"
        # The resubscription races this publish by a few milliseconds: publish until it lands.
        for _ in range(20):
            pub.publish("t/restart", b"after").wait_for_publish(5)
            if arrived.wait(0.5):
                break
        assert arrived.is_set(), "no message after the restart: not resubscribed"
        assert set(got) == {b"after"}
    finally:
        sub.stop()
        pub.stop()

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
    for bad in ("http://h:1", "h:1883", "mqtt://", "mqtt://h:notaport", "mqtts://h?cafile=x"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)
    with pytest.raises(ValueError, match="needs a TLS broker URL"):
        parse_broker_url("mqtt://h?ca=/etc/ca.crt")


def test_full_url_carries_credentials_and_ca_and_url_hides_them():
    a = parse_broker_url("mqtts://pi-01:s%2Fp%40ss@laptop:8884?ca=/etc/fed%20prune/ca.crt")
    assert (a.username, a.password, a.ca_file, a.port) == ("pi-01", "s/p@ss", "/etc/fed prune/ca.crt", 8884)
    assert parse_broker_url(a.full_url()) == a
    assert a.url == "mqtts://laptop:8884" and "s/p@ss" not in repr(a)
    b = parse_broker_url("mqtts://u:p@h", username="v", password="q", ca_file="/ca.pem")
    assert (b.username, b.password, b.ca_file) == ("v", "q", "/ca.pem")


def test_large_messages_travel_in_chunks_and_oversize_ones_are_refused(broker_url):
    got: list[tuple[str, bytes]] = []
    done = threading.Event()

    def on_message(topic, payload):
        got.append((topic, payload))
        done.set()

    limits = dict(max_payload_bytes=1000, max_message_bytes=5000)
    sub = MqttSession(broker_url, "chunk-sub", subscriptions=["t/big"], on_message=on_message, **limits).start(10)
    pub = MqttSession(broker_url, "chunk-pub", **limits).start(10)
    try:
        big = bytes(range(256)) * 19  # 4,864 bytes: 6 chunks of at most 1,000
        pub.publish("t/big", big).wait_for_publish(5)
        assert done.wait(10), "the chunked message never arrived whole"
        assert got == [("t/big", big)]
        assert pub.bytes_published > len(big)  # chunk headers
        with pytest.raises(PayloadTooLarge, match="exceeds the limit of 5000 bytes"):
            pub.publish("t/big", b"x" * 5001)
    finally:
        sub.stop()
        pub.stop()


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


def test_an_incoming_message_over_the_payload_limit_is_dropped_with_a_log_and_the_session_goes_on(
        broker_url, caplog):
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(topic, payload):
        got.append(payload)
        arrived.set()

    sub = MqttSession(broker_url, "limit-sub", subscriptions=["t/limit"], on_message=on_message,
                      max_payload_bytes=1024).start(10)
    # A sender that ignores the limit (a raw client, not chunking): 5,000 bytes in one message.
    pub = MqttSession(broker_url, "limit-pub", max_payload_bytes=10_000).start(10)
    try:
        with caplog.at_level("WARNING", logger="fedprune.transport"):
            pub.publish("t/limit", b"x" * 5000).wait_for_publish(5)
            pub.publish("t/limit", b"small").wait_for_publish(5)
            assert arrived.wait(10), "the message after the oversize one never arrived"
        assert got == [b"small"] and sub.oversize_dropped == 1
        assert "dropped 5000-byte message on t/limit: over the 1024-byte limit" in caplog.text
    finally:
        sub.stop()
        pub.stop()


def test_a_failed_connection_is_logged_at_warning_with_its_reason_and_the_wait(caplog):
    """An agent pointed at a broker that refuses it (or a name that does not resolve) used to log
    nothing, even at DEBUG, while paho retried in silence."""
    from brokers import free_port

    caplog.set_level("WARNING", logger="fedprune.transport")
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    refused = MqttSession(url, "refused-agent").start(timeout_s=None)
    unresolved = MqttSession("mqtt://no-such-host.invalid:1883", "lost-agent").start(timeout_s=None)
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and (refused.failed_attempts < 2 or not unresolved.failed_attempts):
            time.sleep(0.1)
    finally:
        refused.stop()
        unresolved.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    mine = [line for line in lines if url in line]
    assert mine[:2] == [f"cannot connect to the MQTT broker at {url} (ConnectionRefusedError: [Errno 111] "
                        f"Connection refused); retrying in {s} s" for s in (3, 4)], lines
    assert any("no-such-host.invalid" in line and "gaierror" in line and "retrying in 3 s" in line for line in lines)
    assert refused.last_failure.startswith("ConnectionRefusedError")


def test_the_outbox_is_bounded_best_effort_messages_are_dropped_and_others_wait():
    from fedprune.transport import OutboxFull

    # Never connected: paho keeps every publish in its outbox, as it would for a broker that
    # stopped acknowledging.
    session = MqttSession("mqtt://127.0.0.1:1", "no-broker", max_queued_messages=3, outbox_wait_s=0.2)
    for i in range(3):
        assert session.publish("t/x", b"%d" % i) is not None
    assert session.publish("t/x", b"ack", best_effort=True) is None and session.outbox_dropped == 1
    started = time.monotonic()
    with pytest.raises(OutboxFull, match="no room in the outbox for t/x within 0 s"):
        session.publish("t/x", b"task")
    assert time.monotonic() - started >= 0.2


def test_the_admit_gate_sees_every_message_before_it_is_buffered(broker_url):
    """What the aggregator's per-device budgets stand on: a gate that says no costs a lookup, and
    nothing it refuses reaches the handler or the reassembler."""
    from fedprune.converters.chunking import split_message

    seen, handled = [], []
    done = threading.Event()

    def admit(topic, size):
        seen.append((topic, size))
        return topic != "gate/flood"

    def on_message(topic, payload):
        handled.append(payload)
        if payload == b"last":
            done.set()

    sub = MqttSession(broker_url, "gate-sub", subscriptions=["gate/#"], on_message=on_message, admit=admit).start(10)
    pub = MqttSession(broker_url, "gate-pub").start(10)
    try:
        for i in range(5):
            pub.publish("gate/a", b"m%d" % i)
        for chunk in split_message(bytes(5000), 1000):  # refused one by one: never buffered
            pub.client.publish("gate/flood", chunk, qos=1)
        pub.publish("gate/a", b"last").wait_for_publish(5)
        assert done.wait(10)
    finally:
        sub.stop()
        pub.stop()
    assert handled == [b"m0", b"m1", b"m2", b"m3", b"m4", b"last"]
    assert len(seen) == 5 + 6 + 1 and sub.reassembler.pending_messages == 0

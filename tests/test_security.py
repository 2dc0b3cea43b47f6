"""Access control: the set-up written by init-broker, enforced by a real Mosquitto started with
that very config and by the embedded broker with the same folder; TLS, logins and the ACL."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from brokers import MosquittoProcess, free_port, mosquitto_available

from fedprune.aggregator.access import Access, AccessPolicy, filter_within
from fedprune.aggregator.broker_setup import BrokerFolder, BrokerSetupError, init_broker, load_broker_folder
from fedprune.aggregator.embedded_broker import EmbeddedBroker
from fedprune.aggregator.passwords import PasswordFileError, read_password_file, verify_password, write_password_file
from fedprune.converters.protocol import Topics
from fedprune.connection import ConnectionFileError, load_connection
from fedprune.transport import MqttSession

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from probe_broker import Client  # noqa: E402  (scripts/: the probe suite's raw client)

WAIT_S = 10.0
QUIET_S = 1.0  # how long "never arrives" is watched, after a later message from the same sender did

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto and mosquitto_passwd")


# ---------------------------------------------------------------------- the policy, no broker


def test_filter_within():
    assert filter_within("a/b/c", "a/#") and filter_within("a", "a/#") and filter_within("a/+/c", "a/#")
    assert filter_within("a/x/c", "a/+/c") and not filter_within("a/+/c", "a/x/c")
    assert not filter_within("a/#", "a/b") and not filter_within("a/b", "a/b/c") and not filter_within("b/c", "a/#")
    assert not filter_within("a/b/#", "a/+/c") and not filter_within("a/b/c/d", "a/+/c")


def test_policy_gives_a_device_its_own_topics_only():
    policy = AccessPolicy("clinic", "agg")
    t = Topics("clinic")
    files = (t.trainable_model, f"{t.trainable_model}/chunk/+", t.final_model("int8"),
             f"{t.final_model('float32')}/chunk/+")  # retained model files and their chunks
    for topic in (t.architecture, t.round, t.task("pi-01"), t.ack("pi-01"), *files):
        assert policy.allows("pi-01", topic, Access.READ), topic
        assert not policy.allows("pi-01", topic, Access.WRITE), topic  # no forged model, round or task
    for topic in (t.update("pi-01"), t.presence("pi-01")):
        assert policy.allows("pi-01", topic, Access.WRITE) and not policy.allows("pi-01", topic, Access.READ)
    for topic in (t.task("pi-02"), t.ack("pi-02"), t.update("pi-02"), t.all_updates, t.all_presence,
                  f"{t.root}/#", "#", "fedprune/v1/other/round"):
        assert not policy.allows("pi-01", topic, Access.READ), topic
    assert not policy.allows("pi-01", t.update("pi-02"), Access.WRITE)
    assert not policy.allows("pi-01", t.update("+"), Access.WRITE)
    assert policy.allows("agg", t.all_updates, Access.READ) and policy.allows("agg", t.task("x"), Access.WRITE)
    assert not policy.allows("agg", "fedprune/v1/other/round", Access.WRITE)
    assert not policy.allows(None, t.round, Access.READ) and not policy.allows("a/b", t.round, Access.READ)


@needs_mosquitto
def test_password_file_is_hashed_by_mosquitto_passwd_and_verified(tmp_path):
    path = write_password_file(tmp_path / "passwd", {"pi-01": "s3cret-01", "agg": "p@ss word"})
    text = path.read_text()
    assert "s3cret-01" not in text and "p@ss word" not in text
    assert path.stat().st_mode & 0o077 == 0
    stored = read_password_file(path)
    assert stored["pi-01"].startswith("$7$")
    assert verify_password(stored["pi-01"], "s3cret-01") and verify_password(stored["agg"], "p@ss word")
    assert not verify_password(stored["pi-01"], "s3cret-02") and not verify_password(stored["pi-01"], "")
    assert not verify_password("$6$abc$def", "s3cret-01") and not verify_password("garbage", "x")
    # mosquitto_passwd -U would silently cut a password at a second ':'
    with pytest.raises(PasswordFileError, match="password of 'agg'"):
        write_password_file(tmp_path / "passwd2", {"agg": "p@ss:word"})
    assert not (tmp_path / "passwd2").exists()


# ---------------------------------------------------------------------- init-broker's folder


@pytest.fixture
def setup_folder(tmp_path) -> BrokerFolder:
    if not mosquitto_available():
        pytest.skip("init-broker needs mosquitto_passwd")
    return init_broker(tmp_path / "broker", "sec", ["pi-01", "pi-02"], ["localhost"], port=free_port(),
                       bind="127.0.0.1")


def test_init_broker_writes_private_files_and_refuses_to_overwrite(setup_folder):
    folder = load_broker_folder(setup_folder.path)
    assert (folder.federation, folder.devices) == ("sec", ("pi-01", "pi-02"))
    for private in ("ca.key", "server.key", "passwd", "aggregator.toml", "devices/pi-01/connection.toml"):
        assert (folder.path / private).stat().st_mode & 0o077 == 0, private
    c = load_connection(folder.device_connection("pi-01"))
    assert (c.role, c.device_id, c.federation, c.broker.username) == ("device", "pi-01", "sec", "pi-01")
    assert c.broker.tls and c.broker.ca_file == str(folder.path / "devices" / "pi-01" / "ca.crt")
    assert c.broker.password and c.broker.password != load_connection(folder.device_connection("pi-02")).broker.password
    assert c.broker.password not in repr(c.broker) and c.broker.password not in c.broker.url
    with pytest.raises(BrokerSetupError, match="already holds a broker set-up"):
        init_broker(folder.path, "sec", ["pi-03"], [], port=folder.port)
    with pytest.raises(BrokerSetupError, match="not usable"):
        init_broker(folder.path.parent / "other", "sec", ["a/b"], [])
    with pytest.raises(BrokerSetupError, match="federation id 'a.nb' must be"):
        init_broker(folder.path.parent / "other", "a\nb", ["pi-01"], [])


def test_mosquitto_runs_the_generated_config_as_documented(setup_folder):
    """``mosquitto -c broker/mosquitto.conf`` and nothing else. Started as root, Mosquitto drops to
    the account its ``user`` line names (by default ``mosquitto``, which could not read the private
    files, mode 600: "Unable to open pwfile"); the generated line names their owner."""
    import os
    import pwd
    import subprocess
    import time

    from brokers import mosquitto_executable

    conf = setup_folder.mosquitto_conf
    assert f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n" in conf.read_text()
    proc = subprocess.Popen([mosquitto_executable(), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        aggregator = load_connection(setup_folder.aggregator_connection).broker.full_url()
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            try:
                MqttSession(aggregator, "documented").start(timeout_s=1.0).stop()
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "mosquitto -c mosquitto.conf took no login"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("text,match", [
    ("role = 'device'\n[broker", "not valid TOML"),
    ("role = 'device'\nfederation = 'f'\n", "[broker] table"),
    ("role = 'server'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n", "role must be"),
    ("role = 'device'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n", "device_id"),
    ("role = 'aggregator'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword=''\n", "broker.password"),
    ("role = 'aggregator'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\nca_file='ca.crt'\n",
     "needs a TLS broker URL"),
    ("role = 'aggregator'\nfederation = 'f'\nextra = 1\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n",
     "unknown keys"),
    ("role = 'aggregator'\nfederation = \"a\\nb\"\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n",
     "federation 'a\\nb' must be 1-128 bytes"),
    ("role = 'device'\ndevice_id = 'a/b'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n",
     "device_id 'a/b' must be"),
    # protocol version 2: each role's key, in its own role's file only
    ("role = 'device'\ndevice_id = 'd'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n",
     "no aggregator_key (the aggregator's public key); it was written before signed messages"),
    ("role = 'aggregator'\nfederation = 'f'\n[broker]\nurl='mqtt://h'\nusername='u'\npassword='p'\n",
     "no signing_key"),
    ("role = 'device'\ndevice_id = 'd'\nfederation = 'f'\naggregator_key = 'ed25519:AAAA'\n[broker]\nurl='mqtt://h'\n"
     "username='u'\npassword='p'\n", "aggregator_key: an aggregator key looks like"),
    ("role = 'device'\ndevice_id = 'd'\nfederation = 'f'\nsigning_key = 'k'\n[broker]\nurl='mqtt://h'\n"
     "username='u'\npassword='p'\n", "signing_key belongs in the aggregator's connection file"),
])
def test_malformed_connection_files_are_refused_with_the_key_named(tmp_path, text, match):
    path = tmp_path / "connection.toml"
    path.write_text(text)
    with pytest.raises(ConnectionFileError, match=re.escape(match)):
        load_connection(path)


# ---------------------------------------------------------------------- both brokers enforce it


@pytest.fixture(params=["embedded", "mosquitto"])
def secured(request, setup_folder):
    """The set-up running: Mosquitto with the generated mosquitto.conf, or the embedded broker."""
    if request.param == "embedded":
        with EmbeddedBroker("127.0.0.1", setup_folder.port, setup_folder.security()):
            yield setup_folder
    else:
        with MosquittoProcess(port=setup_folder.port, base_config=setup_folder.mosquitto_conf.read_text()):
            yield setup_folder


@pytest.fixture
def login():
    """``login(folder, who, password=..., will_topic=...)``: a raw TLS client with ``who``'s
    credentials ("aggregator" or a device id), closed after the test."""
    made: list[Client] = []

    def make(folder: BrokerFolder, who: str, *, password: str | None = None, will_topic: str | None = None) -> Client:
        path = folder.aggregator_connection if who == "aggregator" else folder.device_connection(who)
        b = load_connection(path).broker
        made.append(Client(folder, b.username, b.password if password is None else password, will_topic=will_topic))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_a_refused_login_is_reported_as_such(secured):
    """What each broker refuses is probed in tests/test_broker_probes.py; here, that fedprune's own
    session says "refused" instead of waiting."""
    c = load_connection(secured.device_connection("pi-01")).broker
    stranger = MqttSession(f"mqtts://nobody:{c.password}@localhost:{c.port}?ca={c.ca_file}", "stranger")
    with pytest.raises(ConnectionError, match="refused nobody"):
        stranger.start(timeout_s=WAIT_S)


def test_untrusted_certificates_are_refused_on_the_tls_port(secured, tmp_path):
    # (Plain text on the TLS port is a probe of tests/test_broker_probes.py.) A client that trusts another CA refuses the broker's certificate before sending a password.
    other = init_broker(tmp_path / "other", "sec", ["pi-01"], ["localhost"], port=secured.port)
    b = load_connection(secured.device_connection("pi-01")).broker
    with pytest.raises(ConnectionError, match="within"):
        MqttSession(f"mqtts://pi-01:{b.password}@localhost:{secured.port}?ca={other.ca_file}", "mitm").start(5)
    # And the real CA, with the right host name, works.
    MqttSession(b.full_url(), "ok").start(WAIT_S).stop()
    with pytest.raises(ConnectionError):
        MqttSession(f"mqtt://pi-01:{b.password}@127.0.0.1:{secured.port}", "plain").start(3)


def test_a_last_will_on_another_devices_presence_never_arrives(request, secured, login):
    # A device that could write pi-02's presence could mark it offline whenever it dropped.
    t = Topics(secured.federation)
    aggregator = login(secured, "aggregator")
    assert aggregator.accepted() and aggregator.subscribe(t.all_presence) == 1
    forger = login(secured, "pi-01", will_topic=t.presence("pi-02"))
    accepted = forger.accepted()
    if request.node.callspec.params["secured"] == "embedded":
        assert not accepted  # the embedded broker refuses the CONNECT
    honest = login(secured, "pi-01", will_topic=t.presence("pi-01"))
    assert honest.accepted()
    for client in (forger, honest):
        client.client.loop_stop()
        sock = client.client.socket()
        if sock is not None:
            sock.close()  # vanish without DISCONNECT: the broker sends the will if it may
    assert aggregator.drain(QUIET_S) == [(t.presence("pi-01"), b"gone")]  # the honest one's, the control

"""Probe a secured broker from outside: every way in without a valid login, every take-over of
another client's session, and every read or write of another device's topics must be refused,
on both brokers, and the clients under attack must keep working.

Each broker runs the same ``fedprune-aggregator init-broker`` set-up: the embedded one (amqtt,
the rules of ``--broker-dir``) and Mosquitto with the generated ``mosquitto.conf``. The bench
holds the clients a run would have: the aggregator (its own client id, a persistent session,
subscribed to its whole federation) and device pi-01 (subscribed to its task), retained
architecture, round, tasks and presences; pi-02 is the attacker, with valid credentials of its
own; pi-03 is an honest bystander that sends updates.

    python scripts/probe_broker.py                      # both brokers; JSON summary on the last line
    python scripts/probe_broker.py --broker embedded

Issue 16's target ("every cross-device and take-over probe refused on both brokers") is its
``all_refused``. ``tests/test_broker_probes.py`` runs every probe on both brokers.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "tests")):  # tests/brokers.py runs Mosquitto
    if _path not in sys.path:
        sys.path.insert(0, _path)

import paho.mqtt.client as mqtt  # noqa: E402

from fedprune.aggregator.broker_setup import BrokerFolder, init_broker  # noqa: E402
from fedprune.connection import load_connection  # noqa: E402
from fedprune.converters.protocol import Topics  # noqa: E402

WAIT_S = 10.0  # for what must arrive (a CONNACK, a control message)
QUIET_S = 0.4  # what must not arrive is watched this long after a later control message did
BROKERS = ("embedded", "mosquitto")
DEVICES = ["pi-01", "pi-02", "pi-03"]
FEDERATION = "probe"


@dataclass(frozen=True)
class ProbeResult:
    refused: bool
    detail: str


class Client:
    """A raw paho MQTT 3.1.1 client over TLS, with whatever credentials and client id a probe
    wants. ``disconnects`` counts the times the broker dropped it after it was connected."""

    def __init__(self, folder: BrokerFolder, username: str | None, password: str | None, *,
                 client_id: str | None = None, clean_session: bool = True, will_topic: str | None = None) -> None:
        b = load_connection(folder.aggregator_connection).broker
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.tls_set(ca_certs=b.ca_file)
        if will_topic:
            self.client.will_set(will_topic, b"gone", qos=1)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.disconnects = 0
        self._connected = False
        self._subacks: dict[int, int] = {}
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(b.host, b.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, rc, properties) -> None:
        self._connected = not rc.is_failure
        self.connack.put(rc)

    def _on_disconnect(self, client, userdata, flags, rc, properties) -> None:
        if self._connected:
            self.disconnects += 1
        self._connected = False

    def _on_subscribe(self, client, userdata, mid, codes, properties) -> None:
        with self._cond:
            self._subacks[mid] = codes[0].value
            self._cond.notify_all()

    def accepted(self) -> bool:
        """Whether the broker accepted the login (False: refused, or no CONNACK at all)."""
        try:
            return not self.connack.get(timeout=WAIT_S).is_failure
        except queue.Empty:
            return False

    def subscribe(self, topic: str) -> int:
        """The SUBACK code: 1 (granted at QoS 1) or 128 (refused)."""
        _, mid = self.client.subscribe(topic, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, WAIT_S):
                raise TimeoutError(f"no SUBACK for {topic}")
            return self._subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for {topic}")

    def wait_for(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received until (topic, payload) arrives, then for QUIET_S more; it included."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + WAIT_S
        while (topic, payload) not in got and time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return got + self.drain()

    def drain(self, quiet_s: float = QUIET_S) -> list[tuple[str, bytes]]:
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ProbeBench:
    """A secured broker of one kind, with the clients of a running federation on it."""

    def __init__(self, kind: str, workdir: Path) -> None:
        if kind not in BROKERS:
            raise ValueError(f"broker must be one of {BROKERS}, not {kind!r}")
        from brokers import free_port

        self.kind = kind
        self.folder = init_broker(workdir / f"broker-{kind}", FEDERATION, DEVICES, ["localhost"], port=free_port(),
                                  bind="127.0.0.1", persistence=False)
        self.t = Topics(FEDERATION)
        self.aggregator_client_id = f"fedprune-aggregator-{FEDERATION}"  # as fedprune.aggregator.server names it
        self._broker = None
        self._clients: list[Client] = []

    # --- set-up ---
    def __enter__(self) -> ProbeBench:
        if self.kind == "embedded":
            from fedprune.aggregator.embedded_broker import EmbeddedBroker

            self._broker = EmbeddedBroker("127.0.0.1", self.folder.port, self.folder.security()).start()
        else:
            from brokers import MosquittoProcess

            self._broker = MosquittoProcess(port=self.folder.port, base_config=self.folder.mosquitto_conf.read_text())
            self._broker.start()
        try:
            self._start_federation()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for c in self._clients:
            c.close()
        if self._broker is not None:
            (self._broker.stop if self.kind == "embedded" else self._broker.close)()

    def password(self, who: str) -> str:
        path = self.folder.aggregator_connection if who == "aggregator" else self.folder.device_connection(who)
        return load_connection(path).broker.password

    def username(self, who: str) -> str:
        return self.folder.aggregator_user if who == "aggregator" else who

    def login(self, who: str, *, password: str | None = None, keep: bool = False, **kwargs) -> Client:
        """A client logged in (or trying to) as ``who`` ("aggregator" or a device id)."""
        client = Client(self.folder, self.username(who), self.password(who) if password is None else password,
                        **kwargs)
        if keep:
            self._clients.append(client)
        return client

    def _start_federation(self) -> None:
        t = self.t
        self.aggregator = self.login("aggregator", keep=True, client_id=self.aggregator_client_id, clean_session=False)
        self.device = self.login("pi-01", keep=True, client_id=f"fedprune-{FEDERATION}-pi-01")
        self.bystander = self.login("pi-03", keep=True, client_id=f"fedprune-{FEDERATION}-pi-03")
        if not all(c.accepted() for c in (self.aggregator, self.device, self.bystander)):
            raise RuntimeError(f"{self.kind}: the federation's own logins were refused")
        for topic in (f"{t.root}/#",):
            assert self.aggregator.subscribe(topic) == 1
        assert self.device.subscribe(t.task("pi-01")) == 1 and self.device.subscribe(t.architecture) == 1
        # What a run leaves retained: the model, the round, the drawn devices' tasks, presences.
        self.aggregator.publish(t.architecture, b"architecture", retain=True)
        self.aggregator.publish(t.round, b"round 1: pi-01, pi-03", retain=True)
        for d in ("pi-01", "pi-02", "pi-03"):
            self.aggregator.publish(t.task(d), f"task for {d}".encode(), retain=True)
        self.device.publish(t.presence("pi-01"), b"pi-01 online, 1234 samples", retain=True)
        self.bystander.publish(t.presence("pi-03"), b"pi-03 online, 99 samples", retain=True)
        self.aggregator.drain()
        self.device.drain()

    # --- what every probe checks afterwards ---
    def victims_work(self) -> tuple[bool, str]:
        """The aggregator still receives updates, and pi-01 its tasks, without having been dropped."""
        t, stamp = self.t, uuid.uuid4().hex[:6].encode()
        self.bystander.publish(t.update("pi-03"), b"update " + stamp)
        aggregator_ok = (t.update("pi-03"), b"update " + stamp) in self.aggregator.wait_for(t.update("pi-03"),
                                                                                                b"update " + stamp)
        self.aggregator.publish(t.task("pi-01"), b"new task " + stamp)
        device_ok = (t.task("pi-01"), b"new task " + stamp) in self.device.wait_for(t.task("pi-01"), b"new task " + stamp)
        dropped = {"aggregator": self.aggregator.disconnects, "pi-01": self.device.disconnects}
        ok = aggregator_ok and device_ok and not any(dropped.values())
        return ok, ("" if ok else f"victims: aggregator receives {aggregator_ok}, pi-01 receives {device_ok}, "
                                  f"dropped {dropped}")

    def readable_by(self, device: str) -> set[str]:
        t = self.t
        return {t.architecture, t.round, t.task(device), t.ack(device)}

    # --- the probes ---
    def probe_no_tls(self) -> ProbeResult:
        connect = bytes([0x10, 14, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 2]) + b"pt"  # MQTT 3.1.1, anonymous
        with socket.create_connection(("127.0.0.1", self.folder.port), timeout=WAIT_S) as sock:
            sock.sendall(connect)
            try:
                answer = sock.recv(64)
            except (ConnectionResetError, socket.timeout):
                answer = b""
        return ProbeResult(not answer.startswith(b"\x20"), f"plain-text CONNECT answered {answer[:8]!r}")

    def _refused_login(self, username: str | None, password: str | None, what: str) -> ProbeResult:
        client = Client(self.folder, username, password)
        try:
            accepted = client.accepted()
        finally:
            client.close()
        return ProbeResult(not accepted, f"{what}: {'accepted' if accepted else 'refused'}")

    def probe_no_credentials(self) -> ProbeResult:
        return self._refused_login(None, None, "no username")

    def probe_wrong_password(self) -> ProbeResult:
        return self._refused_login("pi-02", "wrong", "pi-02 with a wrong password")

    def probe_another_devices_username(self) -> ProbeResult:
        return self._refused_login("pi-01", self.password("pi-02"), "username pi-01 with pi-02's password")

    def _takeover(self, victim: str, attacker: str, password: str, client_ids: list[str]) -> ProbeResult:
        """Connect as ``attacker`` with each of the victim's client ids (clean and persistent
        sessions): refused means the victim was never dropped, still works, and the attacker
        received nothing of the victim's."""
        details, leaked = [], []
        for client_id in client_ids:
            for clean in (True, False):
                c = Client(self.folder, self.username(attacker), password, client_id=client_id, clean_session=clean)
                try:
                    accepted = c.accepted()
                    details.append(f"{client_id!r} clean={clean}: {'connected' if accepted else 'refused'}")
                    if accepted:  # as itself at most: it must not have the victim's session
                        self.aggregator.publish(self.t.task(victim) if victim != "aggregator" else self.t.round,
                                                b"after take-over")
                        self.bystander.publish(self.t.update("pi-03"), b"after take-over")
                        leaked += [m for m in c.drain() if m[0] not in self.readable_by(attacker)]
                finally:
                    c.close()
        ok, why = self.victims_work()
        return ProbeResult(ok and not leaked, "; ".join(details) + (f"; {why}" if why else "")
                           + (f"; the attacker received {leaked[:3]}" if leaked else ""))

    def probe_takeover_aggregator_wrong_password(self) -> ProbeResult:
        return self._takeover("aggregator", "aggregator", "wrong", [self.aggregator_client_id, self.folder.aggregator_user])

    def probe_takeover_device_wrong_password(self) -> ProbeResult:
        return self._takeover("pi-01", "pi-01", "wrong", [f"fedprune-{FEDERATION}-pi-01", "pi-01"])

    def probe_takeover_aggregator_with_device_login(self) -> ProbeResult:
        return self._takeover("aggregator", "pi-02", self.password("pi-02"),
                              [self.aggregator_client_id, self.folder.aggregator_user])

    def probe_takeover_device_with_other_device_login(self) -> ProbeResult:
        return self._takeover("pi-01", "pi-02", self.password("pi-02"), [f"fedprune-{FEDERATION}-pi-01", "pi-01"])

    def _snoop(self, filters: list[str], after: Callable[[], None] | None = None) -> ProbeResult:
        """pi-02 subscribes to ``filters`` (and to its own task, the control): refused means
        nothing arrives that pi-02 may not read, retained or live (``after`` sends live ones)."""
        t = self.t
        c = self.login("pi-02")
        try:
            if not c.accepted():
                return ProbeResult(False, "pi-02's own login was refused: the probe proves nothing")
            codes = {f: c.subscribe(f) for f in filters}
            if after is not None:
                after()
            c.subscribe(t.task("pi-02"))  # its own retained task arrives: the control
            got = c.wait_for(t.task("pi-02"), b"task for pi-02")
        finally:
            c.close()
        foreign = [m for m in got if m[0] not in self.readable_by("pi-02")]
        control = (t.task("pi-02"), b"task for pi-02") in got
        return ProbeResult(control and not foreign, f"SUBACKs {codes}; foreign messages {foreign[:4]}"
                           + ("" if control else "; the control message never arrived"))

    def _live_traffic(self) -> None:
        t = self.t
        self.aggregator.publish(t.task("pi-01"), b"live task for pi-01")
        self.aggregator.publish(t.ack("pi-03"), b"live ack for pi-03")
        self.device.publish(t.update("pi-01"), b"live update of pi-01")
        self.device.publish(t.presence("pi-01"), b"pi-01 still online", retain=True)

    def probe_subscribe_everything(self) -> ProbeResult:
        return self._snoop(["#", f"{self.t.root}/#", "+/+/+/+/+"], self._live_traffic)

    def probe_read_other_devices_tasks(self) -> ProbeResult:
        t = self.t
        return self._snoop([t.task("pi-01"), f"{t.root}/device/+/task", f"{t.root}/device/pi-01/#", t.ack("pi-03")],
                           self._live_traffic)

    def probe_read_presences(self) -> ProbeResult:
        return self._snoop([self.t.all_presence, self.t.presence("pi-01")], self._live_traffic)

    def probe_read_updates(self) -> ProbeResult:
        return self._snoop([self.t.all_updates, self.t.update("pi-01")], self._live_traffic)

    def probe_retained_without_subscribing(self) -> ProbeResult:
        """A device that subscribes to nothing must receive nothing (amqtt sent it every retained
        message of everyone's subscriptions)."""
        c = self.login("pi-02")
        try:
            accepted = c.accepted()
            got = c.drain(quiet_s=1.0)
        finally:
            c.close()
        return ProbeResult(accepted and not got, f"received without subscribing: {got[:4]}")

    def probe_publish_on_other_topics(self) -> ProbeResult:
        """pi-02 forges pi-01's update, presence (as its last will too), task and ack, the model
        and the round, retained and not: none reaches the aggregator or pi-01, nor stays retained."""
        t = self.t
        forged = [t.update("pi-01"), t.presence("pi-01"), t.task("pi-01"), t.ack("pi-01"), t.architecture, t.round,
                  "fedprune/v1/other/round"]
        c = self.login("pi-02", will_topic=t.presence("pi-01"))
        will_refused = not c.accepted()  # the embedded broker refuses the CONNECT; Mosquitto never sends it
        c.close()
        c = self.login("pi-02")
        try:
            if not c.accepted():
                return ProbeResult(False, "pi-02's own login was refused: the probe proves nothing")
            for topic in forged:
                c.publish(topic, b"forged", retain=True)
            c.publish(t.update("pi-02"), b"pi-02's own update")  # the control, sent last
        finally:
            c.client.loop_stop()
            sock = c.client.socket()
            if sock is not None:
                sock.close()  # vanish without DISCONNECT: a will would be sent now
        at_aggregator = self.aggregator.wait_for(t.update("pi-02"), b"pi-02's own update")
        at_device = self.device.drain()
        fresh = self.login("pi-02")  # what is retained now, seen anew by a device allowed to read the model
        try:
            fresh.accepted()
            fresh.subscribe(t.architecture)
            fresh.subscribe(t.round)
            retained = fresh.drain()
        finally:
            fresh.close()
        forgeries = [m for m in at_aggregator + at_device + retained if m[1] in (b"forged", b"gone")]
        control = (t.update("pi-02"), b"pi-02's own update") in at_aggregator
        ok, why = self.victims_work()
        return ProbeResult(control and not forgeries and ok,
                           f"forgeries delivered or retained: {forgeries[:4]}; will on pi-01's presence "
                           f"{'refused at CONNECT' if will_refused else 'accepted at CONNECT'}"
                           + ("" if control else "; the control update never arrived") + (f"; {why}" if why else ""))

    def probes(self) -> dict[str, Callable[[], ProbeResult]]:
        return {name[len("probe_"):]: getattr(self, name) for name in dir(self) if name.startswith("probe_")}

    def run(self, name: str) -> ProbeResult:
        """One probe; an exception (a victim gone, a broker that stopped answering) is a failure."""
        try:
            return self.probes()[name]()
        except Exception as e:  # noqa: BLE001 - reported as the probe's result
            return ProbeResult(False, f"the probe failed: {type(e).__name__}: {e}")

    def run_all(self) -> dict[str, ProbeResult]:
        return {name: self.run(name) for name in self.probes()}


PROBES = sorted(name[len("probe_"):] for name in dir(ProbeBench) if name.startswith("probe_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", action="append", choices=BROKERS, help="which broker (default: both)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the brokers' own refusals are logged as warnings
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.broker or BROKERS:
            start = time.monotonic()
            with ProbeBench(kind, Path(tmp)) as bench:
                results = bench.run_all()
            for name, r in results.items():
                print(f"{kind:9s} {name:42s} {'refused' if r.refused else 'NOT REFUSED'}  {r.detail}", flush=True)
            summary[kind] = {name: {"refused": r.refused, "detail": r.detail} for name, r in results.items()}
            summary[kind]["wall_s"] = round(time.monotonic() - start, 1)
    all_refused = all(v["refused"] for results in summary.values() for k, v in results.items() if k != "wall_s")
    print(json.dumps({"brokers": summary, "all_refused": all_refused}))
    return 0 if all_refused else 1


if __name__ == "__main__":
    sys.exit(main())

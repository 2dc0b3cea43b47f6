"""Fuzz a running aggregator over MQTT: random and mutated payloads on the update topics, sent by
a real paho client while a real federation (aggregator and agents on a real broker) runs.

    .venv/bin/python scripts/fuzz_aggregator.py                      # embedded broker, 3 devices
    .venv/bin/python scripts/fuzz_aggregator.py --broker mosquitto   # a private Mosquitto
    .venv/bin/python scripts/fuzz_aggregator.py --rate 400 --rounds 4

The fuzzer learns the real devices from their presence, keeps every real update it sees as a
seed, and sends a stream of: random bytes; random bytes behind a valid frame prefix; real updates
with bits flipped, truncated, extended, with header fields rewritten (round, attempt, sample
count, precision, mask digest, device id) and the checksum refitted or not; NaN/Inf written into
their values; real updates replayed as they are, to their own topic and to another device's;
forged chunk frames; empty and oversize payloads; and topics that name no device or an unknown
one. The aggregator must reject each with a logged reason and finish every round with the real
devices. It prints what it sent by kind, what the aggregator rejected and why, and as the last
line one JSON object; it exits 1 if the aggregator did not survive.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # brokers.MosquittoProcess, codec_helpers.recrc

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from codec_helpers import recrc as refit_crc  # noqa: E402  (the frame CRC refitted after an edit)

from fedprune.converters.chunking import CHUNK_KIND  # noqa: E402
from fedprune.converters.frame import FRAME_VERSION, MAGIC, PREFIX  # noqa: E402
from fedprune.converters.errors import CodecError  # noqa: E402
from fedprune.converters.protocol import Kind, Topics, peek_update  # noqa: E402
from fedprune.transport import parse_broker_url  # noqa: E402

# Offsets in an update frame: the frame prefix, then the fixed binary header (fedprune.converters.protocol).
_ROUND, _ATTEMPT, _SAMPLES, _PRECISION, _DIGEST, _DEVICE_LEN = (PREFIX.size + o for o in (0, 4, 6, 12, 14, 30))


class PayloadGenerator:
    """Random and mutated update payloads; ``next()`` gives (kind, topic, payload)."""

    def __init__(self, topics: Topics, rng: random.Random, max_payload_bytes: int) -> None:
        self.topics, self.rng, self.max_payload_bytes = topics, rng, max_payload_bytes
        self.devices: list[str] = []
        self.seeds: list[tuple[str, bytes]] = []  # real updates (topic, payload)
        self._sent: set[bytes] = set()  # digests of what the fuzzer sent (it hears its own messages)
        self._lock = threading.Lock()

    def learn(self, topic: str, payload: bytes, device: str | None = None) -> None:
        """A device seen online (``device``), or a real update to mutate: one that decodes and
        that this fuzzer did not send itself."""
        with self._lock:
            if device is not None:
                if device not in self.devices:
                    self.devices.append(device)
                return
            if hashlib.sha256(payload).digest() in self._sent:
                return
        try:
            peek_update(payload, 1 << 30)
        except CodecError:
            return
        with self._lock:
            self.seeds.append((topic, payload))

    def mark_sent(self, payload: bytes) -> None:
        with self._lock:
            self._sent.add(hashlib.sha256(payload).digest())

    def next(self) -> tuple[str, str, bytes]:
        with self._lock:
            devices, seeds = list(self.devices) or ["nobody"], list(self.seeds)
        r = self.rng
        own = self.topics.update(r.choice(devices))
        if not seeds or r.random() < 0.25:
            # Oversize payloads (1 MB each) rarer than the rest: each one crosses the broker whole.
            kind = r.choices(["random", "framed random", "chunk", "empty", "oversize", "bad topic", "unknown device"],
                             weights=[1, 1, 1, 1, 0.1, 1, 1])[0]
            return kind, *self._unseeded(kind, own)
        topic, seed = r.choice(seeds)
        kind = r.choice(["bit flip", "bit flip + crc", "truncate", "extend", "header field", "nan values",
                         "replay", "replay to another device", "device id swap", "unknown device update"])
        return kind, *self._mutated(kind, topic, seed, devices)

    def _unseeded(self, kind: str, own: str) -> tuple[str, bytes]:
        r = self.rng
        if kind == "random":
            return own, r.randbytes(r.randint(1, 4096))
        if kind == "framed random":
            body = PREFIX.pack(MAGIC, FRAME_VERSION, Kind.UPDATE, 0) + r.randbytes(r.randint(0, 2048))
            return own, refit_crc(body + b"\0\0\0\0") if r.random() < 0.5 else body
        if kind == "chunk":  # forged pieces of a message that never completes, or lies about its size
            body = PREFIX.pack(MAGIC, FRAME_VERSION, CHUNK_KIND, 0) + r.randbytes(r.randint(60, 600))
            return own, refit_crc(body + b"\0\0\0\0")
        if kind == "empty":
            return own, b""
        if kind == "oversize":  # to a topic the fuzzer does not listen on (see Fuzzer)
            return self.topics.update(f"ghost-{r.randint(0, 9)}"), r.randbytes(self.max_payload_bytes + r.randint(1, 4096))
        if kind == "bad topic":
            return r.choice([f"{self.topics.root}/device//update", f"{self.topics.root}/device/a/b/update"]), \
                r.randbytes(64)
        return self.topics.update(f"ghost-{r.randint(0, 9)}"), r.randbytes(r.randint(1, 512))

    def _mutated(self, kind: str, topic: str, seed: bytes, devices: list[str]) -> tuple[str, bytes]:
        r = self.rng
        data = bytearray(seed)
        if kind.startswith("bit flip"):
            for _ in range(r.randint(1, 8)):
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            return topic, refit_crc(bytes(data)) if kind.endswith("crc") else bytes(data)
        if kind == "truncate":
            return topic, bytes(data[: r.randrange(len(data))])
        if kind == "extend":
            return topic, bytes(data) + r.randbytes(r.randint(1, 64))
        if kind == "header field":
            field, size = r.choice([(_ROUND, 4), (_ATTEMPT, 2), (_SAMPLES, 4), (_PRECISION, 1), (_DIGEST, 16)])
            value = r.choice([0, 1, 2**(8 * size) - 1, r.randrange(2**(8 * size))])
            data[field:field + size] = value.to_bytes(size, "little")
            return topic, refit_crc(bytes(data))
        if kind == "nan values":
            end = len(data) - 4
            for _ in range(r.randint(1, 4)):
                at = r.randrange(max(_DEVICE_LEN + 1, end - 4096), end - 4)
                data[at:at + 4] = np.float32(r.choice([np.nan, np.inf, -np.inf])).tobytes()
            return topic, refit_crc(bytes(data))
        if kind == "replay":
            return topic, seed
        if kind == "replay to another device":
            return self.topics.update(r.choice(devices)), seed
        n = data[_DEVICE_LEN]
        if kind == "unknown device update":  # a well-formed update from a device never announced
            ghost = "g" * n
            data[_DEVICE_LEN + 1:_DEVICE_LEN + 1 + n] = ghost.encode()
            return self.topics.update(ghost), refit_crc(bytes(data))
        # "device id swap": the header names another real device (same length), checksum refitted
        same_length = [d for d in devices if len(d.encode()) == n]
        if same_length:
            data[_DEVICE_LEN + 1:_DEVICE_LEN + 1 + n] = r.choice(same_length).encode()
        return topic, refit_crc(bytes(data))


class Fuzzer:
    """A paho client that learns the devices from their presence and seeds from their updates, and
    sends the generator's payloads.

    It listens on each real device's update topic only until it holds ``SEEDS`` updates: it hears
    its own payloads there too, and a subscriber that falls behind makes the broker queue (and,
    with persistence, save) everything it has not read.
    """

    SEEDS = 16

    def __init__(self, broker_url: str, topics: Topics, generator: PayloadGenerator) -> None:
        address = parse_broker_url(broker_url)
        self.topics, self.generator = topics, generator
        self.sent: Counter[str] = Counter()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzzer-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv311)
        self.client.max_queued_messages_set(0)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if address.tls:
            self.client.tls_set(ca_certs=address.ca_file)
        ready = threading.Event()
        listening: set[str] = set()

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe(topics.all_presence, 1)
            ready.set()

        def on_message(client, userdata, msg):
            payload = bytes(msg.payload)
            try:
                device = topics.device_from_topic(msg.topic)
            except ValueError:
                return
            if "/presence/" in msg.topic:
                if b'"online":true' in payload:
                    generator.learn(msg.topic, payload, device)
                    if device not in listening and len(generator.seeds) < self.SEEDS:
                        listening.add(device)
                        client.subscribe(topics.update(device), 1)
                return
            generator.learn(msg.topic, payload)
            if len(generator.seeds) >= self.SEEDS and listening:
                client.unsubscribe([topics.update(d) for d in listening])
                listening.clear()

        self.client.on_connect, self.client.on_message = on_connect, on_message
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        if not ready.wait(30):
            raise ConnectionError(f"the fuzzer could not connect to {address.url}")

    def send(self, count: int) -> None:
        for _ in range(count):
            kind, topic, payload = self.generator.next()
            self.generator.mark_sent(payload)
            self.client.publish(topic, payload, qos=1)
            self.sent[kind] += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(args: argparse.Namespace) -> dict:
    from contextlib import ExitStack

    from fedprune.cli_common import setup_logging
    from fedprune.simulation.cli import run_simulation
    from fedprune.task import parse_task

    setup_logging(args.log_level)
    task = parse_task({
        "seed": args.seed, "model": {"factory": "fedprune.models:digits_cnn"}, "data": {"dataset": "digits"},
        "federation": {"rounds": args.rounds, "devices_per_round": args.devices, "min_devices": args.devices,
                       "round_timeout_s": 120, "wait_for_devices_s": 120},
        "training": {"local_epochs": 1, "learning_rate": 0.003},
        "pruning": {"final_sparsity": 0.5, "begin_round": 1, "end_round": args.rounds, "leave_dense": ["logits"]},
    })
    topics = Topics(task.federation.id)
    outcome: dict = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        if args.broker == "embedded":
            from fedprune.aggregator.embedded_broker import EmbeddedBroker

            url = stack.enter_context(EmbeddedBroker()).url
        elif args.broker == "mosquitto":
            from brokers import MosquittoProcess

            url = stack.enter_context(MosquittoProcess()).url
        else:
            url = args.broker
        generator = PayloadGenerator(topics, random.Random(args.seed), task.transport.max_payload_bytes)
        fuzzer = Fuzzer(url, topics, generator)
        stack.callback(fuzzer.close)

        def federation() -> None:
            try:
                outcome["result"] = run_simulation(task, args.devices, Path(tmp) / "run", broker_url=url,
                                                   export_tflite=False)
            except BaseException as e:  # noqa: BLE001 - reported below: the point of the run
                outcome["error"] = f"{type(e).__name__}: {e}"
            outcome["ended"] = time.monotonic()

        start = time.monotonic()
        runner = threading.Thread(target=federation, name="federation", daemon=True)
        runner.start()
        interval = 1.0 / args.rate
        sent_while_alive = 0
        while runner.is_alive() and sum(fuzzer.sent.values()) < args.max_payloads:
            fuzzer.send(1)
            sent_while_alive += 1
            time.sleep(interval)
        runner.join()
        wall = time.monotonic() - start

    result = outcome.get("result")
    rejected: Counter[str] = Counter()
    for record in (result.rounds if result else []):
        rejected.update(record.rejections)
    survived = result is not None and len(result.rounds) == args.rounds
    return {
        "benchmark": "fuzz_aggregator",
        "broker": args.broker,
        "devices": args.devices,
        "sent": sum(fuzzer.sent.values()),
        "sent_by_kind": dict(sorted(fuzzer.sent.items())),
        "survived": sent_while_alive if survived else 0,
        "aggregator_survived": survived,
        "aggregator_error": outcome.get("error"),
        "rounds_completed": len(result.rounds) if result else 0,
        "rounds_expected": args.rounds,
        "updates_counted_per_round": [r.reported for r in result.rounds] if result else [],
        "rejected_by_aggregator": dict(sorted(rejected.items())),
        "final_accuracy": round(result.final_accuracy, 4) if result else None,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="embedded", help="embedded, mosquitto, or an mqtt:// URL")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="payloads per second (default 200)")
    parser.add_argument("--max-payloads", type=int, default=1_000_000, help="stop sending after this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="ERROR", help="the aggregator's rejections log at WARNING")
    args = parser.parse_args(argv)
    figures = run(args)
    print(f"sent {figures['sent']} payloads at {args.rate:.0f}/s over {figures['wall_s']} s; the aggregator "
          f"{'survived all' if figures['aggregator_survived'] else 'DID NOT survive: ' + str(figures['aggregator_error'])}")
    for kind, n in figures["sent_by_kind"].items():
        print(f"  sent {kind:<26} {n:>7}")
    for reason, n in figures["rejected_by_aggregator"].items():
        print(f"  rejected {reason:<22} {n:>7}")
    print(f"rounds {figures['rounds_completed']}/{figures['rounds_expected']}, real updates counted per round "
          f"{figures['updates_counted_per_round']}, final accuracy {figures['final_accuracy']}")
    print(json.dumps(figures))
    return 0 if figures["aggregator_survived"] else 1


if __name__ == "__main__":
    sys.exit(main())

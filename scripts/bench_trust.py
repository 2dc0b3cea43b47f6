"""Benchmark: issue 16's trust targets, each measured on real processes; a table, then one JSON line.

    .venv/bin/python scripts/bench_trust.py                      # every part
    .venv/bin/python scripts/bench_trust.py --only cost forged   # some parts
    .venv/bin/python scripts/bench_trust.py --only flood --flood-messages 100000

Parts (docs/benchmarks.md, "Trust boundaries (issue 16)"):

- ``cost``: bytes and microseconds to sign and to open a signed message, by size (protocol.md,
  section 19).
- ``forged``: an open Mosquitto (anonymous, no ACL) and a real ``fedprune-agent`` trusting key K.
  An attacker publishes forged architectures (a Lambda layer whose function, importable by the
  agent's training child, writes a marker file) and tasks: unsigned, signed by another key,
  altered after signing, signed for another topic, and of protocol version 1. Every one must be
  refused and logged by the agent, no marker written and no training started; an architecture
  signed by K is then taken (the agent is not refusing everything).
- ``replay``: the same agent, with a state folder, takes a task; a task the same key signed for it
  in an earlier run (issued an hour before) is then replayed on its task topic, and again after
  the agent restarts: refused and logged both times, not trained (protocol.md, section 12.3); a
  newer task is then trained.
- ``probes``: ``scripts/probe_broker.py`` on both brokers (every probe refused).
- ``flood``: Mosquitto with ``init-broker``'s config, the aggregator and three agents as real
  processes, ``--rounds`` (3) rounds. A fourth login (valid credentials, announced online, so it
  is drawn every round: every online device is) sends ``--flood-messages`` (1,000,000) small
  messages at full speed on its own update topic with ``mosquitto_pub`` from before round 1.
  Every round must complete with every honest update counted, and the aggregator's RSS grow by at
  most 100 MB over the clean run's; RSS is sampled from the flood's start to the run's end.
- ``flood_presence``: the same, on the attacker's presence topic, which the aggregator always
  listens to (reported; the issue's target is the update topic).
- ``bomb``: the same federation. Before round 1 the fourth login sends ``--bomb-bytes`` (2 GB) of
  maximum-size payloads (1,000,000 bytes, the task's default ``max_payload_bytes``: chunks of
  messages that each claim the maximum size, every one a new message), on its update and presence
  topics in turn; the agents start half way through, so the bomb overlaps round 1. The
  aggregator's RSS growth over the clean run's, and whether any honest device's partial message
  was evicted (the aggregator logs every eviction).
- ``bomb_chunked``: the same with a payload limit of 64 KiB for the task, the agents and the
  broker, so the honest updates travel in chunks while the bomb's chunks arrive.
- ``clean``: the same federation, no attack: the RSS a run reaches anyway, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tests"))  # the fleet harness, the Mosquitto runner, test helpers

from brokers import MosquittoProcess  # noqa: E402
from fleet import Fleet  # noqa: E402

HONEST = ["pi-01", "pi-02", "pi-03"]
ATTACKER = "pi-04"
ROUNDS = 3
ROUND_TIMEOUT_S = 180  # a round waits this long at most; honest ones take ~20 s on a loaded 2-core machine


# --- cost -----------------------------------------------------------------------------------------

def part_cost(args) -> dict:
    from fedprune.converters.signing import SIGNED_OVERHEAD, SigningKey, open_signed, sign_message

    key = SigningKey.generate()
    topic = "fedprune/v1/clinic/device/pi-07/task"
    rows = []
    for size in (78, 10_000, 150_000, 1_000_000, 64_000_000):
        payload = os.urandom(size)
        n = max(3, min(2000, 200_000_000 // (size * 20 + 1)))
        started = time.perf_counter()
        for _ in range(n):
            envelope = sign_message(topic, payload, key)
        sign_us = (time.perf_counter() - started) / n * 1e6
        started = time.perf_counter()
        for _ in range(n):
            open_signed(topic, envelope, key.public, 1 << 27)
        open_us = (time.perf_counter() - started) / n * 1e6
        rows.append({"bytes": size, "sign_us": round(sign_us, 1), "open_us": round(open_us, 1),
                     "overhead_bytes": len(envelope) - size, "runs": n})
    print("| message bytes | sign µs | open and verify µs | overhead bytes |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bytes']:,} | {r['sign_us']:,.0f} | {r['open_us']:,.0f} | {r['overhead_bytes']} |")
    return {"overhead_bytes": SIGNED_OVERHEAD, "rows": rows}


# --- forged ---------------------------------------------------------------------------------------

def _forgeries(topics, key, attacker_key, honest_arch, module: str) -> list[tuple[str, str, bytes]]:
    """(what, topic, payload): every forged message the attacker sends, none signed by ``key``
    for its topic."""
    import numpy as np

    from codec_helpers import recrc
    from fedprune.converters.protocol import PROTOCOL_VERSION, Architecture, TrainTask, encode_task
    from fedprune.converters.signing import sign_message

    config = json.loads(honest_arch.model_json)
    config["config"]["layers"].insert(1, {
        "module": "keras.layers", "class_name": "Lambda", "registered_name": None,
        "config": {"name": "lam", "trainable": True, "dtype": "float32", "function_type": "function",
                   "function": {"class_name": "function", "config": "run", "module": module, "registered_name": "run"},
                   "module": None, "output_shape": None, "output_shape_type": "raw", "output_shape_module": None,
                   "arguments": {}}})
    evil = Architecture(json.dumps(config), "e" * 32, honest_arch.shapes, honest_arch.names)
    weights = [np.zeros(s, np.float32) for s in evil.shapes]
    task = encode_task(TrainTask(1, 1, evil.digest, weights, [None] * len(weights),
                                 {"local_epochs": 1, "batch_size": 8, "optimizer": "sgd", "learning_rate": 0.1},
                                 "int8", 60.0, session="forged"), evil.names)
    arch_topic, task_topic = topics.architecture, topics.task("pi-01")
    honest_signed = bytearray(sign_message(arch_topic, evil.encode(), key))
    honest_signed[40] ^= 0x01  # a byte of the message, after signing; the CRC refitted
    version_1 = bytearray(task)
    version_1[4] = 1
    return [
        ("architecture, unsigned", arch_topic, evil.encode()),
        ("architecture, signed by another key", arch_topic, sign_message(arch_topic, evil.encode(), attacker_key)),
        ("architecture, protocol version 1", arch_topic, evil.encode().replace(b'"v":%d' % PROTOCOL_VERSION, b'"v":1')),
        ("architecture, altered after signing", arch_topic, recrc(bytes(honest_signed))),
        ("task, unsigned", task_topic, task),
        ("task, signed by another key", task_topic, sign_message(task_topic, task, attacker_key)),
        ("task, protocol version 1 frame", task_topic, recrc(bytes(version_1))),
        ("task, signed for another device's topic", task_topic, sign_message(topics.task("pi-02"), task, key)),
        ("task topic, an architecture signed for its own topic", task_topic,
         sign_message(arch_topic, evil.encode(), key)),
    ]


def _start_agent(work: Path, broker_url: str, log_path: Path, pythonpath: list[str] = ()) -> subprocess.Popen:
    """A real ``fedprune-agent`` (device ``pi-01``, 16 samples of 4 features, state in
    ``work/state``) on ``broker_url``, trusting ``work/aggregator.key``'s public key; its log
    appended to ``log_path``."""
    import numpy as np

    from fedprune.aggregator_key import public_key_file

    if not (work / "local.npz").is_file():
        np.savez(work / "local.npz", x_train=np.zeros((16, 4), np.float32), y_train=np.arange(16) % 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedprune.edge_agent.cli", "run", "--broker", broker_url, "--device-id", "pi-01",
             "--data", str(work / "local.npz"), "--state-dir", str(work / "state"), "--log-level", "INFO",
             "--aggregator-key", str(public_key_file(work / "aggregator.key"))],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)


def part_forged(args) -> dict:
    from edge_helpers import MARKER_MODULE, training_child_pid
    from federation_helpers import Spy
    from fedprune.aggregator_key import write_key_pair
    from fedprune.converters.protocol import Topics
    from fedprune.converters.signing import SigningKey, sign_message
    from fedprune.models import architecture_of, mlp

    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess() as broker:
        work = Path(tmp)
        key = write_key_pair(work / "aggregator.key")
        attacker_key = SigningKey.generate()
        module = "fedprune_bench_payload"
        marker = str(work / "marker")
        (work / "payload").mkdir()
        (work / "payload" / f"{module}.py").write_text(MARKER_MODULE.format(marker=marker))
        topics = Topics("default")
        log_path = work / "agent.log"
        agent = _start_agent(work, broker.url, log_path, [str(work / "payload")])
        spy = Spy(broker.url, [f"{topics.root}/#"])
        try:
            _wait(lambda: spy.on("/presence/pi-01"), 60, "the agent's presence", log_path)
            honest = architecture_of(mlp((4,), 2))
            forgeries = _forgeries(topics, key, attacker_key, honest, module)
            for _, topic, payload in forgeries:
                spy.client.publish(topic, payload, qos=1).wait_for_publish(5)
            spy.client.publish(topics.architecture, sign_message(topics.architecture, honest.encode(), key),
                               qos=1).wait_for_publish(5)
            _wait(lambda: "took architecture" in log_path.read_text(errors="replace"), 30,
                  "the signed architecture taken", log_path)
            time.sleep(2.0)  # anything the forgeries set off would have started by now
            text = log_path.read_text(errors="replace")
            trained = training_child_pid(work / "state") is not None or "training in child pid" in text
        finally:
            spy.close()
            agent.terminate()
            agent.wait(30)
        refused = [line for line in text.splitlines() if "refused a message on" in line]
        ran = sorted(p.name for p in work.glob("marker.*"))
    rows = [what for what, _, _ in forgeries]
    print("| forged message | refused and logged |")
    print("|---|---|")
    for line, what in zip(refused + [""] * len(rows), rows):
        print(f"| {what} | {line.split(': refused a message on ', 1)[-1][:150] if line else 'NOT LOGGED'} |")
    ok = len(refused) == len(forgeries) and not ran and not trained
    print(f"forged messages {len(forgeries)}, refused and logged {len(refused)}, code run: {ran or 'none'}, "
          f"training started: {trained}")
    return {"forged": len(forgeries), "refused_and_logged": len(refused), "code_ran": ran, "training_started": trained,
            "signed_architecture_taken": True, "ok": ok}


def part_replay(args) -> dict:
    """A real agent with a state folder on an open Mosquitto takes a task of run B (issued now),
    then an attacker replays a task the same key signed for it in an earlier run A (issued an
    hour before, recorded off the open broker): refused and logged, not trained. The agent is
    restarted and the replay sent again: refused again (the newest task is kept in its state
    folder). A newer task of run B is then trained: the agent is not refusing everything."""
    from federation_helpers import Spy
    from fedprune.aggregator_key import write_key_pair
    from fedprune.converters.protocol import Topics, TrainTask, encode_task
    from fedprune.converters.signing import sign_message
    from fedprune.models import architecture_of, get_layer_weights, mlp

    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess() as broker:
        work = Path(tmp)
        key = write_key_pair(work / "aggregator.key")
        topics = Topics("default")
        model = mlp((4,), 2)
        arch = architecture_of(model)
        now_us = time.time_ns() // 1000

        def task(session: str, round_: int, issued_us: int) -> bytes:
            weights = get_layer_weights(model)
            body = encode_task(TrainTask(round_, 1, arch.digest, weights, [None] * len(weights),
                                         {"local_epochs": 1, "batch_size": 8, "optimizer": "sgd", "learning_rate": 0.1},
                                         "float32", 60.0, session=session, issued_us=issued_us), arch.names)
            return sign_message(topics.task("pi-01"), body, key)

        run_a_round_5 = task("a" * 16, 5, now_us - 3_600 * 10**6)
        log_path = work / "agent.log"
        refusals: list[int] = []
        agent = _start_agent(work, broker.url, log_path)
        spy = Spy(broker.url, [f"{topics.root}/#"])

        def text() -> str:
            return log_path.read_text(errors="replace")

        def send(payload: bytes) -> None:
            spy.client.publish(topics.task("pi-01"), payload, qos=1).wait_for_publish(5)

        try:
            _wait(lambda: spy.on("/presence/pi-01"), 60, "the agent's presence", log_path)
            spy.client.publish(topics.architecture, sign_message(topics.architecture, arch.encode(), key), qos=1,
                               retain=True).wait_for_publish(5)
            _wait(lambda: "took architecture" in text(), 30, "the architecture taken", log_path)
            send(task("b" * 16, 1, now_us))
            _wait(lambda: "sent update for round 1" in text(), 120, "run B's round 1 trained", log_path)
            send(run_a_round_5)  # the replay
            _wait(lambda: text().count("refused a message on") >= 1, 30, "the replay refused", log_path)
            refusals.append(text().count("refused a message on"))
            agent.terminate()
            agent.wait(30)
            agent = _start_agent(work, broker.url, log_path)
            _wait(lambda: text().count("took architecture") >= 2, 60, "the restarted agent's architecture", log_path)
            send(run_a_round_5)  # again, to the restarted agent
            _wait(lambda: text().count("refused a message on") >= 2, 30, "the replay refused after a restart",
                  log_path)
            refusals.append(text().count("refused a message on") - refusals[0])
            send(task("b" * 16, 2, time.time_ns() // 1000))
            _wait(lambda: "sent update for round 2" in text(), 120, "run B's round 2 trained", log_path)
        finally:
            spy.close()
            agent.terminate()
            agent.wait(30)
        log_text = text()
    trained = sorted({int(line.rsplit("sent update for round ", 1)[1].split()[0])
                      for line in log_text.splitlines() if "sent update for round " in line})
    refused = [line.split(": refused a message on ", 1)[1] for line in log_text.splitlines()
               if "refused a message on" in line]
    print("| message | what the agent did |")
    print("|---|---|")
    print(f"| run B round 1 (issued now) | trained: {1 in trained} |")
    print(f"| run A round 5 replayed (issued an hour before) | {refused[0][:160] if refused else 'NOT REFUSED'} |")
    print(f"| the same, after the agent restarted | {refused[1][:160] if len(refused) > 1 else 'NOT REFUSED'} |")
    print(f"| run B round 2 (issued now) | trained: {2 in trained} |")
    ok = trained == [1, 2] and refusals == [1, 1]
    return {"replays": 2, "refused_and_logged": sum(refusals), "rounds_trained": trained, "ok": ok}


def _wait(condition, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s; the agent's log ends:\n"
                         + log.read_text(errors="replace")[-2000:])


# --- probes ---------------------------------------------------------------------------------------

def part_probes(args) -> dict:
    import contextlib
    import io

    import probe_broker  # scripts/

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = probe_broker.main([])
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    counts = {kind: sum(v["refused"] for k, v in results.items() if k != "wall_s")
              for kind, results in summary["brokers"].items()}
    total = {kind: sum(1 for k in results if k != "wall_s") for kind, results in summary["brokers"].items()}
    for kind in counts:
        print(f"{kind}: {counts[kind]} of {total[kind]} probes refused")
    return {"refused": counts, "probes": total, "all_refused": summary["all_refused"] and status == 0}


# --- the federation under attack ------------------------------------------------------------------

class RssSampler:
    """Samples a process's resident set every ``period_s`` on a thread of its own."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_mb(self.pid)
            if rss is None:
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.period_s)

    @property
    def peak_mb(self) -> float:
        return max((r for _, r in self.samples), default=float("nan"))


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _attacker_url(fleet: Fleet) -> str:
    from fedprune.connection import load_connection

    return load_connection(fleet.folder.device_connection(ATTACKER)).broker.full_url()


def _announce(fleet: Fleet) -> None:
    """The attacker announces itself online (retained), so the aggregator knows it, charges its
    budget, and draws it: every round selects every online device here."""
    from fedprune.converters.protocol import Presence, Topics
    from fedprune.transport import MqttSession

    topics = Topics(fleet.folder.federation)
    session = MqttSession(_attacker_url(fleet), ATTACKER).start()
    session.publish(topics.presence(ATTACKER), Presence(ATTACKER, True, 50).encode(), retain=True).wait_for_publish(5)
    session.stop()


def _mosquitto_pub_flood(fleet: Fleet, count: int, topic: str) -> subprocess.Popen:
    """``count`` small messages on ``topic`` of the attacker's, as fast as Mosquitto's own C client
    sends them over TLS (QoS 1, 100 in flight)."""
    from fedprune.connection import load_connection
    from fedprune.converters.protocol import Topics

    b = load_connection(fleet.folder.device_connection(ATTACKER)).broker
    topics = Topics(fleet.folder.federation)
    junk = "FPRN" + "x" * 60  # looks like a frame, is none: what passes the budget is refused as undecodable
    return subprocess.Popen(
        ["mosquitto_pub", "-h", "localhost", "-p", str(b.port), "--cafile", b.ca_file, "-u", b.username,
         "-P", b.password, "-i", ATTACKER, "-q", "1", "-M", "100", "-m", junk, "--repeat", str(count),
         "--repeat-delay", "0",
         "-t", topics.update(ATTACKER) if topic == "update" else topics.presence(ATTACKER)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _bomb(fleet: Fleet, total_bytes: int, payload_bytes: int, half_done: threading.Event) -> dict:
    """Chunks of messages that each claim the maximum size, every one a new message, from the
    attacker's login at full speed (the outbox of 1,000 messages paces it to the broker), on its
    update and its presence topic in turn: the aggregator always listens to presences, and to
    the attacker's updates whenever it is drawn."""
    import hashlib

    from fedprune.converters.chunking import CHUNK_KIND, CHUNK_OVERHEAD, MESSAGE_ID_BYTES
    from fedprune.converters.frame import pack_frame
    from fedprune.converters.protocol import Topics
    from fedprune.transport import MqttSession
    import struct

    topics = Topics(fleet.folder.federation)
    targets = [topics.update(ATTACKER), topics.presence(ATTACKER)]
    session = MqttSession(_attacker_url(fleet), ATTACKER, max_payload_bytes=payload_bytes).start()
    slice_bytes = payload_bytes - CHUNK_OVERHEAD
    claimed = 64_000_000
    count = -(-claimed // slice_bytes)
    data = os.urandom(slice_bytes)
    digest = hashlib.sha256(b"never sent").digest()
    sent = 0
    started = time.monotonic()
    try:
        while sent < total_bytes:
            head = struct.pack("<16sIIQ32s", os.urandom(MESSAGE_ID_BYTES), 0, count, claimed, digest)
            session.publish(targets[(sent // payload_bytes) % 2], pack_frame(CHUNK_KIND, None, head + data))
            sent += payload_bytes
            if sent >= total_bytes // 2:
                half_done.set()
    finally:
        session.stop()
    half_done.set()
    return {"bomb_bytes": sent, "bomb_messages": sent // payload_bytes, "bomb_s": round(time.monotonic() - started, 1)}


def _federation(args, name: str, workdir: Path, attacked: bool = True, max_payload_bytes: int | None = None) -> Fleet:
    """Three agents, and the attacker's login; every online device is drawn every round (the
    attacker included, when it has announced itself)."""
    return Fleet(workdir / name, HONEST, rounds=args.rounds, round_timeout_s=ROUND_TIMEOUT_S, extra_logins=[ATTACKER],
                 aggregator_args=["--log-level", "INFO"], devices_per_round=len(HONEST) + (1 if attacked else 0),
                 max_payload_bytes=max_payload_bytes)


def _outcome(fleet: Fleet, sampler: RssSampler, before_mb: float) -> dict:
    rec = fleet.record() if (fleet.run_dir / "metrics.jsonl").is_file() else None
    log = fleet.aggregator_output()
    evicted_honest = [line for line in log.splitlines() if "evicted incomplete message" in line
                      and any(f"/device/{d}/" in line for d in HONEST)]
    peak = max(sampler.peak_mb, rss_mb(fleet.aggregator.pid, "VmHWM") or 0.0) if fleet.aggregator.poll() is None \
        else sampler.peak_mb
    return {
        "rounds_completed": len(set(rec.rounds)) if rec else 0,
        "selected_per_round": rec.selected if rec else [],
        "honest_updates_counted": rec.reported if rec else [],
        "rejected": rec.rejections if rec else {},
        "aggregator_rss_before_mb": round(before_mb, 1),
        "aggregator_rss_peak_mb": round(peak, 1),
        "aggregator_rss_growth_mb": round(peak - before_mb, 1),
        "honest_partial_messages_evicted": len(evicted_honest),
        "over_budget_lines": sum("went over its budget" in line for line in log.splitlines()),
        # what the budgets kept out, from their per-round summaries: the attacker's messages that
        # reached the aggregator past its budget
        "dropped_at_budget": sum(int(m.group(1)) for m in re.finditer(r"over its budget: (\d+) message", log)),
        # Mosquitto logs a notice when it starts dropping a client's queued messages (queue full)
        "broker_drop_notices": sum("dropped" in line.lower() for line in _broker_log(fleet).splitlines()),
        "log_lines": len(log.splitlines()),
    }


def _broker_log(fleet: Fleet) -> str:
    try:
        return fleet.broker.log_path.read_text(errors="replace")
    except OSError:
        return ""


def part_clean(args, workdir: Path) -> dict:
    with _federation(args, "clean", workdir, attacked=False) as fleet:
        return _run_attacked(fleet, attack=None)


def part_flood(args, workdir: Path) -> dict:
    with _federation(args, "flood", workdir) as fleet:
        return _run_attacked(fleet, attack="flood", count=args.flood_messages, topic="update")


def part_flood_presence(args, workdir: Path) -> dict:
    with _federation(args, "flood-presence", workdir) as fleet:
        return _run_attacked(fleet, attack="flood", count=args.flood_messages, topic="presence")


def part_bomb(args, workdir: Path) -> dict:
    """The task's default payload limit (1,000,000 bytes): the bomb's payloads are 1 MB."""
    return _bomb_part(args, workdir, "bomb", None, 1_000_000)


def part_bomb_chunked(args, workdir: Path) -> dict:
    """A payload limit of 64 KiB for the task, the agents and the broker: the honest updates travel
    in chunks while the bomb's maximum-size payloads (64 KiB) arrive."""
    return _bomb_part(args, workdir, "bomb-chunked", 65_536, 65_536)


def _bomb_part(args, workdir: Path, name: str, max_payload_bytes: int | None, payload_bytes: int) -> dict:
    fleet = _federation(args, name, workdir, max_payload_bytes=max_payload_bytes)
    fleet.broker.start()
    try:
        return _run_attacked(fleet, attack="bomb", total=args.bomb_bytes, payload_bytes=payload_bytes)
    finally:
        fleet.close()


def _run_attacked(fleet: Fleet, attack: str | None, count: int = 0, total: int = 0, topic: str = "update",
                  payload_bytes: int = 1_000_000) -> dict:
    """Start the aggregator; the attack from before round 1; every round to the end."""
    started = time.monotonic()
    agents_first = attack != "bomb"  # the bomb comes before round 1: the agents join half way through it
    if not agents_first and not fleet.broker.running:
        fleet.broker.start()
    fleet.start_aggregator()
    # The baseline: the aggregator built, its initial model evaluated, about to wait for devices.
    deadline = time.monotonic() + 600
    while "initial model: held-out accuracy" not in fleet.aggregator_output():
        if time.monotonic() > deadline or fleet.aggregator.poll() is not None:
            raise AssertionError("the aggregator never got ready:\n" + fleet.aggregator_output()[-2000:])
        time.sleep(0.1)
    before = rss_mb(fleet.aggregator.pid) or float("nan")
    notes: dict = {}
    with RssSampler(fleet.aggregator.pid) as sampler:
        if attack is not None:
            _announce(fleet)
        if attack == "flood":
            flood_started = time.monotonic()
            flooder = _mosquitto_pub_flood(fleet, count, topic)
        elif attack == "bomb":
            half = threading.Event()
            result: dict = {}
            bomber = threading.Thread(target=lambda: result.update(_bomb(fleet, total, payload_bytes, half)),
                                      daemon=True)
            bomber.start()
            half.wait(600)
            for device in fleet.devices:
                fleet.start_agent(device)
        try:
            fleet.finish_aggregator(timeout_s=3600)
        except AssertionError as e:
            notes["error"] = str(e).splitlines()[-1][:300]
        if attack == "flood":
            try:
                flooder.wait(1800)
            finally:
                if flooder.poll() is None:
                    flooder.kill()
            notes.update(flood_messages=count, flood_topic=topic, flood_exit=flooder.returncode,
                         flood_s=round(time.monotonic() - flood_started, 1),
                         flood_stderr=(flooder.stderr.read() or b"").decode(errors="replace")[-300:])
        elif attack == "bomb":
            bomber.join(1800)
            notes.update(result)
    out = _outcome(fleet, sampler, before)
    out.update(notes, wall_s=round(time.monotonic() - started, 1))
    return out


PARTS = {"cost": part_cost, "forged": part_forged, "replay": part_replay, "probes": part_probes, "clean": part_clean,
         "flood": part_flood,
         "flood_presence": part_flood_presence, "bomb": part_bomb, "bomb_chunked": part_bomb_chunked}
FEDERATION_PARTS = ("clean", "flood", "flood_presence", "bomb", "bomb_chunked")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run these parts only")
    parser.add_argument("--flood-messages", type=int, default=1_000_000)
    parser.add_argument("--bomb-bytes", type=int, default=2_000_000_000)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds of each federation (default {ROUNDS})")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(PARTS):
            print(f"\n## {name}", flush=True)
            part = PARTS[name]
            results[name] = part(args, Path(tmp)) if name in FEDERATION_PARTS else part(args)
            print(json.dumps(results[name]), flush=True)
    clean_peak = results.get("clean", {}).get("aggregator_rss_peak_mb")
    for name, r in results.items():
        if name in FEDERATION_PARTS and name != "clean" and clean_peak:
            r["rss_growth_over_clean_mb"] = round(r["aggregator_rss_peak_mb"] - clean_peak, 1)
    ok = all(_target_met(name, r, clean_peak) for name, r in results.items())
    print(json.dumps({"benchmark": "trust", "ok": ok, **results}))
    return 0 if ok else 1


def _target_met(name: str, r: dict, clean_peak_mb: float | None) -> bool:
    """Issue 16's targets. RSS growth is the attacked run's peak over the clean run's (a run grows
    by itself as it trains, evaluates and checkpoints); without a clean run, over its own start."""
    if name in ("forged", "replay"):
        return r["ok"]
    if name == "probes":
        return r["all_refused"]
    if name in ("flood", "flood_presence", "bomb", "bomb_chunked"):
        rounds = len(r["honest_updates_counted"])
        counted = r["honest_updates_counted"] == [len(HONEST)] * rounds and r["rounds_completed"] == rounds > 0
        growth = r["aggregator_rss_peak_mb"] - clean_peak_mb if clean_peak_mb else r["aggregator_rss_growth_mb"]
        return counted and growth <= 100 and r["honest_partial_messages_evicted"] == 0 and "error" not in r
    return True


if __name__ == "__main__":
    sys.exit(main())

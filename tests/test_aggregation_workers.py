"""Aggregation workers (issue 17): ``fedprune-aggregator --workers N`` takes the updates through a
Mosquitto shared subscription in N worker processes, which claim each device from the
coordinator before folding it and hand in partial sums; the coordinator counts duplicates and
rejections once and merges the partials, so the result equals one process's. A worker killed
mid-round costs the attempt (retried), never a device counted twice."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from fedprune.aggregator.collect import AttemptCollector, DeviceLink
from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.intake import RoundContext
from fedprune.aggregator.peer_budgets import Budget
from fedprune.aggregator.registry import DeviceRegistry
from fedprune.aggregator.round_fold import RoundFold
from fedprune.aggregator.run_folder import FederationError
from fedprune.aggregator.strategies import strategy_from_config
from fedprune.aggregator.strategies.base import ClientResult
from fedprune.aggregator.strategies.dp_fedavg import DPFedAvg
from fedprune.aggregator.workers import WorkerPool, worker_pool, workers_refusal
from fedprune.converters.codec import MaskLayout
from fedprune.converters.protocol import Ack, Topics, Update, encode_update
from federation_helpers import small_task
from test_fleet import fleet_task
from test_streaming_aggregation import SHAPES, _results

@pytest.mark.parametrize("config", [
    {"strategy": "fedavg"},
    {"strategy": "norm_clipping", "clip_norm": 1.0, "inner": {"strategy": "fedavg"}},
    {"strategy": "device_mask_averaging"},
    {"strategy": "dp_fedavg"},
], ids=lambda c: c["strategy"])
def test_partial_sums_merged_in_worker_order_equal_one_process_to_the_bit(config):
    rng = np.random.default_rng(5)
    masks = [rng.random(SHAPES[0]) > 0.5, None, rng.random(SHAPES[2]) > 0.8, None]
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    results = _results(rng, 50, masks, device_masks=config["strategy"] == "device_mask_averaging")
    if config["strategy"] == "dp_fedavg":  # the noise is drawn once, by the coordinator's aggregate
        def make():
            return DPFedAvg(clip_norm=0.5, noise_multiplier=1.1, sampled=60, rng=np.random.default_rng(11))
    else:
        def make():
            return strategy_from_config(config)
    one = make().running(weights, masks)
    for r in results:
        one.add(r)
    expected = one.result()
    for seed in range(3):  # whichever worker got which update, in whatever order
        owner = np.random.default_rng(seed).integers(0, 3, size=len(results))
        partials = [make().running(weights, masks) for _ in range(3)]
        for i in np.random.default_rng(seed + 10).permutation(len(results)):
            partials[owner[i]].add(results[i])
        merged = make().running(weights, masks)
        for partial in partials:
            merged.merge(partial)
        assert merged.count == len(results)
        assert all(np.array_equal(a, b) for a, b in zip(merged.result(), expected))


def test_workers_are_refused_for_robust_strategies_and_chunked_updates():
    from fedprune.converters.protocol import Architecture

    task = small_task()
    refusal = workers_refusal(strategy_from_config({"strategy": "median"}), task)
    assert "needs a strategy that streams" in refusal and "run without --workers" in refusal
    assert workers_refusal(strategy_from_config({"strategy": "fedavg"}), task) is None
    big = Architecture(model_json="{}", digest="x", shapes=[[1000, 1000]], names=["w"])  # 4 MB updates, 1 MB messages
    with pytest.raises(FederationError, match="max_payload_bytes"):
        worker_pool(2, "mqtt://127.0.0.1:1", task, strategy_from_config({"strategy": "fedavg"}), big)


def test_the_cli_refuses_workers_on_the_embedded_broker_and_with_a_robust_strategy(tmp_path, capsys):
    from fedprune.aggregator.cli import main

    assert main(["--task", "examples/digits.toml", "--workers", "2", "--run-dir", str(tmp_path / "a")]) == 2
    assert "embedded broker (amqtt" in capsys.readouterr().err
    assert main(["--task", "examples/robust.toml", "--workers", "2", "--broker", "mqtt://127.0.0.1:1",
                 "--run-dir", str(tmp_path / "b")]) == 2
    assert "needs a strategy that streams" in capsys.readouterr().err
    # Accepted with a streaming strategy and --broker: on to the run folder's checks (nothing to resume here)
    (tmp_path / "c").mkdir()
    assert main(["--task", "examples/digits.toml", "--workers", "2", "--broker", "mqtt://127.0.0.1:1",
                 "--run-dir", str(tmp_path / "c"), "--resume"]) == 2
    assert "--workers" not in capsys.readouterr().err


def test_fedprune_simulate_refuses_aggregator_workers_on_the_embedded_broker(capsys):
    from fedprune.simulation.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["--task", "examples/digits.toml", "--broker", "embedded", "--aggregator-workers", "2"])
    assert stopped.value.code == 2 and "embedded broker (amqtt) has none" in capsys.readouterr().err


# --- the coordinator and two real workers on a real Mosquitto ---
TOPICS = Topics("fed")


class _Publisher:
    """The coordinator's signed way to devices, recorded (the acks it would send)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, *, retain=False, best_effort=False):
        self.published.append((topic, payload))

    def clear(self, topic):
        pass


def _link(devices):
    registry = DeviceRegistry()
    for d in devices:
        registry.update(d, True, 50)
    return DeviceLink(_Publisher(), TOPICS, registry, BoundedInbox(1 << 30))


def test_two_workers_claim_each_device_once_and_merge_to_one_process_result(mosquitto_url):
    """8 devices' updates, a byte-identical copy of one (QoS 1 redelivery), another update of an
    accepted device (a duplicate) and a stale one, spread over two workers by Mosquitto: the same
    accepted devices, rejections, redeliveries and new weights, to the bit, as one process."""
    import paho.mqtt.client as mqtt
    from fedprune.transport import parse_broker_url

    devices = [f"dev-{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    masks = [rng.random(SHAPES[0]) > 0.5, None, rng.random(SHAPES[2]) > 0.5, None]
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    names = ["a/kernel", "a/bias", "b/kernel", "b/bias"]
    ctx = RoundContext(2, 1, tuple(devices), set(devices).__contains__, TOPICS, SHAPES, masks, names, 10**7, "float32",
                       False, weights, layout=MaskLayout.of(SHAPES, masks))

    def update(device, samples=50, round_number=2):
        tensors = [rng.normal(size=s).astype(np.float32) * 0.01 for s in SHAPES]
        return encode_update(Update(round_number, 1, device, samples, {"loss": 0.1}, tensors, precision="float32"),
                             masks)

    first = [(d, update(d)) for d in devices]
    extra = [("dev-1", first[1][1]), ("dev-2", update("dev-2", samples=7)), ("dev-3", update("dev-3", round_number=1))]
    messages = first[:-1] + extra  # the last device's update goes last, once the rest are in
    strategy = strategy_from_config({"strategy": "fedavg"})

    single = AttemptCollector(_link(devices), ctx, {}, RoundFold(strategy, weights, masks))
    now = time.monotonic()
    for d, data in [*messages, first[-1]]:
        single.link.inbox.put((TOPICS.update(d), data, now))
    expected = single.collect(now, now + 10)

    pool = WorkerPool(2, mosquitto_url, small_task(federation={"id": "fed"}), Budget(100, 10**8))
    try:
        collector = pool.collector(_link(devices), ctx, {}, RoundFold(strategy, weights, masks))
        addr = parse_broker_url(mosquitto_url)
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices", protocol=mqtt.MQTTv311)
        device.connect(addr.host, addr.port)
        device.loop_start()

        def send():
            # In steps, each once the coordinator has heard of the one before: the first update of a
            # device wins, and with two workers "first" is the order their claims reach the coordinator.
            for step in (first[:-1], extra, first[-1:]):
                heard = collector.out.received + len(step)
                for d, data in step:
                    device.publish(TOPICS.update(d), data, qos=1).wait_for_publish(5)
                while collector.out.received < heard and step is not first[-1:]:
                    time.sleep(0.01)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = collector.collect(time.monotonic(), time.monotonic() + 10)
        sender.join(5)
        device.loop_stop()
        device.disconnect()
    finally:
        pool.stop()
    assert [r.device_id for r in got.results] == [r.device_id for r in expected.results] == devices
    assert collector.rejections == single.rejections == {"duplicate": 1, "wrong round": 1}
    assert (got.redelivered, got.received, got.lost) == (expected.redelivered, expected.received, 0) == (1, 11, 0)
    assert all(len(g) > 0 for g in collector.granted.values())  # Mosquitto gave both workers some
    assert sum(len(g) for g in collector.granted.values()) == len(devices)
    assert all(np.array_equal(a, b) for a, b in zip(got.fold.weights(got.results), expected.fold.weights([])))
    acks = [Ack.decode(p) for t, p in collector.link.publisher.published if t.endswith("/ack")]
    assert sorted(a.device_id for a in acks if a.accepted) == devices


def _accuracies(run_dir):
    return [(r["round"], r["accuracy"], r["loss"], r["reported"], r["received"], r["rejected"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow  # two simulated federations: 10-33 s on the shared 2-core VM
def test_a_federation_with_two_workers_gives_the_same_run_as_one_process(tmp_path):
    from fedprune.simulation.cli import run_simulation

    task = fleet_task(federation={"rounds": 2, "devices_per_round": 8, "min_devices": 8})
    one = run_simulation(task, 10, tmp_path / "one", broker_url="mosquitto", export_tflite=False)
    two = run_simulation(task, 10, tmp_path / "two", broker_url="mosquitto", export_tflite=False,
                         aggregator_workers=2)
    assert _accuracies(tmp_path / "one") == _accuracies(tmp_path / "two")
    assert all(r.reported == 8 for r in two.rounds)
    from fedprune.aggregator.checkpoint import load_latest_checkpoint

    ends = [load_latest_checkpoint(tmp_path / name / "checkpoints").weights for name in ("one", "two")]
    assert len(ends[0]) > 0 and all(np.array_equal(a, b) for a, b in zip(*ends))
    with pytest.raises(ValueError, match="shared subscriptions"):
        run_simulation(task, 10, tmp_path / "three", export_tflite=False, aggregator_workers=2)


def _kill_a_worker_once(killed: list[int]):
    def on_update(progress):
        if not killed and progress.round == 1 and progress.reported >= 2:
            worker = next(p for p in multiprocessing.active_children() if p.name.endswith("worker-0"))
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)
    return on_update


@pytest.mark.slow  # a simulated federation with a retried round: 3-17 s on the shared 2-core VM (fast form below)
def test_a_worker_killed_mid_round_costs_the_attempt_and_counts_nothing_twice(tmp_path):
    from fedprune.simulation.cli import run_simulation

    task = fleet_task(federation={"rounds": 2, "devices_per_round": 8, "min_devices": 8, "max_round_retries": 2})
    killed: list[int] = []
    result = run_simulation(task, 10, tmp_path / "run", broker_url="mosquitto", export_tflite=False,
                            aggregator_workers=2, on_update=_kill_a_worker_once(killed))
    assert killed
    first = result.rounds[0]
    assert first.attempts == 2  # the attempt the worker died in was dropped and retried
    assert first.reported == 8 and all(r.reported == 8 for r in result.rounds)
    assert result.rounds[1].attempts == 1  # the worker was started again
    assert first.accuracy > 0.1


def test_a_worker_killed_during_an_attempt_drops_the_attempt_and_is_started_again(mosquitto_url):
    """The fast form of the test above, without TensorFlow: a worker is killed once the coordinator
    has granted it a claim; the attempt reports nothing (its accepted updates count as lost, so the
    round retries), and the next attempt starts the worker again."""
    import paho.mqtt.client as mqtt
    from fedprune.transport import parse_broker_url

    devices = [f"dev-{i}" for i in range(4)]
    masks = [None] * len(SHAPES)
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    names = ["a/kernel", "a/bias", "b/kernel", "b/bias"]
    strategy = strategy_from_config({"strategy": "fedavg"})

    def context(attempt):
        return RoundContext(1, attempt, tuple(devices), set(devices).__contains__, TOPICS, SHAPES, masks, names,
                            10**7, "float32", False, weights, layout=MaskLayout.of(SHAPES, masks))

    def update(device, attempt):
        tensors = [np.full(s, 0.01, np.float32) for s in SHAPES]
        return encode_update(Update(1, attempt, device, 10, {}, tensors, precision="float32"), masks)

    addr = parse_broker_url(mosquitto_url)
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices", protocol=mqtt.MQTTv311)
    sender.connect(addr.host, addr.port)
    sender.loop_start()
    pool = WorkerPool(2, mosquitto_url, small_task(federation={"id": "fed"}), Budget(100, 10**8))
    try:
        collector = pool.collector(_link(devices), context(1), {}, RoundFold(strategy, weights, masks))
        first_pids = pool.pids
        sender.publish(TOPICS.update("dev-0"), update("dev-0", 1), qos=1).wait_for_publish(5)
        until = time.monotonic() + 10
        while not any(collector.granted.values()) and time.monotonic() < until:
            collector._serve(0.1)
        owner = next(w for w, got in collector.granted.items() if got)
        os.kill(pool.workers[owner].process.pid, signal.SIGKILL)
        out = collector.collect(time.monotonic(), time.monotonic() + 10)
        assert out.results == [] and out.lost == len(devices)  # dev-0 was accepted, then lost with the worker
        assert "worker" in collector.failed

        again = pool.collector(_link(devices), context(2), {}, RoundFold(strategy, weights, masks))
        assert pool.pids[owner] != first_pids[owner] and pool.pids[1 - owner] == first_pids[1 - owner]
        for d in devices:
            sender.publish(TOPICS.update(d), update(d, 2), qos=1).wait_for_publish(5)
        out = again.collect(time.monotonic(), time.monotonic() + 10)
        assert [r.device_id for r in out.results] == devices and not again.failed
        assert all(np.allclose(w, 0.01) for w in out.fold.weights(out.results))
    finally:
        pool.stop()
        sender.loop_stop()
        sender.disconnect()


def test_workers_log_in_to_an_init_broker_mosquitto_and_its_access_policy_lets_them_work(tmp_path):
    """The secured set-up of ``fedprune-aggregator init-broker`` on Mosquitto (TLS, logins, access
    policy): the workers, logged in as the aggregator, get the devices' updates through the shared
    filter, and nothing else changes."""
    from brokers import MosquittoProcess, free_port, mosquitto_available
    from fedprune.aggregator.broker_setup import init_broker
    from fedprune.connection import load_connection
    from fedprune.transport import MqttSession

    if not mosquitto_available():
        pytest.skip("needs mosquitto and mosquitto_passwd")
    devices = ["pi-01", "pi-02"]
    folder = init_broker(tmp_path / "broker", "sec", devices, ["localhost"], port=free_port(), bind="127.0.0.1")
    topics = Topics("sec")
    masks = [None] * len(SHAPES)
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    ctx = RoundContext(1, 1, tuple(devices), set(devices).__contains__, topics, SHAPES, masks,
                       ["a/kernel", "a/bias", "b/kernel", "b/bias"], 10**7, "float32", False, weights,
                       layout=MaskLayout.of(SHAPES, masks))
    strategy = strategy_from_config({"strategy": "fedavg"})
    link = _link(devices)
    link = DeviceLink(link.publisher, topics, link.registry, link.inbox)
    with MosquittoProcess(port=folder.port, base_config=folder.mosquitto_conf.read_text()):
        aggregator_url = load_connection(folder.aggregator_connection).broker.full_url()
        pool = WorkerPool(2, aggregator_url, small_task(federation={"id": "sec"}), Budget(100, 10**8))
        sessions = []
        try:
            collector = pool.collector(link, ctx, {}, RoundFold(strategy, weights, masks))
            for i, device in enumerate(devices):
                url = load_connection(folder.device_connection(device)).broker.full_url()
                session = MqttSession(url, client_id=device).start(10)
                sessions.append(session)
                tensors = [np.full(s, float(i + 1), np.float32) for s in SHAPES]
                data = encode_update(Update(1, 1, device, 10, {}, tensors, precision="float32"), masks)
                session.publish(topics.update(device), data).wait_for_publish(5)
            out = collector.collect(time.monotonic(), time.monotonic() + 10)
        finally:
            for session in sessions:
                session.stop()
            pool.stop()
    assert [r.device_id for r in out.results] == devices
    assert all(np.allclose(w, 1.5) for w in out.fold.weights(out.results))

"""The fleet simulator end to end: asyncio devices on real brokers (embedded and Mosquitto), real
TensorFlow, the aggregator's accounting of every selected device, emulated links, dropouts,
device-id ranges across processes, and the report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from fedprune.converters.protocol import Presence, Topics
from federation_helpers import Spy, small_task
from fedprune.simulation.fleet import draw_behaviours
from fedprune.simulation.report import write_report
from fedprune.simulation.cli import run_simulation

ROOT = Path(__file__).resolve().parents[1]


def fleet_task(**overrides):
    """A small MLP on digits: quick to train, so the fleet and the protocol dominate."""
    base = {
        "model": {"factory": "fedprune.models:mlp"},
        "federation": {"rounds": 2, "devices_per_round": 20, "min_devices": 1, "round_timeout_s": 60,
                       "wait_for_devices_s": 60},
        "training": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.01},
        "pruning": {"final_sparsity": 0.5, "begin_round": 1, "end_round": 2},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values) if isinstance(values, dict) else base.update({section: values})
    return small_task(**base)


def test_sixty_asyncio_devices_two_rounds_nothing_lost(broker_url, tmp_path):
    task = fleet_task()
    topics = Topics(task.federation.id)
    spy = Spy(broker_url, [topics.all_presence])
    try:
        result = run_simulation(task, 60, tmp_path / "run", broker_url=broker_url, export_tflite=False)
    finally:
        spy.close()
    online = {Presence.decode(p).device_id for _, p in spy.on("/presence/") if p and Presence.decode(p).online}
    assert online == {f"sim-{i:03d}" for i in range(60)}  # each device its own session
    for r in result.rounds:
        assert (r.selected, r.reported, r.received, r.rejected, r.offline, r.lost) == (20, 20, 20, 0, 0, 0)
        assert 0 < r.train_s < r.wall_s and r.encode_s > 0 and r.decode_s > 0 and r.aggregate_s > 0
        assert r.transfer_s > 0 and 0 < r.fleet_s <= r.wall_s
    assert result.final_accuracy > 0.3  # learning at all (chance: 0.1); learning well is test_federation's
    fleet = json.loads((tmp_path / "run" / "fleet.json").read_text())
    assert fleet["updates_sent"] == 40 and fleet["send_errors"] == 0


@pytest.mark.slow
def test_report_has_figures_tables_and_csv(tmp_path):
    pruned = tmp_path / "pruned"
    dense = tmp_path / "dense"
    ten = {"devices_per_round": 10}
    run_simulation(fleet_task(federation=ten), 12, pruned, export_tflite=False)  # each on its own broker
    run_simulation(fleet_task(federation=ten, pruning={"final_sparsity": 0.0},
                              transport={"uplink_precision": "float32"}), 12, dense, export_tflite=False)
    from fedprune.simulation.report import Run

    report = write_report(pruned, label="pruned", compare=[Run.load(dense, "dense")], notes=["a test"])
    text = report.read_text()
    import matplotlib.image as mpimg

    for name in ("accuracy_vs_round", "accuracy_vs_uplink", "layer_sparsity", "devices_per_round", "round_time"):
        png = pruned / "plots" / f"{name}.png"
        assert f"plots/{name}.png" in text
        pixels = mpimg.imread(png)
        assert png.stat().st_size > 10_000 and pixels.shape[0] > 300 and pixels.std() > 0.05, name
    assert "compared with `dense`" in text and "| 2 | 10 | 10 |" in text
    rows = (pruned / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "layer_sparsity.dense1/kernel" in rows[0] and "fleet_s" in rows[0]
    # Dense float32 sends 4x the bytes of int8 less the headers (pruning applies from round 2 on).
    up = lambda d: sum(json.loads(l)["bytes_up"] for l in (d / "metrics.jsonl").read_text().splitlines())
    assert up(dense) > 3.5 * up(pruned)


def test_emulated_links_delay_each_message_by_its_size(embedded_broker_url, tmp_path):
    profile = {"name": "thin", "uplink_kbps": 64.0, "downlink_kbps": 512.0, "latency_ms": 100.0}
    task = fleet_task(federation={"rounds": 1, "devices_per_round": 3}, pruning={"final_sparsity": 0.0},
                      simulation={"profiles": [profile]})
    result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    r = result.rounds[0]
    assert r.reported == 3
    up_s = 0.1 + 8 * (r.bytes_up / r.received) / 64_000
    down_s = 0.1 + 8 * (r.bytes_down / r.selected) / 512_000
    assert up_s > 2.0  # a ~17 kB int8 update at 64 kbit/s
    assert up_s + down_s <= r.transfer_s < up_s + down_s + 3.0
    fleet = json.loads((tmp_path / "run" / "fleet.json").read_text())
    assert fleet["link_delay_s"] == pytest.approx(3 * (up_s + down_s), rel=0.01)


def test_dropouts_are_counted_offline_as_drawn_from_the_seed(mosquitto_url, tmp_path):
    profile = {"name": "flaky", "dropout": 0.4}
    task = fleet_task(federation={"rounds": 1, "devices_per_round": 10}, pruning={"final_sparsity": 0.0},
                      simulation={"profiles": [profile], "rejoin_s": 300})
    expected = sum(b.drops_out(1, 1) for b in draw_behaviours(task.simulation, range(10), task.seed))
    assert 0 < expected < 10  # the seed gives a round with some of each
    result = run_simulation(task, 10, tmp_path / "run", broker_url=mosquitto_url, export_tflite=False)
    r = result.rounds[0]
    assert (r.reported, r.offline, r.lost) == (10 - expected, expected, 0)
    assert r.wall_s < 50  # closed once every device still due had gone, not at the deadline


def test_a_selected_device_that_never_answers_is_counted_lost(embedded_broker_url, tmp_path):
    task = fleet_task(federation={"rounds": 1, "devices_per_round": 4, "round_timeout_s": 20},
                      pruning={"final_sparsity": 0.0})
    topics = Topics(task.federation.id)
    ghost = Spy(embedded_broker_url, [])
    ghost.client.publish(topics.presence("ghost"), Presence("ghost", True, 50, "0").encode(), qos=1,
                         retain=True).wait_for_publish(5)
    try:
        result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        ghost.client.publish(topics.presence("ghost"), b"", qos=1, retain=True).wait_for_publish(5)
        ghost.close()
    r = result.rounds[0]
    assert (r.selected, r.reported, r.received, r.offline, r.lost) == (4, 3, 3, 0, 1)


@pytest.mark.slow
def test_two_processes_with_device_id_ranges_form_one_federation(mosquitto_url, tmp_path):
    task_file = tmp_path / "task.toml"
    task_file.write_text(
        "[model]\nfactory = 'fedprune.models:mlp'\n[data]\npartition = 'iid'\n"
        "[federation]\nrounds = 2\ndevices_per_round = 16\nmin_devices = 16\nround_timeout_s = 120\n"
        "wait_for_devices_s = 120\n[training]\nlocal_epochs = 1\n[transport]\nuplink_precision = 'int8'\n")
    from fedprune.aggregator_key import write_key_pair
    from fedprune.task import load_task

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    key = write_key_pair(tmp_path / "run" / "aggregator.key")  # the run's key, which the other devices trust
    other = subprocess.Popen(
        [sys.executable, "-m", "fedprune.simulation.cli", "--task", str(task_file), "--devices", "16",
         "--device-ids", "8-15", "--no-aggregator", "--broker", mosquitto_url, "--aggregator-key", key.public.text],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        result = run_simulation(load_task(task_file), 16, tmp_path / "run", broker_url=mosquitto_url,
                                export_tflite=False, device_ids=range(0, 8))
        out, _ = other.communicate(timeout=120)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, out
    assert json.loads(out.strip().splitlines()[-1])["updates_sent"] == 16  # 8 devices x 2 rounds
    assert [(r.reported, r.lost) for r in result.rounds] == [(16, 0), (16, 0)]
    mine = json.loads((tmp_path / "run" / "fleet.json").read_text())
    assert mine["devices"] == 8 and mine["updates_sent"] == 16


def test_round_one_does_not_wait_for_devices_offline_by_their_profile(embedded_broker_url, tmp_path, caplog):
    """A tier with ``availability`` below 1 leaves some devices unconnected for the whole run: the
    simulation's aggregator must start round 1 once the others are in, not hold it until
    ``wait_for_devices_s`` (the README's fleet command waited 300 s for 39 such devices)."""
    from fedprune.simulation.fleet import online_by_profile

    task = fleet_task(federation={"rounds": 1, "devices_per_round": 3, "min_devices": 3, "wait_for_devices_s": 30},
                      pruning={"final_sparsity": 0.0},
                      simulation={"profiles": [{"name": "sometimes", "availability": 0.5}]})
    online = online_by_profile(task.simulation, 8, task.seed)
    assert 3 <= online < 8  # the seed leaves some of the fleet offline, and enough online
    with caplog.at_level(logging.WARNING, logger="fedprune.aggregator.registry"):
        result = run_simulation(task, 8, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    assert not [r for r in caplog.records if "devices online after" in r.getMessage()]
    assert result.rounds[0].reported == 3

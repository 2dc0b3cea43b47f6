"""Faults against a real Mosquitto (the TLS + ACL set-up of init-broker), with the aggregator and
the agents as real processes, killed for real (SIGKILL) mid-round.

The aggregator killed mid-round and resumed is in test_cli (with Ctrl-C before it); the same
scenario over TLS is ``fleet.aggregator_killed``, which scripts/bench_faults.py runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from brokers import mosquitto_available
from fleet import Fleet, broker_restarted, device_killed, update_replayed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto")

DEVICES = ["pi-01", "pi-02", "pi-03"]
# Each test runs four TensorFlow processes for about 50 s on 2 cores. The first (which is also the
# end-to-end check over TLS with per-device logins) runs by default; the others are slow.


@needs_mosquitto
def test_a_device_killed_mid_round_the_round_closes_with_the_quorum(tmp_path):
    with Fleet(tmp_path, DEVICES) as fleet:
        notes = device_killed(fleet)
    rec = fleet.record()
    assert rec.rounds == [1, 2, 3]
    assert rec.selected[1] == 3 and rec.reported[1] == 2  # selected, then killed before it reported
    assert rec.reported[2] == 2 and notes["killed"] == DEVICES[0]  # round 3: the two that are left
    assert rec.accuracy > 0.6


@pytest.mark.slow
@needs_mosquitto
def test_the_broker_restarted_mid_round_everyone_reconnects_and_finishes(tmp_path):
    with Fleet(tmp_path, DEVICES) as fleet:
        broker_restarted(fleet)
        assert all(p.poll() is None for p in fleet.agents.values())  # the agents rode it out
    rec = fleet.record()
    assert rec.rounds == [1, 2, 3]
    assert rec.reported[2] == 3  # after the restart every device is back
    assert rec.accuracy > 0.6


@pytest.mark.slow
@needs_mosquitto
def test_an_update_sent_twice_is_counted_once(tmp_path):
    with Fleet(tmp_path, DEVICES) as fleet:
        notes = update_replayed(fleet)
    rec = fleet.record()
    assert notes["replayed"] >= 9  # every update of the 3 rounds came twice
    assert rec.reported == [3, 3, 3]  # each counted once
    # A replay lands in its own round (a byte-identical copy: a redelivery, dropped and counted
    # apart from rejections) or the next (a wrong round); those of the last round may come after
    # the aggregator stopped listening.
    assert rec.redelivered + rec.rejections.get("wrong round", 0) >= 6
    assert rec.redelivered >= 1 and rec.rejections.get("duplicate", 0) == 0


@pytest.mark.slow
def test_the_aggregator_survives_the_mqtt_fuzzer(capsys):
    import fuzz_aggregator  # scripts/

    assert fuzz_aggregator.main(["--rounds", "1", "--rate", "100", "--seed", "5"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["sent"] > 100 and figures["survived"] == figures["sent"]
    assert figures["updates_counted_per_round"] == [3]
    assert sum(figures["rejected_by_aggregator"].values()) > 0

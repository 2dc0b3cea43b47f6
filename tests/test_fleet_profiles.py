"""The simulated fleet's behaviour: profiles from the task file, reproducible draws, the link model,
device-id ranges. No broker, no TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

from federation_helpers import small_task
from fedprune.simulation.fleet import draw_behaviours, parse_id_range
from fedprune.simulation.fleet.link import Link
from fedprune.task import TaskError

TIERS = [
    {"name": "pi4", "weight": 3, "speed": 1.5, "uplink_kbps": 2000, "latency_ms": 20},
    {"name": "pi-zero", "weight": 1, "speed": 6.0, "availability": 0.5, "dropout": 0.2,
     "uplink_kbps": 256, "downlink_kbps": 1000, "latency_ms": 120, "loss": 0.1},
]


def test_profiles_parse_from_an_array_of_tables():
    task = small_task(simulation={"profiles": TIERS, "rejoin_s": 3})
    pi4, zero = task.simulation.profiles
    assert (pi4.name, pi4.weight, pi4.speed, pi4.availability, pi4.uplink_kbps) == ("pi4", 3.0, 1.5, 1.0, 2000.0)
    assert (zero.dropout, zero.loss, zero.latency_ms) == (0.2, 0.1, 120.0)
    assert task.simulation.rejoin_s == 3.0
    assert small_task().simulation.profiles[0].uplink_kbps == 0.0  # default: links not emulated
    assert pi4.trainer == "keras"  # default: devices train with Keras
    mixed = small_task(simulation={"profiles": [{"name": "k"}, {"name": "l", "trainer": "litert"}]})
    assert [p.trainer for p in mixed.simulation.profiles] == ["keras", "litert"]


@pytest.mark.parametrize("profiles, key", [
    ([{"name": "a", "uplink": 5}], "simulation.profiles[0].uplink"),
    ([{"name": "a"}, {"name": "b", "speed": 0}], "simulation.profiles[1].speed"),
    ([{"name": "a", "availability": 0}], "simulation.profiles[0].availability"),
    ([{"name": "a", "loss": 1.0}], "simulation.profiles[0].loss"),
    ([{"name": "a", "uplink_kbps": -1}], "simulation.profiles[0].uplink_kbps"),
    ([{"name": "a"}, {"name": "a"}], "names must be unique"),
    ([{"name": "a", "trainer": "torch"}], "simulation.profiles[0].trainer"),
    ([], "at least one"),
    ("fast", "array of tables"),
])
def test_bad_profiles_are_refused_naming_the_key(profiles, key):
    with pytest.raises(TaskError, match=key.replace("[", r"\[").replace("]", r"\]")):
        small_task(simulation={"profiles": profiles})


def test_same_seed_same_fleet_other_seed_other_fleet():
    section = small_task(simulation={"profiles": TIERS}).simulation
    a = draw_behaviours(section, range(500), seed=7)
    b = draw_behaviours(section, range(500), seed=7)
    c = draw_behaviours(section, range(500), seed=8)
    key = lambda fleet: [(x.profile.name, x.online, [x.drops_out(r, 1) for r in range(1, 6)]) for x in fleet]
    assert key(a) == key(b)
    assert key(a) != key(c)
    # A device's draw does not depend on which other devices a process holds (several hosts).
    assert key(draw_behaviours(section, range(250, 500), seed=7)) == key(a)[250:]


def test_tiers_availability_and_dropouts_follow_the_profiles():
    fleet = draw_behaviours(small_task(simulation={"profiles": TIERS}).simulation, range(4000), seed=1)
    zero = [b for b in fleet if b.profile.name == "pi-zero"]
    assert len(zero) / len(fleet) == pytest.approx(0.25, abs=0.03)  # weights 3:1
    assert all(b.online for b in fleet if b.profile.name == "pi4")
    assert np.mean([b.online for b in zero]) == pytest.approx(0.5, abs=0.05)
    assert np.mean([b.drops_out(r, 1) for b in zero for r in range(1, 11)]) == pytest.approx(0.2, abs=0.02)
    assert not any(b.drops_out(r, 1) for b in fleet if b.profile.name == "pi4" for r in range(1, 11))


def test_link_delay_is_latency_plus_size_over_bandwidth():
    rng = np.random.default_rng(0)
    assert Link(256.0, 0.05).delay_s(32_000, rng) == pytest.approx(0.05 + 1.0)
    assert Link(0.0, 0.02).delay_s(10**9, rng) == pytest.approx(0.02)  # bandwidth not emulated
    assert not Link().emulated and Link(loss=0.1).emulated


def test_lost_transmissions_are_sent_again_reproducibly():
    link = Link(1000.0, 0.0, loss=0.25)
    delays = [link.delay_s(1000, np.random.default_rng(3)) for _ in range(3)]
    assert delays[0] == delays[1] == delays[2]
    rng = np.random.default_rng(4)
    sends = [link.transmissions(rng) for _ in range(20_000)]
    assert min(sends) == 1 and np.mean(sends) == pytest.approx(1 / 0.75, rel=0.03)
    assert set(np.round([link.delay_s(1000, rng) / 0.008 for _ in range(50)], 6)) <= set(range(1, 100))


def test_device_id_ranges():
    assert parse_id_range("0-499", 1000) == range(0, 500)
    assert parse_id_range("7", 10) == range(7, 8)
    for bad in ("5-2", "0-1000", "a-b", "-3", ""):
        with pytest.raises(ValueError, match="device ids"):
            parse_id_range(bad, 1000)


def test_waiting_for_shared_simulator_resources_counts_as_simulator_time():
    """A simulated device's wait for a decoding thread and for the shared trainer is the simulator's
    (sim_wait_s, taken out of fleet time); its own training is not; a slower device computes longer."""
    import time

    from fedprune.edge_agent.device import TrainResult
    from fedprune.simulation.fleet.device import _TimedTrainer

    class SleepingTrainer:  # trains for 50 ms and says so, as KerasTrainer reports train_s
        def train(self, architecture, task, x, y):
            time.sleep(0.05)
            return TrainResult([], [], {"train_s": 0.05})

    enqueued = time.perf_counter() - 0.2  # queued 0.2 s for the trainer
    timed = _TimedTrainer(SleepingTrainer(), speed=2.0, enqueued=enqueued, waited_s=0.3)
    metrics = timed.train(None, None, None, None).metrics
    assert metrics["compute_s"] == 0.1 and timed.extra_s == pytest.approx(0.05)
    assert metrics["sim_wait_s"] == pytest.approx(0.3 + 0.2, abs=0.03)
    # at speed 1 the emulated time is the measured one: compute_s is not sent (the aggregator
    # takes train_s for it), five bytes less in every update
    same = _TimedTrainer(SleepingTrainer(), speed=1.0, enqueued=time.perf_counter()).train(None, None, None, None)
    assert "compute_s" not in same.metrics and set(same.metrics) == {"train_s", "sim_wait_s"}

"""The aggregator's device registry: waiting for devices, and for their presences to stop arriving."""

from __future__ import annotations

import threading
import time

import pytest

from fedprune.aggregator.registry import DeviceRegistry


def _presences(registry: DeviceRegistry, count: int, every_s: float,
               sent: list[float] | None = None) -> threading.Thread:
    def run() -> None:
        for i in range(count):
            registry.update(f"dev-{i}", True, 10)
            if sent is not None:
                sent.append(time.monotonic())
            time.sleep(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_waits_for_the_last_presence_of_a_burst_then_for_the_quiet_interval():
    registry = DeviceRegistry()
    sent: list[float] = []
    sender = _presences(registry, 20, 0.02, sent)  # a burst of retained presences, 0.4 s long
    assert registry.wait_for(3, 5.0) >= 3
    n = registry.wait_until_quiet(0.2, 10.0)
    done = time.monotonic()
    sender.join()
    assert n == 20 == len(registry.online())  # every device of the burst, not only the first few in
    assert done - sent[-1] >= 0.2 - 0.01  # it waited the quiet interval after the last presence


def test_an_endless_stream_of_presences_ends_the_wait_at_the_timeout():
    registry = DeviceRegistry()
    sender = _presences(registry, 60, 0.02)  # never quiet for 0.2 s while it lasts (about 1.2 s)
    started = time.monotonic()
    n = registry.wait_until_quiet(0.2, 0.5)
    waited = time.monotonic() - started
    assert 0.45 <= waited < 1.0 and 0 < n < 60
    sender.join()


def test_a_registry_already_quiet_returns_at_once():
    registry = DeviceRegistry()
    registry.update("dev-0", True, 10)
    time.sleep(0.15)
    started = time.monotonic()
    assert registry.wait_until_quiet(0.1, 5.0) == 1
    assert time.monotonic() - started < 0.05


def test_an_id_no_device_can_have_is_refused_and_never_known():
    """Device ids taken from topics obey the 128-byte rule too: an over-long one is not registered."""
    registry = DeviceRegistry()
    for bad in ("é" * 65, "a" * 129, "", "bad\nid"):
        with pytest.raises(ValueError, match="must be 1-128 bytes"):
            registry.update(bad, True, 10)
        assert not registry.known(bad)
    registry.update("a" * 128, True, 10)
    assert registry.known("a" * 128)


def test_a_simulation_waits_for_its_whole_fleet_when_its_device_processes_connect_apart():
    """Two device processes whose devices connect one second apart: without ``fleet_size`` round 1
    would draw from the first process's devices only (the presences go quiet in between)."""
    from fedprune.aggregator.registry import OtherFederations, wait_for_devices
    from fedprune.task import FederationSection

    fed = FederationSection(devices_per_round=5, min_devices=5, wait_for_devices_s=10)

    def two_processes(registry: DeviceRegistry) -> None:
        for first in (0, 10):
            for i in range(first, first + 10):
                registry.update(f"dev-{i}", True, 10)
            time.sleep(1.0)

    bare, whole = DeviceRegistry(), DeviceRegistry()
    threading.Thread(target=two_processes, args=(bare,), daemon=True).start()
    assert wait_for_devices(bare, OtherFederations("default"), fed) == 10
    threading.Thread(target=two_processes, args=(whole,), daemon=True).start()
    assert wait_for_devices(whole, OtherFederations("default"), fed, fleet_size=20) == 20

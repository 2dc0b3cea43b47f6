"""Which devices are known and online, from their retained presence messages."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from fedprune.converters.errors import CodecError
from fedprune.converters.protocol import Presence, Topics, valid_device_id
from fedprune.converters.log_rate import worth_logging
from fedprune.converters.text import one_line
from fedprune.names import ID_RULE

log = logging.getLogger(__name__)


@dataclass
class DeviceInfo:
    device_id: str
    online: bool
    num_samples: int
    last_seen: float
    last_offline: float = float("-inf")  # time.monotonic() of its last offline presence


class DeviceRegistry:
    """Thread-safe: presence arrives on the MQTT thread, the round loop reads it."""

    def __init__(self) -> None:
        self._devices: dict[str, DeviceInfo] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._last_update = time.monotonic()
        self.bad_presences = 0  # malformed presence messages ignored (counted on the network thread)

    def update(self, device_id: str, online: bool, num_samples: int) -> None:
        """Record a presence. ``ValueError`` for an id no device can have (it may come from a
        topic): such a device is never known, so its updates are refused as unknown."""
        if not valid_device_id(device_id):
            shown = f"{device_id[:64]!r}" + ("..." if len(device_id) > 64 else "")  # it may be 64 kB
            raise ValueError(f"device id {shown} must be {ID_RULE}")
        with self._lock:
            before = self._devices.get(device_id)
            last_offline = time.monotonic() if not online else (before.last_offline if before else float("-inf"))
            self._devices[device_id] = DeviceInfo(device_id, online, num_samples, time.time(), last_offline)
            self._last_update = time.monotonic()
            self._changed.notify_all()

    def online(self) -> list[str]:
        with self._lock:
            return sorted(d.device_id for d in self._devices.values() if d.online)

    def is_online(self, device_id: str) -> bool:
        with self._lock:
            info = self._devices.get(device_id)
            return bool(info and info.online)

    def went_offline_since(self, device_id: str, since: float) -> bool:
        """Whether the device is offline, or went offline after ``since`` (``time.monotonic()``),
        even if it is back: a device that dropped out mid-round."""
        with self._lock:
            info = self._devices.get(device_id)
            return info is None or not info.online or info.last_offline >= since

    def known(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    def wait_for(self, count: int, timeout_s: float) -> int:
        """Wait until ``count`` devices are online or the timeout passes; returns how many are."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                n = self._online_count()
                left = deadline - time.monotonic()
                if n >= count or left <= 0:
                    return n
                self._changed.wait(min(left, 1.0))

    def wait_until_quiet(self, quiet_s: float, timeout_s: float) -> int:
        """Wait until no presence has arrived for ``quiet_s`` (or ``timeout_s`` has passed); returns
        how many devices are online.

        A large fleet's retained presence messages reach a new aggregator over a second or more
        (about 1 s for 1,000 devices); a run that drew its first round as soon as enough were in
        would draw only from the first to arrive, and its first tasks would queue behind the rest.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                now = time.monotonic()
                quiet_for = now - self._last_update
                if quiet_for >= quiet_s or now >= deadline:
                    return self._online_count()
                self._changed.wait(min(quiet_s - quiet_for, deadline - now))

    def _online_count(self) -> int:  # the caller holds the lock
        return sum(d.online for d in self._devices.values())


def take_presence(registry: DeviceRegistry, topics: Topics, topic: str, payload: bytes) -> None:
    """Update ``registry`` from a presence message (an empty payload is a cleared retained
    presence: offline); a malformed one, or one for another device than its topic's, is logged
    and ignored."""
    try:
        device_id = topics.device_from_topic(topic)
        if not payload:
            registry.update(device_id, False, 0)
            return
        p = Presence.decode(payload)
        if p.device_id != device_id:
            log.warning("presence on %s claims device %s; ignored", topic, one_line(repr(p.device_id)))
            return
        registry.update(device_id, p.online, p.num_samples)
    except (CodecError, ValueError) as e:
        registry.bad_presences += 1
        if worth_logging(registry.bad_presences):
            log.warning("ignored bad presence message on %s: %s (%d so far)", one_line(topic), one_line(str(e)),
                        registry.bad_presences)

"""Which devices are known and online, and what each can train with, from their retained
presence messages; and which devices announce themselves on other federations of the same broker
(a federation id that does not match is the commonest reason a newcomer's aggregator waits for
devices that are there)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from fedprune.converters.errors import CodecError
from fedprune.converters.log_rate import worth_logging
from fedprune.converters.protocol import TOPIC_ROOT, Presence, Topics, valid_device_id
from fedprune.converters.text import one_line
from fedprune.names import ID_RULE

if TYPE_CHECKING:
    from fedprune.task import FederationSection

log = logging.getLogger(__name__)

# Before round 1: wait until no presence has arrived for this long (retained presences of a large
# fleet arrive over about a second), but no longer than the second figure.
PRESENCE_QUIET_S = 0.25
PRESENCE_SETTLE_MAX_S = 5.0


@dataclass
class DeviceInfo:
    device_id: str
    online: bool
    num_samples: int
    last_seen: float
    last_offline: float = float("-inf")  # time.monotonic() of its last offline presence
    trainer: str = "keras"  # what it trains with (converters.protocol.TRAINERS): "keras", "litert", "none"
    runtime: str = ""  # its TFLite runtime and version, "" if it named none
    agent_version: str = ""
    # The mask list the device holds, for values-only tasks ("" none); None: it takes
    # self-describing tasks only (it announced no mask digest: an older agent).
    mask_digest: str | None = None


class DeviceRegistry:
    """Thread-safe: presence arrives on the MQTT thread, the round loop reads it."""

    def __init__(self) -> None:
        self._devices: dict[str, DeviceInfo] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._last_update = time.monotonic()
        self.bad_presences = 0  # malformed presence messages ignored (counted on the network thread)

    def update(self, device_id: str, online: bool, num_samples: int, *, trainer: str = "keras", runtime: str = "",
               agent_version: str = "", mask_digest: str | None = None) -> None:
        """Record a presence. ``ValueError`` for an id no device can have (it may come from a
        topic): such a device is never known, so its updates are refused as unknown."""
        if not valid_device_id(device_id):
            shown = f"{device_id[:64]!r}" + ("..." if len(device_id) > 64 else "")  # it may be 64 kB
            raise ValueError(f"device id {shown} must be {ID_RULE}")
        with self._lock:
            before = self._devices.get(device_id)
            last_offline = time.monotonic() if not online else (before.last_offline if before else float("-inf"))
            self._devices[device_id] = DeviceInfo(device_id, online, num_samples, time.time(), last_offline,
                                                  trainer, runtime, agent_version, mask_digest)
            self._last_update = time.monotonic()
            self._changed.notify_all()

    def mask_digest(self, device_id: str) -> str | None:
        """The mask list ``device_id`` holds ("" none), or None if it takes no values-only task."""
        with self._lock:
            info = self._devices.get(device_id)
            return info.mask_digest if info else None

    def holds_masks(self, device_id: str, digest: str) -> None:
        """Record that ``device_id`` now holds the mask list ``digest`` ("" unknown: it is sent the
        masks again); nothing for a device that takes no values-only task."""
        with self._lock:
            info = self._devices.get(device_id)
            if info is not None and info.mask_digest is not None:
                info.mask_digest = digest

    def online(self) -> list[str]:
        with self._lock:
            return sorted(d.device_id for d in self._devices.values() if d.online)

    def devices(self) -> list[DeviceInfo]:
        """Every device that has announced itself, by id (copies)."""
        with self._lock:
            return [replace(self._devices[d]) for d in sorted(self._devices)]

    def online_devices(self) -> list[DeviceInfo]:
        """What is known of every online device (copies), in device id order."""
        with self._lock:
            return [replace(d) for _, d in sorted(self._devices.items()) if d.online]

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

    def wait_for(self, count: int, timeout_s: float, counts: Callable[[DeviceInfo], bool] | None = None) -> int:
        """Wait until ``count`` devices are online (of those ``counts`` accepts, if given) or the
        timeout passes; returns how many are."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                n = self._online_count(counts)
                left = deadline - time.monotonic()
                if n >= count or left <= 0:
                    return n
                self._changed.wait(min(left, 1.0))

    def wait_until_quiet(self, quiet_s: float = PRESENCE_QUIET_S, timeout_s: float = PRESENCE_SETTLE_MAX_S) -> int:
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

    def _online_count(self, counts: Callable[[DeviceInfo], bool] | None = None) -> int:  # the caller holds the lock
        return sum(d.online and (counts is None or counts(d)) for d in self._devices.values())


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
        registry.update(device_id, p.online, p.num_samples, trainer=p.trainer, runtime=p.runtime,
                        agent_version=p.agent_version, mask_digest=p.mask_digest)
    except (CodecError, ValueError) as e:
        registry.bad_presences += 1
        if worth_logging(registry.bad_presences):
            log.warning("ignored bad presence message on %s: %s (%d so far)", one_line(topic), one_line(str(e)),
                        registry.bad_presences)


class OtherFederations:
    """Devices online on other federations than ``own``, from presences the aggregator reads on
    an open broker (``FILTER``; a secured broker's connection files carry the federation, and its
    access policy would refuse the filter). Thread-safe; read only for hints."""

    FILTER = f"{TOPIC_ROOT}/+/presence/+"  # every federation's presences (its own among them)

    def __init__(self, own: str) -> None:
        self.own = own
        self._online: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def take(self, topic: str, payload: bytes) -> None:
        """Note a presence on another federation's topic (others, and malformed ones, are ignored)."""
        parts = topic.removeprefix(TOPIC_ROOT + "/").split("/")
        if not topic.startswith(TOPIC_ROOT + "/") or len(parts) != 3 or parts[1] != "presence" or parts[0] == self.own:
            return
        federation, device_id = parts[0], parts[2]
        try:
            online = bool(payload) and Presence.decode(payload).online
        except CodecError:
            return
        with self._lock:
            devices = self._online.setdefault(federation, set())
            (devices.add if online else devices.discard)(device_id)

    def seen(self) -> dict[str, list[str]]:
        """Federation -> its online devices, for those with any."""
        with self._lock:
            return {f: sorted(d) for f, d in sorted(self._online.items()) if d}

    def hint(self) -> str:
        """What to do when devices wait on another federation ("" when none were seen)."""
        seen = self.seen()
        if not seen:
            return ""
        where = "; ".join(f"'{f}' ({len(d)}: {', '.join(d[:5])}{', ...' if len(d) > 5 else ''})"
                          for f, d in seen.items())
        first = next(iter(seen))
        return (f"devices were seen announcing themselves on federation {where}, not on '{self.own}': "
                f"start those agents with --federation {self.own} (config: broker.federation), or set "
                f'[federation] id = "{first}" in the task file')


def wait_for_devices(registry: DeviceRegistry, others: OtherFederations, fed: FederationSection,
                     counts: Callable[[DeviceInfo], bool] | None = None, fleet_size: int | None = None) -> int:
    """Wait until ``fed.devices_per_round`` devices (those ``counts`` accepts, if given) are online
    or ``fed.wait_for_devices_s`` has passed, then until the presences stop coming in (round 1 is
    drawn from every device already there, not from the first presences in); how many are online.
    ``fleet_size`` (a simulation, which knows its devices): wait for that many too, within the same
    time, so that round 1 draws from the whole fleet, however its device processes raced. Devices
    seen on another federation meanwhile are named at WARNING once (the commonest reason none
    come). ``FederationError`` below ``fed.min_devices``, with the hint."""
    from fedprune.aggregator.run_folder import FederationError

    deadline, warned = time.monotonic() + fed.wait_for_devices_s, ""
    while True:
        n = registry.wait_for(fed.devices_per_round, min(1.0, max(0.0, deadline - time.monotonic())), counts)
        hint = others.hint()
        if hint and hint != warned and n < fed.devices_per_round:
            log.warning("waiting for devices on federation '%s': %s", fed.id, hint)
            warned = hint
        if n >= fed.devices_per_round or time.monotonic() >= deadline:
            break
    if fleet_size is not None:  # every device, whether it can train the task or not: they all connect
        online = registry.wait_for(fleet_size, max(0.0, deadline - time.monotonic()))
        if online < fleet_size:
            log.warning("%d of the simulation's %d devices online after %.0f s (federation.wait_for_devices_s): "
                        "starting with them", online, fleet_size, fed.wait_for_devices_s)
        n = registry.wait_for(0, 0.0, counts)  # of those, how many ``counts`` accepts, now
    if n < fed.min_devices:
        untrained = len(registry.online()) - n
        raise FederationError(
            f"only {n} device(s) online on federation '{fed.id}'"
            + (f" that can train ({untrained} more without a trainer)" if untrained else "")
            + f" after {fed.wait_for_devices_s:.0f} s; need at least federation.min_devices = {fed.min_devices}. "
            + (f"But {hint}." if hint else "Start more agents or lower min_devices."))
    return registry.wait_until_quiet()

"""Each simulated device's behaviour, drawn from the task's ``[simulation]`` section.

Everything a device does by chance comes from a generator seeded by ``(task seed, device index)``
(and the round for per-round decisions), never from the order in which things happen at run
time: the same seed gives every device the same tier, the same availability and the same
dropouts, whichever host or process runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprune.simulation.fleet.link import Link
from fedprune.task import DeviceProfile, SimulationSection

_BEHAVIOUR_STREAM = 1  # seed-sequence tags: independent streams for each use of one device's seed
_DROPOUT_STREAM = 2
_LINK_STREAM = 3


@dataclass(frozen=True)
class DeviceBehaviour:
    """What one simulated device is like."""

    index: int
    profile: DeviceProfile
    online: bool  # connects at all during this run (drawn from the profile's availability)
    seed: int

    @property
    def uplink(self) -> Link:
        p = self.profile
        return Link(p.uplink_kbps, p.latency_ms / 1000.0, p.loss)

    @property
    def downlink(self) -> Link:
        p = self.profile
        return Link(p.downlink_kbps, p.latency_ms / 1000.0, p.loss)

    def drops_out(self, round_: int, attempt: int) -> bool:
        """Whether the device goes offline after receiving this round's task."""
        if self.profile.dropout <= 0:
            return False
        rng = np.random.default_rng([self.seed, self.index, _DROPOUT_STREAM, round_, attempt])
        return bool(rng.random() < self.profile.dropout)

    def link_rng(self) -> np.random.Generator:
        """The generator for this device's retransmissions (one per device, in message order)."""
        return np.random.default_rng([self.seed, self.index, _LINK_STREAM])


def draw_behaviours(section: SimulationSection, indices: range | list[int], seed: int) -> list[DeviceBehaviour]:
    """The behaviour of each device index: its tier (by the profiles' weights) and availability."""
    weights = np.array([p.weight for p in section.profiles], float)
    weights /= weights.sum()
    out = []
    for i in indices:
        rng = np.random.default_rng([seed, i, _BEHAVIOUR_STREAM])
        profile = section.profiles[int(rng.choice(len(weights), p=weights))]
        online = bool(rng.random() < profile.availability)
        out.append(DeviceBehaviour(i, profile, online, seed))
    return out


def online_by_profile(section: SimulationSection, num_devices: int, seed: int) -> int:
    """How many of a ``num_devices`` fleet connect at all (``DeviceBehaviour.online``), whichever
    process simulates each: what the aggregator of a simulation waits for before round 1."""
    return sum(b.online for b in draw_behaviours(section, range(num_devices), seed))


def parse_id_range(text: str, num_devices: int) -> range:
    """``"0-499"`` (inclusive) or ``"7"`` into a range of device indices below ``num_devices``."""
    try:
        if "-" in text:
            lo_s, hi_s = text.split("-", 1)
            lo, hi = int(lo_s), int(hi_s)
        else:
            lo = hi = int(text)
    except ValueError:
        raise ValueError(f"device ids must look like 0-499 or 7, got {text!r}") from None
    if not 0 <= lo <= hi < num_devices:
        raise ValueError(f"device ids {text!r} must lie within 0-{num_devices - 1} "
                         f"(the fleet has --devices {num_devices})")
    return range(lo, hi + 1)

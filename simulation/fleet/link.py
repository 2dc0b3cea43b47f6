"""The emulated link between a device and the broker.

A message of ``n`` bytes over a link of ``kbps`` kbit/s with one-way latency ``L`` arrives
``L + 8 n / (1000 kbps)`` seconds after it is sent. Each transmission is lost with probability
``loss`` and sent again (as TCP would, under MQTT), so a message takes a geometric number of
transmissions, each paying the full delay. The bytes are the real encoded bytes of the message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Link:
    kbps: float = 0.0  # 0 = not emulated: only the latency is added
    latency_s: float = 0.0
    loss: float = 0.0

    def transmissions(self, rng: np.random.Generator) -> int:
        """How many times a message is sent until one gets through."""
        return 1 if self.loss <= 0 else int(rng.geometric(1.0 - self.loss))

    def delay_s(self, nbytes: int, rng: np.random.Generator) -> float:
        """Seconds from sending ``nbytes`` to their arrival, retransmissions included."""
        once = self.latency_s + (8.0 * nbytes / (1000.0 * self.kbps) if self.kbps > 0 else 0.0)
        return once * self.transmissions(rng)

    @property
    def emulated(self) -> bool:
        return self.kbps > 0 or self.latency_s > 0 or self.loss > 0

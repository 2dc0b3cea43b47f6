"""Memory for one round's decoded updates, allocated once and reused by every round.

A round holds every accepted update, decoded to float32, until it aggregates them: for the digits
model and 100 devices a round, 60 MB. Allocated afresh, that memory is first touched while the
round is open: 14,000 page faults in round 1 on the benchmark VM, about 0.1 s of the aggregator's
CPU taken from the updates it is decoding. Reserved (and written) before the first round, it costs
that once, up front, where a machine without the memory also fails at once instead of mid-round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


class UpdateMemoryError(RuntimeError):
    """The machine cannot hold a round's decoded updates; the message says what to lower."""


class UpdateBuffers:
    """``rows`` sets of float32 arrays, one per tensor of ``shapes``, to decode updates into.

    ``row(i)`` is the i-th set (C-contiguous views into one block), or None beyond the last.
    The caller gives each update of a round its own row and must be done with a round's updates
    before the next round writes the rows again.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        dims = [tuple(int(d) for d in s) for s in shapes]
        sizes = [int(np.prod(s)) for s in dims]
        try:
            self._block = np.empty((rows, sum(sizes)), dtype=np.float32)
            self._block.fill(0.0)  # touch every page now, not during a round
        except MemoryError:
            need = rows * sum(sizes) * 4 / 2**20
            raise UpdateMemoryError(
                f"cannot reserve {need:,.0f} MB for the decoded updates of a round ({rows} devices x "
                f"{sum(sizes) * 4 / 2**20:,.1f} MB): lower federation.devices_per_round, or run the aggregator "
                "on a machine with more memory") from None
        bounds = np.cumsum([0, *sizes])
        self._rows = [[self._block[r, a:b].reshape(s) for a, b, s in zip(bounds[:-1], bounds[1:], dims)]
                      for r in range(rows)]
        log.info("reserved %.1f MB for the decoded updates of a round (%d rows)", self._block.nbytes / 2**20, rows)

    @property
    def rows(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return int(self._block.nbytes)

    def row(self, i: int) -> list[np.ndarray] | None:
        return self._rows[i] if 0 <= i < len(self._rows) else None

"""The aggregator's reserved memory for a round's decoded updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.update_buffers import UpdateBuffers

SHAPES = [(3, 3, 1, 4), (4,), (36, 10), (10,)]


def test_rows_are_separate_contiguous_float32_arrays_of_the_shapes():
    buffers = UpdateBuffers(SHAPES, 3)
    assert buffers.rows == 3 and buffers.nbytes == 3 * 4 * sum(int(np.prod(s)) for s in SHAPES)
    rows = [buffers.row(i) for i in range(3)]
    for row in rows:
        assert [a.shape for a in row] == SHAPES
        assert all(a.dtype == np.float32 and a.flags.c_contiguous and not a.any() for a in row)
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            assert not any(np.shares_memory(x, y) for x in a for y in b)
    rows[0][2][...] = 1.0  # writing one tensor of one row touches nothing else
    assert rows[0][2].all() and not rows[0][3].any() and not rows[1][2].any()
    assert buffers.row(3) is None and buffers.row(-1) is None


def test_at_least_one_row():
    with pytest.raises(ValueError, match="rows"):
        UpdateBuffers(SHAPES, 0)


def test_a_round_the_machine_cannot_hold_says_what_to_lower():
    from fedprune.aggregator.update_buffers import UpdateMemoryError

    with pytest.raises(UpdateMemoryError, match=r"cannot reserve .* MB .*: lower federation.devices_per_round") as e:
        UpdateBuffers([(2**22, 2**22)], 4096)  # 256 PiB: beyond any address space
    assert "\n" not in str(e.value)

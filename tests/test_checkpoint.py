"""Tests for fedprune.aggregator.checkpoint: atomic checkpoints of the federation state."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.checkpoint import KEEP_LAST, FederationState, load_latest_checkpoint, save_checkpoint
from fedprune.fileio import atomic_write_bytes


def make_state(rounds: int, seed: int = 0) -> FederationState:
    rng = np.random.default_rng(seed + rounds)
    weights = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32),
               rng.normal(size=(2, 2, 2)).astype(np.float32)]
    masks = [rng.random((3, 4)) > 0.5, None, rng.random((2, 2, 2)) > 0.3]
    return FederationState(rounds, weights, masks, rng.bit_generator.state,
                           {"bytes_up": 1234.0 * rounds, "bytes_down": 5.5})


def assert_same_state(a: FederationState, b: FederationState) -> None:
    assert a.completed_rounds == b.completed_rounds
    assert len(a.weights) == len(b.weights)
    for x, y in zip(a.weights, b.weights):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for x, y in zip(a.masks, b.masks):
        assert (x is None and y is None) or (y is not None and y.dtype == bool and np.array_equal(x, y))
    assert a.rng_state == b.rng_state
    assert a.totals == b.totals


def test_round_trip_with_none_masks_and_rng_state(tmp_path):
    state = make_state(4)
    path = save_checkpoint(tmp_path, state)
    assert path.name == "round-00004.npz" and path.is_file()
    loaded = load_latest_checkpoint(tmp_path)
    assert_same_state(state, loaded)
    assert loaded.masks[1] is None
    # the restored rng continues exactly where the saved one was
    g1, g2 = np.random.default_rng(), np.random.default_rng()
    g1.bit_generator.state = state.rng_state
    g2.bit_generator.state = loaded.rng_state
    assert np.array_equal(g1.random(5), g2.random(5))


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    assert load_latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "round-1.npz").write_bytes(b"not matched")
    assert load_latest_checkpoint(tmp_path) is None


def test_only_last_three_kept_and_latest_loaded(tmp_path):
    for r in range(1, 7):
        save_checkpoint(tmp_path, make_state(r))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert KEEP_LAST == 3
    assert names == ["round-00004.npz", "round-00005.npz", "round-00006.npz"]
    assert_same_state(make_state(6), load_latest_checkpoint(tmp_path))


def test_newest_is_by_round_number_not_write_order(tmp_path):
    save_checkpoint(tmp_path, make_state(12))
    save_checkpoint(tmp_path, make_state(9))
    assert load_latest_checkpoint(tmp_path).completed_rounds == 12


def test_corrupted_newest_is_skipped(tmp_path):
    save_checkpoint(tmp_path, make_state(1))
    newest = save_checkpoint(tmp_path, make_state(2))
    newest.write_bytes(b"garbage, not an npz" * 10)
    assert_same_state(make_state(1), load_latest_checkpoint(tmp_path))


def test_newest_with_missing_weight_is_skipped(tmp_path):
    import io
    import json

    save_checkpoint(tmp_path, make_state(1))
    newest = save_checkpoint(tmp_path, make_state(2))
    meta = json.dumps({"completed_rounds": 2, "num_weights": 3, "rng_state": {}, "totals": {}})
    buf = io.BytesIO()
    np.savez(buf, w0=np.zeros(2), meta=np.frombuffer(meta.encode(), np.uint8))
    newest.write_bytes(buf.getvalue())
    assert load_latest_checkpoint(tmp_path).completed_rounds == 1


@pytest.mark.parametrize("damage", ["truncated", "bit-flip", "empty"])
def test_damaged_newest_is_skipped(tmp_path, damage):
    save_checkpoint(tmp_path, make_state(1))
    newest = save_checkpoint(tmp_path, make_state(2))
    raw = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(raw[: len(raw) // 2])
    elif damage == "bit-flip":
        start = raw.index(b"\x93NUMPY")  # the first stored array (.npy v1: u16 header length)
        i = start + 10 + int.from_bytes(raw[start + 8 : start + 10], "little") + 5  # in its data
        newest.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    else:
        newest.write_bytes(b"")
    state = load_latest_checkpoint(tmp_path)
    assert state is not None and state.completed_rounds == 1


def test_atomic_write_bytes_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "dir" / "file.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]
    save_checkpoint(tmp_path / "ck", make_state(1))
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["round-00001.npz"]


def test_atomic_write_bytes_failure_leaves_no_temp_file(tmp_path):
    target = tmp_path / "x"
    (target / "occupied").mkdir(parents=True)  # os.replace onto a non-empty directory fails
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_atomic_write_bytes_gives_a_secret_its_mode_from_the_start(tmp_path):
    import os

    target = tmp_path / "passwd"
    stale = tmp_path / f".passwd.tmp-{os.getpid()}"  # left by a crash, world-readable
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    atomic_write_bytes(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret" and target.stat().st_mode & 0o777 == 0o600
    assert not stale.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_file(tmp_path, bad):
    from fedprune.aggregator.checkpoint import CheckpointError

    save_checkpoint(tmp_path, make_state(1))
    diverged = make_state(2)
    diverged.weights[1][2] = bad
    path = save_checkpoint(tmp_path, diverged)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} holds NaN or infinite weights "
                                              r"\(tensor 1 of 3\).*moving this one away") as raised:
        load_latest_checkpoint(tmp_path)
    assert "\n" not in str(raised.value)
    path.rename(tmp_path / "diverged.npz")  # what the message says to do: the one before resumes
    assert load_latest_checkpoint(tmp_path).completed_rounds == 1


def test_a_resumed_run_issues_tasks_after_the_checkpointed_one_whatever_its_clock_says(tmp_path):
    """Devices refuse a task issued before the newest they took (an older one replayed): a resumed
    aggregator whose clock runs behind must still issue later tasks than its checkpoint's."""
    state = make_state(2)
    now = state.issue()
    assert state.issue() > now  # every task later than the one before
    ahead = now + 3_600 * 10**6  # issued by a process whose clock was an hour ahead
    state.issued_us = ahead
    save_checkpoint(tmp_path, state)
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded.issued_us == ahead
    assert loaded.issue() == ahead + 1  # the clock alone would have gone back an hour

"""``fedprune-simulate --processes P`` (issue 17): the fleet cut into device-id ranges, one child
process per range on a private Mosquitto, the aggregator in the parent; the children's counters
merged; a child that dies stops the run with a message that names it and its log."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.data import partition
from fedprune.simulation.processes import merge_counters, raise_open_files_limit, split_ranges
from tests.brokers import mosquitto_available

ROOT = Path(__file__).resolve().parent.parent
needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

TASK = """
seed = 1
[model]
factory = "fedprune.models:mlp"
[data]
dataset = "digits"
partition = "iid"
min_samples = 1
[federation]
id = "procs"
rounds = 2
devices_per_round = {per_round}
min_devices = {per_round}
round_timeout_s = {round_timeout_s}
wait_for_devices_s = 120
[training]
local_epochs = 1
batch_size = 16
learning_rate = 0.01
[pruning]
final_sparsity = 0.5
begin_round = 1
end_round = 2
[transport]
uplink_precision = "int8"
"""


def _simulate(tmp_path: Path, *args: str, per_round: int = 20, round_timeout_s: int = 120,
              sigint_ignored: bool = False) -> subprocess.Popen:
    """``sigint_ignored``: started as a shell script's background job is (``fedprune-simulate ... &``)."""
    task = tmp_path / "task.toml"
    task.write_text(TASK.format(per_round=per_round, round_timeout_s=round_timeout_s))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "fedprune.simulation.cli", "--task", str(task), "--no-progress",
                             "--run-dir", str(tmp_path / "run"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            preexec_fn=ignore)


# --- fast: the parts ---------------------------------------------------------------------------

def test_ranges_cover_the_fleet_in_order_without_overlap():
    assert split_ranges(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split_ranges(10_000, 4) == [range(k * 2500, (k + 1) * 2500) for k in range(4)]
    for n, p in [(1, 1), (7, 7), (41, 2), (9_999, 4)]:
        ranges = split_ranges(n, p)
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="cannot fill 5 device processes"):
        split_ranges(4, 5)
    with pytest.raises(ValueError, match="--processes must be >= 1"):
        split_ranges(4, 0)


def test_counters_of_the_processes_are_summed_and_kept():
    a = {"devices": 20, "online": 20, "updates_sent": 40, "send_errors": 0, "link_delay_s": 1.5, "peak_rss_kb": 10,
         "train_s_by_round": {"1": 1.0, "2": 2.0}}
    b = {"devices": 20, "online": 19, "updates_sent": 38, "send_errors": 1, "link_delay_s": 0.5, "peak_rss_kb": 12,
         "train_s_by_round": {"2": 0.5, "3": 1.0}}
    merged = merge_counters([a, b])
    assert {k: merged[k] for k in a} == {"devices": 40, "online": 39, "updates_sent": 78, "send_errors": 1,
                                         "link_delay_s": 2.0, "peak_rss_kb": 22,
                                         "train_s_by_round": {"1": 1.0, "2": 2.5, "3": 1.0}}
    assert merged["processes"] == [a, b]


def test_the_open_files_limit_is_raised_or_the_error_says_what_to_do():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_open_files_limit(min(soft, 64)) == soft  # enough already: left as it is
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(RuntimeError, match=r"ulimit -Hn"):
            raise_open_files_limit(hard + 1)


def test_sampling_with_replacement_gives_more_devices_than_samples_each_their_own_draw():
    y = np.arange(1437) % 10
    shards = partition(y, 10_000, "iid_with_replacement", seed=3, min_samples=2)
    assert len(shards) == 10_000 and all(len(set(s)) == len(s) == 2 for s in shards)
    again = partition(y, 10_000, "iid_with_replacement", seed=3, min_samples=2)
    assert all((a == b).all() for a, b in zip(shards, again))  # every process draws the same fleet
    # Few devices: each gets n // devices distinct samples (shared with others, unlike "iid").
    assert {len(s) for s in partition(y, 100, "iid_with_replacement", seed=0)} == {14}


def test_processes_refuse_the_embedded_broker_beyond_what_it_serves(tmp_path):
    proc = _simulate(tmp_path, "--devices", "500", "--processes", "2", "--broker", "embedded")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "the embedded broker serves up to 200 devices" in out, out


# --- real processes on a private Mosquitto -------------------------------------------------------

@needs_mosquitto
def test_two_device_processes_and_the_aggregator_account_for_every_update(tmp_path):
    started = time.monotonic()
    proc = _simulate(tmp_path, "--devices", "40", "--processes", "2", "--broker", "mosquitto")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "40 devices in 2 processes (0-19, 20-39)" in out and "private Mosquitto" in out
    assert "device process 1: 20 of devices 20-39 online" in out and "(2 of 2 processes ready)" in out, out
    run = tmp_path / "run"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert [(r["selected"], r["reported"], r["rejected"], r["offline"], r["lost"]) for r in rounds] == \
        [(20, 20, 0, 0, 0)] * 2
    fleet = json.loads((run / "fleet.json").read_text())
    assert (fleet["devices"], fleet["online"], fleet["updates_sent"], fleet["send_errors"]) == (40, 40, 40, 0)
    assert [p["devices"] for p in fleet["processes"]] == [20, 20] and fleet["peak_rss_kb"] > 0
    assert set(fleet["train_s_by_round"]) == {"1", "2"} and 0 < fleet["train_s"] < sum(r["wall_s"] for r in rounds) * 2
    assert "running devices 0-19 of 40" in (run / "devices-0.log").read_text()
    assert "devices in 2 processes" in (run / "report.md").read_text()
    print(f"two processes, 40 devices, 2 rounds: {time.monotonic() - started:.1f} s")
    # The same run as one process gives: round 1 drew 20 of all 40 devices, not of the first process's
    from fedprune.simulation.cli import run_simulation
    from fedprune.task import load_task

    one = run_simulation(load_task(tmp_path / "task.toml"), 40, tmp_path / "one", export_tflite=False)
    assert [r.accuracy for r in one.rounds] == [r["accuracy"] for r in rounds]


@needs_mosquitto
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "background-job"])
def test_a_device_process_that_dies_stops_the_run_and_is_named(tmp_path, sigint_ignored):
    # One device per round more than the fleet holds: the first round waits for devices until one
    # of the device processes is killed. The run stops through SIGINT, which a background job of
    # a shell script starts with ignored (it hung there until the round's deadline).
    proc = _simulate(tmp_path, "--devices", "8", "--processes", "2", "--broker", "mosquitto", per_round=8,
                     round_timeout_s=300, sigint_ignored=sigint_ignored)
    log = tmp_path / "run" / "devices-1.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "running devices" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    time.sleep(1.0)
    child = _child_pid(proc.pid, "--device-ids 4-7")
    os.kill(child, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "device process 1 (devices 4-7) was killed by signal 9" in out and str(log) in out, out
    assert _child_pid(proc.pid, "--device-ids 0-3", missing_ok=True) is None  # the other one stopped too


def _child_pid(parent: int, needle: str, missing_ok: bool = False) -> int | None:
    """The child of ``parent`` whose command line holds ``needle``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and needle in cmdline:
            return int(entry.name)
    if missing_ok:
        return None
    raise AssertionError(f"no child of {parent} runs {needle!r}")


def test_tensorflow_is_seeded_per_task_only_for_models_with_random_layers():
    # tf.random.set_seed clears TensorFlow's kernel cache: 0.1 s per traced call after it.
    from tensorflow.python.eager import context

    from fedprune.edge_agent.trainer import _seed_task, _wrap
    from fedprune.keras_setup import keras
    from fedprune.models import architecture_of

    plain = _wrap(architecture_of(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])))
    noisy = _wrap(architecture_of(keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5),
                                                    keras.layers.Dense(2)])))
    assert (plain.random_layers, noisy.random_layers) == (False, True)
    keras.utils.set_random_seed(1)
    _seed_task(plain, 7)
    assert context.global_seed() == 1 and np.random.get_state()[1][0] == np.random.RandomState(7).get_state()[1][0]
    _seed_task(noisy, 7)
    assert context.global_seed() == 7


def test_equal_task_payloads_received_by_many_devices_are_held_once():
    from fedprune.simulation.fleet.shared_tasks import SharedTasks

    tasks = SharedTasks()
    first = bytes(range(256)) * 64
    copy = bytes(bytearray(first))
    assert copy is not first and tasks.intern(copy) is copy
    assert tasks.intern(bytes(bytearray(first))) is copy  # the one held already
    other = first[:-1] + b"x"  # same length, other bytes: itself
    assert tasks.intern(other) is other
    small = b"presence"
    assert tasks.intern(small) is small


def test_child_environment_sizes_tensorflow_pools_to_each_process_share(monkeypatch):
    from fedprune.simulation.processes import child_environment

    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env = child_environment(4)
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"]) == ("2", "2")
    assert child_environment(16)["TF_NUM_INTRAOP_THREADS"] == "1"  # more processes than cores: one each
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")  # the user's setting wins
    assert child_environment(4)["TF_NUM_INTRAOP_THREADS"] == "3"

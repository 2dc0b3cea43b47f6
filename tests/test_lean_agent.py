"""The lean agent as a device runs it: ``fedprune-agent`` processes, a real Mosquitto, real
TensorFlow in the training child, and SIGKILL at the worst moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_helpers import small_mlp_task, training_child_pid, wait_for, write_digits_npz
from federation_helpers import Spy
from fedprune.converters.protocol import Topics, decode_update, encode_task
from fedprune.edge_agent.budgets import rss_mb
from fedprune.edge_agent.model_store import ModelStore
from signing_helpers import VERIFY_KEY, signed

ROOT = Path(__file__).resolve().parents[1]
TOPICS = Topics("default")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _start_agent(url: str, tmp_path: Path, *extra: str) -> subprocess.Popen:
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "fedprune.edge_agent.cli", "run", "--broker", url, "--device-id", "pi-01",
         "--data", str(tmp_path / "local.npz"), "--state-dir", str(tmp_path / "state"), "--log-level", "INFO",
         "--aggregator-key", VERIFY_KEY.text, *extra],
        cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _send_round(spy: Spy, round_: int):
    arch, task = small_mlp_task(sparsity=0.8, round_=round_)
    spy.client.publish(TOPICS.architecture, signed(TOPICS.architecture, arch.encode()), qos=1,
                       retain=True).wait_for_publish(5)
    spy.client.publish(TOPICS.task("pi-01"), signed(TOPICS.task("pi-01"), encode_task(task, arch.names)), qos=1,
                       retain=True).wait_for_publish(5)
    return arch, task


def _update(spy: Spy, arch, task, timeout_s: float, log: Path):
    def arrived():
        for _, payload in spy.on("/update"):
            update = decode_update(payload, arch.shapes, task.masks, 1 << 24, names=arch.names)
            if update.round == task.round:
                return update
        return None

    return wait_for(arrived, timeout_s, f"the update of round {task.round}", log)


def _stop(agent: subprocess.Popen) -> int:
    agent.send_signal(signal.SIGTERM)
    try:
        return agent.wait(30)
    except subprocess.TimeoutExpired:
        agent.kill()
        raise


def _mapped_tensorflow(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f if "tensorflow" in line})


def test_a_round_on_the_lean_agent(mosquitto_url, tmp_path):
    write_digits_npz(tmp_path / "local.npz", n=300)
    spy = Spy(mosquitto_url, [f"{TOPICS.root}/#"])
    agent = _start_agent(mosquitto_url, tmp_path, "--max-round-s", "180")
    try:
        wait_for(lambda: spy.on("/presence/pi-01"), 30, "the agent's presence", tmp_path / "agent.log")
        arch, task = _send_round(spy, 1)
        update = _update(spy, arch, task, 180, tmp_path / "agent.log")
        assert not update.error and update.num_samples == 300 and update.tensors is not None
        assert update.metrics["train_peak_rss_mb"] > 300  # TensorFlow ran, in the child
        # The agent itself never mapped a TensorFlow library and stays small: TensorFlow in the parent
        # would be 300+ MB. The idle target (60 MB) is bench_edge.py's to measure; mid-round the agent
        # holds the task and the update too (55-61 MB seen), so this bound leaves room for that.
        assert _mapped_tensorflow(agent.pid) == []
        assert rss_mb(agent.pid) < 100
        store = ModelStore(tmp_path / "state" / "model")
        installed = wait_for(store.current, 120, "the round's model to be installed", tmp_path / "agent.log")
        assert installed.round == 1 and installed.precision == "int8"
        assert _stop(agent) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        spy.close()


def test_sigkill_mid_round_then_restart_finishes_the_round(mosquitto_url, tmp_path):
    write_digits_npz(tmp_path / "local.npz", n=300)
    state = tmp_path / "state"
    spy = Spy(mosquitto_url, [f"{TOPICS.root}/#"])
    agent = _start_agent(mosquitto_url, tmp_path)
    try:
        wait_for(lambda: spy.on("/presence/pi-01"), 30, "the agent's presence", tmp_path / "agent.log")
        arch, task = _send_round(spy, 1)
        child = wait_for(lambda: training_child_pid(state), 60, "the training child", tmp_path / "agent.log")
        time.sleep(2.0)  # inside TensorFlow's import or fit
        agent.send_signal(signal.SIGKILL)  # a power cut, as far as the agent can tell
        agent.wait(10)
        # The child dies with its agent (PR_SET_PDEATHSIG), not holding 600 MB for nothing.
        wait_for(lambda: not Path(f"/proc/{child}").exists() or
                  (Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"), 10, "the orphaned child to die")
        assert not spy.on("/update")

        agent = _start_agent(mosquitto_url, tmp_path)  # restart: the task is still retained
        update = _update(spy, arch, task, 180, tmp_path / "agent.log")
        assert not update.error and update.tensors is not None
        store = ModelStore(state / "model")
        assert wait_for(store.current, 120, "the model install", tmp_path / "agent.log").round == 1
        assert _stop(agent) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        spy.close()

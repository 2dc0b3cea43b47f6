"""A federation id that does not match is named on both sides: the aggregator's wait (and its
error) says which federations devices were seen announcing themselves on, and the agent's log says
which federation an aggregator announces. The aggregator also starts quietly (none of TensorFlow's
loading noise) and says what it waits for every 10 s."""

from __future__ import annotations

import logging
import subprocess
import time

from federation_helpers import Spy
from fleet import ENV, command

from fedprune.converters.protocol import Presence, Topics
from signing_helpers import VERIFY_KEY

TASK = """
seed = 1
[model]
factory = "fedprune.models:mlp"
[data]
dataset = "breast_cancer"
[federation]
id = "newuser"
rounds = 1
devices_per_round = 2
min_devices = 2
wait_for_devices_s = 12
"""
NOISE = ("absl::InitializeLog", "cuInit", "cudart_stub", "oneDNN custom operations", "cuda drivers")


def test_the_aggregator_names_the_federation_its_devices_wait_on_and_starts_quietly(mosquitto_url, tmp_path):
    """With [federation] id = "newuser" and agents started as the README showed (no --federation),
    the aggregator said "only 0 device(s) online" after 180 s, with no hint about --federation."""
    default = Topics("default")
    spy = Spy(mosquitto_url, [])
    try:
        spy.ready.wait(10)
        for device in ("pi-01", "pi-02"):  # two agents on federation 'default', as retained presences
            spy.client.publish(default.presence(device), Presence(device, True, 100).encode(), qos=1,
                               retain=True).wait_for_publish(5)
        task = tmp_path / "task.toml"
        task.write_text(TASK)
        started = time.monotonic()
        proc = subprocess.run(command("fedprune-aggregator", "fedprune.aggregator.cli")
                              + ["--task", str(task), "--broker", mosquitto_url, "--run-dir", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=180, env=ENV)
    finally:
        for device in ("pi-01", "pi-02"):
            spy.client.publish(default.presence(device), b"", qos=1, retain=True).wait_for_publish(5)
        spy.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    hint = ("devices were seen announcing themselves on federation 'default' (2: pi-01, pi-02), not on 'newuser': "
            "start those agents with --federation newuser (config: broker.federation), or set "
            '[federation] id = "default" in the task file')
    assert f"only 0 device(s) online on federation 'newuser' after 12 s; need at least federation.min_devices = 2. " \
           f"But {hint}." in proc.stderr
    assert f"WARNING fedprune.aggregator.registry: waiting for devices on federation 'newuser': {hint}" in proc.stderr
    assert "(agents: --federation newuser)" in proc.stdout
    # Every quiet stretch said what it waited for (12 s of waiting: at least one notice).
    assert "INFO fedprune.aggregator.cli: waiting for devices on federation 'newuser': 0 of 2 online" in proc.stderr
    assert not [line for line in out.splitlines() if any(n in line for n in NOISE)], out
    assert "Traceback" not in out and time.monotonic() - started < 170


class _NoTrainer:
    def train(self, *args):  # pragma: no cover - never selected here
        raise AssertionError("not selected")


def test_the_agent_names_the_federation_an_aggregator_announces(embedded_broker_url, caplog):
    from fedprune.edge_agent.agent import EdgeAgent

    caplog.set_level(logging.INFO)
    other = Topics("newuser")
    spy = Spy(embedded_broker_url, [])
    spy.ready.wait(10)
    spy.client.publish(other.architecture, b'{"an": "architecture"}', qos=1, retain=True).wait_for_publish(5)
    agent = EdgeAgent(embedded_broker_url, "pi-01", None, None, _NoTrainer(), aggregator_key=VERIFY_KEY,
                      num_samples=10).start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "newuser" not in agent.aggregators_seen:
            time.sleep(0.05)
        agent.check_federation(settle_s=0)
        agent.check_federation(settle_s=0)  # said once, not every second
        hint = ("no aggregator has announced federation 'default' on this broker, but one announces federation "
                "'newuser': start the agent with --federation newuser (config: broker.federation)")
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [f"pi-01: {hint}"]
        assert agent.activity() == (f"pi-01: waiting for the aggregator of federation 'default' to announce its "
                                    f"model; {hint}")
    finally:
        agent.stop()
        spy.client.publish(other.architecture, b"", qos=1, retain=True).wait_for_publish(5)
        spy.close()


def test_whatever_the_agents_worker_thread_raises_is_logged_with_its_traceback(caplog):
    from concurrent.futures import ThreadPoolExecutor

    from fedprune.edge_agent.agent import _log_failure

    def fails():
        raise TypeError("a defect")

    caplog.set_level("INFO")
    with ThreadPoolExecutor(1) as pool:
        pool.submit(fails).add_done_callback(_log_failure)
        pool.submit(lambda: None).add_done_callback(_log_failure)  # nothing to say
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "TypeError: a defect" in errors[0].getMessage() and errors[0].exc_info is not None

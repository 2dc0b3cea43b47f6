"""The three commands as a user runs them: real processes, a real Mosquitto, Ctrl-C and --resume."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time

import numpy as np
import pytest

from fedprune.data import load_dataset, partition
from fleet import ENV, command, read_until

TASK = """
seed = 1
[model]
factory = "fedprune.models:digits_cnn"
[data]
dataset = "digits"
[federation]
rounds = 3
devices_per_round = 2
min_devices = 2
round_timeout_s = 60
wait_for_devices_s = 90
[training]
local_epochs = 3
learning_rate = 0.003
[pruning]
final_sparsity = 0.5
begin_round = 1
end_round = 2
leave_dense = ["logits"]
"""


def test_bad_task_file_is_rejected_with_the_key_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TASK.replace("final_sparsity = 0.5", "final_sparsity = 1.5"))
    proc = subprocess.run(command("fedprune-aggregator", "fedprune.aggregator.cli") + ["--task", str(bad)],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2
    assert "pruning.final_sparsity" in proc.stderr
    bad.write_text(TASK + "\n[transport]\nuplink = 'int8'\n")
    proc = subprocess.run(command("fedprune-simulate", "fedprune.simulation.cli") + ["--task", str(bad)],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2
    assert "transport.uplink" in proc.stderr
    # A strategy name only the aggregator's registry knows is checked as the task loads, too.
    bad.write_text(TASK + "\n[aggregation]\nmethod = 'mean_of_best'\n")
    proc = subprocess.run(command("fedprune-aggregator", "fedprune.aggregator.cli") + ["--task", str(bad)],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2
    assert f"{bad}: aggregation.method 'mean_of_best' is not a registered strategy" in proc.stderr


def test_aggregator_and_agents_as_processes_with_ctrl_c_kill_9_and_resume(mosquitto_url, tmp_path):
    from fedprune.aggregator_key import write_key_pair

    task_file = tmp_path / "task.toml"
    task_file.write_text(TASK)
    ds = load_dataset("digits", seed=1)
    # The agents start first (as on a fleet whose devices run all the time): they are given the
    # public key of the key the aggregator will sign with.
    key = write_key_pair(tmp_path / "aggregator.key")
    agents = []
    for i, idx in enumerate(partition(ds.y_train, 2, "iid", seed=1)):
        data = tmp_path / f"device{i}.npz"
        np.savez(data, x_train=ds.x_train[idx], y_train=ds.y_train[idx])
        agents.append(subprocess.Popen(
            command("fedprune-agent", "fedprune.edge_agent.cli")
            + ["--broker", mosquitto_url, "--device-id", f"pi-{i:02d}", "--data", str(data),
               "--state-dir", str(tmp_path / f"state{i}"), "--aggregator-key", str(tmp_path / "aggregator.pub")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV))
    run_dir = tmp_path / "run"
    aggregator_cmd = command("fedprune-aggregator", "fedprune.aggregator.cli") + [
        "--task", str(task_file), "--broker", mosquitto_url, "--signing-key", str(tmp_path / "aggregator.key"),
        "--run-dir", str(run_dir)]
    try:
        agg = subprocess.Popen(aggregator_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        first = read_until(agg, "round   1", 240)
        assert any(f"--aggregator-key {key.public.text}" in line for line in first)
        assert "devices   2/2" in first[-1]
        agg.send_signal(signal.SIGINT)  # Ctrl-C during round 2
        out, _ = agg.communicate(timeout=60)
        assert agg.returncode == 130, out
        assert (run_dir / "checkpoints" / "round-00001.npz").is_file()
        # The hint is the command that continues the run, as given (the broker kept), pasted as is.
        hint = out.split("interrupted after round 1; continue with:\n", 1)[1].splitlines()[0]
        pasted = shlex.split(hint)
        assert pasted[0] == "fedprune-aggregator" and pasted[-3:] == ["--run-dir", str(run_dir), "--resume"]
        assert pasted[1:-3] == aggregator_cmd[len(command("fedprune-aggregator", "fedprune.aggregator.cli")):-2]
        resume_cmd = command("fedprune-aggregator", "fedprune.aggregator.cli") + pasted[1:]

        # Resumed, then SIGKILLed (no handler runs, nothing is flushed) while round 3 trains.
        agg = subprocess.Popen(resume_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        lines = read_until(agg, "round   2", 240)
        assert [l.split()[1] for l in lines if l.startswith("round")] == ["2"]  # continued, round 1 not redone
        time.sleep(0.5)
        agg.send_signal(signal.SIGKILL)
        agg.communicate(timeout=30)
        assert (run_dir / "checkpoints" / "round-00002.npz").is_file()

        resumed = subprocess.run(resume_cmd, capture_output=True, text=True, timeout=300, env=ENV)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        rounds = [l for l in resumed.stdout.splitlines() if l.startswith("round")]
        assert [l.split()[1] for l in rounds] == ["3"]  # round 2 was checkpointed, round 3 (open at the kill) redone
        assert "sparsity 0.500" in rounds[-1]
        assert "exported" in resumed.stdout and (run_dir / "model-int8.tflite").is_file()
        metrics = [json.loads(m) for m in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in metrics] == [1, 2, 3]  # each round recorded once
        # Devices that had trained the open round answered the resumed aggregator with the same
        # update (its copies dropped as redeliveries): nothing rejected, no round trained twice.
        assert [m["rejected"] for m in metrics] == [0, 0, 0], [m["rejections"] for m in metrics]
        again = subprocess.run(resume_cmd, capture_output=True, text=True, timeout=120, env=ENV)
        assert again.returncode == 0 and "finished already: 3 rounds" in again.stdout, again.stdout + again.stderr
        fresh = subprocess.run(aggregator_cmd, capture_output=True, text=True, timeout=120, env=ENV)
        assert fresh.returncode == 2 and "already holds a run" in fresh.stderr and "--resume" in fresh.stderr
        # int8 uplink: each agent kept its quantization residual on disk for the next round
        assert all((tmp_path / f"state{i}" / "error_feedback.npz").is_file() for i in range(2))
    finally:
        for p in agents:
            p.send_signal(signal.SIGINT)
        for p in agents:
            try:
                out, _ = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            assert p.returncode == 0, out
            trained = json.loads(out.strip().splitlines()[-1].split("stopped after rounds ", 1)[1])
            assert len(trained) == len(set(trained)), out  # no round trained twice


def test_init_broker_command_and_connection_files_on_both_commands(tmp_path, capsys):
    from fedprune.aggregator.cli import main as aggregator_main
    from brokers import mosquitto_available
    from fedprune.edge_agent.cli import main as agent_main

    if not mosquitto_available():
        pytest.skip("init-broker needs mosquitto_passwd")
    out = tmp_path / "broker"
    assert aggregator_main(["init-broker", "--out", str(out), "--federation", "clinic", "--device-count", "2",
                            "--host", "laptop.local", "--port", "8884"]) == 0
    assert "mosquitto -c" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "devices").iterdir()) == ["device-01", "device-02"]
    device_file = (out / "devices" / "device-01" / "connection.toml").read_text()
    assert 'url = "mqtts://laptop.local:8884"' in device_file
    # the aggregator's signing key, private beside its connection file, public in every device's
    from fedprune.aggregator_key import load_signing_key

    key = load_signing_key(out / "aggregator.key")
    assert (out / "aggregator.key").stat().st_mode & 0o777 == 0o600
    assert f'aggregator_key = "{key.public.text}"' in device_file
    assert 'signing_key = "aggregator.key"' in (out / "aggregator.toml").read_text()
    assert aggregator_main(["init-broker", "--out", str(out), "--devices", "x"]) == 2  # never overwrites
    assert "already holds a broker set-up" in capsys.readouterr().err

    task = tmp_path / "task.toml"
    task.write_text(TASK)  # federation 'default', not 'clinic'
    assert aggregator_main(["--task", str(task), "--connection", str(out / "aggregator.toml")]) == 2
    assert "federation 'clinic'" in capsys.readouterr().err
    assert aggregator_main(["--task", str(task), "--connection", str(out / "devices/device-01/connection.toml")]) == 2
    assert "aggregator needs aggregator.toml" in capsys.readouterr().err
    assert agent_main(["--connection", str(out / "aggregator.toml"), "--data", "x.npz"]) == 2
    assert "not a device's" in capsys.readouterr().err
    assert agent_main(["--data", "x.npz"]) == 2  # neither --connection nor --broker/--device-id
    assert "broker.url is required" in capsys.readouterr().err

    # --broker-dir: the embedded broker with TLS, the logins and the policy; the aggregator logs in
    # with aggregator.toml, then finds no device online within the second it waits.
    task.write_text(TASK.replace("wait_for_devices_s = 90", 'wait_for_devices_s = 1\nid = "clinic"'))
    assert aggregator_main(["--task", str(task), "--broker-dir", str(out), "--port", "0",
                            "--run-dir", str(tmp_path / "run")]) == 1
    captured = capsys.readouterr()
    assert "broker mqtts://127.0.0.1:" in captured.out
    assert "only 0 device(s) online" in captured.err, captured.err

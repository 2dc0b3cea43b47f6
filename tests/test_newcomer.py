"""A newcomer's path, scripted (issue 18's first target): README's two commands, then an
aggregator and three agents, each in its own process, with the user's own task, data (CSV) and
model (a module the test writes), to a model installed on every device: no traceback, and no
process silent for more than 10 s while it waits (every quiet stretch gets a line saying what for).

README's two commands are not run again (they are how this test came to run): their essence is
checked instead, the package installed with its commands, and the test command in the README.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from brokers import free_port
from fleet import ENV, command

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 2
SILENCE_LIMIT_S = 11.0  # the notices come after 10 s of silence; a second for their tick and the pipe

MODEL = '''
"""The newcomer's own model: a function (input_shape, num_classes) -> an uncompiled tf-keras model
whose last layer gives logits."""
from fedprune.keras_setup import keras


def clinic_mlp(input_shape, num_classes):
    return keras.Sequential([
        keras.layers.Input(shape=input_shape),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(num_classes, name="logits"),
    ])
'''

TASK = f"""
seed = 7
[model]
factory = "clinic_models:clinic_mlp"
[data]
dataset = "csv"
path = "heldout.csv"
label_column = "diagnosis"
test_fraction = 0.5
[federation]
id = "clinic"
rounds = {ROUNDS}
devices_per_round = 3
min_devices = 3
round_timeout_s = 240
wait_for_devices_s = 120
[training]
local_epochs = 2
batch_size = 16
learning_rate = 0.01
[pruning]
final_sparsity = 0.5
begin_round = 1
end_round = {ROUNDS}
leave_dense = ["logits"]
"""


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([*(f"f{i}" for i in range(x.shape[1])), "diagnosis"])
    rows = [",".join([*(f"{v:.5f}" for v in row), str(int(label))]) for row, label in zip(x, y)]
    path.write_text("\n".join([header, *rows]) + "\n")


class Output:
    """A process's output lines, each with the time it arrived (stdout and stderr together)."""

    def __init__(self, name: str, proc: subprocess.Popen) -> None:
        self.name, self.proc = name, proc
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def longest_silence(self, until: float) -> tuple[float, str]:
        """The longest stretch without a line from the first line to ``until``, and the line it ended at."""
        times = [t for t, _ in self.lines if t <= until] + [until]
        gaps = [(b - a, i) for i, (a, b) in enumerate(zip(times, times[1:]))]
        gap, i = max(gaps) if gaps else (0.0, 0)
        return gap, self.lines[i][1] if i < len(self.lines) else "(the end)"

    def join(self) -> None:
        self._thread.join(timeout=30)


def final_models_installed(states: list[Path], exported: Path) -> list[bool]:
    """Whether each device has installed the federation's final model: the very file the
    aggregator exported (its sha256), marked final in the device's model store."""
    from fedprune.edge_agent.model_store import ModelStore

    sha256 = hashlib.sha256(exported.read_bytes()).hexdigest()
    out = []
    for state in states:
        current = ModelStore(state / "model").current() if (state / "model").is_dir() else None
        out.append(current is not None and current.final and current.sha256 == sha256)
    return out


def test_readme_commands_hold_and_the_package_is_installed():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[:2] == ["bash scripts/setup.sh && .venv/bin/fedprune-simulate --task examples/digits.toml --devices 20",
                          'bash scripts/setup.sh dev && .venv/bin/python -m pytest -m "not slow"']
    scripts = {e.name for e in metadata.distribution("fedprune").entry_points if e.group == "console_scripts"}
    assert scripts == {"fedprune-aggregator", "fedprune-agent", "fedprune-simulate"}
    assert all((Path(sys.executable).parent / name).exists() for name in scripts)


@pytest.mark.slow
def test_a_newcomer_runs_an_aggregator_and_three_agents_with_their_own_task_data_and_model(tmp_path):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = ((data.data - data.data.mean(0)) / data.data.std(0)).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    _write_csv(tmp_path / "heldout.csv", x[order[:160]], data.target[order[:160]])
    devices = [f"clinic-{i}" for i in range(1, 4)]
    for i, part in enumerate(np.array_split(order[160:], 3)):
        _write_csv(tmp_path / f"{devices[i]}.csv", x[part], data.target[part])
    (tmp_path / "clinic_models.py").write_text(MODEL)
    (tmp_path / "task.toml").write_text(TASK)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}:{ENV['PYTHONPATH']}"}
    port = free_port()

    def start(name: str, args: list[str]) -> Output:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
        return Output(name, proc)

    from fedprune.aggregator_key import write_key_pair

    write_key_pair(tmp_path / "aggregator.key")  # the agents trust its public half, aggregator.pub
    aggregator = start("aggregator", command("fedprune-aggregator", "fedprune.aggregator.cli")
                       + ["--task", "task.toml", "--port", str(port), "--run-dir", "run",
                          "--signing-key", "aggregator.key"])
    agents = [start(d, command("fedprune-agent", "fedprune.edge_agent.cli")
                    + ["--broker", f"mqtt://127.0.0.1:{port}", "--device-id", d, "--data", f"{d}.csv",
                       "--label-column", "diagnosis", "--federation", "clinic", "--state-dir", f"state/{d}",
                       "--aggregator-key", "aggregator.pub"])
              for d in devices]
    try:
        assert aggregator.proc.wait(timeout=540) == 0, aggregator.text()
        states, exported = [tmp_path / "state" / d for d in devices], tmp_path / "run" / "model-int8.tflite"
        deadline = time.monotonic() + 60  # the final model is retained: each agent installs it as it comes
        while not all(final_models_installed(states, exported)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stopped = time.monotonic()
        for agent in agents:
            agent.proc.send_signal(signal.SIGINT)
        for agent in agents:
            try:
                agent.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
        for p in [aggregator, *agents]:
            p.join()
    outputs = [aggregator, *agents]
    for p in outputs:  # kept beside the run, for whoever reads a failure
        (tmp_path / f"{p.name}.log").write_text("".join(f"{t - aggregator.lines[0][0]:7.2f} {line}\n"
                                                        for t, line in p.lines))
    for p in outputs:
        assert "Traceback" not in p.text(), f"{p.name}:\n{p.text()}"
    assert all(a.proc.returncode == 0 for a in agents), [a.text()[-2000:] for a in agents]
    rounds = [line for _, line in aggregator.lines if line.startswith("round ")]
    assert [r.split()[1] for r in rounds] == [str(r) for r in range(1, ROUNDS + 1)] and all("3/3" in r for r in rounds)
    assert "final accuracy" in aggregator.text() and (tmp_path / "run" / "model-int8.tflite").is_file()
    assert all(final_models_installed(states, exported)), [a.text()[-2000:] for a in agents]
    for p in outputs:  # no silent wait: every 10 s of a process's life has a line saying what it is at
        end = p.lines[-1][0] if p is aggregator else stopped
        gap, after = p.longest_silence(end)
        assert gap <= SILENCE_LIMIT_S, f"{p.name} was silent for {gap:.1f} s before {after!r}:\n{p.text()}"

"""A device without TensorFlow, as ``fedprune-agent`` runs it: it says what it trains with, trains
rounds of a real federation with the aggregator's trainable TFLite file in a child process, never
imports TensorFlow (every import of it fails in these processes), and installs the final model
the aggregator exported, byte for byte. Without any trainer the agent refuses to start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_helpers import wait_for, write_digits_npz
from federation_helpers import Spy, small_task
from fedprune.converters.protocol import Presence, Topics
from fedprune.edge_agent.model_store import ModelStore
from signing_helpers import AGGREGATOR_KEY, VERIFY_KEY

ROOT = Path(__file__).resolve().parents[1]
TENSORFLOW = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "keras")
RUNTIMES = ("ai_edge_litert", "tflite_runtime")


def _env_without(tmp_path: Path, modules: tuple[str, ...]) -> dict:
    """An environment whose Pythons (the agent and every child it starts) behave as if
    ``modules`` were not installed: importing one fails, ``find_spec`` finds none."""
    folder = tmp_path / "without"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\nfor name in %r:\n    sys.modules[name] = None  # import fails; find_spec returns None\n"
        % (modules,))
    return {**os.environ, "PYTHONPATH": str(folder), "PYTHONUNBUFFERED": "1"}


def _agent(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fedprune.edge_agent.cli", "run", "--device-id", "pi-01",
            "--data", str(tmp_path / "local.npz"), "--state-dir", str(tmp_path / "state"),
            "--aggregator-key", VERIFY_KEY.text, *args]


@pytest.mark.parametrize("missing, trainer, extra", [
    (TENSORFLOW + RUNTIMES, "auto", 'pip install "fedprune[agent-lite]"'),
    (TENSORFLOW, "keras", 'pip install "fedprune[agent]"'),
    (RUNTIMES, "litert", 'pip install "fedprune[agent-lite]"'),
])
def test_without_its_trainer_the_agent_refuses_to_start_naming_the_extra(tmp_path, missing, trainer, extra):
    write_digits_npz(tmp_path / "local.npz", n=20)
    proc = subprocess.run(_agent(tmp_path, "--broker", "mqtt://127.0.0.1:9", "--trainer", trainer),
                          env=_env_without(tmp_path, missing), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and extra in lines[0], proc.stderr


def test_a_device_without_tensorflow_trains_and_installs_the_final_model(mosquitto_url, tmp_path):
    from fedprune.aggregator.server import Aggregator
    from fedprune.data import load_dataset

    task = small_task(federation={"rounds": 2, "devices_per_round": 1, "min_devices": 1}, pruning={"end_round": 2})
    topics = Topics(task.federation.id)
    write_digits_npz(tmp_path / "local.npz", n=300)
    log = tmp_path / "agent.log"
    spy = Spy(mosquitto_url, [topics.all_presence])
    with open(log, "wb") as out:
        agent = subprocess.Popen(_agent(tmp_path, "--broker", mosquitto_url, "--log-level", "INFO"),
                                 env=_env_without(tmp_path, TENSORFLOW),  # trainer "auto": LiteRT is all there is
                                 cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        presence = wait_for(lambda: [Presence.decode(p) for _, p in spy.on("/presence/pi-01") if p], 60,
                            "the agent's presence", log)[-1]
        assert presence.trainer == "litert" and presence.runtime.startswith("ai-edge-litert ")
        dataset = load_dataset("digits", test_fraction=0.2, seed=0)
        aggregator = Aggregator(task, dataset, mosquitto_url, tmp_path / "run", signing_key=AGGREGATOR_KEY)
        done: list = []
        runner = threading.Thread(target=lambda: done.append(aggregator.run()), daemon=True)
        runner.start()
        runner.join(240)
        assert done, f"the federation did not end\n{log.read_text()[-3000:]}"
        result = done[0]
        assert [r.reported for r in result.rounds] == [1, 1]  # the device trained both rounds
        assert result.final_accuracy > 0.3

        store = ModelStore(tmp_path / "state" / "model")
        installed = wait_for(lambda: (store.current() or None) and store.current().final and store.current(), 60,
                             "the final model's install", log)
        exported = (tmp_path / "run" / "model-int8.tflite").read_bytes()  # model.export = "int8" by default
        assert store.current_path.read_bytes() == exported
        assert (installed.round, installed.precision) == (2, "int8")

        text = log.read_text()
        peaks = [float(m) for m in re.findall(r"training child exited \(code 0\) after [\d.]+ s, peak RSS ([\d.]+) MB",
                                              text)]
        assert len(peaks) == 2 and max(peaks) < 120, text[-3000:]  # issue 15's target; Keras's child: 778 MB
        with open(f"/proc/{agent.pid}/maps") as maps:
            assert "tensorflow" not in maps.read()
        assert "Traceback" not in text and "ImportError" not in text
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            assert agent.wait(30) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
            spy.close()

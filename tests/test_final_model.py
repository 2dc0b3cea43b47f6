"""The final model reaches every device: after the last round the aggregator publishes the sparse
TFLite files its report describes, retained, and each device (Keras or TensorFlow-free, there
during the run or joining after it) installs the precision its config asks for, byte for byte,
through its model store; ``predict`` then runs that file."""

from __future__ import annotations

import hashlib

from edge_helpers import wait_for
from federation_helpers import small_task
from fedprune.edge_agent.agent import EdgeAgent
from fedprune.edge_agent.capabilities import tflite_runtime
from fedprune.edge_agent.inference import Predictor
from fedprune.edge_agent.litert_trainer import TrainableFileTrainer
from fedprune.edge_agent.model_store import ModelStore
from fedprune.edge_agent.trainable_files import TrainableFiles
from signing_helpers import AGGREGATOR_KEY, VERIFY_KEY


def _lite_agent(url, device_id, x, y, state_dir, precision):
    files = TrainableFiles()  # each device its own, as on a board
    return EdgeAgent(url, device_id, x, y, TrainableFileTrainer(files, seed=0), aggregator_key=VERIFY_KEY,
                     state_dir=state_dir,
                     trainer_kind="litert", runtime=tflite_runtime(), trainable_files=files, final_model=precision)


def _installed_final(state_dir):
    store = ModelStore(state_dir / "model")
    current = store.current()
    return current if current is not None and current.final else None


def test_every_device_installs_the_exported_final_model_byte_for_byte(mosquitto_url, tmp_path):
    from fedprune.aggregator.server import Aggregator
    from fedprune.data import load_dataset
    from fedprune.edge_agent.trainer import KerasTrainer

    task = small_task(federation={"rounds": 2, "devices_per_round": 2, "min_devices": 2}, pruning={"end_round": 2})
    data = load_dataset("digits", test_fraction=0.2, seed=0)
    x, y = data.x_train, data.y_train
    wanted = {"lite": "int8", "keras": "float32", "late": "int8"}
    agents = [
        _lite_agent(mosquitto_url, "lite", x[:400], y[:400], tmp_path / "lite", wanted["lite"]),
        EdgeAgent(mosquitto_url, "keras", x[400:800], y[400:800], KerasTrainer(), aggregator_key=VERIFY_KEY,
                  state_dir=tmp_path / "keras",
                  final_model=wanted["keras"]),
    ]
    try:
        for agent in agents:
            agent.start(10)
        result = Aggregator(task, data, mosquitto_url, tmp_path / "run", signing_key=AGGREGATOR_KEY).run()
        assert [r.reported for r in result.rounds] == [2, 2]  # a Keras and a TensorFlow-free device each round
        agents.append(_lite_agent(mosquitto_url, "late", x[800:900], y[800:900], tmp_path / "late", wanted["late"]))
        agents[-1].start(10)  # after the run: the retained message is all it gets
        for device, precision in wanted.items():
            info = wait_for(lambda: _installed_final(tmp_path / device), 60, f"{device}'s final model")
            exported = (tmp_path / "run" / f"model-{precision}.tflite").read_bytes()
            assert (tmp_path / device / "model" / "current.tflite").read_bytes() == exported, device
            assert (info.round, info.precision, info.sha256) == (2, precision, hashlib.sha256(exported).hexdigest())
        predictor = Predictor(tmp_path / "late" / "model")  # what `fedprune-agent predict` runs
        assert predictor.model_info.sha256 == hashlib.sha256((tmp_path / "run" / "model-int8.tflite").read_bytes()
                                                              ).hexdigest()
        classes, _ = predictor.classify(data.x_test)
        assert (classes == data.y_test).mean() > 0.5
    finally:
        for agent in agents:
            agent.stop()

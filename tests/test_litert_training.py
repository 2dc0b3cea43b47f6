"""Training with LiteRT alone (train signatures), against Keras training of the same task."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_helpers import digits_arrays, small_mlp_task
from fedprune.edge_agent.litert_training import LiteRTTrainer, UnsupportedModel, build_trainable_tflite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    arch, task = small_mlp_task(sparsity=0.8, epochs=8)
    task.training.update(learning_rate=0.005, batch_size=16)
    x, y = digits_arrays(1797)
    return arch, task, build_trainable_tflite(arch, [m is not None for m in task.masks], 16), x, y


def _accuracy(arch, task, delta, x, y) -> float:
    from fedprune.architecture import model_from_architecture_json
    from fedprune.models import set_layer_weights

    model = model_from_architecture_json(arch.model_json)
    set_layer_weights(model, [w + d for w, d in zip(task.weights, delta)])
    return float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))


def test_litert_training_holds_the_mask_and_matches_keras(setup):
    from fedprune.edge_agent.trainer import KerasTrainer

    arch, task, trainable, x, y = setup
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    lite = LiteRTTrainer(trainable, 16).train(arch, task, xtr, ytr)
    assert np.all(lite.delta[0][~task.masks[0]] == 0) and np.any(lite.delta[0][task.masks[0]] != 0)
    keras_result = KerasTrainer().train(arch, task, xtr, ytr)
    lite_acc, keras_acc = (_accuracy(arch, task, r.delta, xte, yte) for r in (lite, keras_result))
    assert lite_acc > 0.9 and abs(lite_acc - keras_acc) < 0.03, (lite_acc, keras_acc)
    task.training.update(optimizer="sgd", learning_rate=0.1)
    sgd = LiteRTTrainer(trainable, 16).train(arch, task, xtr, ytr)
    assert sgd.metrics["loss"] < 1.0 and np.all(sgd.delta[0][~task.masks[0]] == 0)
    task.training["optimizer"] = "rmsprop"
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        LiteRTTrainer(trainable, 16).train(arch, task, xtr, ytr)
    task.training.update(optimizer="adam", learning_rate=0.005)


def test_a_convolution_is_refused_by_name():
    import dataclasses

    from fedprune.models import architecture_of, digits_cnn

    arch = architecture_of(digits_cnn((8, 8, 1), 10))
    with pytest.raises(UnsupportedModel, match="'conv1' \\(Conv2D\\)"):
        build_trainable_tflite(dataclasses.replace(arch), [False] * len(arch.shapes), 16)


def test_litert_training_runs_without_tensorflow(setup, tmp_path):
    arch, task, trainable, x, y = setup
    (tmp_path / "trainable.tflite").write_bytes(trainable)
    np.savez(tmp_path / "data.npz", x=x[:400], y=y[:400])
    from fedprune.edge_agent import jobfiles

    jobfiles.write_job(tmp_path, arch, task, jobfiles.JobSpec(str(tmp_path / "data.npz"), "off", "", 0))
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from fedprune.edge_agent import jobfiles
        from fedprune.edge_agent.budgets import peak_rss_mb
        from fedprune.edge_agent.litert_training import LiteRTTrainer
        folder = Path({str(tmp_path)!r})
        arch, task, spec = jobfiles.read_job(folder)
        data = np.load(folder / "data.npz")
        result = LiteRTTrainer((folder / "trainable.tflite").read_bytes(), 16).train(arch, task, data["x"], data["y"])
        assert "tensorflow" not in sys.modules
        print(result.metrics["accuracy"], peak_rss_mb())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    accuracy, peak = map(float, proc.stdout.split())
    assert accuracy > 0.8 and peak < 120  # MB: LiteRT and numpy, not TensorFlow's 600+

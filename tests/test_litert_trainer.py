"""Training without TensorFlow: the trainable TFLite file (converters/trainable_tflite.py) against the
same steps in Keras, layer by layer, and the LiteRT trainer (edge_agent/litert_trainer.py) on the
project's models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_helpers import digits_arrays
from fedprune.converters.protocol import TrainTask
from fedprune.converters.trainable_tflite import (
    BATCHNORM_MOMENTS,
    TRAIN,
    UnsupportedModel,
    build_trainable_tflite,
    dropout_name,
    learning_rate_input,
    moment_mean_name,
    moment_variance_name,
    weight_name,
)
from fedprune.converters.tflite_export import load_interpreter
from fedprune.edge_agent.litert_trainer import LiteRTTrainer
from fedprune.edge_agent.training_checks import TrainingError
from fedprune.keras_setup import keras, tf
from fedprune.models import (
    architecture_of,
    digits_cnn,
    full_masks,
    get_layer_weights,
    mlp,
    mnist1d_cnn,
    set_layer_weights,
)
from fedprune.pruning.masks import prune_to_sparsity

ROOT = Path(__file__).resolve().parents[1]
L = keras.layers
BATCH = 8


def image_model() -> keras.Model:
    """Every 2-D layer: strides, both paddings (uneven 'same' padding too), BN on 4-D (fused) and
    2-D inputs, dropout, relu6; 2-wide windows mostly, which keeps the build short."""
    return keras.Sequential([
        L.Input((7, 7, 2)),
        L.Conv2D(4, (2, 3), padding="same", use_bias=False, name="conv"),  # no bias before BN: its gradient is ~0
        L.BatchNormalization(momentum=0.9, name="bn4d"),
        L.ReLU(name="relu"),
        L.MaxPooling2D(2, strides=2, padding="same", name="maxpool"),  # 4x4
        L.AveragePooling2D(2, strides=1, padding="same", name="avgpool"),  # 4x4, windows of 1, 2 and 4
        L.DepthwiseConv2D(2, padding="same", depth_multiplier=2, activation=tf.nn.relu6, name="depthwise"),
        L.Conv2D(6, 2, strides=2, padding="valid", activation="relu", name="strided"),  # 2x2
        L.SeparableConv2D(5, 2, strides=2, padding="same", name="separable"),  # 1x1
        L.ReLU(max_value=6.0, name="relu6"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(7, use_bias=False, name="dense"),
        L.BatchNormalization(name="bn2d"),
        L.Activation("relu", name="activation"),
        L.Dropout(0.5, name="dropout"),
        L.Dense(5, name="logits"),
    ], name="image")


def sequence_model() -> keras.Model:
    """Every 1-D layer, BN on 3-D inputs (not fused), Dense on a 3-D input, softmax outputs."""
    return keras.Sequential([
        L.Input((12, 3)),
        L.Conv1D(4, 3, padding="same", activation="relu", use_bias=False, name="conv"),
        L.BatchNormalization(center=False, name="bn3d"),
        L.MaxPooling1D(2, name="maxpool"),  # 6
        L.Conv1D(4, 3, strides=2, padding="valid", activation="relu", name="strided"),  # 2
        L.AveragePooling1D(2, padding="same", name="avgpool"),  # 1
        L.Dense(6, name="dense3d"),
        L.Activation("relu", name="activation"),
        L.GlobalAveragePooling1D(name="gap"),
        L.Dense(5, activation="softmax", name="probabilities"),
        # Keras' loss takes the input of a final softmax as the logits: here, the probabilities
        L.Softmax(name="softmax"),
    ], name="sequence")


def _moved_weights(model: keras.Model, initial: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The initial weights moved a little (biases and BN statistics off 0 and 1; the moving
    variance kept positive)."""
    names = [w.name for layer in model.layers for w in layer.weights]
    weights = [w + rng.normal(0, 0.2, w.shape).astype(np.float32) for w in initial]
    return [np.abs(w) + 0.5 if "moving_variance" in n else w for w, n in zip(weights, names)]


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[keras.Model, list[np.ndarray], bytes]]:
    keras.utils.set_random_seed(0)
    models = {"image": image_model(), "sequence": sequence_model()}
    return {name: (m, get_layer_weights(m), build_trainable_tflite(m, [False] * len(m.weights), BATCH))
            for name, m in models.items()}


def _keras_step(model: keras.Model, optimizer: str, x, y, noise: list[np.ndarray], lr: float) -> tuple[float, list]:
    """One training step in Keras, eagerly, layer by layer: Dropout takes the given noise (kept
    where noise >= rate, as tf.nn.dropout keeps), every other layer runs itself with training=True.
    Returns the loss and each weight tensor's gradient (zeros for the non-trainable ones)."""
    noise = list(noise)
    with tf.GradientTape() as tape:
        h = tf.constant(x)
        for layer in model.layers:
            if isinstance(layer, L.Dropout):
                keep = tf.cast(noise.pop(0) >= layer.rate, h.dtype)
                h = h * keep / (1.0 - layer.rate)
            else:
                h = layer(h, training=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, h)
    grads = tape.gradient(loss, model.trainable_variables)
    opt = keras.optimizers.SGD(lr) if optimizer == "sgd" else keras.optimizers.Adam(lr)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    by_variable = {id(v): g.numpy() for v, g in zip(model.trainable_variables, grads)}
    flat = [w for layer in model.layers for w in layer.weights]
    return float(loss), [by_variable.get(id(w), np.zeros(w.shape, np.float32)) for w in flat]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["image", "sequence"])
@pytest.mark.parametrize("rows", [BATCH, 5], ids=["full-batch", "short-batch"])
def test_one_step_in_litert_is_the_keras_step(built, name, optimizer, rows):
    """Weights (BN's moving statistics included), loss and inference outputs as Keras computes
    them; a short batch is padded with all-zero label rows that count for nothing."""
    model, initial, trainable = built[name]
    rng = np.random.default_rng(1)
    weights = _moved_weights(model, initial, rng)
    set_layer_weights(model, weights)
    x = rng.normal(size=(rows, *model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, 5, rows)
    noise = [rng.random((BATCH, 7), dtype=np.float32)] if name == "image" else []

    interpreter = load_interpreter(trainable).interpreter
    run = interpreter.get_signature_runner
    run("set_weights")(**{weight_name(i): w for i, w in enumerate(weights)})
    np.testing.assert_allclose(run("infer")(x=x)["logits"], model(x, training=False).numpy(), atol=1e-5)
    padded_x = np.zeros((BATCH, *x.shape[1:]), np.float32)
    padded_x[:rows] = x
    onehot = np.zeros((BATCH, 5), np.float32)
    onehot[np.arange(rows), y] = 1.0
    lr = 0.05
    out = run(TRAIN[optimizer])(x=padded_x, y=onehot, lr=learning_rate_input(lr),
                                **{dropout_name(k): n for k, n in enumerate(noise)})
    got = run("get_weights")()

    expected_loss, grads = _keras_step(model, optimizer, x, y, [n[:rows] for n in noise], lr)
    assert float(out["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    for i, (w, before, g) in enumerate(zip(get_layer_weights(model), weights, grads)):
        step = np.abs(w - before).max()
        assert step > 0, f"weight tensor {i} did not move in Keras"
        diff = np.abs(got[weight_name(i)] - w)
        # float32 rounding: both trainers are this far from a float64 Keras step (seen: 2e-5 of
        # the step where BatchNormalization normalises 5 rows)
        if optimizer == "sgd":
            assert diff.max() < 2e-4 * step + 1e-6, f"weight tensor {i}: {diff.max()} of a step of {step}"
        else:
            # Adam's first step is about lr * sign(gradient): where the gradient is rounding noise
            # (a shift that a later BatchNormalization takes out) either sign is right
            clear = np.abs(g) > max(1e-3 * np.abs(g).max(), 1e-4)
            assert diff[clear].max(initial=0) < 1e-5 and diff.max() <= 2 * lr, f"weight tensor {i}"


@pytest.mark.parametrize("name", ["image", "sequence"])
def test_the_moments_signature_measures_every_batchnorm_input_over_the_real_rows(built, name):
    """Mean and biased variance per channel of each BatchNormalization's input (4-D, 2-D and 3-D),
    the model in inference mode, over a batch of 5 padded to 8: the padding counts nowhere."""
    model, initial, trainable = built[name]
    rng = np.random.default_rng(2)
    weights = _moved_weights(model, initial, rng)
    set_layer_weights(model, weights)
    x = rng.normal(size=(5, *model.input_shape[1:])).astype(np.float32)
    run = load_interpreter(trainable).interpreter.get_signature_runner
    run("set_weights")(**{weight_name(i): w for i, w in enumerate(weights)})
    padded = np.concatenate([x, np.full((BATCH - 5, *x.shape[1:]), 7.0, np.float32)])
    out = run(BATCHNORM_MOMENTS)(x=padded, rows=np.array([1.0] * 5 + [0.0] * (BATCH - 5), np.float32))
    flat = [id(w) for layer in model.layers for w in layer.weights]
    layers = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    assert len(out) == 2 * len(layers)
    for layer in layers:
        h = np.asarray(keras.Model(model.inputs, layer.input)(x, training=False), np.float64)
        axes = tuple(range(h.ndim - 1))
        np.testing.assert_allclose(out[moment_mean_name(flat.index(id(layer.moving_mean)))], h.mean(axes),
                                   rtol=1e-5, atol=1e-6, err_msg=layer.name)
        np.testing.assert_allclose(out[moment_variance_name(flat.index(id(layer.moving_variance)))], h.var(axes),
                                   rtol=1e-5, atol=1e-6, err_msg=layer.name)


def test_max_pooling_sends_a_tied_maximum_its_gradient_as_tensorflow_does():
    """Integer inputs and kernels: most pooling windows have a tied maximum."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([L.Input((6, 6, 1)), L.Conv2D(2, 2, padding="same", use_bias=False),
                              L.MaxPooling2D(2), L.Flatten(), L.Dense(3)])
    rng = np.random.default_rng(0)
    weights = get_layer_weights(model)
    weights[0] = rng.integers(-1, 2, weights[0].shape).astype(np.float32)
    set_layer_weights(model, weights)
    x = rng.integers(0, 2, (BATCH, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, BATCH)
    run = load_interpreter(build_trainable_tflite(model, [False] * 3, BATCH)).interpreter.get_signature_runner
    run("set_weights")(**{weight_name(i): w for i, w in enumerate(weights)})
    got = run("gradients")(x=x, y=np.eye(3, dtype=np.float32)[y])["g0"]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))
    np.testing.assert_allclose(got, tape.gradient(loss, model.trainable_variables[0]).numpy(), atol=1e-5)


@pytest.mark.parametrize("layer, refused", [
    (L.LSTM(4, name="lstm"), "'lstm' \\(LSTM\\)"),
    (L.Conv1D(4, 3, activation="tanh", name="conv"), "'conv' \\(Conv1D\\).*activation 'tanh'"),
    (L.Conv1D(4, 3, dilation_rate=2, name="dilated"), "'dilated' \\(Conv1D\\).*dilation_rate"),
    (L.Conv1D(4, 3, padding="causal", name="causal"), "'causal' \\(Conv1D\\).*padding 'causal'"),
])
def test_an_unsupported_layer_is_refused_by_name_and_class(layer, refused):
    model = keras.Sequential([L.Input((12, 3)), layer, L.Flatten(), L.Dense(2)])
    with pytest.raises(UnsupportedModel, match=refused):
        build_trainable_tflite(model, [False] * len(get_layer_weights(model)), BATCH)


def test_a_branching_model_is_refused():
    inputs = L.Input((4,))
    a, b = L.Dense(3, name="a")(inputs), L.Dense(3, name="b")(inputs)
    model = keras.Model(inputs, L.Add(name="add")([a, b]))
    with pytest.raises(UnsupportedModel, match="'b' \\(Dense\\).*not the previous layer's output"):
        build_trainable_tflite(model, [False] * 4, BATCH)


# --- the trainer, on the project's models -----------------------------------------------------------

def _task(model: keras.Model, masks: list, epochs: int = 2, unchecked: dict | None = None, **training) -> TrainTask:
    """A task with these training settings; ``unchecked`` ones are set past ``TrainingSettings``'
    checks (what no aggregator sends, to see what the trainer itself does with it)."""
    settings = {"local_epochs": epochs, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.002, **training}
    task = TrainTask(round=1, attempt=1, architecture_digest=architecture_of(model).digest,
                     weights=get_layer_weights(model), masks=masks, training=settings, uplink_precision="float32",
                     deadline_s=60)
    for key, value in (unchecked or {}).items():
        object.__setattr__(task.training, key, value)
    return task


def _pruned(model: keras.Model, keep_dense: tuple[str, ...] = ("logits",)) -> list:
    """Masks of 90 % sparsity for the Dense/Conv kernels not in ``keep_dense``; the model's weights
    pruned to them."""
    weights, masks = prune_to_sparsity(get_layer_weights(model), full_masks(model, keep_dense), 0.9)
    set_layer_weights(model, weights)
    return masks


def _sequences(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D-shaped data with a learnable rule: the class is where the bump is."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.normal(0, 0.3, (n, 40, 1)).astype(np.float32)
    x[np.arange(n), 4 * y, 0] += 3.0
    return x, y


@pytest.fixture(scope="module")
def digits_setup():
    keras.utils.set_random_seed(0)
    model = digits_cnn((8, 8, 1), 10)
    masks = _pruned(model, ("conv1", "logits"))  # conv2 and dense1, as the benchmark prunes them
    trainable = build_trainable_tflite(model, [m is not None for m in masks], 32)
    return model, masks, trainable


def _loss_falls_and_masks_hold(model, masks, trainable, x, y) -> LiteRTTrainer:
    arch = architecture_of(model)
    trainer = LiteRTTrainer(trainable, seed=0)
    task = _task(model, masks, epochs=1)
    first = trainer.train(arch, task, x, y)
    for i, m in enumerate(masks):
        if m is not None:
            assert np.all(first.delta[i][~m] == 0) and np.all(task.weights[i][~m] + first.delta[i][~m] == 0)
            assert np.count_nonzero(first.delta[i][m]) > 0
    task.weights = [w + d for w, d in zip(task.weights, first.delta)]
    second = trainer.train(arch, task, x, y)
    assert second.metrics["loss"] < first.metrics["loss"], (first.metrics, second.metrics)
    return trainer


@pytest.fixture(scope="module")
def keras_trainer():
    from fedprune.edge_agent.trainer import KerasTrainer

    return KerasTrainer()


def test_digits_cnn_trains_in_litert_as_in_keras(digits_setup, keras_trainer):
    model, masks, trainable = digits_setup
    x, y = digits_arrays(1797)
    (xtr, ytr), (xte, yte) = (x[:1000], y[:1000]), (x[1400:], y[1400:])
    _loss_falls_and_masks_hold(model, masks, trainable, xtr[:300], ytr[:300])
    arch, task = architecture_of(model), _task(model, masks, epochs=3, learning_rate=0.005)
    accuracy = {}
    for name, trainer in (("litert", LiteRTTrainer(trainable, seed=0)), ("keras", keras_trainer)):
        result = trainer.train(arch, task, xtr, ytr)
        trained = keras.models.clone_model(model)
        set_layer_weights(trained, [w + d for w, d in zip(task.weights, result.delta)])
        accuracy[name] = float(np.mean(trained.predict(xte, verbose=0).argmax(-1) == yte))
    assert accuracy["litert"] > 0.85 and abs(accuracy["litert"] - accuracy["keras"]) < 0.05, accuracy


def test_a_model_without_batchnorm_has_no_moments_signature(digits_setup):
    assert BATCHNORM_MOMENTS not in load_interpreter(digits_setup[2]).interpreter.get_signature_list()


@pytest.mark.parametrize("factory", [mnist1d_cnn, mlp])
def test_the_other_models_train_in_litert(factory):
    keras.utils.set_random_seed(0)
    model = factory((40, 1), 10)
    masks = _pruned(model)
    trainable = build_trainable_tflite(model, [m is not None for m in masks], 32)
    x, y = _sequences(256)
    _loss_falls_and_masks_hold(model, masks, trainable, x, y)


def test_regrowth_gradients_are_the_keras_trainers(digits_setup, keras_trainer):
    """At the same weights (a learning rate of 0: even a tiny step moves the zero biases, and with
    them which ReLUs pass a gradient), both trainers report the same positions and gradients."""
    model, masks, trainable = digits_setup
    arch, task = architecture_of(model), _task(model, masks, epochs=1, optimizer="sgd", unchecked={"learning_rate": 0.0})
    task.gradient_fraction = 0.05
    x, y = digits_arrays(600)
    lite = LiteRTTrainer(trainable).train(arch, task, x, y)
    ref = keras_trainer.train(arch, task, x, y)
    for got, want, got_at, want_at in zip(lite.gradients, ref.gradients, lite.gradient_masks, ref.gradient_masks):
        np.testing.assert_array_equal(got_at, want_at)
        np.testing.assert_allclose(got, want, atol=1e-7)
    assert [int(m.sum()) for m in lite.gradient_masks] == [
        0 if m is None else int(np.ceil(0.05 * m.sum())) for m in masks]


def test_the_trainer_refuses_what_the_file_cannot_do(digits_setup):
    model, masks, trainable = digits_setup
    arch = architecture_of(model)
    trainer = LiteRTTrainer(trainable)
    x, y = digits_arrays(64)
    for task, refused in ((_task(model, masks, batch_size=16), "batches of 16, the trainable file was built for 32"),
                          (_task(model, masks, unchecked={"optimizer": "rmsprop"}), "unknown optimizer 'rmsprop'"),
                          (_task(model, [m if m is not None else np.ones(w.shape, bool) for m, w in
                                         zip(masks, get_layer_weights(model))]), "without masks for"),
                          (_task(model, masks), "labels go from")):
        with pytest.raises(TrainingError, match=refused):
            trainer.train(arch, task, x, y + 10 if "labels" in refused else y)
    task = _task(model, masks)
    task.device_sparsity = 0.5
    with pytest.raises(TrainingError, match="device-side pruning"):
        trainer.train(arch, task, x, y)


def test_the_trainer_process_imports_no_tensorflow(digits_setup, tmp_path):
    model, masks, trainable = digits_setup
    arch, task = architecture_of(model), _task(model, masks)
    (tmp_path / "trainable.tflite").write_bytes(trainable)
    x, y = digits_arrays(400)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    from fedprune.edge_agent import jobfiles

    jobfiles.write_job(tmp_path, arch, task, jobfiles.JobSpec(str(tmp_path / "data.npz"), "off", "", 0))
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        from fedprune.edge_agent import jobfiles
        from fedprune.edge_agent.budgets import peak_rss_mb
        from fedprune.edge_agent.litert_trainer import LiteRTTrainer
        folder = Path({str(tmp_path)!r})
        arch, task, spec = jobfiles.read_job(folder)
        data = np.load(folder / "data.npz")
        trainer = LiteRTTrainer((folder / "trainable.tflite").read_bytes(), seed=0)
        result = trainer.train(arch, task, data["x"], data["y"])
        assert "tensorflow" not in sys.modules, "the LiteRT trainer imported TensorFlow"
        print(result.metrics["loss"], sum(int(np.count_nonzero(d)) for d in result.delta), peak_rss_mb())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loss, changed, peak = map(float, proc.stdout.split()[-3:])
    assert np.isfinite(loss) and changed > 0, proc.stdout
    assert peak < 120, f"the trainer's process peaked at {peak} MB"  # LiteRT and NumPy, not TensorFlow's 600+

"""BatchNormalization under federated averaging (issue 19): the statistics a device reports are
those of the weights it trained, whether it trains with Keras or without TensorFlow (the trainable
TFLite file in LiteRT), and the exported TFLite model has the normalization folded into its kernels.

Real TensorFlow, real LiteRT, no broker (the federation itself: scripts/bench_batchnorm.py,
docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.converters.protocol import TrainTask
from fedprune.converters.trainable_tflite import BATCHNORM_MOMENTS, TRAIN, build_trainable_tflite
from fedprune.edge_agent.batchnorm_stats import recalibrate_batchnorm
from fedprune.edge_agent.litert_trainer import LiteRTTrainer
from fedprune.edge_agent.trainer import KerasTrainer
from fedprune.keras_setup import keras
from fedprune.models import architecture_of, digits_bn_cnn, get_layer_weights, set_layer_weights, weight_names


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order].astype(np.int64)


def _task(model, **training) -> TrainTask:
    return TrainTask(round=1, attempt=1, architecture_digest=architecture_of(model).digest,
                     weights=get_layer_weights(model), masks=[None] * len(model.weights), deadline_s=60,
                     uplink_precision="float32",
                     training={"local_epochs": 1, "batch_size": 32, "learning_rate": 0.002, "optimizer": "adam",
                               **training})


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), axis=1) == y))


def _exact_statistics(model, layer_name, x):
    """Mean and biased variance per channel of the named layer's input, the model in inference mode."""
    layer = model.get_layer(layer_name)
    out = np.asarray(keras.Model(model.inputs, layer.input)(x, training=False), np.float64)
    axes = tuple(range(out.ndim - 1))
    return out.mean(axis=axes), out.var(axis=axes)


def test_device_reports_the_statistics_of_the_weights_it_trained(digits):
    """15 local steps at Keras's default momentum (0.99) move the moving statistics 14 % of the
    way: as Keras leaves them they are wrong for the trained weights (the model scores far below
    what the same weights score), and the device reports the exact ones instead."""
    x, y = digits
    x_dev, y_dev, x_test, y_test = x[:480], y[:480], x[-360:], y[-360:]
    keras.utils.set_random_seed(0)
    model = digits_bn_cnn((8, 8, 1), 10)
    arch, task = architecture_of(model), _task(model)

    lagging = KerasTrainer()
    lagging.recalibrate_batchnorm = False
    keras.utils.set_random_seed(1)
    stale = lagging.train(arch, task, x_dev, y_dev)
    keras.utils.set_random_seed(1)
    fixed = KerasTrainer().train(arch, task, x_dev, y_dev)

    trained_stale = digits_bn_cnn((8, 8, 1), 10)
    set_layer_weights(trained_stale, [w + d for w, d in zip(task.weights, stale.delta)])
    trained = digits_bn_cnn((8, 8, 1), 10)
    set_layer_weights(trained, [w + d for w, d in zip(task.weights, fixed.delta)])
    names = weight_names(trained)
    # Same seed, same steps: the trainable weights agree; only the statistics differ.
    for name, a, b in zip(names, stale.delta, fixed.delta):
        if "moving_" not in name:
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    for bn in ("bn1", "bn2", "bn3"):
        mean, var = _exact_statistics(trained, bn, x_dev)
        layer = trained.get_layer(bn)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-3, atol=1e-6)
        stale_var = trained_stale.get_layer(bn).moving_variance.numpy()
        assert np.median(np.abs(np.log(stale_var / np.maximum(var, 1e-12)))) > np.log(1.5), bn  # far off before
    assert _accuracy(trained, x_test, y_test) >= _accuracy(trained_stale, x_test, y_test) + 0.15  # 0.96 vs 0.68, seen
    assert _accuracy(trained, x_test, y_test) >= 0.85


def test_recalibration_measures_layer_after_layer(digits):
    """A later layer's statistics are measured with the earlier layers' new statistics in place."""
    x, _ = digits
    keras.utils.set_random_seed(2)
    model = digits_bn_cnn((8, 8, 1), 10)
    assert recalibrate_batchnorm(model, x[:300]) == 3
    for bn in ("bn1", "bn2", "bn3"):  # measured after the fact, with every statistic in place: unchanged
        mean, var = _exact_statistics(model, bn, x[:300])
        np.testing.assert_allclose(model.get_layer(bn).moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.get_layer(bn).moving_variance.numpy(), var, rtol=1e-3, atol=1e-6)


def test_exported_tflite_folds_batchnorm_into_the_kernels(digits, tmp_path):
    """The converter folds each BatchNormalization (its statistics, scale and shift) into the
    preceding kernel: no multiply or add op is left, the pruned zeros stay stored sparse, and the
    file gives the Keras model's outputs."""
    from fedprune.converters.tflite_export import export_sparse_tflite, open_interpreter, predict_tflite

    x, y = digits
    keras.utils.set_random_seed(3)
    model = digits_bn_cnn((8, 8, 1), 10)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1000], y[:1000], epochs=2, batch_size=32, verbose=0)
    weights = get_layer_weights(model)
    for i, name in enumerate(weight_names(model)):  # prune 80 % of conv2 and dense1 by magnitude
        if name in ("conv2/kernel", "dense1/kernel"):
            weights[i] = np.where(np.abs(weights[i]) > np.quantile(np.abs(weights[i]), 0.8), weights[i], 0.0)
    set_layer_weights(model, weights)
    recalibrate_batchnorm(model, x[:1000])
    result = export_sparse_tflite(model, tmp_path / "bn.tflite", eval_x=x[-300:], eval_y=y[-300:])
    interpreter, _ = open_interpreter(result.path)
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not ops & {"MUL", "ADD", "SUB", "RSQRT", "SQUARED_DIFFERENCE", "MEAN"}, ops
    assert {"CONV_2D", "FULLY_CONNECTED"} <= ops
    expected = np.asarray(model(x[-300:], training=False))
    np.testing.assert_allclose(predict_tflite(interpreter, x[-300:]), expected, rtol=1e-3, atol=1e-3)
    assert result.accuracy == pytest.approx(_accuracy(model, x[-300:], y[-300:]), abs=0.01)
    assert result.size_bytes < 0.5 * sum(w.size for w in weights) * 4  # the folded kernels stayed sparse


# --- devices without TensorFlow ----------------------------------------------------------------------

def _small_bn_model() -> keras.Model:
    """BatchNormalization on a 4-D input (Keras' fused kernel) and on a 2-D one, the second
    measured through the first."""
    L = keras.layers
    return keras.Sequential([
        L.Input((8, 8, 1)),
        L.Conv2D(4, 3, padding="same", use_bias=False, name="conv"),
        L.BatchNormalization(name="bn4d"),
        L.ReLU(name="relu1"),
        L.MaxPooling2D(2, name="pool"),
        L.Flatten(name="flatten"),
        L.Dense(8, use_bias=False, name="dense"),
        L.BatchNormalization(name="bn2d"),
        L.ReLU(name="relu2"),
        L.Dense(10, name="logits"),
    ], name="small_bn")


@pytest.fixture(scope="module")
def small_bn():
    keras.utils.set_random_seed(4)
    model = _small_bn_model()
    return model, build_trainable_tflite(model, [False] * len(model.weights), 32)


def _statistics(weights, names) -> dict[str, np.ndarray]:
    return {n: w for n, w in zip(names, weights) if "moving_" in n}


def test_tf_free_device_reports_the_statistics_the_keras_trainer_would(small_bn, digits):
    """After a round in LiteRT (200 samples: 6 full batches and one padded), the moving statistics
    are the ones the Keras trainer's recalibration gives the same trained weights on the same data;
    with recalibration off, the same steps leave the statistics the momentum left, far from them.
    The file is left holding the new statistics (inference uses them)."""
    model, trainable = small_bn
    x, y = digits[0][:200], digits[1][:200]
    arch, task, names = architecture_of(model), _task(model), weight_names(model)
    device = LiteRTTrainer(trainable)
    lagging = LiteRTTrainer(trainable)
    lagging.recalibrate_batchnorm = False
    fixed = device.train(arch, task, x, y, seed=1)
    stale = lagging.train(arch, task, x, y, seed=1)
    for name, a, b in zip(names, fixed.delta, stale.delta):  # same steps: only the statistics differ
        if "moving_" not in name:
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)

    reference = _small_bn_model()  # the trained weights, the statistics as the momentum left them
    set_layer_weights(reference, [w + d for w, d in zip(task.weights, stale.delta)])
    assert recalibrate_batchnorm(reference, x) == 2  # what KerasTrainer runs after training
    expected = _statistics(get_layer_weights(reference), names)
    got = _statistics([w + d for w, d in zip(task.weights, fixed.delta)], names)
    left = _statistics([w + d for w, d in zip(task.weights, stale.delta)], names)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        off = np.median(np.abs(np.log(np.abs(left[name]) / np.maximum(np.abs(expected[name]), 1e-12))))
        assert off > np.log(1.5), name  # 7 steps at momentum 0.99: far from the exact statistics
    np.testing.assert_allclose(device.predict(x[:50]), np.asarray(reference(x[:50], training=False)),
                               rtol=1e-4, atol=1e-4)


def test_without_recalibration_the_statistics_move_at_the_momentum(small_bn, digits):
    """A round of one (padded) step with recalibration off leaves the moving statistics where
    Keras' own training step moves them at the layer's momentum."""
    model, trainable = small_bn
    x, y = digits[0][:20], digits[1][:20]
    arch, task, names = architecture_of(model), _task(model), weight_names(model)
    lagging = LiteRTTrainer(trainable)
    lagging.recalibrate_batchnorm = False
    result = lagging.train(arch, task, x, y, seed=1)
    stepped = _small_bn_model()
    set_layer_weights(stepped, task.weights)
    stepped(x, training=True)  # one forward pass in training mode: the moving statistics move, once
    expected = _statistics(get_layer_weights(stepped), names)
    got = _statistics([w + d for w, d in zip(task.weights, result.delta)], names)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(got[name], _statistics(task.weights, names)[name]), name  # they did move


def _ops_by_signature(content: bytes) -> dict[str, set[str]]:
    """The builtin ops each signature's subgraph runs."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
    op_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}

    def op(index: int) -> str:
        code = model.operatorCodes[index]
        return op_names[max(code.builtinCode, code.deprecatedBuiltinCode)]

    return {sig.signatureKey.decode(): {op(o.opcodeIndex) for o in model.subgraphs[sig.subgraphIndex].operators}
            for sig in model.signatureDefs}


def test_the_moments_signature_runs_only_ops_training_runs(small_bn):
    """A runtime (a board) that trains with the file can run the measurement: no new op."""
    ops = _ops_by_signature(small_bn[1])
    assert ops[BATCHNORM_MOMENTS] and ops[BATCHNORM_MOMENTS] <= ops[TRAIN["sgd"]], (
        ops[BATCHNORM_MOMENTS] - ops[TRAIN["sgd"]])

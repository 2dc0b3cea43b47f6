"""Tests for fedprune.converters.tflite_size: what a small exported file leaves out, and when an
int8 file's weights are quantized per tensor rather than per channel.

Real converter, real LiteRT: a 64-32-10 MLP on scikit-learn's digits, 90 % of its hidden kernel
zeroed, and a model built so that per-tensor quantization destroys it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.converters.tflite_export import export_sparse_tflite, load_interpreter, predict_tflite
from fedprune.converters.tflite_size import compact_flatbuffer


@pytest.fixture(scope="module")
def keras():
    from fedprune.keras_setup import keras

    return keras


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def _trained_mlp(keras, x: np.ndarray, y: np.ndarray, seed: int):
    """A 64-32-10 MLP trained on digits for 8 epochs."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.layers.Input((64,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.Dense(10, name="logits")])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def pruned_mlp(keras, digits):
    model = _trained_mlp(keras, *digits, seed=0)
    kernel, bias = model.get_layer("hidden").get_weights()
    keep = np.abs(kernel) >= np.quantile(np.abs(kernel), 0.9)
    model.get_layer("hidden").set_weights([kernel * keep, bias])
    return model


def _outputs(content: bytes, x: np.ndarray) -> np.ndarray:
    return predict_tflite(load_interpreter(content).interpreter, x)


def test_compact_flatbuffer_drops_names_metadata_and_empty_buffers_but_not_outputs_or_signatures(
        pruned_mlp, digits):
    import tensorflow as tf  # after keras_setup (the fixtures imported it)
    from tensorflow.lite.tools import flatbuffer_utils

    x, _ = digits
    converter = tf.lite.TFLiteConverter.from_keras_model(pruned_mlp)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    original = bytes(converter.convert())
    compact = compact_flatbuffer(original)

    assert len(compact) < len(original)
    np.testing.assert_array_equal(_outputs(compact, x[:50]), _outputs(original, x[:50]))
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(compact))
    assert all(t.name is None or t.name == b"" for t in model.subgraphs[0].tensors)
    assert [m.name for m in model.metadata] == [b"min_runtime_version"]
    assert all(b.data is not None and len(b.data) for b in model.buffers[1:])  # only buffer 0 is empty
    runner = load_interpreter(compact).interpreter.get_signature_runner("serving_default")
    (input_name,) = runner.get_input_details()
    (output,) = runner(**{input_name: x[:1]}).values()
    np.testing.assert_allclose(output, _outputs(original, x[:1]), rtol=1e-6)


def test_auto_quantizes_per_tensor_when_it_is_smaller_and_as_faithful(pruned_mlp, digits, tmp_path):
    x, y = digits
    per_channel = export_sparse_tflite(pruned_mlp, tmp_path / "c.tflite", "int8", representative_x=x,
                                       eval_x=x, eval_y=y, int8_granularity="per_channel")
    auto = export_sparse_tflite(pruned_mlp, tmp_path / "a.tflite", "int8", representative_x=x, eval_x=x, eval_y=y)

    assert (per_channel.granularity, auto.granularity) == ("per_channel", "per_tensor")
    assert auto.size_bytes < per_channel.size_bytes - 32 * 12  # at least a scale and zero point per channel
    assert auto.accuracy >= per_channel.accuracy - 0.01


def test_auto_keeps_per_channel_when_per_tensor_changes_predictions(keras, digits, tmp_path):
    """Output channel 0 of the hidden layer has weights 10^4 times the others, on an input that is
    always 0: its activation stays 0 (so activation ranges are unchanged), but one int8 scale for
    the whole kernel rounds every other channel's weights to 0."""
    x, y = digits
    model = _trained_mlp(keras, x, y, seed=1)
    dead_input = int(np.flatnonzero(np.all(x == 0, axis=0))[0])  # digits' corner pixels are always blank
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[dead_input, 0] = 1e4 * np.abs(kernel).max()
    model.get_layer("hidden").set_weights([kernel, bias])

    forced = export_sparse_tflite(model, tmp_path / "t.tflite", "int8", representative_x=x, eval_x=x, eval_y=y,
                                  int8_granularity="per_tensor")
    auto = export_sparse_tflite(model, tmp_path / "a.tflite", "int8", representative_x=x, eval_x=x, eval_y=y)

    assert forced.accuracy < 0.5  # the setup: per-tensor weights ruin this model
    assert auto.granularity == "per_channel"
    assert auto.accuracy > 0.85


def test_unknown_granularity_is_refused_by_name(pruned_mlp, digits, tmp_path):
    x, _ = digits
    with pytest.raises(ValueError, match="int8_granularity must be one of"):
        export_sparse_tflite(pruned_mlp, tmp_path / "m.tflite", "int8", representative_x=x,
                             int8_granularity="per_row")  # type: ignore[arg-type]

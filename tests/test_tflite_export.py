"""Tests for fedprune.converters.tflite_export: sparse TFLite export verified in LiteRT.

Real models, real converter, real runtime: a 64-64-10 MLP and a tiny Conv2D net on
scikit-learn's bundled digits, 85 % of each kernel zeroed by magnitude (plain numpy, no tfmot)
and fine-tuned with the zeros held.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository root is not installed into the venv
    sys.path.insert(0, str(ROOT))

from fedprune.converters import tflite_export as te  # noqa: E402
from fedprune.converters.tflite_export import (  # noqa: E402
    ExportError,
    TFLiteExport,
    export_sparse_tflite,
    open_interpreter,
    predict_tflite,
    sparse_weight_stats,
)

SPARSITY = 0.85


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kt():
    from fedprune.keras_setup import keras, tf

    return keras, tf


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype(np.int64)
    return x[:-400], y[:-400], x[-400:], y[-400:]


def _prune_and_finetune(keras, model, x, y, epochs=5):
    """Zero SPARSITY of every kernel by magnitude, fine-tune with the zeros held."""
    masked = []
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            kernel = layer.kernel.numpy()
            threshold = np.quantile(np.abs(kernel), SPARSITY)
            mask = (np.abs(kernel) > threshold).astype(np.float32)
            layer.kernel.assign(kernel * mask)
            masked.append((layer, mask))

    class KeepZeros(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for layer, mask in masked:
                layer.kernel.assign(layer.kernel * mask)

    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[KeepZeros()])
    for layer, mask in masked:
        assert np.all(layer.kernel.numpy()[mask == 0] == 0)
    return model


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y))


@pytest.fixture(scope="module")
def mlp(kt, digits):
    keras, _ = kt
    xtr, ytr, _, _ = digits
    keras.utils.set_random_seed(0)
    dense = keras.Sequential(
        [
            keras.layers.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    dense.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    dense.fit(xtr, ytr, epochs=15, batch_size=32, verbose=0)
    pruned = keras.models.clone_model(dense)
    pruned.set_weights(dense.get_weights())
    pruned.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _prune_and_finetune(keras, pruned, xtr, ytr)
    return dense, pruned


@pytest.fixture(scope="module")
def exports(mlp, digits, tmp_path_factory):
    """Sparse (pruned) and dense (unpruned) exports at both precisions, done once."""
    dense, pruned = mlp
    xtr, _, xte, yte = digits
    out = tmp_path_factory.mktemp("exports")
    result = {}
    for label, model in (("sparse", pruned), ("dense", dense)):
        for precision in ("float32", "int8"):
            result[label, precision] = export_sparse_tflite(
                model,
                out / f"{label}_{precision}.tflite",
                precision=precision,
                representative_x=xtr if precision == "int8" else None,
                eval_x=xte,
                eval_y=yte,
            )
    return result


def _kernels(model):
    """Keras kernels transposed to TFLite's layout (Dense: (out, in); Conv2D: OHWI)."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            k = layer.kernel.numpy()
            out.append(k.T if k.ndim == 2 else k.transpose(3, 0, 1, 2))
    return out


def _match(stats, tflite_kernel):
    hits = [s for s in stats if s["shape"] == tflite_kernel.shape]
    assert len(hits) == 1, [(s["name"], s["shape"]) for s in stats]
    return hits[0]


def _leftovers(directory: Path):
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------- export


def test_float32_sparse_export_is_small_verified_and_accurate(exports, mlp, digits):
    _, pruned = mlp
    _, _, xte, yte = digits
    sparse, dense = exports["sparse", "float32"], exports["dense", "float32"]
    assert isinstance(sparse, TFLiteExport)
    assert sparse.path.is_file() and sparse.path.stat().st_size == sparse.size_bytes
    assert sparse.precision == "float32"
    assert sparse.runtime.startswith("ai-edge-litert")
    # 85 % zeros: values + CSR indices of both kernels are well under a third of dense.
    assert sparse.size_bytes < 0.4 * dense.size_bytes, (sparse.size_bytes, dense.size_bytes)
    assert sparse.accuracy is not None
    assert abs(sparse.accuracy - _accuracy(pruned, xte, yte)) <= 0.02
    assert sparse.accuracy > 0.85


def test_int8_sparse_export_is_small_verified_and_accurate(exports, mlp, digits):
    _, pruned = mlp
    _, _, xte, yte = digits
    sparse = exports["sparse", "int8"]
    assert sparse.path.is_file() and sparse.path.stat().st_size == sparse.size_bytes
    assert sparse.precision == "int8"
    assert sparse.size_bytes < exports["dense", "int8"].size_bytes
    assert sparse.size_bytes < 0.5 * exports["dense", "float32"].size_bytes
    assert abs(sparse.accuracy - _accuracy(pruned, xte, yte)) <= 0.03
    # No file is left next to the exports but the exports themselves.
    assert _leftovers(sparse.path.parent) == sorted(
        e.path.name for e in exports.values()
    )


def test_float32_stores_exactly_the_nonzero_weights(exports, mlp):
    _, pruned = mlp
    stats = sparse_weight_stats(exports["sparse", "float32"].path, include_dense=True)
    for kernel in _kernels(pruned):
        entry = _match(stats, kernel)
        assert entry["sparse"]
        assert entry["dtype"] == "float32"
        assert entry["stored_values"] == np.count_nonzero(kernel) == entry["stored_nonzero"]
        assert entry["value_bytes"] == 4 * entry["stored_values"]
        assert 0 < entry["index_bytes"] < entry["value_bytes"]
        # Rebuilt from the CSR metadata: bit-identical to the Keras kernel, zeros included.
        np.testing.assert_array_equal(entry["dense"], kernel)


def test_int8_stores_the_nonzero_quantized_weights(exports, mlp):
    _, pruned = mlp
    stats = sparse_weight_stats(exports["sparse", "int8"].path, include_dense=True)
    for kernel in _kernels(pruned):
        entry = _match(stats, kernel)
        assert entry["sparse"] and entry["dtype"] == "int8"
        quant = entry["quantization"]
        assert quant is not None and quant["axis"] == 0 and np.all(quant["zero_point"] == 0)
        scale = quant["scale"].reshape(-1, *([1] * (kernel.ndim - 1)))
        # Quantized first (symmetric per output channel), sparsified second: the values stored
        # are exactly the weights whose int8 value is not 0, never a pruned one.
        expected = np.count_nonzero(np.round(kernel / scale))
        assert entry["stored_values"] == entry["stored_nonzero"] == expected
        assert entry["stored_values"] <= np.count_nonzero(kernel)
        stored = entry["dense"]
        assert np.all(stored[kernel == 0] == 0)
        assert np.all(np.abs(stored * scale - kernel) <= scale / 2 + 1e-7)


def test_unpruned_model_is_stored_dense(exports):
    stats = sparse_weight_stats(exports["dense", "float32"].path)
    kernels = [s for s in stats if len(s["shape"]) == 2]
    assert len(kernels) == 2
    assert not any(s["sparse"] for s in kernels)
    assert all(s["stored_values"] == s["elements"] for s in kernels)


def test_conv2d_sparse_kernels_are_ohwi_csr(kt, digits, tmp_path):
    keras, _ = kt
    xtr, ytr, xte, yte = digits
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(xtr.reshape(-1, 8, 8, 1), ytr, epochs=3, batch_size=32, verbose=0)
    _prune_and_finetune(keras, model, xtr.reshape(-1, 8, 8, 1), ytr, epochs=1)
    result = export_sparse_tflite(
        model,
        tmp_path / "conv.tflite",
        eval_x=xte.reshape(-1, 8, 8, 1),
        eval_y=yte,
    )
    assert abs(result.accuracy - _accuracy(model, xte.reshape(-1, 8, 8, 1), yte)) <= 0.02
    stats = sparse_weight_stats(result.path, min_elements=64, include_dense=True)
    for kernel in _kernels(model):
        entry = _match(stats, kernel)
        assert entry["sparse"]
        assert entry["stored_values"] == np.count_nonzero(kernel)
        np.testing.assert_array_equal(entry["dense"], kernel)


# ------------------------------------------------------------------------------- failures


def test_int8_without_representative_data_raises_and_writes_nothing(mlp, tmp_path):
    _, pruned = mlp
    target = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match="representative_x"):
        export_sparse_tflite(pruned, target, precision="int8")
    assert _leftovers(tmp_path) == []


def test_bad_arguments_raise_value_error(mlp, digits, tmp_path):
    _, pruned = mlp
    _, _, xte, yte = digits
    with pytest.raises(ValueError, match="precision"):
        export_sparse_tflite(pruned, tmp_path / "m.tflite", "int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_y"):
        export_sparse_tflite(pruned, tmp_path / "m.tflite", eval_x=xte)
    with pytest.raises(ValueError, match="shape"):
        export_sparse_tflite(pruned, tmp_path / "m.tflite", eval_x=xte[:, :32], eval_y=yte)
    assert _leftovers(tmp_path) == []


def test_runtime_failure_raises_export_error_and_leaves_no_file(mlp, tmp_path, monkeypatch):
    _, pruned = mlp
    seen = []

    def broken_runtime(path, num_threads=None):
        seen.append(Path(path))
        assert Path(path).is_file() and Path(path).stat().st_size > 0  # bytes written first
        raise RuntimeError("Node number 3 (DENSIFY) failed to prepare.")

    monkeypatch.setattr(te, "open_interpreter", broken_runtime)
    target = tmp_path / "m.tflite"
    with pytest.raises(ExportError, match="DENSIFY"):
        export_sparse_tflite(pruned, target)
    assert seen and seen[0].parent == tmp_path and seen[0] != target
    assert _leftovers(tmp_path) == []

    # An earlier good file at the target stays as it was.
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError):
        export_sparse_tflite(pruned, target)
    assert target.read_bytes() == b"previous export"
    assert _leftovers(tmp_path) == ["m.tflite"]


# ------------------------------------------------------------------------------- runtime


class _FakeResolver:
    AUTO = "AUTO"
    BUILTIN_WITHOUT_DEFAULT_DELEGATES = "NO_DEFAULT_DELEGATES"


def _fake_runtime(error: str):
    calls = []

    class FakeInterpreter:
        def __init__(self, model_path, experimental_op_resolver_type="AUTO", **kwargs):
            self.resolver = experimental_op_resolver_type
            calls.append((model_path, experimental_op_resolver_type, kwargs))

        def allocate_tensors(self):
            if self.resolver == "AUTO":
                raise RuntimeError(error)

    return calls, ("fake-litert 0", FakeInterpreter, _FakeResolver)


def test_open_interpreter_falls_back_on_xnnpack_delegate_failure(monkeypatch):
    calls, runtime = _fake_runtime(
        "failed to delegate FULLY_CONNECTED node #2Node number 6 (TfLiteXNNPackDelegate) "
        "failed to prepare."
    )
    monkeypatch.setattr(te, "_find_runtime", lambda order: runtime)
    _, label = open_interpreter("x.tflite", num_threads=2)
    assert label == "fake-litert 0 (builtin ops, no default delegates)"
    assert [c[1] for c in calls] == ["AUTO", "NO_DEFAULT_DELEGATES"]
    assert all(c[2] == {"num_threads": 2} for c in calls)


def test_open_interpreter_does_not_hide_other_errors(monkeypatch):
    calls, runtime = _fake_runtime("Node number 1 (DENSIFY) failed to prepare.")
    monkeypatch.setattr(te, "_find_runtime", lambda order: runtime)
    with pytest.raises(RuntimeError, match="DENSIFY"):
        open_interpreter("x.tflite")
    assert len(calls) == 1


def test_open_interpreter_on_real_exports(exports, digits):
    from ai_edge_litert.interpreter import Interpreter

    _, _, xte, _ = digits
    for key, export in exports.items():
        interpreter, runtime = open_interpreter(export.path)
        assert runtime == export.runtime
        # Whether LiteRT's default delegates take the file decides the runtime string.
        try:
            Interpreter(model_path=str(export.path)).allocate_tensors()
        except RuntimeError as exc:
            assert "delegate" in str(exc).lower()
            assert runtime.endswith("(builtin ops, no default delegates)"), key
        else:
            assert runtime.endswith("(default delegates)"), key
        out = predict_tflite(interpreter, xte[:5])
        assert out.shape == (5, 10) and out.dtype == np.float32


def test_without_litert_falls_back_to_tensorflow(exports, digits, monkeypatch):
    _, _, xte, _ = digits
    export = exports["sparse", "int8"]
    litert_stats = sparse_weight_stats(export.path, include_dense=True)
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "ai_edge_litert.tools",
                 "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    interpreter, runtime = open_interpreter(export.path)
    assert runtime.startswith("tensorflow ") and "tf.lite" in runtime
    assert predict_tflite(interpreter, xte[:3]).shape == (3, 10)
    # The flatbuffer reader falls back to TensorFlow's copy, which returns numpy vectors.
    tf_stats = sparse_weight_stats(export.path, include_dense=True)
    assert len(tf_stats) == len(litert_stats)
    for a, b in zip(tf_stats, litert_stats):
        for key in ("name", "sparse", "stored_values", "index_bytes"):
            assert a[key] == b[key], key
        np.testing.assert_array_equal(a["dense"], b["dense"])


def test_predict_tflite_handles_int8_input_and_output(kt, mlp, digits, tmp_path):
    _, tf = kt
    _, pruned = mlp
    xtr, _, xte, _ = digits
    converter = tf.lite.TFLiteConverter.from_keras_model(pruned)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([xtr[i : i + 1]] for i in range(100))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path = tmp_path / "int8_io.tflite"
    path.write_bytes(converter.convert())
    interpreter, _ = open_interpreter(path)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    out = predict_tflite(interpreter, xte[:50])
    assert out.dtype == np.float32
    keras_out = pruned.predict(xte[:50], verbose=0)
    assert np.mean(out.argmax(1) == keras_out.argmax(1)) >= 0.95


def test_representative_subset_is_capped():
    x = np.arange(1000, dtype=np.float32).reshape(500, 2)
    subset = te._representative_subset(x)
    assert len(subset) == te.MAX_REPRESENTATIVE_SAMPLES == 200
    assert np.array_equal(subset, te._representative_subset(x))  # deterministic
    assert len(np.unique(subset[:, 0])) == 200
    assert len(te._representative_subset(x[:10])) == 10


def test_runtime_side_does_not_import_tensorflow(exports):
    path = exports["sparse", "int8"].path
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from fedprune.converters.tflite_export import open_interpreter, predict_tflite, sparse_weight_stats
        interpreter, runtime = open_interpreter({str(path)!r})
        out = predict_tflite(interpreter, np.zeros((3, 64), np.float32))
        assert out.shape == (3, 10), out.shape
        assert any(s["sparse"] for s in sparse_weight_stats({str(path)!r}))
        heavy = ("tensorflow", "tf_keras", "keras")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        assert not loaded, loaded
        print(runtime)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("ai-edge-litert")

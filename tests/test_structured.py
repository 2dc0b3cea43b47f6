"""Tests for fedprune.pruning.structured: removing whole units/filters and rebuilding the model.

The key property: the rebuilt smaller model computes exactly what the original computes once the
removed units are dead (kernel slice, bias and the next layer's incoming weights zeroed). The
zeroing here is written out by hand per model, independently of the code under test, including
the channels-last Flatten order behind a Conv.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.data import load_dataset
from fedprune.keras_setup import keras
from fedprune.models import digits_cnn, get_layer_weights, mlp, set_layer_weights, weight_names
from fedprune.pruning.structured import (
    StructuredPlan,
    apply_structured,
    count_flops,
    measure_latency_ms,
    plan_structured,
    unit_norms,
)

L = keras.layers


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _randomized(model: keras.Model, seed: int) -> list[np.ndarray]:
    """A weight list unlike the model's own: random kernels, non-zero biases, valid BN stats."""
    rng = np.random.default_rng(seed)
    out = []
    for name, w in zip(weight_names(model), get_layer_weights(model)):
        if name.endswith("moving_variance"):
            out.append(rng.uniform(0.5, 2.0, w.shape).astype(np.float32))
        elif name.endswith("gamma"):
            out.append(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
        elif w.ndim == 1:
            out.append((0.3 * rng.standard_normal(w.shape)).astype(np.float32))
        else:
            fan_in = int(np.prod(w.shape[:-1]))
            out.append((rng.standard_normal(w.shape) / np.sqrt(fan_in)).astype(np.float32))
    return out


def _index(model: keras.Model, name: str) -> int:
    return weight_names(model).index(name)


def _dead(model, weights, plan, successors):
    """Zero the removed units' kernel slices and biases and their outgoing weights.

    ``successors[layer] = (next_layer, view)``: ``view`` reshapes the next kernel so that the
    removed layer's units are axis -2 (``None``: the kernel is already ``(..., in, out)``).
    """
    w = [a.copy() for a in weights]
    for name, keep in plan.keep.items():
        k, b = _index(model, f"{name}/kernel"), _index(model, f"{name}/bias")
        removed = np.setdiff1d(np.arange(w[k].shape[-1]), keep)
        assert removed.size, f"the test wants something removed from {name}"
        w[k][..., removed] = 0.0
        w[b][removed] = 0.0
        nxt, view = successors[name]
        nk = _index(model, f"{nxt}/kernel")
        kernel = w[nk] if view is None else w[nk].reshape(view)  # a view: writes go through
        kernel[..., removed, :] = 0.0
    return w


def _predict(model, weights, x):
    set_layer_weights(model, weights)
    return model.predict(x, verbose=0, batch_size=256)


def _check_dead_equivalence(model, weights, plan, successors, x):
    small, small_weights = apply_structured(model, weights, plan)
    assert type(small) is type(model)
    assert [(type(a), a.name) for a in small.layers] == [(type(b), b.name) for b in model.layers]
    reference = _predict(model, _dead(model, weights, plan, successors), x)
    original = _predict(model, weights, x)
    assert not np.allclose(reference, original, atol=1e-3), "zeroing should change the outputs"
    got = small.predict(x, verbose=0, batch_size=256)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    # The returned list is the flat layout of the small model and is what it holds.
    for a, b in zip(small_weights, get_layer_weights(small), strict=True):
        np.testing.assert_array_equal(a, b)
    return small


# --------------------------------------------------------------------- the key equivalence


def test_digits_cnn_equals_original_with_dead_units(digits):
    model = digits_cnn((8, 8, 1), 10)
    weights = _randomized(model, seed=1)  # not set in the model: planning reads the list
    plan = plan_structured(model, weights, 0.5, norm="l2")
    assert sorted(plan.keep) == ["conv1", "conv2", "dense1"]
    successors = {
        "conv1": ("conv2", None),  # conv2 kernel (3, 3, 32, 64): input channels on axis -2
        "conv2": ("dense1", (4, 4, 64, 128)),  # Flatten of (4, 4, 64), channels last
        "dense1": ("logits", None),
    }
    _check_dead_equivalence(model, weights, plan, successors, digits.x_test)


def test_mlp_equals_original_with_dead_units(digits):
    bc = load_dataset("breast_cancer")
    model = mlp((30,), 2)
    weights = _randomized(model, seed=2)
    plan = plan_structured(model, weights, {"dense1": 0.7, "dense2": 0.3}, norm="l1")
    assert {k: v.size for k, v in plan.keep.items()} == {"dense1": 38, "dense2": 45}
    successors = {"dense1": ("dense2", None), "dense2": ("logits", None)}
    _check_dead_equivalence(model, weights, plan, successors, bc.x_test)


def test_functional_chain_with_bn_pooling_and_activations():
    inp = keras.Input((16, 3), name="x")
    h = L.Conv1D(8, 3, padding="same", name="c1")(inp)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU(name="relu1")(h)
    h = L.AveragePooling1D(2, name="avg")(h)
    h = L.Dropout(0.5, name="drop")(h)
    h = L.Conv1D(6, 3, padding="valid", name="c2")(h)
    h = L.Activation("tanh", name="tanh")(h)
    h = L.MaxPooling1D(2, name="max")(h)  # (3, 6)
    h = L.Flatten(name="flat")(h)  # 18
    h = L.BatchNormalization(name="bn2")(h)
    h = L.Dense(7, activation="sigmoid", name="d1")(h)
    out = L.Dense(3, name="logits")(h)
    model = keras.Model(inp, out, name="chain")
    weights = _randomized(model, seed=3)
    plan = plan_structured(model, weights, 0.5)
    assert {k: v.size for k, v in plan.keep.items()} == {"c1": 4, "c2": 3, "d1": 3}  # round(3.5) = 4 removed
    successors = {"c1": ("c2", None), "c2": ("d1", (3, 6, 7)), "d1": ("logits", None)}
    x = np.random.default_rng(0).standard_normal((64, 16, 3)).astype(np.float32)
    small = _check_dead_equivalence(model, weights, plan, successors, x)
    assert small.get_layer("bn1").weights[0].shape == (4,)
    assert small.get_layer("bn2").weights[0].shape == (9,)  # 3 positions x 3 channels


def test_global_pooling_chain():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(10, 3, activation="relu", name="c1"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dense(5, name="logits"),
        ]
    )
    weights = _randomized(model, seed=4)
    plan = plan_structured(model, weights, 0.4)
    x = np.random.default_rng(1).standard_normal((32, 6, 6, 2)).astype(np.float32)
    _check_dead_equivalence(model, weights, plan, {"c1": ("logits", None)}, x)


# ----------------------------------------------------------------------------- sizes, FLOPs


def test_parameter_counts_shrink_as_expected():
    cnn = digits_cnn((8, 8, 1), 10)
    assert cnn.count_params() == 320 + 18_496 + 131_200 + 1_290
    small, _ = apply_structured(cnn, None, plan_structured(cnn, None, 0.5))
    # conv1 16 filters, conv2 32, dense1 64 units fed by 4*4*32 = 512 features.
    assert small.count_params() == (9 * 16 + 16) + (9 * 16 * 32 + 32) + (512 * 64 + 64) + (64 * 10 + 10)

    net = mlp((30,), 2)
    assert net.count_params() == 3_968 + 8_256 + 130
    small, _ = apply_structured(net, None, plan_structured(net, None, 0.5))
    assert small.count_params() == (30 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)


def test_count_flops_matches_hand_computation():
    conv = keras.Sequential(
        [keras.Input((5, 5, 2)), L.Conv2D(3, 3, name="c"), L.Flatten(), L.Dense(4, name="d")]
    )
    # Conv: 3x3 output positions x (3*3*2 inputs x 3 filters) = 486 MACs; Dense: 27 x 4 = 108.
    assert count_flops(conv) == 2 * (486 + 108)
    seq = keras.Sequential(
        [keras.Input((10, 2)), L.Conv1D(4, 3, padding="same"), L.Dense(5), L.MaxPooling1D(2)]
    )
    # Conv1D: 10 positions x 3*2*4 = 240 MACs; Dense on (10, 4): 10 positions x 4*5 = 200.
    assert count_flops(seq) == 2 * (240 + 200)
    cnn = digits_cnn((8, 8, 1), 10)
    assert count_flops(cnn) == 2 * (64 * 9 * 32 + 64 * 9 * 32 * 64 + 1024 * 128 + 128 * 10)


# ------------------------------------------------------------------------------- the ranking


def _hand_model(kernel: np.ndarray) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((kernel.shape[0],)), L.Dense(kernel.shape[1], name="hidden"), L.Dense(2, name="logits")]
    )
    w = get_layer_weights(model)
    w[0] = kernel.astype(np.float32)
    set_layer_weights(model, w)
    return model


def test_l1_and_l2_rank_units_differently():
    # Columns are units: L1 = (4, 3, 4), L2 = (2, 3, 2.83).
    kernel = np.array([[1, 3, 2], [1, 0, 2], [1, 0, 0], [1, 0, 0]], dtype=np.float32)
    model = _hand_model(kernel)
    np.testing.assert_allclose(unit_norms(model, norm="l1")["hidden"], [4, 3, 4])
    np.testing.assert_allclose(unit_norms(model, norm="l2")["hidden"], [2, 3, np.sqrt(8)])
    assert set(unit_norms(model)) == {"hidden", "logits"}
    assert plan_structured(model, None, 1 / 3, norm="l1").keep["hidden"].tolist() == [0, 2]
    assert plan_structured(model, None, 1 / 3, norm="l2").keep["hidden"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="norm"):
        unit_norms(model, norm="l3")  # type: ignore[arg-type]


def test_conv_filter_norms_use_all_axes_but_the_last_and_ties_go_by_position():
    model = keras.Sequential([keras.Input((4, 4, 2)), L.Conv2D(4, 2, name="c"), L.Flatten(), L.Dense(2)])
    w = get_layer_weights(model)
    w[0] = np.zeros((2, 2, 2, 4), np.float32)
    w[0][..., 0] = 1.0  # L2 = sqrt(8)
    w[0][0, 0, 0, 1] = 5.0  # L2 = 5
    w[0][1, 1, 1, 2] = 2.0  # L2 = 2, tied with filter 3
    w[0][0, 1, 0, 3] = -2.0
    norms = unit_norms(model, w, "l2")["c"]
    np.testing.assert_allclose(norms, [np.sqrt(8), 5, 2, 2])
    # One of the tied filters goes: the lower index first, as magnitude_mask breaks ties.
    assert plan_structured(model, w, 0.25).keep["c"].tolist() == [0, 1, 3]


# ------------------------------------------------------------------- leave, min_units, output


def test_leave_min_units_and_fraction_dict():
    model = digits_cnn((8, 8, 1), 10)
    plan = plan_structured(model, None, 0.5, leave=("logits", "conv1"))
    assert sorted(plan.keep) == ["conv2", "dense1"]

    plan = plan_structured(model, None, 0.9, min_units=40)
    assert plan.kept_units("conv1") == 32  # fewer units than min_units: all kept
    assert plan.kept_units("conv2") == 40  # 64 - round(57.6) = 6, raised to 40
    assert plan.kept_units("dense1") == 40
    assert plan.kept_units("logits") is None

    plan = plan_structured(model, None, 1.0)
    assert {k: v.size for k, v in plan.keep.items()} == {"conv1": 1, "conv2": 1, "dense1": 1}
    small, _ = apply_structured(model, None, plan)
    assert small.output_shape == (None, 10)

    plan = plan_structured(model, None, {"dense1": 0.25})
    assert list(plan.keep) == ["dense1"] and plan.kept_units("dense1") == 96

    for bad, match in [
        ({"logits": 0.5}, "output layer"),
        ({"pool": 0.5}, "not a Dense"),
        ({"nope": 0.5}, "names no layer"),
        ({"dense1": 1.5}, r"\[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            plan_structured(model, None, bad)
    with pytest.raises(ValueError, match="both"):
        plan_structured(model, None, {"conv1": 0.5}, leave=("conv1",))
    with pytest.raises(ValueError, match="min_units"):
        plan_structured(model, None, 0.5, min_units=0)


def test_the_output_layer_is_never_cut():
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(8, name="hidden"), L.Dense(4, name="head"), L.Activation("softmax")]
    )
    plan = plan_structured(model, None, 0.5, leave=())
    assert list(plan.keep) == ["hidden"]
    with pytest.raises(ValueError, match="output layer"):
        apply_structured(model, None, StructuredPlan({"head": np.array([0, 1])}))
    with pytest.raises(ValueError, match="has 8"):
        apply_structured(model, None, StructuredPlan({"hidden": np.array([0, 8])}))


def test_plan_validation_and_weight_list_length():
    with pytest.raises(ValueError, match="sorted"):
        StructuredPlan({"a": np.array([2, 1])})
    with pytest.raises(ValueError, match="non-empty"):
        StructuredPlan({"a": np.array([], dtype=np.int64)})
    model = mlp((30,), 2)
    with pytest.raises(ValueError, match="weight tensors"):
        plan_structured(model, get_layer_weights(model)[:-1], 0.5)


# -------------------------------------------------------------------------- unsupported models


def _residual():
    inp = keras.Input((8,))
    h = L.Dense(8, name="a")(inp)
    return keras.Model(inp, L.Dense(2)(L.Add()([inp, h])))


def _concat():
    inp = keras.Input((8,))
    return keras.Model(inp, L.Dense(2)(L.Concatenate()([L.Dense(4)(inp), L.Dense(4)(inp)])))


def _depthwise():
    return keras.Sequential([keras.Input((8, 8, 3)), L.DepthwiseConv2D(3), L.Flatten(), L.Dense(2)])


def _transpose():
    return keras.Sequential([keras.Input((4, 4, 3)), L.Conv2DTranspose(4, 3), L.Flatten(), L.Dense(2)])


def _shared():
    inp = keras.Input((8,))
    d = L.Dense(8, name="shared")
    return keras.Model(inp, L.Dense(2)(d(d(inp))))


def _channels_first():
    return keras.Sequential(
        [keras.Input((3, 8, 8)), L.Conv2D(4, 3, data_format="channels_first"), L.Flatten(), L.Dense(2)]
    )


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.d1 = L.Dense(4)
        self.d2 = L.Dense(2)

    def call(self, x):
        return self.d2(self.d1(x))


def _subclassed():
    m = _Subclassed()
    m(np.zeros((1, 3), np.float32))
    return m


@pytest.mark.parametrize(
    "build, match",
    [
        (_residual, "Add"),
        (_concat, "Concatenate"),
        (_depthwise, "DepthwiseConv2D"),
        (_transpose, "Conv2DTranspose"),
        (_shared, "shared"),
        (_channels_first, "channels_first"),
        (_subclassed, "subclassed"),
    ],
)
def test_unsupported_architectures_raise(build, match):
    model = build()
    with pytest.raises(NotImplementedError, match=match):
        plan_structured(model, None, 0.5)
    with pytest.raises(NotImplementedError, match=match):
        apply_structured(model, None, StructuredPlan({}))


# ------------------------------------------------------------------------------ TFLite export


def test_smaller_model_exports_smaller_tflite_and_runs(digits, tmp_path):
    from fedprune.converters.tflite_export import export_sparse_tflite, open_interpreter, predict_tflite

    model = digits_cnn((8, 8, 1), 10)
    weights = _randomized(model, seed=5)
    set_layer_weights(model, weights)
    small, _ = apply_structured(model, weights, plan_structured(model, weights, 0.5))
    x, y = digits.x_test[:100], digits.y_test[:100]
    big = export_sparse_tflite(model, tmp_path / "big.tflite", eval_x=x, eval_y=y)
    little = export_sparse_tflite(small, tmp_path / "small.tflite", eval_x=x, eval_y=y)
    assert little.size_bytes < 0.35 * big.size_bytes  # 38k vs 151k float32 parameters
    assert little.accuracy is not None
    interpreter, _ = open_interpreter(little.path)
    np.testing.assert_allclose(
        predict_tflite(interpreter, x), small.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )
    latency = measure_latency_ms(little.path, x, runs=20, warmup=2)
    assert 0.0 < latency < 1_000.0
    assert measure_latency_ms(little.path, x[0], runs=3, warmup=0) > 0.0

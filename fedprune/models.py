"""Built-in model factories for the examples.

A factory is ``f(input_shape, num_classes) -> keras.Model`` (uncompiled, outputs logits); a task
file names one as ``module:function``, so users plug in their own the same way. Layers are
of the types in ``PRUNABLE_KERNELS`` so they are pruned; names are stable so
``pruning.leave_dense`` can name them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Callable

from fedprune.architecture import ArchitectureError, check_architecture, layer_classes
from fedprune.keras_setup import keras
from fedprune.names import parse_import_spec

log = logging.getLogger(__name__)

ModelFactory = Callable[[tuple[int, ...], int], "keras.Model"]


def digits_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """A small CNN for 8x8 digits, about 150k parameters.

    Wider than 8x8 digits need, on purpose: real models carry the redundancy that pruning removes,
    and a network sized to the bone would only show pruning hurting.
    """
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="dense1"),
            keras.layers.Dense(num_classes, name="logits"),
        ],
        name="digits_cnn",
    )


def digits_bn_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The digits CNN with a BatchNormalization after each hidden layer, at Keras's defaults
    (momentum 0.99), as most edge models (MobileNet-style) have it: the model that showed the
    moving statistics going wrong under federated averaging (docs/pruning.md, BatchNorm)."""
    return _digits_bn(input_shape, num_classes, momentum=0.99, name="digits_bn_cnn")


def _digits_bn(input_shape: tuple[int, ...], num_classes: int, momentum: float, name: str) -> keras.Model:
    L = keras.layers
    return keras.Sequential(
        [
            L.Input(shape=input_shape),
            L.Conv2D(32, 3, padding="same", use_bias=False, name="conv1"),
            L.BatchNormalization(momentum=momentum, name="bn1"),
            L.ReLU(name="relu1"),
            L.Conv2D(64, 3, padding="same", use_bias=False, name="conv2"),
            L.BatchNormalization(momentum=momentum, name="bn2"),
            L.ReLU(name="relu2"),
            L.MaxPooling2D(2, name="pool"),
            L.Flatten(name="flatten"),
            L.Dense(128, use_bias=False, name="dense1"),
            L.BatchNormalization(momentum=momentum, name="bn3"),
            L.ReLU(name="relu3"),
            L.Dense(num_classes, name="logits"),
        ],
        name=name,
    )


def mnist1d_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """A 1-D CNN for MNIST-1D sequences (40 x 1), about 420k parameters.

    Three convolutions (64, 128, 128 filters) and a 256-unit dense layer: wider than the task
    needs, as real models are, so that pruning has redundancy to remove. The narrower 176k-parameter
    version (32/64 filters, 128 units) reached 0.88 in 40 federated rounds and lost 14 points at
    90 % sparsity; this one reaches about 0.96 dense (the data set's paper reports 94 % for a CNN
    trained centrally).
    """
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Conv1D(64, 5, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv1D(128, 5, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling1D(2, name="pool"),
            keras.layers.Conv1D(128, 3, padding="same", activation="relu", name="conv3"),
            keras.layers.MaxPooling1D(2, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(256, activation="relu", name="dense1"),
            keras.layers.Dense(num_classes, name="logits"),
        ],
        name="mnist1d_cnn",
    )


def mlp(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """A two-hidden-layer MLP for tabular data (e.g. breast_cancer)."""
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="dense1"),
            keras.layers.Dense(64, activation="relu", name="dense2"),
            keras.layers.Dense(num_classes, name="logits"),
        ],
        name="mlp",
    )


def load_factory(spec: str) -> ModelFactory:
    """Import ``module:function``; errors say which part failed.

    The spec's form is checked before anything is imported (``fedprune.names.parse_import_spec``:
    no standard-library module such as ``os``), and what it names must be a Python function
    defined in that module (not a builtin, a class, or a function it imported from elsewhere).
    """
    module_name, func_name = parse_import_spec(spec, "model.factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model.factory {spec!r}: cannot import module {module_name!r} ({e})") from None
    factory = getattr(module, func_name, None)
    if factory is None:
        raise ValueError(f"model.factory {spec!r}: {module_name} has no function {func_name!r}")
    if not inspect.isfunction(factory) or factory.__module__ != module_name:
        raise ValueError(f"model.factory {spec!r}: {func_name} must be a function defined in {module_name}, "
                         f"taking (input_shape, num_classes)")
    return factory


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    factory = load_factory(spec)
    try:
        model = factory(tuple(input_shape), int(num_classes))
    except Exception as e:  # the user's code: one line here, the traceback at DEBUG
        log.debug("model.factory %r failed", spec, exc_info=True)
        raise ValueError(f"model.factory {spec!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model.factory {spec!r} returned {type(model).__name__}, not a tf_keras Model; "
            "build it with `from fedprune.keras_setup import keras`"
        )
    custom = layer_classes(model)
    try:  # what devices will check (their own custom layers aside): fail here, not on every device
        check_architecture(model.to_json(), custom)
    except ArchitectureError as e:
        raise ValueError(f"model.factory {spec!r} builds a model devices refuse: {e}") from None
    if custom:
        log.warning("model.factory %r uses layer classes of its own (%s): each device must allow them in "
                    "[model] custom_layers", spec, ", ".join(sorted(f"{c.__module__}:{n}" for n, c in custom.items())))
    return model


# --- The weight layout both sides agree on -------------------------------------------------------
# Weights travel as one flat list: layer by layer in ``model.layers`` order, each layer's own
# ``get_weights()`` order. (``model.get_weights()`` puts all trainable weights before all
# non-trainable ones, an order that changes once tfmot wraps a layer.) Masks align with that list.

#: Layer types whose kernels are pruned, and the names of those kernels. tfmot's own registry
#: prunes no DepthwiseConv2D weight and only the pointwise kernel of a separable convolution; the
#: device's trainer names these kernels to tfmot itself (``edge_agent/trainer.py``), so every
#: kernel of these layers is pruned. Layers of other types keep their weights dense, and a run's
#: report names them with the reason (``unpruned_layers``).
PRUNABLE_KERNELS: dict[str, tuple[str, ...]] = {
    "Dense": ("kernel",),
    "Conv1D": ("kernel",), "Conv2D": ("kernel",), "Conv3D": ("kernel",),
    "Conv1DTranspose": ("kernel",), "Conv2DTranspose": ("kernel",), "Conv3DTranspose": ("kernel",),
    "DepthwiseConv1D": ("depthwise_kernel",), "DepthwiseConv2D": ("depthwise_kernel",),
    "SeparableConv1D": ("depthwise_kernel", "pointwise_kernel"),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel"),
}
PRUNABLE_LAYER_TYPES = tuple(PRUNABLE_KERNELS)


def _inner(layer: "keras.layers.Layer") -> "keras.layers.Layer":
    # tfmot's PruneLowMagnitude wrapper keeps the wrapped layer as `.layer`.
    return getattr(layer, "layer", layer) if type(layer).__name__ == "PruneLowMagnitude" else layer


def weight_variables(model: "keras.Model") -> list:
    """The model's weight variables in the order ``get_layer_weights`` lists their values (a pruning
    wrapper's own variables left out)."""
    return [v for layer in model.layers for v in _inner(layer).weights]


def get_layer_weights(model: "keras.Model") -> list:
    return [w for layer in model.layers for w in _inner(layer).get_weights()]


def set_layer_weights(model: "keras.Model", weights: list) -> None:
    i = 0
    for layer in model.layers:
        inner = _inner(layer)
        n = len(inner.weights)
        if n:
            inner.set_weights(weights[i : i + n])
        i += n
    if i != len(weights):
        raise ValueError(f"model has {i} weight tensors, got {len(weights)}")


def architecture_of(model: "keras.Model"):
    """The ``fedprune.converters.protocol.Architecture`` message that describes ``model`` to the devices."""
    import hashlib

    from fedprune.converters.protocol import Architecture

    model_json = model.to_json()
    return Architecture(
        model_json=model_json,
        digest=hashlib.sha256(model_json.encode()).hexdigest()[:32],
        shapes=[list(w.shape) for w in get_layer_weights(model)],
        names=weight_names(model),
    )


def weight_names(model: "keras.Model") -> list[str]:
    return [f"{_inner(l).name}/{w.name.split('/')[-1].split(':')[0]}" for l in model.layers for w in _inner(l).weights]


def prunable_layers(model: "keras.Model", leave_dense: tuple[str, ...] = ()) -> list[str]:
    """Names of the layers whose kernels are pruned: layers of a ``PRUNABLE_KERNELS`` type not
    in ``leave_dense``."""
    names = [l.name for l in model.layers]
    unknown = sorted(set(leave_dense) - set(names))
    if unknown:
        raise ValueError(f"pruning.leave_dense names no layer of the model: {unknown}; layers: {names}")
    return [
        l.name
        for l in model.layers
        if type(_inner(l)).__name__ in PRUNABLE_LAYER_TYPES and l.name not in leave_dense
    ]


def kernel_positions(model: "keras.Model", layers: list[str]) -> dict[int, str]:
    """Index in the flat weight list of every prunable kernel of the named layers (two for a
    separable convolution: depthwise, then pointwise), and its layer's name."""
    positions: dict[int, str] = {}
    i = 0
    for layer in model.layers:
        inner = _inner(layer)
        if inner.name in layers:
            ids = [id(w) for w in inner.weights]
            for attribute in PRUNABLE_KERNELS[type(inner).__name__]:
                positions[i + ids.index(id(getattr(inner, attribute)))] = inner.name
        i += len(inner.weights)
    return positions


def unpruned_layers(model: "keras.Model", leave_dense: tuple[str, ...] = ()) -> dict[str, str]:
    """Layers holding a weight matrix (or larger) that pruning leaves dense, and why: for a run's
    report, so that no layer goes unpruned in silence. Biases and normalization vectors are not
    listed (they are never pruned)."""
    out: dict[str, str] = {}
    for layer in model.layers:
        inner = _inner(layer)
        if not any(len(w.shape) >= 2 for w in inner.weights):
            continue
        kind = type(inner).__name__
        if inner.name in leave_dense:
            out[inner.name] = f"{kind}: left dense by pruning.leave_dense"
        elif kind not in PRUNABLE_KERNELS:
            out[inner.name] = (f"{kind}: not a prunable layer type; fedprune prunes the kernels of "
                               f"{', '.join(PRUNABLE_KERNELS)}")
    return out


def full_masks(model: "keras.Model", leave_dense: tuple[str, ...] = ()):
    """All-kept masks for the prunable kernels, ``None`` elsewhere."""
    import numpy as np

    weights = get_layer_weights(model)
    masks: list = [None] * len(weights)
    for idx in kernel_positions(model, prunable_layers(model, leave_dense)):
        masks[idx] = np.ones(weights[idx].shape, dtype=bool)
    return masks

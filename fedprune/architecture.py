"""The model architecture is data, not code: check a Keras JSON config against an allow-list
before anything in it is imported or deserialized, then build it.

Keras's ``model_from_json`` resolves names: a ``"function_type": "function"`` or a
``"module"`` key makes it import a module and call what it finds there (``os:system``), and a
``Lambda`` layer carries bytecode. The architecture reaches a device over MQTT, so whoever can
publish on the architecture topic (anyone, on an open broker) could run code on every device.
:func:`check_architecture` walks the parsed JSON (plain ``json.loads``, no hooks) and refuses
every serialized object that is not on the lists below, naming it and where it was found;
:func:`model_from_architecture_json` checks, then builds. Every place that builds a model from
JSON (devices, the training child, the aggregator's ``--resume``) goes through it.

A layer class of one's own is allowed only through :func:`register_custom_layers`, with
``"module:Class"`` specs from the device's own configuration (``[model] custom_layers`` in the
agent's config), never from the network: the module is imported when a model is built, and the
attribute must be a Keras ``Layer`` subclass.

This module imports no TensorFlow until :func:`model_from_architecture_json` builds a model, so
the TensorFlow-free agent can check an architecture as it arrives.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from fedprune.names import parse_import_spec

__all__ = [
    "ArchitectureError",
    "check_architecture",
    "model_from_architecture_json",
    "register_custom_layers",
    "registered_custom_layers",
    "parse_custom_layer_spec",
    "layer_classes",
]


class ArchitectureError(ValueError):
    """An architecture that names something outside the allow-list; the message says what and where."""


# Layers whose configs hold only numbers, strings and the allow-listed objects below. Left out on
# purpose: Lambda, TFOpLambda, SlicingOpLambda and TensorFlowOpLayer (they run code or arbitrary TF
# ops), ClassMethod/InstanceMethod/InstanceProperty (they call methods by name), ResidualWrapper
# (a serialized function), lookup and text layers (they read vocabulary files), feature columns.
LAYERS = frozenset({
    "InputLayer", "Dense", "EinsumDense",
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "Flatten", "Reshape", "Permute", "RepeatVector", "Identity", "Masking",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "Rescaling",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "ActivityRegularization",
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU",
    "Embedding", "SimpleRNN", "LSTM", "GRU", "SimpleRNNCell", "LSTMCell", "GRUCell", "RNN", "StackedRNNCells",
    "Bidirectional", "TimeDistributed",
    "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot",
    "Attention", "AdditiveAttention", "MultiHeadAttention",
    "Sequential", "Functional", "Model",
})
MODELS = frozenset({"Sequential", "Functional", "Model"})
ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "swish", "silu", "mish", "sigmoid",
    "hard_sigmoid", "tanh", "softmax", "log_softmax", "softplus", "softsign", "exponential",
})
INITIALIZERS = frozenset({
    "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal", "VarianceScaling",
    "Orthogonal", "Identity", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "LecunNormal",
    "LecunUniform",
    "zeros", "ones", "constant", "random_normal", "random_uniform", "truncated_normal", "variance_scaling",
    "orthogonal", "identity", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform", "lecun_normal",
    "lecun_uniform",
})
REGULARIZERS = frozenset({"L1", "L2", "L1L2", "OrthogonalRegularizer", "l1", "l2", "l1_l2",
                          "orthogonal_regularizer"})
CONSTRAINTS = frozenset({"MaxNorm", "NonNeg", "UnitNorm", "MinMaxNorm", "RadialConstraint",
                         "max_norm", "non_neg", "unit_norm", "min_max_norm", "radial_constraint"})
DTYPE_POLICIES = frozenset({"Policy", "DTypePolicy"})

# Per kind of object: the names allowed, and the "module" values Keras writes beside them (None:
# the key left out or null). A module is where Keras would import the name from: only its own.
_KINDS: dict[str, tuple[frozenset[str], frozenset[str | None]]] = {
    "layer": (LAYERS, frozenset({None, "keras.layers", "keras", "keras.models"})),
    "initializer": (INITIALIZERS, frozenset({None, "keras.initializers"})),
    "regularizer": (REGULARIZERS, frozenset({None, "keras.regularizers"})),
    "constraint": (CONSTRAINTS, frozenset({None, "keras.constraints"})),
    "dtype policy": (DTYPE_POLICIES, frozenset({None, "keras.mixed_precision", "keras"})),
}
# Keys a serialized object may carry besides class_name and config (what tf_keras's to_json writes).
_OBJECT_KEYS = frozenset({"class_name", "config", "module", "registered_name", "build_config", "name",
                          "inbound_nodes", "shared_object_id"})
_TOP_LEVEL_KEYS = frozenset({"class_name", "config", "module", "registered_name", "keras_version", "backend"})
# Keys that mean "deserialize code or a foreign object here", refused wherever they appear.
_FORBIDDEN_KEYS = frozenset({"function_type", "output_shape_type", "__passive_serialization__", "__lambda__",
                             "spec_name", "type_spec", "function", "module", "registered_name"})
_LAYER_KEYS = frozenset({"layer", "forward_layer", "backward_layer", "cell"})
_LAYER_LIST_KEYS = frozenset({"layers", "cells"})
_KERAS_PACKAGES = frozenset({"keras", "tf_keras", "tensorflow", "tensorflow_model_optimization"})
_MAX_DEPTH = 64  # nesting of JSON containers; Keras configs of real models stay under 20
_DTYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # float32, mixed_float16


# --- custom layers: from the device's own configuration only ------------------------------------

_custom_lock = threading.Lock()
_custom_specs: dict[str, str] = {}  # class name -> "module:Class"


def parse_custom_layer_spec(spec: str) -> tuple[str, str]:
    """``"module:Class"`` split in two; ``ArchitectureError`` if it is not of that form
    (:func:`fedprune.names.parse_import_spec`)."""
    try:
        return parse_import_spec(spec, "custom layer")
    except ValueError as e:
        raise ArchitectureError(str(e)) from None


def register_custom_layers(specs: Iterable[str]) -> None:
    """Allow exactly these ``"module:Class"`` layer classes (replacing any registered before).

    Call it with the device's own configuration only: the module is imported when a model that
    uses the class is built. Nothing is imported here.
    """
    parsed = {}
    for spec in specs:
        module, name = parse_custom_layer_spec(spec)
        if name in LAYERS or module.split(".")[0] in _KERAS_PACKAGES:  # e.g. Keras's own Lambda: never
            raise ArchitectureError(f"custom layer {spec!r} names a Keras layer, not one of your own")
        parsed[name] = f"{module}:{name}"
    with _custom_lock:
        _custom_specs.clear()
        _custom_specs.update(parsed)


def registered_custom_layers() -> tuple[str, ...]:
    """The ``"module:Class"`` specs allowed now."""
    with _custom_lock:
        return tuple(_custom_specs.values())


def _import_custom_layers() -> dict[str, type]:
    from fedprune.keras_setup import keras

    classes: dict[str, type] = {}
    for spec in registered_custom_layers():
        module_name, name = parse_custom_layer_spec(spec)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ArchitectureError(f"custom layer {spec!r}: cannot import {module_name!r} ({e})") from None
        cls = getattr(module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
            raise ArchitectureError(f"custom layer {spec!r}: {module_name}.{name} is not a Keras Layer class")
        classes[name] = cls
        classes[keras.saving.get_registered_name(cls)] = cls  # "Package>Name" when registered
    return classes


# --- the check ------------------------------------------------------------------------------------


def check_architecture(model_json: str | bytes, custom_objects: Mapping[str, type] | None = None) -> dict[str, Any]:
    """The parsed config of ``model_json`` if every object in it is allowed; else
    ``ArchitectureError`` naming the first one that is not, and where.

    Allowed layer classes are :data:`LAYERS`, the classes registered with
    :func:`register_custom_layers`, and those in ``custom_objects`` (by the class name the JSON
    uses), each only from its own module. Imports nothing.
    """
    try:
        config = json.loads(model_json)
    except (ValueError, RecursionError) as e:
        raise ArchitectureError(f"architecture: not valid JSON ({str(e)[:100]})") from None
    if not isinstance(config, dict):
        raise ArchitectureError(f"architecture: expected a JSON object, got {type(config).__name__}")
    extra = sorted(set(config) - _TOP_LEVEL_KEYS)
    if extra:
        raise ArchitectureError(f"architecture: unexpected top-level key {extra[0]!r}")
    if config.get("class_name") not in MODELS:
        raise ArchitectureError(f"architecture: the top level must be one of {sorted(MODELS)}, "
                                f"got class_name {config.get('class_name')!r}")
    with _custom_lock:
        custom = {name: spec.partition(":")[0] for name, spec in _custom_specs.items()}
    custom.update({name: cls.__module__ for name, cls in (custom_objects or {}).items()})
    _Walker(custom).object(config, "layer", "architecture", 0)
    return config


class _Walker:
    def __init__(self, custom_layers: Mapping[str, str]) -> None:
        self.custom_layers = custom_layers  # class name -> the only module it may come from

    def value(self, value: Any, key: str, where: str, depth: int) -> None:
        """Any JSON value found under ``key``: what kind of object the key holds decides what is allowed."""
        if depth > _MAX_DEPTH:
            raise ArchitectureError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
        kind = _kind_of_key(key)
        if isinstance(value, dict):
            if "class_name" not in value:
                for k, v in value.items():
                    self.key(k, where)
                    self.value(v, k, f"{where}.{k}", depth + 1)
            elif value["class_name"] == "__tuple__" and set(value) == {"class_name", "items"}:
                self.value(value["items"], key, where, depth + 1)
            elif kind is None or kind == "activation":
                raise ArchitectureError(f"{where}: a serialized object ({_name(value)}) is not allowed here")
            else:
                self.object(value, kind, where, depth)
        elif isinstance(value, list):
            item_key = "layer" if key in _LAYER_LIST_KEYS else key
            for i, item in enumerate(value):
                self.value(item, item_key, f"{where}[{i}]", depth + 1)
        elif isinstance(value, str) and kind == "dtype policy":
            if not _DTYPE_NAME.match(value):
                raise ArchitectureError(f"{where}: dtype {value[:80]!r} is not allowed")
        elif isinstance(value, str) and kind is not None:
            self.name(value, kind, where)

    def object(self, obj: dict[str, Any], kind: str, where: str, depth: int) -> None:
        """A serialized object ``{"class_name": ..., "config": {...}}`` of ``kind``."""
        class_name = obj.get("class_name")
        if not isinstance(class_name, str):
            raise ArchitectureError(f"{where}: class_name must be a string, got {class_name!r}")
        where = f"{where} ({class_name})"
        extra = sorted(set(obj) - _OBJECT_KEYS - (_TOP_LEVEL_KEYS if depth == 0 else frozenset()))
        if extra:
            raise ArchitectureError(f"{where}: unexpected key {extra[0]!r} in a serialized {kind}")
        self.name(class_name, kind, where)
        custom = kind == "layer" and class_name in self.custom_layers
        module = obj.get("module")
        modules = {None, self.custom_layers[class_name]} if custom else _KINDS[kind][1]
        if module not in modules:
            raise ArchitectureError(f"{where}: {kind} from module {module!r} is not allowed; only from "
                                    f"{sorted(m for m in modules if m)}")
        registered = obj.get("registered_name")
        # Keras looks a registered name up among the custom objects, then in the module above.
        if registered is not None and registered != class_name and not (
                custom and isinstance(registered, str) and registered.endswith(f">{class_name}")):
            raise ArchitectureError(f"{where}: registered_name {registered!r} is not allowed")
        inner = obj.get("config", {})
        if inner is None:
            inner = {}
        if not isinstance(inner, dict):
            raise ArchitectureError(f"{where}: config must be a JSON object, got {type(inner).__name__}")
        for k, v in inner.items():
            self.key(k, where)
            self.value(v, k, f"{where}.{k}", depth + 1)
        for k in ("build_config", "inbound_nodes"):
            if k in obj:
                self.value(obj[k], k, f"{where}.{k}", depth + 1)

    def name(self, name: str, kind: str, where: str) -> None:
        allowed = ACTIVATIONS if kind == "activation" else _KINDS[kind][0]
        if kind == "layer" and name in self.custom_layers:
            return
        if name not in allowed:
            hint = (" (register a layer of your own with custom_layers in the device's config)"
                    if kind == "layer" else "")
            raise ArchitectureError(f"{where}: {kind} {name!r} is not allowed{hint}")

    @staticmethod
    def key(key: str, where: str) -> None:
        if key in _FORBIDDEN_KEYS:
            raise ArchitectureError(f"{where}: key {key!r} is not allowed (it makes Keras import or run code)")


def _kind_of_key(key: str) -> str | None:
    """What kind of object the config key ``key`` holds (None: plain data)."""
    if key in _LAYER_KEYS:
        return "layer"
    if key.endswith("activation"):
        return "activation"
    for suffix in ("initializer", "regularizer", "constraint"):
        if key.endswith(suffix):
            return suffix
    if key == "dtype":
        return "dtype policy"
    return None


def _name(obj: dict[str, Any]) -> str:
    return repr(obj.get("class_name"))[:80]


# --- building -----------------------------------------------------------------------------------


def model_from_architecture_json(model_json: str, custom_objects: Mapping[str, type] | None = None):
    """The Keras model of ``model_json``, after :func:`check_architecture` has allowed it.

    ``custom_objects``: layer classes the caller itself trusts (e.g. those of the model its own
    factory built), by the class name the JSON uses; the classes registered with
    :func:`register_custom_layers` are added. Imports TensorFlow.
    """
    extra = dict(custom_objects or {})
    check_architecture(model_json, extra)
    from fedprune.keras_setup import keras

    objects = {**_import_custom_layers(), **extra}
    return keras.models.model_from_json(model_json, custom_objects=objects or None)


def layer_classes(model: Any) -> dict[str, type]:
    """The layer classes of ``model`` (nested ones too) that are not Keras's own, by class name:
    the ``custom_objects`` that rebuild a model this process made itself. (Keras's own classes off
    the allow-list, such as ``Lambda``, are not among them: they stay refused.)"""
    classes: dict[str, type] = {}
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        if not type(layer).__module__.startswith(("tf_keras.", "keras.")):
            classes[type(layer).__name__] = type(layer)
        stack.extend(getattr(layer, "layers", []))
        stack.extend(x for x in (getattr(layer, "layer", None), getattr(layer, "cell", None)) if x is not None)
    return classes

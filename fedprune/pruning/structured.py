"""Structured pruning: remove whole Dense units and Conv filters and rebuild a smaller model.

Magnitude pruning (:mod:`fedprune.pruning.masks`) zeroes single weights: the file shrinks once
it is stored sparse, but RAM, FLOPs and latency stay those of the dense model. Removing whole
output units (Dense) or filters (Conv1D/Conv2D) shrinks every one of them, because the result
is an ordinary dense model with narrower layers.

Three steps, each usable on its own:

1. :func:`unit_norms` ranks the output units of each Dense/Conv1D/Conv2D layer by the L1 or L2
   norm of its kernel slice (``kernel[..., j]``: all axes but the last; the bias is not counted).
2. :func:`plan_structured` picks the units to keep: the ``round(fraction * units)`` lowest-norm
   units of each layer are removed (Python's ``round``, halves to even, as in
   :func:`fedprune.pruning.masks.magnitude_mask`); ties are broken by position, the lower index
   going first, so every party derives the same plan from the same weights.
3. :func:`apply_structured` builds the smaller model (same layer names and types, fewer units)
   and carries the surviving weights over, cutting the inputs of whatever follows a cut layer:
   the next Dense/Conv kernel's input axis, a BatchNormalization's per-channel vectors, and,
   through a ``Flatten`` of a ``(..., H, W, C)`` tensor, the Dense kernel rows that came from
   removed channels (channels-last order: flat index ``(h * W + w) * C + c``).

Removing a unit is exactly deleting a dead neuron: the smaller model computes the same function
as the original whose removed units have their kernel slice, bias and the following layer's
incoming weights set to zero (a removed unit's constant output, e.g. ``sigmoid(0)`` or a batch
norm's shift, only ever reached the rest of the network through those incoming weights).

Supported: ``keras.Sequential`` models and functional models that are a single chain (one input,
one output, each layer called once on the previous layer's output) built from Dense, Conv1D,
Conv2D and, in between, MaxPooling1D/2D, AveragePooling1D/2D, GlobalMax/AveragePooling1D/2D,
Flatten, Dropout, Activation, ReLU and BatchNormalization, all channels-last. Anything else
(branches, Add, Concatenate, DepthwiseConv2D, Conv2DTranspose, grouped convolutions, nested
models, tfmot wrappers) raises :class:`NotImplementedError`.

Weights follow the project's flat layout (:func:`fedprune.models.get_layer_weights`), so the
federation's aggregated weights can be planned on and cut directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedprune.keras_setup import keras, tf
from fedprune.models import _inner, get_layer_weights, set_layer_weights

__all__ = [
    "Norm",
    "StructuredPlan",
    "apply_structured",
    "count_flops",
    "measure_latency_ms",
    "plan_structured",
    "unit_norms",
]

logger = logging.getLogger(__name__)

Norm = Literal["l1", "l2"]

_L = keras.layers
#: Layers whose output units/filters can be removed (exact types: subclasses such as
#: Conv2DTranspose or DepthwiseConv2D lay their kernels out differently).
_UNIT_TYPES: tuple[type, ...] = (_L.Dense, _L.Conv1D, _L.Conv2D)
#: Layers that act on each channel separately and keep the last axis as it is.
_CHANNELWISE_TYPES: tuple[type, ...] = (
    _L.MaxPooling1D,
    _L.MaxPooling2D,
    _L.AveragePooling1D,
    _L.AveragePooling2D,
    _L.GlobalMaxPooling1D,
    _L.GlobalMaxPooling2D,
    _L.GlobalAveragePooling1D,
    _L.GlobalAveragePooling2D,
)
_ELEMENTWISE_TYPES: tuple[type, ...] = (_L.Dropout, _L.Activation, _L.ReLU)
_SUPPORTED_TYPES: tuple[type, ...] = (
    _UNIT_TYPES + _CHANNELWISE_TYPES + _ELEMENTWISE_TYPES + (_L.Flatten, _L.BatchNormalization)
)
_FLOP_TYPES: tuple[type, ...] = (_L.Dense, _L.Conv1D, _L.Conv2D, _L.Conv3D)


@dataclass(frozen=True, eq=False)
class StructuredPlan:
    """Which output units/filters of each layer survive.

    Attributes:
        keep: Layer name -> sorted, distinct indices (int64, 1-D, at least one) of the output
            units (Dense) or filters (Conv) that are kept. Layers not named keep all units.
    """

    keep: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        checked: dict[str, np.ndarray] = {}
        for name, idx in self.keep.items():
            arr = np.asarray(idx)
            if arr.ndim != 1 or arr.size == 0 or (arr.dtype.kind not in "iu"):
                raise ValueError(
                    f"plan for {name!r}: keep must be a non-empty 1-D integer array, got "
                    f"shape {arr.shape} dtype {arr.dtype}"
                )
            arr = arr.astype(np.int64)
            if arr[0] < 0 or np.any(np.diff(arr) <= 0):
                raise ValueError(f"plan for {name!r}: keep must be sorted, distinct and >= 0")
            arr.setflags(write=False)
            checked[str(name)] = arr
        object.__setattr__(self, "keep", checked)

    def kept_units(self, name: str) -> int | None:
        """How many units of ``name`` survive, or ``None`` if the plan leaves it whole."""
        idx = self.keep.get(name)
        return None if idx is None else int(idx.size)


# ------------------------------------------------------------------------------ model analysis


@dataclass(frozen=True)
class _Step:
    layer: Any  # keras.layers.Layer
    in_shape: tuple[int | None, ...]
    out_shape: tuple[int | None, ...]
    start: int  # index of the layer's first weight in the flat list
    count: int  # number of weights the layer holds


@dataclass(frozen=True)
class _Chain:
    steps: list[_Step]
    n_weights: int

    def unit_steps(self) -> list[_Step]:
        return [s for s in self.steps if type(s.layer) in _UNIT_TYPES]

    def output_unit_layer(self) -> str | None:
        """The last Dense/Conv layer: its units are the model's outputs and are never cut."""
        units = self.unit_steps()
        return units[-1].layer.name if units else None


def _type_name(layer: Any) -> str:
    return type(layer).__name__


def _unsupported(layer: Any, why: str = "") -> NotImplementedError:
    name = _type_name(layer)
    hint = why
    if not hint:
        if name == "PruneLowMagnitude":
            hint = "the model is wrapped by tfmot; apply tfmot.sparsity.keras.strip_pruning first"
        elif name in ("Add", "Concatenate", "Multiply", "Subtract", "Average", "Maximum", "Minimum"):
            hint = "merge layers (branches, residual connections) are not supported"
        elif isinstance(layer, keras.Model):
            hint = "nested models are not supported; flatten them into one chain"
        else:
            supported = sorted({t.__name__ for t in _SUPPORTED_TYPES})
            hint = f"supported layer types: {', '.join(supported)}"
    return NotImplementedError(
        f"structured pruning cannot handle layer {layer.name!r} ({name}): {hint}"
    )


def _check_layer(layer: Any, in_shape: tuple[int | None, ...]) -> None:
    t = type(layer)
    if t not in _SUPPORTED_TYPES:
        raise _unsupported(layer)
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format != "channels_last":
        raise _unsupported(layer, f"data_format {data_format!r}; only channels_last is supported")
    if t in (_L.Conv1D, _L.Conv2D) and layer.groups != 1:
        raise _unsupported(layer, f"grouped convolution (groups={layer.groups})")
    if t is _L.BatchNormalization:
        axes = [int(a) % len(in_shape) for a in layer.axis]
        if axes != [len(in_shape) - 1]:
            raise _unsupported(layer, f"axis {list(layer.axis)}; only the last axis is supported")


def _functional_chain_names(model: Any) -> list[str]:
    """Layer names of a functional model in chain order; NotImplementedError if not a chain."""
    config = model.get_config()
    layers = config["layers"]
    if len(config["input_layers"]) != 1 or len(config["output_layers"]) != 1:
        raise NotImplementedError("structured pruning needs a single-input, single-output model")
    names = [entry["config"]["name"] for entry in layers]
    if config["input_layers"][0][0] != names[0] or config["output_layers"][0] != [names[-1], 0, 0]:
        raise NotImplementedError(
            "structured pruning needs a simple chain of layers from the input to the output"
        )
    for previous, entry in zip(names, layers[1:]):
        nodes = entry["inbound_nodes"]
        name = entry["config"]["name"]
        if len(nodes) != 1:
            raise NotImplementedError(
                f"structured pruning needs a simple chain: layer {name!r} is called "
                f"{len(nodes)} times (shared layers are not supported)"
            )
        inbound = nodes[0]
        if len(inbound) != 1:
            raise NotImplementedError(
                f"structured pruning needs a simple chain: layer {name!r} has {len(inbound)} "
                "inputs (branches and merges are not supported)"
            )
        source, node_index, tensor_index, *rest = inbound[0]
        if source != previous or node_index != 0 or tensor_index != 0:
            raise NotImplementedError(
                f"structured pruning needs a simple chain: layer {name!r} reads {source!r}, "
                f"not the layer before it ({previous!r}); branches are not supported"
            )
        if rest and rest[0]:
            raise NotImplementedError(
                f"structured pruning cannot rebuild layer {name!r}: it was called with "
                f"arguments {rest[0]!r}"
            )
    return names


def _analyse(model: Any) -> _Chain:
    """Check that ``model`` is a supported chain and describe each layer's shapes and weights."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a tf_keras Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError("the model is not built; give it an Input or call build() first")
    if not getattr(model, "_is_graph_network", False):
        raise NotImplementedError(
            f"structured pruning cannot handle subclassed model {model.name!r} "
            f"({type(model).__name__}); use keras.Sequential or a functional chain"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise NotImplementedError("structured pruning needs a single-input, single-output model")

    layers = list(model.layers)
    # Unsupported layer types first: they give the clearest message (Add, Concatenate, ...).
    for layer in layers:
        if not isinstance(layer, _L.InputLayer) and type(layer) not in _SUPPORTED_TYPES:
            raise _unsupported(layer)
    if isinstance(model, keras.Sequential):
        if len({id(layer) for layer in layers}) != len(layers):
            raise NotImplementedError("structured pruning does not support shared layers")
    else:
        names = _functional_chain_names(model)
        by_name = {layer.name: layer for layer in layers}
        layers = [by_name[n] for n in names]

    steps: list[_Step] = []
    start = 0
    shape: tuple[int | None, ...] = tuple(model.inputs[0].shape)
    for layer in layers:
        count = len(layer.weights)
        if isinstance(layer, _L.InputLayer):
            start += count
            continue
        _check_layer(layer, shape)
        out = tuple(tf.TensorShape(layer.compute_output_shape(tf.TensorShape(shape))).as_list())
        steps.append(_Step(layer, shape, out, start, count))
        start += count
        shape = out
    return _Chain(steps, start)


def _weights_list(model: Any, weights: Sequence[np.ndarray] | None, n_expected: int) -> list[np.ndarray]:
    if weights is None:
        return [np.asarray(w) for w in get_layer_weights(model)]
    weights = [np.asarray(w) for w in weights]
    if len(weights) != n_expected:
        raise ValueError(
            f"model {model.name!r} has {n_expected} weight tensors (flat layer-by-layer layout), "
            f"got {len(weights)}"
        )
    return weights


def _kernel_bias_index(layer: Any) -> tuple[int, int | None]:
    ids = [id(w) for w in layer.weights]
    kernel = ids.index(id(layer.kernel))
    bias = ids.index(id(layer.bias)) if getattr(layer, "use_bias", False) else None
    return kernel, bias


# ------------------------------------------------------------------------------------ ranking


def unit_norms(
    model: keras.Model,
    weights: Sequence[np.ndarray] | None = None,
    norm: Norm = "l2",
) -> dict[str, np.ndarray]:
    """Norm of each output unit's kernel slice, for every Dense/Conv1D/Conv2D layer.

    The slice of unit ``j`` is ``kernel[..., j]`` (all axes but the last: a Dense unit's
    incoming weights, a Conv filter's ``kh x kw x in`` weights); the bias is not counted.

    Args:
        model: A built model; it supplies the architecture (and the weights if ``weights`` is
            ``None``). tfmot ``PruneLowMagnitude`` wrappers are looked through.
        weights: Optional flat weight list in the layout of
            :func:`fedprune.models.get_layer_weights` (e.g. the federation's aggregated
            weights); the model's own weights when ``None``.
        norm: ``"l1"`` (sum of absolute values) or ``"l2"`` (Euclidean norm).

    Returns:
        Layer name -> float64 array with one norm per output unit, in ``model.layers`` order.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    n_expected = sum(len(_inner(layer).weights) for layer in model.layers)
    flat = _weights_list(model, weights, n_expected)
    norms: dict[str, np.ndarray] = {}
    start = 0
    for layer in model.layers:
        inner = _inner(layer)
        if type(inner) in _UNIT_TYPES:
            k, _ = _kernel_bias_index(inner)
            kernel = flat[start + k].astype(np.float64)
            if kernel.shape != tuple(inner.kernel.shape):
                raise ValueError(
                    f"layer {inner.name!r}: kernel has shape {tuple(inner.kernel.shape)}, "
                    f"the weight list gives {kernel.shape}"
                )
            per_unit = kernel.reshape(-1, kernel.shape[-1])
            if norm == "l1":
                norms[inner.name] = np.abs(per_unit).sum(axis=0)
            else:
                norms[inner.name] = np.sqrt(np.square(per_unit).sum(axis=0))
        start += len(inner.weights)
    return norms


def plan_structured(
    model: keras.Model,
    weights: Sequence[np.ndarray] | None,
    fraction: float | Mapping[str, float],
    norm: Norm = "l2",
    leave: tuple[str, ...] = ("logits",),
    min_units: int = 1,
) -> StructuredPlan:
    """Remove ``round(fraction * units)`` lowest-norm units of each Dense/Conv1D/Conv2D layer.

    Layers named in ``leave`` and the model's output layer (the last Dense/Conv layer, whose
    units are the model's outputs) are never cut. The lowest-norm units go first; among equal
    norms the lower index goes first (a stable sort, as in
    :func:`fedprune.pruning.masks.magnitude_mask`). At least ``min_units`` units of each cut
    layer survive (all of them if the layer has fewer).

    Args:
        model: A built model of a supported architecture (see the module docstring).
        weights: Flat weight list the norms are computed from (the model's own when ``None``).
        fraction: Share of units to remove, in ``[0, 1]``: one number for every layer not left
            alone, or ``{layer name: fraction}`` for exactly the layers named (a name that is
            unknown, not a Dense/Conv layer, in ``leave`` or the output layer is an error).
        norm: ``"l1"`` or ``"l2"``, see :func:`unit_norms`.
        leave: Names of layers to keep whole. Names matching no layer are logged and ignored,
            so the default ``("logits",)`` suits models without such a layer.
        min_units: Fewest units a cut layer keeps; at least 1.

    Returns:
        A :class:`StructuredPlan` with an entry for every layer considered (even when its
        fraction removes nothing).

    Raises:
        NotImplementedError: The architecture is not supported.
        ValueError: Bad fractions, names or ``min_units``.
    """
    chain = _analyse(model)
    if isinstance(min_units, bool) or int(min_units) != min_units or min_units < 1:
        raise ValueError(f"min_units must be an integer >= 1, got {min_units!r}")
    min_units = int(min_units)
    unit_names = [s.layer.name for s in chain.unit_steps()]
    output_name = chain.output_unit_layer()
    all_names = {s.layer.name for s in chain.steps}
    unknown_leave = sorted(set(leave) - all_names)
    if unknown_leave:
        logger.info("leave names no layer of %s: %s (ignored)", model.name, unknown_leave)

    if isinstance(fraction, Mapping):
        targets = {str(k): float(v) for k, v in fraction.items()}
        for name in targets:
            if name not in all_names:
                raise ValueError(f"fraction names no layer of the model: {name!r}")
            if name not in unit_names:
                raise ValueError(f"layer {name!r} is not a Dense/Conv1D/Conv2D layer; cannot cut it")
            if name == output_name:
                raise ValueError(f"layer {name!r} is the model's output layer; it is never cut")
            if name in leave:
                raise ValueError(f"layer {name!r} is both in fraction and in leave")
    else:
        targets = {n: float(fraction) for n in unit_names if n not in leave and n != output_name}
    for name, f in targets.items():
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fraction for {name!r} must be in [0, 1], got {f}")

    norms = unit_norms(model, weights, norm)
    keep: dict[str, np.ndarray] = {}
    for name in unit_names:  # model order, for a readable plan and log
        if name not in targets:
            continue
        values = norms[name]
        units = values.size
        n_remove = int(round(targets[name] * units))
        n_keep = max(units - n_remove, min(min_units, units))
        order = np.argsort(values, kind="stable")  # lowest norm first, ties by position
        keep[name] = np.sort(order[units - n_keep :]).astype(np.int64)
        logger.info(
            "structured plan: %s keeps %d of %d units (%s, fraction %.3f)",
            name, n_keep, units, norm, targets[name],
        )
    return StructuredPlan(keep)


# ---------------------------------------------------------------------------------- rebuilding


def _validate_plan(chain: _Chain, plan: StructuredPlan) -> None:
    units = {s.layer.name: s.out_shape[-1] for s in chain.unit_steps()}
    output_name = chain.output_unit_layer()
    for name, idx in plan.keep.items():
        if name not in units:
            raise ValueError(f"the plan names {name!r}, which is no Dense/Conv1D/Conv2D layer of the model")
        if name == output_name:
            raise ValueError(f"the plan cuts {name!r}, the model's output layer; that is not allowed")
        if idx[-1] >= units[name]:
            raise ValueError(f"the plan keeps unit {int(idx[-1])} of {name!r}, which has {units[name]}")


def apply_structured(
    model: keras.Model,
    weights: Sequence[np.ndarray] | None,
    plan: StructuredPlan,
) -> tuple[keras.Model, list[np.ndarray]]:
    """Build the smaller model and carry the surviving weights over.

    The new model has the same class (Sequential or functional), name, input and layer names
    and types, with each planned layer narrowed to its kept units; the layers after it lose the
    matching inputs (next Dense/Conv kernel input axis, BatchNormalization vectors, Dense rows
    behind a Flatten in channels-last order). It is returned uncompiled.

    Args:
        model: A built model of a supported architecture (see the module docstring).
        weights: Flat weight list to cut (the model's own when ``None``).
        plan: From :func:`plan_structured` (or hand-made).

    Returns:
        ``(smaller_model, smaller_weights)``; the weights are in the flat layout of
        :func:`fedprune.models.get_layer_weights` and already set in the model.

    Raises:
        NotImplementedError: The architecture is not supported (branches, Add, Concatenate,
            DepthwiseConv2D, channels-first, ...).
        ValueError: The plan does not fit the model, or the weight list does not.
    """
    chain = _analyse(model)
    _validate_plan(chain, plan)
    flat = _weights_list(model, weights, chain.n_weights)

    new_layers: list[Any] = []
    new_weights: list[np.ndarray] = []
    # Indices kept along the last axis of the tensor flowing between layers (None: all).
    kept: np.ndarray | None = None
    for step in chain.steps:
        layer = step.layer
        layer_weights = [w.copy() for w in flat[step.start : step.start + step.count]]
        config = layer.get_config()
        config.pop("batch_input_shape", None)
        config.pop("input_shape", None)
        t = type(layer)
        if t in _UNIT_TYPES:
            k, b = _kernel_bias_index(layer)
            if kept is not None:
                layer_weights[k] = np.take(layer_weights[k], kept, axis=-2)
            out_keep = plan.keep.get(layer.name)
            if out_keep is not None:
                layer_weights[k] = np.take(layer_weights[k], out_keep, axis=-1)
                if b is not None:
                    layer_weights[b] = layer_weights[b][out_keep]
                config["units" if t is _L.Dense else "filters"] = int(out_keep.size)
            kept = out_keep
        elif t is _L.BatchNormalization:
            if kept is not None:
                layer_weights = [w[kept] for w in layer_weights]
        elif t is _L.Flatten:
            if kept is not None and len(step.in_shape) > 2:
                spatial_dims = step.in_shape[1:-1]
                if any(d is None for d in spatial_dims):
                    raise NotImplementedError(
                        f"cannot cut through Flatten {layer.name!r}: input shape {step.in_shape} "
                        "has unknown dimensions"
                    )
                channels = int(step.in_shape[-1])
                positions = int(np.prod(spatial_dims))
                kept = (np.arange(positions)[:, None] * channels + kept[None, :]).ravel()
        # Pooling, Dropout, Activation, ReLU: channel-wise, the last axis passes unchanged.
        new_layers.append(t.from_config(config))
        new_weights.extend(layer_weights)

    new_model = _assemble(model, new_layers)
    set_layer_weights(new_model, new_weights)
    removed = {n: int(model.get_layer(n).output_shape[-1]) - int(i.size) for n, i in plan.keep.items()}
    logger.info(
        "structured pruning of %s: %d -> %d parameters; removed units %s",
        model.name, model.count_params(), new_model.count_params(), removed,
    )
    return new_model, [np.asarray(w) for w in get_layer_weights(new_model)]


def _assemble(model: Any, layers: list[Any]) -> Any:
    source = model.inputs[0]
    input_name = getattr(source, "name", None) or None
    if input_name is not None:
        input_name = input_name.split(":")[0]
    inp = keras.Input(batch_shape=tuple(source.shape), dtype=source.dtype, name=input_name)
    if isinstance(model, keras.Sequential):
        return keras.Sequential([inp, *layers], name=model.name)
    x = inp
    for layer in layers:
        x = layer(x)
    return keras.Model(inp, x, name=model.name)


# --------------------------------------------------------------------------------- measurement


def count_flops(model: keras.Model) -> int:
    """Floating-point operations for one sample through the Dense and Conv layers.

    Convention: FLOPs = 2 x multiply-accumulates (one multiply and one add each) of the Dense,
    Conv1D, Conv2D and Conv3D layers only: ``2 * prod(output spatial dims) * kernel.size``
    (a Dense layer applied to a rank-2 input has one position, so ``2 * in * units``). Biases,
    activations, pooling, batch normalization and other layers are not counted; a layer of any
    other type that holds a ``kernel`` (e.g. DepthwiseConv2D) is logged as not counted.
    Nested models are counted recursively; tfmot wrappers are looked through.
    """
    total = 0
    for layer in model.layers:
        inner = _inner(layer)
        if isinstance(inner, keras.Model):
            total += count_flops(inner)
            continue
        if type(inner) in _FLOP_TYPES:
            out_shape = layer.output_shape
            positions = out_shape[1:-1]
            if any(d is None for d in positions):
                raise ValueError(
                    f"layer {layer.name!r} has output shape {out_shape}; FLOPs need known sizes"
                )
            total += 2 * int(np.prod(positions, dtype=np.int64)) * int(np.prod(inner.kernel.shape))
        elif getattr(inner, "kernel", None) is not None:
            logger.warning(
                "count_flops: layer %s (%s) is not counted", layer.name, type(inner).__name__
            )
    return int(total)


def measure_latency_ms(
    tflite_path: str | Path,
    x: np.ndarray,
    runs: int = 200,
    warmup: int = 10,
    num_threads: int | None = None,
) -> float:
    """Median single-sample latency of a ``.tflite`` model, in milliseconds.

    The file is loaded with :func:`fedprune.converters.tflite_export.open_interpreter` (LiteRT, default
    delegates, falling back as that function describes); each run times one
    :func:`fedprune.converters.tflite_export.predict_tflite` call on one sample (set input, invoke, read
    output) with ``time.perf_counter``, cycling through the samples of ``x``. ``warmup`` runs
    are discarded first.

    Args:
        tflite_path: The ``.tflite`` file.
        x: Samples, shape ``(n, *input_shape)``; a single sample without the batch axis is
            accepted too.
        runs: Timed runs (at least 1).
        warmup: Untimed runs before them.
        num_threads: Passed to the interpreter when not ``None``.
    """
    from fedprune.converters.tflite_export import open_interpreter, predict_tflite

    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs} and {warmup}")
    interpreter, runtime = open_interpreter(tflite_path, num_threads=num_threads)
    input_rank = len(interpreter.get_input_details()[0]["shape"])
    samples = np.asarray(x, dtype=np.float32)
    if samples.ndim == input_rank - 1:
        samples = samples[None]
    if samples.ndim != input_rank or len(samples) == 0:
        raise ValueError(
            f"x must have shape (n, *input_shape) for a rank-{input_rank} input, got {samples.shape}"
        )
    times: list[float] = []
    for i in range(warmup + runs):
        sample = samples[i % len(samples)][None]
        t0 = time.perf_counter()
        predict_tflite(interpreter, sample)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    median_ms = float(np.median(times) * 1e3)
    logger.info("%s: median latency %.4f ms over %d runs (%s)", tflite_path, median_ms, runs, runtime)
    return median_ms

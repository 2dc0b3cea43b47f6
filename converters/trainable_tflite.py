"""Trainable TFLite files: a tf-keras model rebuilt from builtin TFLite ops, with signatures that
train it, so a device can train with a TFLite runtime (LiteRT or tflite-runtime) and NumPy alone.

:func:`build_trainable_tflite` (the aggregator's side; it imports TensorFlow) turns the task's model
into one file with these signatures (the names are this module's constants, which the device's
trainer imports without TensorFlow):

- ``train_sgd`` / ``train_adam`` (``x``, ``y`` one-hot, ``lr`` of shape ``[1]`` (see
  :func:`learning_rate_input`), and one ``dropout<k>`` input of
  uniform [0, 1) noise per Dropout layer): one step on one batch, as ``model.train_step`` does under
  Keras' ``SGD`` / ``Adam(epsilon=1e-7)``, with the loss Keras' ``SparseCategoricalCrossentropy(
  from_logits=True)`` computes (which, like Keras, takes the input of a final softmax as the
  logits); then every masked tensor is multiplied by its mask, so pruned weights are exactly 0
  after every step (tfmot multiplies before each step: the same weights take part in every forward
  pass). Returns ``loss`` (the batch mean) and ``correct`` (correct predictions, from the forward
  pass before the step, as Keras' accuracy metric counts them).
- ``infer`` (``x``, any batch size): the model's outputs in inference mode (Dropout off,
  BatchNormalization's moving statistics).
- ``gradients`` (``x``, ``y``): ``g<i>``, the gradient of every weight tensor of the batch's
  *summed* loss, in inference mode (as the Keras trainer computes them for regrowth; the device
  adds the batches up and divides by the sample count).
- ``get_weights``: ``w<i>``; ``set_weights`` (``w<i>`` and ``m<i>`` for each masked tensor): sets
  the weights (masked) and masks and resets the optimizer state (a round starts fresh, as in Keras).
- ``batchnorm_moments`` (``x``, ``rows``: 1 for a sample, 0 for a padding row), only in the file of
  a model with BatchNormalization: for every BatchNormalization layer, ``mean<i>`` and
  ``variance<j>``, the per-channel mean and biased variance over the batch's real rows of the
  layer's input, the model in inference mode (every layer normalising with the moving statistics
  as they are), named by the flat index of the moving mean (``i``) and moving variance (``j``) they
  measure. The device recalibrates with it after local training, as the Keras trainer does
  (``edge_agent/batchnorm_stats.py``): one pass over its data per layer, in order, setting that
  layer's moving statistics with ``set_weights`` before measuring the next (one signature that
  measures every layer, rather than one per layer that stops at it: the file and its conversion
  stay linear in the layers, at the cost of running the rest of the forward pass, at most about
  twice the forward work the per-layer form would do).

Weight tensors travel in fedprune's flat layout: ``model.layers`` order, each layer's own
``get_weights()`` order, non-trainable ones included, so the update a device sends is the same
list of tensors either trainer produces.

**A fixed batch size** for ``train_*`` and ``gradients``: with an open batch dimension, the
gradient of every element-wise op between two batch-sized tensors needs ``BroadcastGradientArgs``
(and a concatenation's ``ConcatOffset``), TensorFlow ops with no builtin kernel. A smaller batch
(the last of an epoch) is padded with rows whose labels are all zero: the loss is a mean over the
real rows, and such a row counts nowhere (not in the loss, the accuracy or BN's statistics), so
the step is the one Keras takes on the smaller batch.

**BatchNormalization**, as Keras does it: in ``train_*`` the batch's own mean and (biased)
variance normalise, and the moving mean and variance move towards them at the layer's momentum;
for the fused kernel Keras uses on 4-D inputs (``layer.fused``) the variance the moving variance
moves towards carries Bessel's correction n/(n-1), for 2-D and 3-D inputs it does not (both seen,
to float32 rounding). The moving statistics are weights of the flat layout: they come back in
``get_weights`` and travel in the update like any other tensor. ``infer`` and ``gradients``
normalise with the moving statistics; a frozen layer (``trainable=False``) always does.

Why the ops are written as they are (TensorFlow 2.21's converter with ``TFLITE_BUILTINS`` only and
ai-edge-litert 2.3.0, seen): the gradients of Keras' own ops are TensorFlow ops with no builtin
kernel (``ReluGrad``, ``Relu6Grad``, ``Conv2DBackpropFilter``,
``DepthwiseConv2dNativeBackpropFilter``, ``MaxPoolGrad``, ``AvgPoolGrad``, ``StridedSliceGrad``;
fused batch norm has neither its forward nor its gradient). Softmax, log-softmax and rsqrt
differentiate into builtin ops. So:

- ReLU is ``where(x > 0, x, 0)`` and ReLU6 ``where(x < 6, where(x > 0, x, 0), 6)``: the same
  gradient as Keras' (0 at exactly 0 and 6). ``infer`` uses them too: the converter folds a
  ``Relu`` after a bias-free matrix product into a ``BATCH_MATMUL``, which has no activation, and
  loses the ReLU (seen);
- a convolution gathers its kernel taps as ``tf.slice``\\ s of the padded input (a slice's gradient
  is a ``Pad``); a stride is a reshape that puts the stride's phase in its own axis and a slice
  that keeps phase 0; the taps are concatenated into one patch matrix and multiplied by the
  kernel reshaped to ``[taps * in, out]``;
- a depthwise convolution multiplies the same patches by the kernel per channel and sums over the
  taps; a separable one is that, then a 1x1 convolution (a matrix product);
- max pooling is ``maximum`` over the window's taps, folded left to right: its gradient goes to the
  first maximum in row-major order, where TensorFlow's ``MaxPoolGrad`` sends it (seen, with most
  windows tied); 'same' padding pads with the lowest float32;
- average pooling sums the taps and divides by how many real (unpadded) inputs each window holds,
  as TensorFlow does for 'same' padding;
- Dropout's noise is an input: the trainer draws it (a seeded NumPy generator), so the file needs
  no random op, and a step can be repeated exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tf_keras as keras

__all__ = [
    "BATCHNORM_MOMENTS",
    "DROPOUT_PREFIX",
    "INFER",
    "INPUT_LABELS",
    "INPUT_LEARNING_RATE",
    "INPUT_ROWS",
    "INPUT_X",
    "GET_WEIGHTS",
    "GRADIENTS",
    "MOMENT_MEAN_PREFIX",
    "MOMENT_VARIANCE_PREFIX",
    "OUTPUT_CORRECT",
    "OUTPUT_LOGITS",
    "OUTPUT_LOSS",
    "SET_WEIGHTS",
    "TRAIN",
    "UnsupportedModel",
    "batchnorm_statistics",
    "build_trainable_tflite",
    "dropout_name",
    "gradient_name",
    "learning_rate_input",
    "mask_name",
    "moment_mean_name",
    "moment_variance_name",
    "weight_name",
]

logger = logging.getLogger(__name__)

#: Signature names, per optimizer for training.
TRAIN = {"sgd": "train_sgd", "adam": "train_adam"}
INFER = "infer"
GRADIENTS = "gradients"
GET_WEIGHTS = "get_weights"
SET_WEIGHTS = "set_weights"
#: Only in the file of a model with BatchNormalization layers.
BATCHNORM_MOMENTS = "batchnorm_moments"

#: Input and output names of the signatures.
INPUT_X, INPUT_LABELS, INPUT_LEARNING_RATE, INPUT_ROWS = "x", "y", "lr", "rows"
OUTPUT_LOSS, OUTPUT_CORRECT, OUTPUT_LOGITS = "loss", "correct", "logits"

#: Keras' Adam defaults (``keras.optimizers.Adam()``, what the Keras trainer uses).
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7

#: TensorFlow's fused batch norm raises a smaller epsilon to this (cuDNN's minimum).
_FUSED_MIN_EPSILON = 1.001e-5

_SUPPORTED = ("Dense, Conv1D, Conv2D, DepthwiseConv2D, SeparableConv2D, MaxPooling1D/2D, AveragePooling1D/2D, "
              "GlobalAveragePooling1D/2D, Flatten, Dropout, BatchNormalization, Activation, ReLU, Softmax; "
              "activations relu, relu6, linear, softmax")


def weight_name(index: int) -> str:
    """The name of weight tensor ``index`` (flat layout) in ``get_weights`` and ``set_weights``."""
    return f"w{index}"


def mask_name(index: int) -> str:
    """The name of the mask of weight tensor ``index`` in ``set_weights``."""
    return f"m{index}"


def gradient_name(index: int) -> str:
    """The name of weight tensor ``index``'s gradient in ``gradients``."""
    return f"g{index}"


def learning_rate_input(learning_rate: float) -> np.ndarray:
    """The train signatures' ``lr`` input: the learning rate as a 1-element float32 array."""
    return np.full(1, learning_rate, np.float32)


#: ``batchnorm_moments``' outputs are named these, then the flat index of the statistic they measure.
MOMENT_MEAN_PREFIX, MOMENT_VARIANCE_PREFIX = "mean", "variance"


def moment_mean_name(index: int) -> str:
    """``batchnorm_moments``' output measuring the moving mean that is weight tensor ``index``."""
    return f"{MOMENT_MEAN_PREFIX}{index}"


def moment_variance_name(index: int) -> str:
    """``batchnorm_moments``' output measuring the moving variance that is weight tensor ``index``."""
    return f"{MOMENT_VARIANCE_PREFIX}{index}"


def batchnorm_statistics(moment_outputs: Sequence[str]) -> list[tuple[int, int]]:
    """The BatchNormalization layers a ``batchnorm_moments`` signature measures, from its output
    names, in the model's order: (flat index of the moving mean, of the moving variance) per layer.

    Raises:
        ValueError: the names are not those of a ``batchnorm_moments`` signature.
    """
    means, variances = [], []
    for name in moment_outputs:
        for prefix, found in ((MOMENT_VARIANCE_PREFIX, variances), (MOMENT_MEAN_PREFIX, means)):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                found.append(int(name[len(prefix):]))
                break
        else:
            raise ValueError(f"{BATCHNORM_MOMENTS} has an output {name!r}, neither {MOMENT_MEAN_PREFIX}<i> nor "
                             f"{MOMENT_VARIANCE_PREFIX}<i>: not a file build_trainable_tflite wrote")
    if len(means) != len(variances):
        raise ValueError(f"{BATCHNORM_MOMENTS} measures {len(means)} moving means and {len(variances)} moving "
                         "variances: not a file build_trainable_tflite wrote")
    # flat layout: layer after layer, each layer's moving mean before its moving variance
    return list(zip(sorted(means), sorted(variances)))


#: The train signatures' noise inputs are named this, then the Dropout layer's number.
DROPOUT_PREFIX = "dropout"


def dropout_name(k: int) -> str:
    """The name of the ``k``-th Dropout layer's noise input of the train signatures."""
    return f"{DROPOUT_PREFIX}{k}"


class UnsupportedModel(ValueError):
    """The model has a layer (or a layer option) the trainable file cannot be built for; the
    message names the layer and its class."""


# ------------------------------------------------------------------------------------------------
# The model as a list of steps over flat weight indices
# ------------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """What one forward pass is: training or inference mode, and what it reads."""

    tf: Any
    weights: list  # the tf.Variables, flat layout
    training: bool
    noise: list = field(default_factory=list)  # dropout inputs, in layer order (train only)
    row_weights: Any = None  # [batch]: 1 for a sample, 0 for a padding row (train and moments only)
    softmax: tuple = ()  # (input, output) of the last softmax computed
    statistic_updates: list = field(default_factory=list)  # (variable, new value): BN moving stats
    # batchnorm_moments only: (moving mean index, moving variance index, batch mean, batch variance)
    # of every BN layer's input; None: not measured
    measured: list | None = None

    def loss_logits(self, output: Any) -> Any:
        """What the loss takes as logits: Keras' cross-entropy with ``from_logits=True`` takes a
        model's output made by a softmax as that softmax's input (``tf_keras.backend._get_logits``)."""
        return self.softmax[0] if self.softmax and self.softmax[1] is output else output


@dataclass
class _Step:
    """One layer: ``run(h, pass) -> h``; ``trainable`` flat indices the optimizer updates."""

    layer: str
    run: Callable[[Any, _Pass], Any]
    trainable: tuple[int, ...] = ()


def _refuse(layer: Any, what: str) -> UnsupportedModel:
    return UnsupportedModel(f"layer {layer.name!r} ({type(layer).__name__}) cannot be trained from a TFLite file: "
                            f"{what}. Supported: {_SUPPORTED}")


def _index_of(layer: Any, first: int, variable: Any) -> int:
    """The flat index of one of ``layer``'s variables (``first``: the index of its first weight)."""
    return first + [id(w) for w in layer.weights].index(id(variable))


def _activation_name(layer: Any, function: Any) -> str:
    name = getattr(function, "__name__", str(function))
    if name not in ("relu", "relu6", "linear", "softmax"):
        raise _refuse(layer, f"activation {name!r} (only relu, relu6, linear and softmax)")
    return name


def _activate(h: Any, name: str, p: _Pass) -> Any:
    """``where`` forms even in ``infer``: TensorFlow 2.21's converter folds a ``Relu`` after a
    bias-free matmul into a ``BATCH_MATMUL``, which has no activation, and drops it (seen)."""
    tf = p.tf
    if name == "relu":
        return tf.where(h > 0.0, h, 0.0)
    if name == "relu6":
        # not minimum(h, 6): its gradient at exactly 6 is 1, Keras' is 0
        return tf.where(h < 6.0, tf.where(h > 0.0, h, 0.0), 6.0)
    if name == "softmax":
        p.softmax = (h, tf.nn.softmax(h))
        return p.softmax[1]
    return h


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow's 'same' padding: (output size, padding before, padding after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _window_geometry(layer: Any, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
                     padding: str) -> tuple[tuple[int, int], list[list[int]]]:
    """Output size and the padding (``[[before, after]] * 2``) of a window op over ``size``.

    The padding after also makes room for the strided tap trick: a tap's slice is ``out * stride``
    long, so the input must reach ``kernel - 1 + out * stride``; the extra rows land in the
    discarded stride phases.
    """
    if padding not in ("same", "valid"):
        raise _refuse(layer, f"padding {padding!r} (only 'same' and 'valid')")
    out, pads = [], []
    for n, k, s in zip(size, kernel, strides):
        if padding == "same":
            o, before, after = _same_padding(n, k, s)
        else:
            o, before, after = (n - k) // s + 1, 0, 0
            if o < 1:
                raise _refuse(layer, f"a window of {k} does not fit an input of {n} with 'valid' padding")
        if s > 1:
            after = max(after, k - 1 + o * s - n - before)
        out.append(o)
        pads.append([before, after])
    return (out[0], out[1]), pads


def _taps(h: Any, p: _Pass, kernel: tuple[int, int], strides: tuple[int, int], out: tuple[int, int],
          pads: list[list[int]], pad_value: float = 0.0) -> list:
    """The window's taps of a padded ``[B, H, W, C]`` input: one ``[B, out_h, out_w, C]`` tensor per
    kernel position, row-major, each the input that position sees at every output position."""
    tf = p.tf
    channels = int(h.shape[-1])
    if any(a or b for a, b in pads):
        h = tf.pad(h, [[0, 0], *pads, [0, 0]], constant_values=pad_value)
    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out
    taps = []
    for i in range(kh):
        for j in range(kw):
            tap = tf.slice(h, [0, i, j, 0], [-1, oh * sh, ow * sw, channels])
            if sh > 1 or sw > 1:
                # rows (o, phase) and columns (o, phase): keep phase 0 of each, by slices (a
                # strided slice's gradient is no builtin op)
                tap = tf.reshape(tap, [-1, sh, ow, sw * channels])
                tap = tf.slice(tap, [0, 0, 0, 0], [-1, 1, ow, channels])
                tap = tf.reshape(tap, [-1, oh, ow, channels])
            taps.append(tap)
    return taps


def _matmul(tf: Any, a: Any, b: Any) -> Any:
    """``a @ b`` whose gradient for ``b`` is ``transpose(a) @ upstream``: TensorFlow's own,
    a ``BATCH_MATMUL`` with ``adj_x``, ran 5x slower in LiteRT 2.3.0 than the explicit transpose
    (3.0 against 0.6 ms for a [2048, 288] patch matrix, seen)."""

    @tf.custom_gradient
    def matmul(a, b):
        def grad(upstream):
            return tf.matmul(upstream, b, transpose_b=True), tf.matmul(tf.transpose(a), upstream)

        return tf.matmul(a, b), grad

    return matmul(a, b)


def _as_2d(shape: tuple) -> tuple[Callable, Callable, tuple[int, int]]:
    """A window layer's input seen as 2-D: for a 1-D layer over ``[B, L, C]``, ``[B, 1, L, C]``
    and back; the spatial size, (1, L) for 1-D."""
    def to_2d(h: Any, p: _Pass) -> Any:
        return p.tf.reshape(h, [-1, 1, int(h.shape[1]), int(h.shape[2])]) if len(shape) == 3 else h

    def from_2d(h: Any, p: _Pass) -> Any:
        return p.tf.reshape(h, [-1, int(h.shape[2]), int(h.shape[3])]) if len(shape) == 3 else h

    spatial = (1, int(shape[1])) if len(shape) == 3 else (int(shape[1]), int(shape[2]))
    return to_2d, from_2d, spatial


def _pair(value: Any, one_d: bool) -> tuple[int, int]:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return (1, int(value[0])) if one_d else (int(value[0]), int(value[-1]))


def _check_channels_last(layer: Any) -> None:
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        raise _refuse(layer, f"data_format {fmt!r} (only 'channels_last')")


def _check_no_dilation(layer: Any) -> None:
    if any(int(d) != 1 for d in np.ravel(getattr(layer, "dilation_rate", 1))):
        raise _refuse(layer, f"dilation_rate {layer.dilation_rate} (only 1)")


def _dense(layer: Any, first: int, in_shape: tuple) -> _Step:
    kernel = _index_of(layer, first, layer.kernel)
    bias = _index_of(layer, first, layer.bias) if layer.use_bias else None
    activation = _activation_name(layer, layer.activation)
    units, inputs = int(layer.units), int(in_shape[-1])
    middle = [int(d) for d in in_shape[1:-1]]

    def run(h: Any, p: _Pass) -> Any:
        tf = p.tf
        flat = tf.reshape(h, [-1, inputs]) if middle else h
        out = _matmul(tf, flat, p.weights[kernel])
        if bias is not None:
            out = out + p.weights[bias]
        if middle:  # Keras applies Dense to the last axis of a higher-rank input
            out = tf.reshape(out, [-1, *middle, units])
        return _activate(out, activation, p)

    return _Step(layer.name, run, (kernel,) if bias is None else (kernel, bias))


def _conv(layer: Any, first: int, in_shape: tuple, kind: str) -> _Step:
    """Conv1D, Conv2D, DepthwiseConv2D and SeparableConv2D: taps, then per kind."""
    _check_channels_last(layer)
    _check_no_dilation(layer)
    if getattr(layer, "groups", 1) != 1:
        raise _refuse(layer, f"groups={layer.groups} (only 1)")
    one_d = kind == "conv1d"
    to_2d, from_2d, spatial = _as_2d(in_shape)
    kernel_size, strides = _pair(layer.kernel_size, one_d), _pair(layer.strides, one_d)
    out, pads = _window_geometry(layer, spatial, kernel_size, strides, layer.padding)
    channels = int(in_shape[-1])
    n_taps = kernel_size[0] * kernel_size[1]
    activation = _activation_name(layer, layer.activation)
    bias = _index_of(layer, first, layer.bias) if layer.use_bias else None
    if kind in ("conv1d", "conv2d"):
        kernel = _index_of(layer, first, layer.kernel)
        filters = int(layer.filters)
        trainable = (kernel,)
    else:
        depthwise = _index_of(layer, first, layer.depthwise_kernel)
        multiplier = int(layer.depth_multiplier)
        filters = channels * multiplier if kind == "depthwise" else int(layer.filters)
        pointwise = _index_of(layer, first, layer.pointwise_kernel) if kind == "separable" else None
        trainable = (depthwise,) if pointwise is None else (depthwise, pointwise)

    def run(h: Any, p: _Pass) -> Any:
        tf = p.tf
        taps = _taps(to_2d(h, p), p, kernel_size, strides, out, pads)
        patches = taps[0] if len(taps) == 1 else tf.concat(taps, axis=-1)
        if kind in ("conv1d", "conv2d"):
            y = _matmul(tf, tf.reshape(patches, [-1, n_taps * channels]),
                        tf.reshape(p.weights[kernel], [n_taps * channels, filters]))
        else:
            # [N, taps, C, 1] * [taps, C, M], summed over the taps: each channel with its own kernel
            per_tap = tf.reshape(patches, [-1, n_taps, channels, 1]) * tf.reshape(
                p.weights[depthwise], [n_taps, channels, multiplier])
            y = tf.reshape(tf.reduce_sum(per_tap, axis=1), [-1, channels * multiplier])
            if pointwise is not None:
                y = _matmul(tf, y, tf.reshape(p.weights[pointwise], [channels * multiplier, filters]))
        if bias is not None:
            y = y + p.weights[bias]
        y = from_2d(tf.reshape(y, [-1, out[0], out[1], filters]), p)
        return _activate(y, activation, p)

    return _Step(layer.name, run, trainable + (() if bias is None else (bias,)))


def _pool(layer: Any, in_shape: tuple, kind: str) -> _Step:
    """MaxPooling and AveragePooling, 1-D and 2-D, over the window's taps."""
    _check_channels_last(layer)
    one_d = len(in_shape) == 3
    to_2d, from_2d, spatial = _as_2d(in_shape)
    pool, strides = _pair(layer.pool_size, one_d), _pair(layer.strides, one_d)
    out, pads = _window_geometry(layer, spatial, pool, strides, layer.padding)
    lowest = float(np.finfo(np.float32).min)
    counts = None
    if kind == "average":  # how many real inputs each window covers ('same' padding: fewer at the edges)
        padded = np.pad(np.ones((1, *spatial, 1), np.float32), [[0, 0], *pads, [0, 0]])
        counts = np.zeros((1, *out, 1), np.float32)
        for i in range(pool[0]):
            for j in range(pool[1]):
                counts += padded[:, i:i + out[0] * strides[0]:strides[0], j:j + out[1] * strides[1]:strides[1], :]

    def run(h: Any, p: _Pass) -> Any:
        tf = p.tf
        taps = _taps(to_2d(h, p), p, pool, strides, out, pads, pad_value=lowest if kind == "max" else 0.0)
        y = taps[0]
        for tap in taps[1:]:
            y = tf.maximum(y, tap) if kind == "max" else y + tap
        if counts is not None:
            y = y / tf.constant(counts)
        return from_2d(y, p)

    return _Step(layer.name, run)


def _batch_norm(layer: Any, first: int, in_shape: tuple) -> _Step:
    rank = len(in_shape)
    axes = [int(a) % rank for a in layer.axis]
    if axes != [rank - 1]:
        raise _refuse(layer, f"axis {list(layer.axis)} (only the last axis)")
    if layer.renorm or layer.virtual_batch_size is not None or layer.adjustment is not None:
        raise _refuse(layer, "renorm, virtual_batch_size or adjustment")
    gamma = _index_of(layer, first, layer.gamma) if layer.scale else None
    beta = _index_of(layer, first, layer.beta) if layer.center else None
    mean_index = _index_of(layer, first, layer.moving_mean)
    variance_index = _index_of(layer, first, layer.moving_variance)
    momentum = float(layer.momentum)
    fused = bool(layer.fused)
    epsilon = max(float(layer.epsilon), _FUSED_MIN_EPSILON) if fused else float(layer.epsilon)
    reduce = list(range(rank - 1))
    per_sample = int(np.prod([int(d) for d in in_shape[1:-1]], dtype=np.int64))  # values per channel in a sample
    frozen = not layer.trainable  # Keras runs a frozen BatchNormalization in inference mode

    def moments(h: Any, p: _Pass) -> tuple[Any, Any, Any]:
        """tf.nn.moments over the real rows only (padding rows weigh 0): mean, biased variance, count."""
        tf = p.tf
        rows = tf.reshape(p.row_weights, [-1] + [1] * (rank - 1))
        n = tf.reduce_sum(p.row_weights) * per_sample
        mean = tf.reduce_sum(h * rows, reduce) / n
        variance = tf.reduce_sum(tf.math.squared_difference(h, tf.stop_gradient(mean)) * rows, reduce) / n
        return mean, variance, n

    def run(h: Any, p: _Pass) -> Any:
        tf = p.tf
        w = p.weights
        if p.measured is not None:  # every layer, frozen ones too: the Keras trainer recalibrates them all
            p.measured.append((mean_index, variance_index, *moments(h, p)[:2]))
        if p.training and not frozen:
            mean, variance, n = moments(h, p)
            target = variance * n / tf.maximum(n - 1.0, 1.0) if fused else variance
            p.statistic_updates.append((w[mean_index], w[mean_index] * momentum + mean * (1.0 - momentum)))
            p.statistic_updates.append(
                (w[variance_index], w[variance_index] * momentum + target * (1.0 - momentum)))
        else:
            mean, variance = w[mean_index], w[variance_index]
        scale = tf.math.rsqrt(variance + epsilon)
        if gamma is not None:
            scale = scale * w[gamma]
        y = (h - mean) * scale
        return y + w[beta] if beta is not None else y

    return _Step(layer.name, run, tuple(i for i in (gamma, beta) if i is not None))


def _dropout(layer: Any, in_shape: tuple, k: int) -> tuple[_Step, list[int]]:
    if layer.noise_shape is not None:
        raise _refuse(layer, "noise_shape (only the default)")
    rate = float(layer.rate)
    noise_shape = [int(d) for d in in_shape[1:]]

    def run(h: Any, p: _Pass) -> Any:
        if not p.training or rate == 0.0:
            return h
        tf = p.tf
        keep = tf.cast(p.noise[k] >= rate, tf.float32)  # as tf.nn.dropout: keep where noise >= rate
        return h * keep * (1.0 / (1.0 - rate))

    return _Step(layer.name, run), noise_shape


def _layer_input_shape(layer: Any) -> tuple:
    shape = layer.input_shape
    if isinstance(shape, list):
        raise _refuse(layer, "more than one input")
    return tuple(shape)


def _plan(model: keras.Model) -> tuple[list[_Step], list[list[int]], list]:
    """The model's layers as steps; the dropout noise shapes; the flat list of weight variables.

    Raises:
        UnsupportedModel: a layer, a layer option or the model's topology cannot be built.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModel(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
                               "outputs; a trainable TFLite file is built for one input and one output")
    if len(model.output_shape) != 2:
        raise UnsupportedModel(f"model {model.name!r} outputs shape {model.output_shape}; a trainable TFLite file "
                               "is built for one score per class, [batch, classes]")
    steps: list[_Step] = []
    noise_shapes: list[list[int]] = []
    variables: list = []
    previous = None
    for layer in model.layers:
        kind = type(layer).__name__
        first = len(variables)
        variables.extend(layer.weights)
        if kind == "InputLayer":
            previous = layer
            continue
        try:
            chained = previous is None or layer.input is previous.output
        except AttributeError:  # a layer called more than once has no single input
            chained = False
        if not chained:
            raise _refuse(layer, "its input is not the previous layer's output (only a chain of layers is built)")
        previous = layer
        shape = _layer_input_shape(layer)
        if kind == "Dense":
            steps.append(_dense(layer, first, shape))
        elif kind in ("Conv1D", "Conv2D"):
            steps.append(_conv(layer, first, shape, kind.lower()))
        elif kind == "DepthwiseConv2D":
            steps.append(_conv(layer, first, shape, "depthwise"))
        elif kind == "SeparableConv2D":
            steps.append(_conv(layer, first, shape, "separable"))
        elif kind in ("MaxPooling1D", "MaxPooling2D"):
            steps.append(_pool(layer, shape, "max"))
        elif kind in ("AveragePooling1D", "AveragePooling2D"):
            steps.append(_pool(layer, shape, "average"))
        elif kind in ("GlobalAveragePooling1D", "GlobalAveragePooling2D"):
            _check_channels_last(layer)
            axes, keepdims = list(range(1, len(shape) - 1)), bool(layer.keepdims)
            steps.append(_Step(layer.name, lambda h, p, a=axes, k=keepdims: p.tf.reduce_mean(h, axis=a, keepdims=k)))
        elif kind == "Flatten":
            size = int(np.prod([int(d) for d in shape[1:]], dtype=np.int64))
            steps.append(_Step(layer.name, lambda h, p, n=size: p.tf.reshape(h, [-1, n])))
        elif kind == "Dropout":
            step, noise_shape = _dropout(layer, shape, len(noise_shapes))
            steps.append(step)
            noise_shapes.append(noise_shape)
        elif kind == "BatchNormalization":
            steps.append(_batch_norm(layer, first, shape))
        elif kind == "Activation":
            name = _activation_name(layer, layer.activation)
            steps.append(_Step(layer.name, lambda h, p, a=name: _activate(h, a, p)))
        elif kind == "ReLU":
            steps.append(_relu_layer(layer))
        elif kind == "Softmax":
            if list(np.ravel(layer.axis)) not in ([-1], [len(shape) - 1]):
                raise _refuse(layer, f"axis {layer.axis} (only the last axis)")
            steps.append(_Step(layer.name, lambda h, p: _activate(h, "softmax", p)))
        else:
            raise _refuse(layer, "no builtin-op formulation of this layer")
        if not layer.trainable:  # frozen: Keras' optimizer leaves it alone
            steps[-1].trainable = ()
    return steps, noise_shapes, variables


def _relu_layer(layer: Any) -> _Step:
    slope, threshold = float(layer.negative_slope), float(layer.threshold)
    if slope != 0.0 or threshold != 0.0:
        raise _refuse(layer, f"negative_slope {slope} or threshold {threshold} (only 0)")
    if layer.max_value is None:
        name = "relu"
    elif float(layer.max_value) == 6.0:
        name = "relu6"
    else:
        raise _refuse(layer, f"max_value {layer.max_value} (only None or 6)")
    return _Step(layer.name, lambda h, p: _activate(h, name, p))


# ------------------------------------------------------------------------------------------------
# The tf.Module and its conversion
# ------------------------------------------------------------------------------------------------


def build_trainable_tflite(model: keras.Model, masked: Sequence[bool], batch_size: int) -> bytes:
    """A TFLite file that trains ``model`` with builtin ops only (see the module's docstring for
    its signatures). Imports TensorFlow; ``model`` is a built tf-keras model whose weights give
    the shapes (their values are not used: a device sets them per task).

    Args:
        model: A chain of the supported layers (Sequential, or a functional model without
            branches), one input, one output of logits.
        masked: ``masked[i]``: whether weight tensor ``i`` of the flat layout has a mask.
        batch_size: The batch size of ``train_*`` and ``gradients`` (fixed: with an open batch
            dimension their gradients need TensorFlow ops that have no builtin kernel). A smaller
            batch is padded with rows whose labels are all zero.

    Raises:
        UnsupportedModel: a layer cannot be built; the message names it and its class.
        ValueError: ``masked`` does not match the weight layout, or a bad ``batch_size``.
    """
    import tensorflow as tf  # the caller built ``model``: TensorFlow and its Keras choice are loaded

    steps, noise_shapes, variables = _plan(model)
    if len(masked) != len(variables):
        raise ValueError(f"{len(masked)} mask flags for the model's {len(variables)} weight tensors "
                         "(the flat layout: model.layers order, each layer's get_weights() order)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    trainable_indices = sorted({i for s in steps for i in s.trainable})
    non_trainable_masked = [i for i, m in enumerate(masked) if m and i not in trainable_indices]
    if non_trainable_masked:
        raise ValueError(f"weight tensors {non_trainable_masked} are masked but not trained by the optimizer")
    module = _trainable_module(tf, steps, noise_shapes, [tuple(int(d) for d in v.shape) for v in variables],
                               [bool(m) for m in masked], trainable_indices, model, batch_size)
    names = [*TRAIN.values(), INFER, GRADIENTS, GET_WEIGHTS, SET_WEIGHTS]
    if any(type(layer).__name__ == "BatchNormalization" for layer in model.layers):
        names.append(BATCHNORM_MOMENTS)  # a model without BatchNormalization has nothing to measure
    functions = [getattr(module, name) for name in names]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function() for f in functions],
                                                                module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    try:
        content = bytes(converter.convert())
    except Exception as e:  # ConverterError and friends: an op this builder should not have written
        raise UnsupportedModel(f"the TFLite converter refused model {model.name!r} with builtin ops only: "
                               f"{str(e)[-800:]}") from e
    logger.info("built a trainable TFLite file of %s: %d bytes, %d weight tensors (%d masked)",
                model.name, len(content), len(variables), sum(map(bool, masked)))
    return content


def _trainable_module(tf: Any, steps: list[_Step], noise_shapes: list[list[int]], shapes: list[tuple[int, ...]],
                      masked: list[bool], trainable: list[int], model: Any, batch_size: int) -> Any:
    in_shape = [int(d) for d in model.input_shape[1:]]
    classes = int(model.output_shape[-1])
    x_batch = tf.TensorSpec([batch_size, *in_shape], tf.float32, name=INPUT_X)
    rows_batch = tf.TensorSpec([batch_size], tf.float32, name=INPUT_ROWS)
    y_batch = tf.TensorSpec([batch_size, classes], tf.float32, name=INPUT_LABELS)
    # [1], not a scalar: LiteRT 2.3.0 on (emulated) aarch64 crashes (SIGSEGV) when a signature
    # runner is handed a 0-d input; a 1-element one runs (seen under qemu-aarch64).
    train_specs = [x_batch, y_batch, tf.TensorSpec([1], tf.float32, name=INPUT_LEARNING_RATE),
                   [tf.TensorSpec([batch_size, *s], tf.float32, name=dropout_name(k))
                    for k, s in enumerate(noise_shapes)]]
    masked_indices = [i for i, m in enumerate(masked) if m]
    set_specs = [tf.TensorSpec(s, tf.float32, name=weight_name(i)) for i, s in enumerate(shapes)] + [
        tf.TensorSpec(shapes[i], tf.float32, name=mask_name(i)) for i in masked_indices]

    def summed_loss(logits, y):
        """The batch's summed cross-entropy; padding rows (all-zero labels) add nothing."""
        return -tf.reduce_sum(y * tf.nn.log_softmax(logits))

    class Trainable(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            # lists, not dicts by index: a tf.Module cannot save a dict with int keys
            self.w = [tf.Variable(np.zeros(s, np.float32), name=weight_name(i)) for i, s in enumerate(shapes)]
            self.masks = [tf.Variable(np.ones(shapes[i], np.float32), name=mask_name(i)) for i in masked_indices]
            self.adam_m = [tf.Variable(np.zeros(shapes[i], np.float32)) for i in trainable]
            self.adam_v = [tf.Variable(np.zeros(shapes[i], np.float32)) for i in trainable]
            self.iterations = tf.Variable(0.0)

        def forward(self, x, p: _Pass):
            h = x
            for step in steps:
                h = step.run(h, p)
            return h

        def step(self, x, y, noise):
            """Loss, correct predictions and gradients of one training batch; BN statistics move."""
            rows = tf.reduce_sum(y, axis=-1)
            p = _Pass(tf, self.w, training=True, noise=list(noise), row_weights=rows)
            with tf.GradientTape() as tape:
                logits = self.forward(x, p)
                # Keras' SparseCategoricalCrossentropy(from_logits=True): the mean over the samples
                loss = summed_loss(p.loss_logits(logits), y) / tf.reduce_sum(rows)
            grads = tape.gradient(loss, [self.w[i] for i in trainable])
            for variable, value in p.statistic_updates:
                variable.assign(value)
            hits = tf.cast(tf.equal(tf.argmax(logits, -1), tf.argmax(y, -1)), tf.float32)
            return loss, tf.reduce_sum(hits * rows), grads

        def hold_masks(self):
            for i, m in zip(masked_indices, self.masks):
                self.w[i].assign(self.w[i] * m)

        @tf.function(input_signature=train_specs, autograph=False)
        def train_sgd(self, x, y, lr, noise):
            lr = tf.reshape(lr, [])
            loss, correct, grads = self.step(x, y, noise)
            for i, g in zip(trainable, grads):
                self.w[i].assign_sub(lr * g)
            self.hold_masks()
            return {OUTPUT_LOSS: loss, OUTPUT_CORRECT: correct}

        @tf.function(input_signature=train_specs, autograph=False)
        def train_adam(self, x, y, lr, noise):
            lr = tf.reshape(lr, [])
            loss, correct, grads = self.step(x, y, noise)
            self.iterations.assign_add(1.0)
            # keras.optimizers.Adam.update_step, term for term
            alpha = lr * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, self.iterations)) / (
                1.0 - tf.pow(ADAM_BETA_1, self.iterations))
            for i, g, m, v in zip(trainable, grads, self.adam_m, self.adam_v):
                m.assign_add((g - m) * (1.0 - ADAM_BETA_1))
                v.assign_add((tf.square(g) - v) * (1.0 - ADAM_BETA_2))
                self.w[i].assign_sub((m * alpha) / (tf.sqrt(v) + ADAM_EPSILON))
            self.hold_masks()
            return {OUTPUT_LOSS: loss, OUTPUT_CORRECT: correct}

        @tf.function(input_signature=[tf.TensorSpec([None, *in_shape], tf.float32, name=INPUT_X)], autograph=False)
        def infer(self, x):
            return {OUTPUT_LOGITS: self.forward(x, _Pass(tf, self.w, training=False))}

        @tf.function(input_signature=[x_batch, y_batch], autograph=False)
        def gradients(self, x, y):
            with tf.GradientTape() as tape:
                p = _Pass(tf, self.w, training=False)
                loss = summed_loss(p.loss_logits(self.forward(x, p)), y)
            grads = tape.gradient(loss, self.w, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return {gradient_name(i): g for i, g in enumerate(grads)}

        @tf.function(input_signature=[x_batch, rows_batch], autograph=False)
        def batchnorm_moments(self, x, rows):
            p = _Pass(tf, self.w, training=False, row_weights=rows, measured=[])
            self.forward(x, p)  # what follows the last BatchNormalization is not an output: not converted
            out = {}
            for mean_index, variance_index, mean, variance in p.measured:
                out[moment_mean_name(mean_index)] = mean
                out[moment_variance_name(variance_index)] = variance
            return out

        @tf.function(input_signature=[], autograph=False)
        def get_weights(self):
            return {weight_name(i): w for i, w in enumerate(self.w)}

        @tf.function(input_signature=set_specs, autograph=False)
        def set_weights(self, *tensors):
            for w, value in zip(self.w, tensors):
                w.assign(value)
            for i, m, value in zip(masked_indices, self.masks, tensors[len(shapes):]):
                m.assign(value)
                self.w[i].assign(tensors[i] * value)
            for slot in (*self.adam_m, *self.adam_v):
                slot.assign(tf.zeros_like(slot))
            self.iterations.assign(0.0)
            return {"iterations": self.iterations}

    return Trainable()

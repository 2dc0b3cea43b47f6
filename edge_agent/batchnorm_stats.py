"""BatchNormalization's moving statistics made right for the weights a device trained.

Keras keeps a BatchNormalization layer's moving mean and variance as an exponential average of
the batch statistics, at the layer's ``momentum`` (0.99 by default). A federated round is a few
dozen local steps: at 0.99 the average moves only 1 - 0.99^50 = 40 % of the way from the global
model's statistics towards those of the trained weights, so the statistics every device reports
lag the weights by rounds, and the averaged global model normalizes with a variance several times
too large (the BatchNorm digits CNN scored 0.28 after 8 rounds; docs/pruning.md).

After local training the device therefore replaces each layer's moving statistics by the exact
statistics of the layer's input over its local data, computed with the trained weights in
inference mode (so every earlier BatchNormalization already normalizes with its new statistics):
the statistics the trained model would converge to with any momentum. FedAvg averages them by
sample count, as every other tensor (docs/pruning.md, BatchNormalization: what was measured).
"""

from __future__ import annotations

import logging

import numpy as np

from fedprune.keras_setup import keras

log = logging.getLogger(__name__)

#: samples per forward pass while measuring the statistics
BATCH = 256


def batchnorm_layers(model: keras.Model) -> list:
    """The model's own BatchNormalization layers (top level; nested models are not searched)."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model: keras.Model, x: np.ndarray, probes: dict | None = None) -> int:
    """Set every BatchNormalization layer's moving mean and variance to the mean and (biased)
    variance of its input over ``x``, layer after layer in the model's order, with the model in
    inference mode. ``probes`` caches the sub-models that compute each layer's input (one per
    layer, built on first use). Returns how many layers were set."""
    done = 0
    if probes is None:
        probes = {}
    for layer in batchnorm_layers(model):
        if layer.name not in probes:
            probes[layer.name] = _probe(model, layer)
        probe = probes[layer.name]
        if probe is None:
            continue
        mean, variance = _moments(probe, x, layer.axis)
        layer.moving_mean.assign(mean.astype(np.float32).reshape(layer.moving_mean.shape))
        layer.moving_variance.assign(variance.astype(np.float32).reshape(layer.moving_variance.shape))
        done += 1
    return done


def _probe(model: keras.Model, layer) -> keras.Model | None:
    """A model from ``model``'s inputs to ``layer``'s input. A layer can belong to several models
    (the device's trainer wraps a copy of the architecture whose unwrapped layers are the
    original's): the node of ``model`` is the one its inputs reach."""
    for index in reversed(range(len(layer._inbound_nodes))):
        try:
            return keras.Model(model.inputs, layer.get_input_at(index))
        except ValueError:  # a node of another model: its graph does not start at these inputs
            continue
    log.warning("BatchNormalization %r: no single input reached from the model's inputs; its moving "
                "statistics are left as training left them", layer.name)
    return None


def _moments(probe: keras.Model, x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance, per channel (``axis``), of ``probe``'s output over ``x``,
    accumulated batch by batch in float64 around the first batch's mean (numerically stable)."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    count, total, squares, shift = 0, None, None, None
    for first in range(0, len(x), BATCH):
        out = np.asarray(probe(x[first:first + BATCH], training=False), np.float64)
        keep = [a % out.ndim for a in axes]
        reduce = tuple(a for a in range(out.ndim) if a not in keep)
        if shift is None:
            shift = out.mean(axis=reduce, keepdims=True)
            total = np.zeros_like(shift)
            squares = np.zeros_like(shift)
        centered = out - shift
        total = total + centered.sum(axis=reduce, keepdims=True)
        squares = squares + (centered * centered).sum(axis=reduce, keepdims=True)
        count += int(np.prod([out.shape[a] for a in reduce]))
    mean_centered = total / count
    variance = np.maximum(squares / count - mean_centered ** 2, 0.0)
    return np.squeeze(shift + mean_centered), np.squeeze(variance)

"""Local training with LiteRT alone: a TFLite model with train, infer, get- and set-weights
signatures (an experiment: the agent does not use it yet, see docs/edge.md).

:func:`build_trainable_tflite` (TensorFlow, once per architecture and batch size) rebuilds a
Keras MLP as a ``tf.Module`` whose ``train`` signature takes one fixed-size batch and the
learning rate, applies one SGD or Adam step and multiplies each masked kernel by its mask, so
pruned weights stay exactly zero, as under tfmot. :class:`LiteRTTrainer` then trains with that
file in LiteRT (``ai-edge-litert``), tens of MB instead of TensorFlow's 600-800 MB, behind the
same ``Trainer`` interface as ``KerasTrainer``.

The limits (ai-edge-litert 2.3.0, seen): builtin ops only (no Flex), so ReLU is written
``maximum(x, 0)`` (the RELU op has no gradient kernel); the loss is a log-softmax cross-entropy on
one-hot labels; the batch size is fixed in the file (the last partial batch of an epoch is left
out); only ``Flatten`` and ``Dense`` layers with ``relu`` or ``linear`` activations are built.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fedprune.architecture import model_from_architecture_json
from fedprune.converters.protocol import Architecture, TrainTask
from fedprune.edge_agent.device import TrainResult

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")


class UnsupportedModel(ValueError):
    """The model has a layer the LiteRT trainer cannot build; the message names it."""


def build_trainable_tflite(architecture: Architecture, masked: list[bool], batch_size: int) -> bytes:
    """A TFLite model of ``architecture`` with ``train_sgd``, ``train_adam``, ``infer``,
    ``get_weights``, ``set_weights`` signatures. Imports TensorFlow.

    ``masked[i]``: whether weight tensor ``i`` (the flat layout) has a mask.
    """
    from fedprune.keras_setup import tf

    model = model_from_architecture_json(architecture.model_json)
    layers: list[tuple[str, Any]] = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Flatten":
            layers.append(("flatten", None))
        elif kind == "Dense" and layer.use_bias and layer.activation.__name__ in ("relu", "linear"):
            layers.append((layer.activation.__name__, layer))
        else:
            raise UnsupportedModel(f"layer {layer.name!r} ({kind}) cannot be trained with LiteRT here: "
                                   "only Flatten and Dense (relu or linear, with bias) are built")
    in_shape = [int(d) for d in model.input_shape[1:]]
    n_out = int(model.output_shape[-1])
    shapes = [tuple(s) for s in architecture.shapes]
    if len(masked) != len(shapes):
        raise ValueError(f"{len(masked)} mask flags for {len(shapes)} weight tensors")

    class Trainable(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = [tf.Variable(np.zeros(s, np.float32), name=f"w{i}") for i, s in enumerate(shapes)]
            self.m = [tf.Variable(np.ones(s, np.float32), name=f"m{i}") if masked[i] else None
                      for i, s in enumerate(shapes)]
            self.slots = [(tf.Variable(np.zeros(s, np.float32)), tf.Variable(np.zeros(s, np.float32)))
                          for s in shapes]
            self.step = tf.Variable(0.0)

        def logits(self, x):
            h, i = x, 0
            for activation, _ in layers:
                if activation == "flatten":
                    h = tf.reshape(h, [tf.shape(h)[0], -1])
                    continue
                h = tf.matmul(h, self.w[i]) + self.w[i + 1]
                if activation == "relu":
                    h = tf.maximum(h, 0.0)  # RELU's gradient is no builtin kernel; MAXIMUM's is
                i += 2
            return h

        def _loss_and_grads(self, x, y):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(tf.reduce_sum(y * tf.nn.log_softmax(self.logits(x)), axis=-1))
            return loss, tape.gradient(loss, self.w)

        def _hold_masks(self):
            for w, m in zip(self.w, self.m):
                if m is not None:
                    w.assign(w * m)

        batch = [tf.TensorSpec([batch_size, *in_shape], tf.float32), tf.TensorSpec([batch_size, n_out], tf.float32),
                 tf.TensorSpec([], tf.float32)]

        @tf.function(input_signature=batch)
        def train_sgd(self, x, y, lr):
            loss, grads = self._loss_and_grads(x, y)
            for w, g in zip(self.w, grads):
                w.assign_sub(lr * g)
            self._hold_masks()
            return {"loss": loss}

        @tf.function(input_signature=batch)
        def train_adam(self, x, y, lr):
            loss, grads = self._loss_and_grads(x, y)
            self.step.assign_add(1.0)
            b1, b2 = 0.9, 0.999
            scale = lr * tf.sqrt(1.0 - tf.pow(b2, self.step)) / (1.0 - tf.pow(b1, self.step))
            for w, g, (m, v) in zip(self.w, grads, self.slots):
                m.assign(b1 * m + (1.0 - b1) * g)
                v.assign(b2 * v + (1.0 - b2) * g * g)
                w.assign_sub(scale * m / (tf.sqrt(v) + 1e-7))
            self._hold_masks()
            return {"loss": loss}

        @tf.function(input_signature=[tf.TensorSpec([None, *in_shape], tf.float32)])
        def infer(self, x):
            return {"logits": self.logits(x)}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {f"w{i}": w for i, w in enumerate(self.w)}

        @tf.function(input_signature=[tf.TensorSpec(s, tf.float32) for s in shapes] * 2)
        def set_weights(self, *tensors):
            """Weights, then masks (ones for unmasked tensors); resets the optimizer state."""
            for i, w in enumerate(self.w):
                w.assign(tensors[i])
                if self.m[i] is not None:
                    self.m[i].assign(tensors[len(shapes) + i])
            for m, v in self.slots:
                m.assign(tf.zeros_like(m))
                v.assign(tf.zeros_like(v))
            self.step.assign(0.0)
            return {"ok": tf.constant(1.0)}

    module = Trainable()
    functions = [module.train_sgd, module.train_adam, module.infer, module.get_weights, module.set_weights]
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [f.get_concrete_function() for f in functions], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    return bytes(converter.convert())


class LiteRTTrainer:
    """A ``Trainer`` that runs a file of :func:`build_trainable_tflite` in LiteRT; no TensorFlow."""

    def __init__(self, trainable_tflite: bytes, batch_size: int, seed: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=trainable_tflite)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._run = {name: self.interpreter.get_signature_runner(name)
                     for name in ("train_sgd", "train_adam", "infer", "get_weights", "set_weights")}

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray) -> TrainResult:
        start = time.perf_counter()
        cfg = task.training
        optimizer = str(cfg.get("optimizer", "adam"))
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
        if int(cfg.get("batch_size", self.batch_size)) != self.batch_size:
            log.warning("the task asks for batch size %s; this trainable model is built for %d",
                        cfg.get("batch_size"), self.batch_size)
        n = len(architecture.shapes)
        masks = [np.ones(s, np.float32) if m is None else m.astype(np.float32)
                 for s, m in zip(architecture.shapes, task.masks)]
        self._run["set_weights"](**self._named([*task.weights, *masks]))
        lr = np.float32(cfg.get("learning_rate", 0.005))
        onehot = np.eye(int(architecture.shapes[-1][-1]), dtype=np.float32)[y]
        train = self._run[f"train_{optimizer}"]
        losses = []
        for _ in range(int(cfg.get("local_epochs", 1))):
            order = self.rng.permutation(len(x))
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                idx = order[i:i + self.batch_size]
                losses.append(float(train(x=x[idx].astype(np.float32), y=onehot[idx], lr=lr)["loss"]))
        trained = self._run["get_weights"]()
        new = [trained[f"w{i}"] for i in range(n)]
        delta = [(w - t).astype(np.float32) for w, t in zip(new, task.weights)]
        logits = self.predict(x)
        metrics = {"loss": float(np.mean(losses[-max(1, len(x) // self.batch_size):])) if losses else float("nan"),
                   "accuracy": float(np.mean(logits.argmax(-1) == y)), "train_s": time.perf_counter() - start}
        return TrainResult(delta, list(task.masks), metrics)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._run["infer"](x=np.asarray(x, np.float32))["logits"]

    def _named(self, tensors: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``set_weights`` takes its inputs by the names the converter gave them, in order."""
        names = self.interpreter.get_signature_list()["set_weights"]["inputs"]
        ordered = sorted(names, key=_arg_index)
        return {name: np.asarray(t, np.float32) for name, t in zip(ordered, tensors)}


def _arg_index(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0

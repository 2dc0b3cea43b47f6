"""The global model's loss and accuracy on the held-out set, once per round.

``model.evaluate`` builds a tf.data pipeline and runs Keras' callbacks on every call: on a
held-out set of a few hundred samples that set-up took longer than the forward pass, and the
evaluation sits on every round's critical path. Here the forward pass is traced once (any batch
size) and the loss and accuracy are computed from the logits in NumPy.
"""

from __future__ import annotations

import numpy as np

from fedprune.keras_setup import keras, tf


class HeldOutEvaluator:
    """Mean sparse cross-entropy (from logits) and top-1 accuracy of ``model`` on ``(x, y)``."""

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"held-out set needs as many labels as samples, at least one: {len(x)} x, {len(y)} y")
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y, np.int64)
        self.batch_size = batch_size
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        self._logits = tf.function(lambda batch: model(batch, training=False), input_signature=[spec])

    def __call__(self) -> tuple[float, float]:
        """(loss, accuracy) of the model's current weights."""
        loss_sum, correct = 0.0, 0
        for first in range(0, len(self.x), self.batch_size):
            logits = self._logits(self.x[first:first + self.batch_size]).numpy().astype(np.float64)
            y = self.y[first:first + self.batch_size]
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            loss_sum -= float(log_probs[np.arange(len(y)), y].sum())
            correct += int((logits.argmax(axis=1) == y).sum())
        return loss_sum / len(self.x), correct / len(self.x)

"""The aggregator's held-out evaluation agrees with Keras' own ``model.evaluate``."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.evaluation import HeldOutEvaluator
from fedprune.keras_setup import keras
from fedprune.models import digits_cnn


def test_loss_and_accuracy_match_keras_evaluate_across_batches():
    keras.utils.set_random_seed(3)
    model = digits_cnn((8, 8, 1), 10)
    rng = np.random.default_rng(0)
    x, y = rng.random((301, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 301)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=3, verbose=0)  # away from chance, so that accuracy is not trivially 0.1
    want_loss, want_acc = model.evaluate(x, y, verbose=0, batch_size=64)
    evaluate = HeldOutEvaluator(model, x, y, batch_size=100)  # a partial last batch
    loss, acc = evaluate()
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert acc == pytest.approx(want_acc, abs=1e-6)
    model.layers[-1].set_weights([w * 0 for w in model.layers[-1].get_weights()])
    assert evaluate()[0] == pytest.approx(np.log(10), rel=1e-6)  # the traced pass reads the new weights


def test_an_empty_or_mismatched_held_out_set_is_refused():
    model = digits_cnn((8, 8, 1), 10)
    with pytest.raises(ValueError, match="held-out set"):
        HeldOutEvaluator(model, np.zeros((0, 8, 8, 1)), np.zeros(0))
    with pytest.raises(ValueError, match="held-out set"):
        HeldOutEvaluator(model, np.zeros((3, 8, 8, 1)), np.zeros(2))

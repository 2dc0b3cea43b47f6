"""The Keras trainer on its own (real TensorFlow, no broker): tracing ahead of the first task, and
which layers device-side pruning may touch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedprune.converters.protocol import TrainTask
from fedprune.edge_agent.trainer import KerasTrainer
from fedprune.keras_setup import keras
from fedprune.models import architecture_of, digits_cnn, full_masks, get_layer_weights


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return digits_cnn((8, 8, 1), 10)


def _task(model, masks, **kw) -> TrainTask:
    return TrainTask(round=1, attempt=1, architecture_digest=architecture_of(model).digest,
                     weights=get_layer_weights(model), masks=masks, deadline_s=60, uplink_precision="int8",
                     training={"local_epochs": 2, "batch_size": 16, "learning_rate": 0.002, "optimizer": "adam"},
                     **kw)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n)


def test_prepare_traces_the_epoch_that_every_task_then_reuses(model):
    arch = architecture_of(model)
    trainer = KerasTrainer()
    trainer.prepare(arch)
    epoch = trainer._cache[arch.digest].epoch
    traced = epoch.experimental_get_tracing_count()
    assert traced >= 1
    # Dense and masked tasks, shards of different sizes (full and partial batches): no new trace.
    for masks, n in (([None] * len(arch.shapes), 40), (full_masks(model, ("logits",)), 73), ([None] * len(arch.shapes), 5)):
        x, y = _data(n)
        trainer.train(arch, _task(model, masks), x, y)
    assert trainer._cache[arch.digest].epoch is epoch
    assert epoch.experimental_get_tracing_count() == traced
    trainer.prepare(arch)  # a second announcement of the same architecture: nothing to do
    assert epoch.experimental_get_tracing_count() == traced


def test_device_side_pruning_leaves_unmasked_layers_dense(model):
    arch = architecture_of(model)
    masks = full_masks(model, ("conv1", "logits"))
    x, y = _data(64, seed=1)
    result = KerasTrainer().train(arch, _task(model, masks, device_sparsity=0.75), x, y)
    for i, (m, d) in enumerate(zip(result.masks, result.delta)):
        if masks[i] is None:
            assert m is None
            if d.ndim > 1:  # a kernel left dense trains (nearly) everywhere; pruned to 75 %, a quarter would
                assert np.count_nonzero(d) > 0.5 * d.size
        else:
            assert abs(1 - m.mean() - 0.75) < 0.02


def test_device_side_pruning_to_sparsity_0_keeps_every_weight(model):
    # The rounds before pruning.begin_round: devices that own their masks are asked for sparsity 0.
    arch = architecture_of(model)
    masks = full_masks(model, ("conv1", "logits"))
    x, y = _data(64, seed=1)
    result = KerasTrainer().train(arch, _task(model, masks, device_sparsity=0.0), x, y)
    kept = [m for m in result.masks if m is not None]
    assert kept and all(m.all() for m in kept)


def _separable_model():
    keras.utils.set_random_seed(1)
    L = keras.layers
    return keras.Sequential([
        L.Input((8, 8, 1)),
        L.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
        L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu", name="depthwise"),
        L.SeparableConv2D(16, 3, padding="same", activation="relu", name="separable"),
        L.Flatten(name="flatten"),
        L.Dense(10, name="logits"),
    ])


def test_depthwise_and_separable_kernels_are_pruned_under_both_mask_modes():
    """tfmot's registry prunes no DepthwiseConv2D weight and only a SeparableConv2D's pointwise
    kernel: they were silently left dense (0.850 of the prunable kernels was 0.796 of all weights)."""
    from fedprune.models import kernel_positions, prunable_layers, unpruned_layers
    from fedprune.pruning.masks import prune_to_sparsity

    model = _separable_model()
    arch = architecture_of(model)
    positions = kernel_positions(model, prunable_layers(model, ("logits",)))
    names = {i: arch.names[i] for i in positions}
    assert sorted(names.values()) == ["conv/kernel", "depthwise/depthwise_kernel", "separable/depthwise_kernel",
                                      "separable/pointwise_kernel"]
    assert unpruned_layers(model, ("logits",)) == {"logits": "Dense: left dense by pruning.leave_dense"}
    weights, masks = prune_to_sparsity(get_layer_weights(model), full_masks(model, ("logits",)), 0.5)
    x, y = _data(48, seed=2)
    trainer = KerasTrainer()
    task = _task(model, masks)
    task = TrainTask(**{**task.__dict__, "weights": weights})
    result = trainer.train(arch, task, x, y)
    for i in positions:  # the aggregator's mask held in every kernel: pruned positions stay exactly 0
        trained = weights[i] + result.delta[i]
        assert np.all(trained[~masks[i]] == 0) and np.count_nonzero(result.delta[i][masks[i]]) > 0, names[i]
    # Device-side pruning prunes them too (to the task's sparsity, by magnitude).
    dense = full_masks(model, ("logits",))
    result = trainer.train(arch, _task(model, dense, device_sparsity=0.6), x, y)
    for i in positions:
        assert abs(1 - result.masks[i].mean() - 0.6) < 0.05, (names[i], result.masks[i].mean())


def test_a_shared_read_only_task_trains_as_its_copy_and_a_changed_array_is_not_served_stale(model):
    arch = architecture_of(model)
    trainer = KerasTrainer()
    x, y = _data(40)
    shared = _task(model, full_masks(model, ("logits",)))
    for a in (*shared.weights, *[m for m in shared.masks if m is not None]):
        a.setflags(write=False)  # as SharedTasks leaves a task that many devices train
    first = trainer.train(arch, shared, x, y, seed=3)
    again = trainer.train(arch, shared, x, y, seed=3)  # flat tensors from the cache
    copy = _task(model, [None if m is None else m.copy() for m in shared.masks])
    fresh = trainer.train(arch, copy, x, y, seed=3)
    for a, b, c in zip(first.delta, again.delta, fresh.delta):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # A writable array changed in place between two tasks: trained with its new values.
    copy.weights[0][...] = 0.0
    zeroed = trainer.train(arch, copy, x, y, seed=3)
    expected = trainer.train(arch, dataclasses.replace(copy, weights=[w.copy() for w in copy.weights]), x, y, seed=3)
    for a, b in zip(zeroed.delta, expected.delta):
        np.testing.assert_array_equal(a, b)


def test_a_task_logs_and_returns_what_it_trained_whatever_the_trainer_trained_before(model):
    """The epoch call resets the metrics and reads the weights back itself: a task's logs are its
    last epoch's alone (not counts left over from the task before), and its delta is the trained
    model's weights less the task's, tensor by tensor in the model's order."""
    arch = architecture_of(model)
    task = _task(model, [None] * len(arch.shapes))
    x, y = _data(40, seed=2)
    fresh = KerasTrainer().train(arch, task, x, y, seed=5)
    used = KerasTrainer()
    other_x, other_y = _data(73, seed=3)
    used.train(arch, _task(model, full_masks(model, ("logits",))), other_x, other_y, seed=1)
    after = used.train(arch, task, x, y, seed=5)
    assert (after.metrics["loss"], after.metrics["accuracy"]) == (fresh.metrics["loss"], fresh.metrics["accuracy"])
    trained = get_layer_weights(used._cache[arch.digest].model)
    for d, f, w, t in zip(after.delta, fresh.delta, task.weights, trained, strict=True):
        np.testing.assert_array_equal(d, f)
        np.testing.assert_array_equal(d, np.subtract(t, w, dtype=np.float32))

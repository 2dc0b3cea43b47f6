"""The pruning controller (fedprune.pruning.controller): every pruning decision of a federation, in
NumPy; and, once, through a real aggregator at round 0."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

from fedprune.pruning import controller as controller_module
from fedprune.pruning.controller import PruningController
from fedprune.pruning.masks import sparsity
from fedprune.task import PruningSection

LAYERS = {0: "dense1", 2: "dense2"}


def _model(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(20, 10)).astype(np.float32), rng.normal(size=(10,)).astype(np.float32),
               rng.normal(size=(10, 4)).astype(np.float32)]
    masks = [np.ones((20, 10), bool), None, np.ones((10, 4), bool)]
    return weights, masks


def test_the_controller_never_asks_which_schedule_it_holds():
    source = inspect.getsource(controller_module)
    assert "isinstance" not in source and "Adaptive" not in source and "Polynomial" not in source


def test_polynomial_turns_prune_by_the_rule_and_others_keep_the_masks():
    c = PruningController(PruningSection(final_sparsity=0.8, begin_round=1, end_round=3), LAYERS)
    weights, masks = _model()
    got = []
    for r in range(1, 5):
        step = c.step(r, weights, masks)
        weights, masks = step.weights, step.masks
        got.append((step.pruned, round(sparsity(masks), 3)))
    assert got[-1] == (False, got[-2][1]) and [p for p, _ in got] == [True, True, True, False]
    assert got[2][1] == pytest.approx(0.8, abs=0.01)
    assert all(np.all(w[~m] == 0) for w, m in zip(weights, masks) if m is not None)


def test_a_layer_rule_applies_to_its_layer_only():
    section = PruningSection(final_sparsity=0.5, begin_round=1, end_round=1,
                             layers={"dense2": {"rule": "absolute", "threshold": 100.0}})
    step = PruningController(section, LAYERS).step(1, *_model())
    assert step.masks[0].mean() == pytest.approx(0.5) and not step.masks[2].any()


def test_round_0_prunes_the_initial_model_and_keeps_each_units_norm():
    weights, masks = _model()
    c = PruningController(PruningSection(schedule="constant", final_sparsity=0.9, begin_round=0, end_round=0),
                          LAYERS)
    new_w, new_m = c.initial(weights, masks)
    assert new_m[0].mean() == pytest.approx(0.1) and np.all(new_w[0][~new_m[0]] == 0)
    alive = new_m[0].any(axis=0)  # a unit with nothing kept has no norm to restore
    np.testing.assert_allclose(np.linalg.norm(new_w[0], axis=0)[alive], np.linalg.norm(weights[0], axis=0)[alive],
                               rtol=1e-5)
    untouched = PruningController(PruningSection(final_sparsity=0.9, begin_round=1, end_round=2), LAYERS)
    assert untouched.initial(weights, masks)[1] is masks


def test_adaptive_backs_off_to_the_masks_before_the_last_prune_and_its_state_round_trips():
    section = PruningSection(schedule="adaptive", initial_sparsity=0.2, final_sparsity=0.8, step=0.2,
                             tolerance=0.01, begin_round=1, end_round=8)
    c = PruningController(section, LAYERS)
    weights, masks = _model()
    first = c.step(1, weights, masks)
    c.observe(1, 0.90)
    second = c.step(2, first.weights, first.masks)
    assert sparsity(second.masks) > sparsity(first.masks)
    c.observe(2, 0.70)  # accuracy fell after the rise
    snapshot = json.loads(json.dumps(c.state()))
    back = c.step(3, second.weights, second.masks)
    assert back.pruned and all(np.array_equal(a, b) for a, b in zip(back.masks, first.masks) if a is not None)
    twin = PruningController(section, LAYERS)
    twin.restore(snapshot)
    assert twin.schedule.decision(3) == c.schedule.decision(3)
    stateless = PruningController(PruningSection(final_sparsity=0.5), LAYERS)
    assert stateless.state() == {}
    stateless.restore({})  # what a checkpoint of a stateless schedule holds


def test_regrowth_swaps_in_the_pruned_weights_with_the_largest_gradients_on_pruning_turns_only():
    section = PruningSection(schedule="constant", final_sparsity=0.5, begin_round=1, end_round=4, frequency=2,
                             regrowth=0.1)
    c = PruningController(section, LAYERS)
    weights, masks = _model()
    assert c.gradient_fraction(1, [None, None, None]) is None  # nothing masked: nothing to regrow
    assert c.gradient_fraction(1, masks) == pytest.approx(0.2) and c.gradient_fraction(2, masks) is None
    plain = PruningController(PruningSection(schedule="constant", final_sparsity=0.5, begin_round=1,
                                             end_round=4, frequency=2), LAYERS).step(1, weights, masks)
    pruned_position = np.flatnonzero(~plain.masks[0].ravel())[0]
    gradients = [np.zeros(w.shape, np.float32) for w in weights]  # as devices send them: every tensor
    gradients[0].flat[pruned_position] = 5.0
    step = c.step(1, weights, masks, [(gradients, 10), (None, 30)])
    assert step.masks[0].flat[pruned_position] and step.weights[0].flat[pruned_position] == 0.0
    assert step.masks[0].sum() == plain.masks[0].sum()  # a swap: the sparsity holds


def test_cosine_regrowth_decay_swaps_fewer_weights_turn_by_turn_and_none_at_end_round():
    section = PruningSection(schedule="constant", final_sparsity=0.5, begin_round=0, end_round=8, frequency=2,
                             regrowth=0.4, regrowth_decay="cosine", scope="global", global_floor=0.0)
    c = PruningController(section, LAYERS)
    assert [c.regrowth_at(r) for r in (0, 4, 8)] == pytest.approx([0.4, 0.2, 0.0])
    weights, masks = _model()
    assert c.gradient_fraction(2, masks) == pytest.approx(2 * c.regrowth_at(2))  # fewer candidates asked
    assert c.gradient_fraction(8, masks) is None  # the last turn swaps nothing: no report asked
    swapped = []
    for r in (2, 4, 6):
        pruned = PruningController(dataclasses.replace(section, regrowth=0.0), LAYERS).step(r, weights, masks)
        # every pruned position has a gradient, so each turn swaps round(fraction * kept) per tensor
        gradients = [np.where(m, 0.0, 1.0).astype(np.float32) if m is not None else np.zeros(w.shape, np.float32)
                     for w, m in zip(pruned.weights, pruned.masks)]
        step = c.step(r, weights, masks, [(gradients, 1)])
        swapped.append(int((step.masks[0] & ~pruned.masks[0]).sum()))
    kept = int(pruned.masks[0].sum())
    assert swapped == [round(c.regrowth_at(r) * kept) for r in (2, 4, 6)] and swapped[0] > swapped[1] > swapped[2] > 0
    constant = PruningController(dataclasses.replace(section, regrowth_decay="constant"), LAYERS)
    assert constant.regrowth_at(6) == constant.regrowth_at(0) == 0.4


def test_device_side_masks_ask_the_scheduled_sparsity_and_reset_the_global_mask():
    c = PruningController(PruningSection(final_sparsity=0.6, begin_round=1, end_round=3, mask_owner="device"),
                          LAYERS)
    assert c.device_target(3) == pytest.approx(0.6) and c.gradient_fraction(3, _model()[1]) is None
    weights, _ = _model()
    pruned_before = [np.zeros((20, 10), bool), None, np.zeros((10, 4), bool)]  # positions may come back
    step = c.step(3, weights, pruned_before)
    assert step.pruned and step.masks[0].mean() == pytest.approx(0.4)
    assert PruningController(PruningSection(final_sparsity=0.6), LAYERS).device_target(3) is None


def test_each_step_says_how_much_of_the_global_kept_set_stayed():
    weights, masks = _model()
    c = PruningController(PruningSection(final_sparsity=0.8, begin_round=1, end_round=2), LAYERS)
    first = c.step(1, weights, masks)
    assert first.mask_overlap == pytest.approx(1 - sparsity(first.masks))  # a subset of all-kept
    assert c.step(3, first.weights, first.masks).mask_overlap == 1.0  # fine-tuning: the mask is fixed
    device = PruningController(PruningSection(final_sparsity=0.6, begin_round=1, end_round=3,
                                              mask_owner="device"), LAYERS)
    moved = [w + np.random.default_rng(1).normal(size=w.shape).astype(np.float32) for w in weights]
    kept = device.step(3, weights, masks).masks
    assert device.step(4, moved, kept).mask_overlap < 1.0  # chosen afresh from new weights: it churns


def test_device_side_masks_prune_nothing_before_begin_round():
    # As tfmot's PolynomialDecay (no pruning before begin_step) and aggregator masks: the schedule's
    # initial sparsity applies from begin_round, not from round 1.
    c = PruningController(PruningSection(initial_sparsity=0.5, final_sparsity=0.9, begin_round=4, end_round=8,
                                         mask_owner="device"), LAYERS)
    assert [c.device_target(r) for r in (1, 3)] == [0.0, 0.0] and c.device_target(4) == pytest.approx(0.5)
    weights, masks = _model()
    step = c.step(3, weights, masks)
    assert sparsity(step.masks) == 0.0 and step.mask_overlap == 1.0
    assert sparsity(c.step(4, weights, masks).masks) == pytest.approx(0.5, abs=0.01)


def test_structured_pruning_is_due_after_its_round_only():
    c = PruningController(PruningSection(structured_fraction=0.5, structured_round=2), {})
    assert [r for r in range(1, 5) if c.structured_due(r)] == [2]
    assert not PruningController(PruningSection(), {}).structured_due(0)


def test_dense_federation_never_prunes():
    c = PruningController(PruningSection(), LAYERS)
    weights, masks = _model()
    assert c.schedule is None and c.step(1, weights, masks).pruned is False
    assert c.initial(weights, masks) == (weights, masks) and c.gradient_fraction(1, masks) is None


def test_begin_round_0_prunes_the_aggregators_initial_model_keeping_each_units_norm(tmp_path):
    from federation_helpers import small_task

    from fedprune.aggregator.server import Aggregator
    from fedprune.data import load_dataset
    from fedprune.keras_setup import keras
    from fedprune.models import build_model, get_layer_weights

    task = small_task(pruning={"schedule": "constant", "final_sparsity": 0.9, "begin_round": 0, "end_round": 0,
                               "leave_dense": ["conv1", "logits"]})
    ds = load_dataset("digits")
    agg = Aggregator(task, ds, "mqtt://127.0.0.1:1", tmp_path / "run", export_tflite=False)
    keras.utils.set_random_seed(task.seed)  # the same initialization the aggregator drew
    initial = get_layer_weights(build_model(task.model.factory, ds.input_shape, ds.num_classes))
    masked = [i for i, m in enumerate(agg.state.masks) if m is not None]
    assert [agg.layer_of[i] for i in masked] == ["conv2", "dense1"]
    for i in masked:
        w, m = agg.state.weights[i], agg.state.masks[i]
        assert abs(1 - m.mean() - 0.9) < 0.001 and np.all(w[~m] == 0)
        units = w.shape[-1]
        np.testing.assert_allclose(np.linalg.norm(w.reshape(-1, units), axis=0),
                                   np.linalg.norm(initial[i].reshape(-1, units), axis=0), rtol=1e-4)

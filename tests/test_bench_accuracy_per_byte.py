"""The study's row definitions (scripts/bench_accuracy_per_byte.py): the tasks it runs, without
running them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_accuracy_per_byte.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_accuracy_per_byte", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rounds", [20, 30])
def test_pruned_95_decays_its_rate_only_after_the_masks_last_change(study, rounds):
    task = study.task_for("mnist1d", "pruned-95", rounds, 10, 5, 0, (3, 12))
    last_change = task.pruning.end_round
    assert last_change == rounds - 5 and task.training.decay_begin_round == last_change
    rates = [task.training.learning_rate_at(r, rounds) for r in range(1, rounds + 1)]
    assert set(rates[:last_change]) == {0.01} and rates[-1] == pytest.approx(0.001)
    # the other rows keep their schedules: pruned-90 falls over the whole run, dense not at all
    assert study.task_for("mnist1d", "pruned-90", rounds, 10, 5, 0, (3, 12)).training.decay_begin_round == 1
    dense = study.task_for("mnist1d", "dense", rounds, 10, 5, 0, (3, 12)).training
    assert dense.learning_rate_at(rounds, rounds) == dense.learning_rate


def test_p90_late_is_pruned_90_with_the_rate_held_until_the_masks_last_change(study):
    late = study.task_for("breast_cancer", "p90-late", 20, 10, 5, 0, (3, 12))
    base = study.task_for("breast_cancer", "pruned-90", 20, 10, 5, 0, (3, 12))
    assert late.pruning == base.pruning and late.transport == base.transport
    assert late.training.decay_begin_round == late.pruning.end_round == 15
    assert late.training.learning_rate_at(15, 20) == 0.01 > base.training.learning_rate_at(15, 20)
    assert late.training.learning_rate_at(20, 20) == pytest.approx(base.training.learning_rate_at(20, 20))

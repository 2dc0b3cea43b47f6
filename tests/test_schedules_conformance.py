"""What every registered pruning schedule promises (fedprune.pruning.schedules.PruningSchedule):
its config round-trips, ``schedule(r)`` is ``decision(r)``, ``sparsity_at`` agrees with the
decisions, and its state round-trips through JSON (empty for a stateless schedule).

A new schedule needs an example config in ``EXAMPLES`` (the first test fails until it has one).
"""

from __future__ import annotations

import json

import pytest

from fedprune.pruning.schedules import SCHEDULES, Decision, PruningSchedule, schedule_from_config
from fedprune.task import PruningSection

EXAMPLES = [
    {"schedule": "polynomial", "initial_sparsity": 0.1, "final_sparsity": 0.85, "begin_round": 2,
     "end_round": 12, "power": 2.0, "frequency": 3},
    {"schedule": "polynomial", "initial_sparsity": 0.5, "final_sparsity": 0.9, "begin_round": 0,
     "end_round": 4, "power": 3.0, "frequency": 1},
    {"schedule": "constant", "target_sparsity": 0.4, "begin_round": 2, "end_round": 8, "frequency": 2},
    {"schedule": "adaptive", "initial_sparsity": 0.2, "final_sparsity": 0.6, "step": 0.1, "tolerance": 0.01,
     "begin_round": 1, "end_round": 10, "frequency": 2},
]
ROUNDS = range(0, 15)


def _accuracy(r: int) -> float:
    """Held-out accuracy that rises, then falls once (so the adaptive schedule backs off)."""
    return 0.5 + 0.04 * r if r < 6 else 0.6


def _run(schedule: PruningSchedule, rounds=ROUNDS, call=False) -> list[Decision | tuple[bool, float]]:
    out = []
    for r in rounds:
        out.append(schedule(r) if call else schedule.decision(r))
        schedule.observe(r, _accuracy(r))
    return out


def _ids(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def test_every_registered_schedule_has_an_example():
    assert {c["schedule"] for c in EXAMPLES} == set(SCHEDULES)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_config_round_trips_and_the_rebuilt_schedule_decides_the_same(config):
    schedule = schedule_from_config(config)
    cfg = schedule.get_config()
    assert json.loads(json.dumps(cfg)) == cfg == config
    rebuilt = schedule_from_config(cfg)
    assert rebuilt == schedule
    assert _run(rebuilt) == _run(schedule)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_calling_it_is_its_decision(config):
    decisions = _run(schedule_from_config(config))
    assert _run(schedule_from_config(config), call=True) == [(d.prune, d.target) for d in decisions]
    assert all(isinstance(d, Decision) and not (d.prune and d.backoff) for d in decisions)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_sparsity_at_a_round_is_the_target_of_its_decision(config):
    schedule = schedule_from_config(config)
    for r in ROUNDS:
        d = schedule.decision(r)
        assert schedule.sparsity_at(r) == pytest.approx(d.target), r
        schedule.observe(r, _accuracy(r))


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_state_round_trips_through_json_and_the_twin_goes_on_alike(config):
    schedule = schedule_from_config(config)
    _run(schedule, range(0, 7))
    snapshot = json.loads(json.dumps(schedule.state()))
    twin = schedule_from_config(config)
    twin.restore(snapshot)
    assert twin.state() == schedule.state()
    assert _run(twin, range(7, 15)) == _run(schedule, range(7, 15))
    if not snapshot:  # stateless: an empty snapshot, and nothing else restores
        with pytest.raises(ValueError, match="state keys"):
            twin.restore({"level": 1})


def test_the_adaptive_example_really_backs_off():
    assert any(d.backoff for d in _run(schedule_from_config(EXAMPLES[-1])))


@pytest.mark.parametrize("config,key", [
    ({}, "'schedule'"),
    ({"schedule": "cosine"}, "'schedule'"),
    ({"schedule": "constant"}, "'target_sparsity'"),
    ({"schedule": "constant", "target_sparsity": 0.5, "power": 2.0}, "'power'"),
    ({"schedule": "polynomial", "initial_sparsity": 0.1, "final_sparsity": 0.5, "begin_round": 1}, "'end_round'"),
    ({"schedule": "polynomial", "initial_sparsity": 0.1, "final_sparsity": 0.5, "begin_round": 1,
      "end_round": 2.5}, "end_round"),
    ({"schedule": "constant", "target_sparsity": "0.5"}, "target_sparsity"),
    ({"schedule": "adaptive", "initial_sparsity": 0.1, "final_sparsity": 0.5, "step": 0.0, "tolerance": 0.01,
      "begin_round": 1, "end_round": 2}, "step"),
])
def test_bad_configs_are_refused_naming_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        schedule_from_config(config)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_the_task_files_schedule_values_build_through_the_registry(schedule):
    section = PruningSection(schedule=schedule, initial_sparsity=0.2, final_sparsity=0.6, begin_round=1,
                             end_round=5, frequency=2)
    built = section.schedule_object()
    assert built.schedule_name == schedule and built.get_config() == section.schedule_config()

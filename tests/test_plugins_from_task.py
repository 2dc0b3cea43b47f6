"""A strategy, schedule or rule added to its registry is reachable from a task file through its
``params`` table, with no other edit (docs/extending.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from fedprune.aggregator.strategies import STRATEGIES, FedAvg, strategy_for_task
from fedprune.pruning import rules
from fedprune.pruning.schedules import SCHEDULES, Decision, PruningSchedule
from fedprune.task import TaskError, parse_task

BASE = {"federation": {"rounds": 4, "devices_per_round": 2, "min_devices": 2}}


@dataclass(frozen=True)
class DampedFedAvg(FedAvg):
    """FedAvg whose step is scaled by ``damping`` (a stand-in for a user's strategy)."""

    strategy_name: ClassVar[str] = "damped_fedavg"
    damping: float = 1.0


@dataclass(frozen=True)
class EveryOtherRound(PruningSchedule):
    """Prunes to ``target`` on even rounds (a stand-in for a user's schedule)."""

    schedule_name: ClassVar[str] = "every_other_round"
    target: float = 0.5

    def decision(self, round_number: int) -> Decision:
        return Decision(prune=round_number % 2 == 0, target=self.target)

    def sparsity_at(self, round_number: int) -> float:
        return self.target


@dataclass(frozen=True)
class AboveMean(rules.Rule):
    """Keeps weights above ``factor`` times the layer's mean magnitude (a stand-in for a user's rule)."""

    rule_name: ClassVar[str] = "above_mean"
    factor: float = 2.0

    def mask(self, w, current, target_sparsity=None):
        a = np.abs(w)
        keep = a > self.factor * a.mean()
        return keep if current is None else keep & current


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(STRATEGIES, DampedFedAvg.strategy_name, DampedFedAvg)
    monkeypatch.setitem(SCHEDULES, EveryOtherRound.schedule_name, EveryOtherRound)
    monkeypatch.setitem(rules.RULES, AboveMean.rule_name, AboveMean)


def test_a_registered_strategy_takes_its_params_table(registered):
    task = parse_task({**BASE, "aggregation": {"method": "damped_fedavg", "params": {"damping": 0.5}}})
    assert strategy_for_task(task) == DampedFedAvg(damping=0.5)


def test_a_registered_schedule_and_rule_take_their_params_tables(registered):
    task = parse_task({**BASE, "pruning": {"final_sparsity": 0.5, "end_round": 2, "schedule": "every_other_round",
                                           "schedule_params": {"target": 0.3}, "rule": "above_mean",
                                           "rule_params": {"factor": 1.5}}})
    assert task.pruning.schedule_object() == EveryOtherRound(target=0.3)
    assert task.pruning.default_rule() == AboveMean(factor=1.5)


def test_unknown_names_and_params_are_refused_naming_the_section(registered):
    with pytest.raises(TaskError, match="aggregation: unknown key 'dampin'"):
        strategy_for_task(parse_task({**BASE, "aggregation": {"method": "damped_fedavg",
                                                              "params": {"dampin": 0.5}}}))
    with pytest.raises(TaskError, match="pruning: unknown 'schedule' 'every_round'"):
        parse_task({**BASE, "pruning": {"final_sparsity": 0.5, "end_round": 2, "schedule": "every_round"}})
    with pytest.raises(TaskError, match="pruning: unknown 'rule' 'below_mean'"):
        parse_task({**BASE, "pruning": {"rule": "below_mean"}})

"""Pruning schedules counted in federated rounds, and their registry.

Modelled on tfmot's ``PruningSchedule`` classes (small, with ``get_config``), but the step is the
round number and the aggregator applies them to the global model after aggregation. Every
schedule answers the same calls, so nothing that uses one checks which it is:

* ``decision(r)``: a ``Decision`` for the round ``r`` just aggregated (0 is the initial model);
  ``schedule(r)`` is ``(decision.prune, decision.target)``;
* ``observe(r, accuracy)``: the held-out accuracy after round ``r`` (only the adaptive schedule
  acts on it);
* ``state()`` / ``restore(state)``: a JSON snapshot of what it has learnt (empty for the others);
* ``sparsity_at(r)``: the sparsity it has the model at by round ``r`` (what devices that prune
  themselves are asked for);
* ``get_config()``: ``{"schedule": name, **parameters}``; ``schedule_from_config`` builds it
  again, refusing a bad, missing or unknown key by name.

To add one: a frozen dataclass subclass of ``PruningSchedule`` in this file (or its own module)
with a ``schedule_name``, ``decision`` and ``sparsity_at`` (and ``observe``/``state``/``restore``
if it learns); one line in ``SCHEDULES``; an example config in
``tests/test_schedules_conformance.py``, which then runs its round trips. The task file names it
in ``[pruning] schedule`` once ``PruningSection.schedule_config`` maps its keys.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from fedprune.configs import check_int, check_real, config_of, parse_config

__all__ = [
    "AdaptiveSparsity",
    "ConstantSparsity",
    "Decision",
    "PolynomialDecay",
    "PruningSchedule",
    "SCHEDULES",
    "schedule_from_config",
]


@dataclass(frozen=True)
class Decision:
    """What the aggregator does after aggregating a round (``PruningSchedule.decision``).

    ``backoff``: restore the masks (and, if kept, the weights) from before the last prune; the
    model is then at sparsity ``target``. ``prune``: prune to ``target``. Never both.
    """

    prune: bool
    target: float
    backoff: bool = False


class PruningSchedule(ABC):
    """Says, for a round, whether to prune after aggregating it and to which sparsity.

    Subclasses are frozen dataclasses whose fields are the config. Stateless ones implement
    ``decision`` and ``sparsity_at``; one that learns from accuracy also ``observe``, ``state``
    and ``restore``.
    """

    #: the ``"schedule"`` value naming this class in a config dict (the task file's value)
    schedule_name: ClassVar[str]

    @abstractmethod
    def decision(self, round_number: int) -> Decision:
        """The decision for the round just aggregated (1-based; 0 is the initial model, before
        round 1)."""

    @abstractmethod
    def sparsity_at(self, round_number: int) -> float:
        """The sparsity the schedule has the model at by round ``round_number``."""

    def __call__(self, round_number: int) -> tuple[bool, float]:
        """``(prune_now, target_sparsity)`` of ``decision(round_number)``."""
        d = self.decision(round_number)
        return d.prune, d.target

    def observe(self, round_number: int, accuracy: float) -> None:
        """Record the held-out accuracy after ``round_number`` (stateless schedules ignore it)."""

    def state(self) -> dict[str, Any]:
        """JSON-serialisable snapshot of what the schedule has learnt (empty when stateless)."""
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a snapshot taken by ``state()`` on a schedule built from the same config."""
        if state:
            raise ValueError(
                f"state keys {sorted(state)} do not match {type(self).__name__}'s []: it keeps no state"
            )

    def get_config(self) -> dict[str, Any]:
        """``{"schedule": name, **parameters}``; ``schedule_from_config`` rebuilds an equal one."""
        return config_of("schedule", self.schedule_name, self)


def _check_range(begin_round: int, end_round: int, frequency: int, first: int = 0) -> None:
    for name, v in (("begin_round", begin_round), ("end_round", end_round), ("frequency", frequency)):
        check_int(name, v)
    # Round 0 is the initial model, before any training: pruning it (pruning at initialization)
    # makes every update sparse from round 1, which is what a thin uplink needs.
    if begin_round < first:
        raise ValueError(f"begin_round must be >= {first}, got {begin_round}")
    if end_round < begin_round:
        raise ValueError(f"end_round ({end_round}) must be >= begin_round ({begin_round})")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")


def _check_sparsities(initial: float, final: float) -> None:
    for name, v in (("initial_sparsity", initial), ("final_sparsity", final)):
        if not 0.0 <= check_real(name, v) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if final < initial:
        raise ValueError(f"final_sparsity ({final}) must be >= initial_sparsity ({initial})")


def _is_pruning_turn(r: int, begin: int, end: int, frequency: int) -> bool:
    # tfmot prunes every `frequency` steps from begin to end; we also prune at `end` itself so the
    # final sparsity is always reached even when frequency does not divide the range.
    return begin <= r <= end and ((r - begin) % frequency == 0 or r == end)


@dataclass(frozen=True)
class ConstantSparsity(PruningSchedule):
    """Prune to a fixed sparsity every ``frequency`` rounds in ``[begin_round, end_round]``."""

    schedule_name: ClassVar[str] = "constant"
    target_sparsity: float
    begin_round: int = 1
    end_round: int = 1
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_range(self.begin_round, self.end_round, self.frequency)
        if not 0.0 <= check_real("target_sparsity", self.target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")

    def decision(self, round_number: int) -> Decision:
        turn = _is_pruning_turn(round_number, self.begin_round, self.end_round, self.frequency)
        return Decision(turn, self.target_sparsity)

    def sparsity_at(self, round_number: int) -> float:
        """Always the target, as tfmot's ConstantSparsity (the model reaches it at the first turn)."""
        return float(self.target_sparsity)


@dataclass(frozen=True)
class PolynomialDecay(PruningSchedule):
    """tfmot's PolynomialDecay in rounds.

    s(r) = final + (initial - final) * (1 - (r - begin) / (end - begin)) ** power, for r clipped to
    [begin, end]; pruning happens every ``frequency`` rounds from ``begin_round`` and at ``end_round``.
    """

    schedule_name: ClassVar[str] = "polynomial"
    initial_sparsity: float
    final_sparsity: float
    begin_round: int
    end_round: int
    power: float = 3.0
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_range(self.begin_round, self.end_round, self.frequency)
        _check_sparsities(self.initial_sparsity, self.final_sparsity)
        if not check_real("power", self.power) > 0:
            raise ValueError(f"power must be a finite number > 0, got {self.power}")

    def sparsity_at(self, round_number: int) -> float:
        span = self.end_round - self.begin_round
        r = min(max(round_number, self.begin_round), self.end_round)
        progress = 1.0 if span == 0 else (r - self.begin_round) / span
        s = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            1.0 - progress
        ) ** self.power
        return float(s)

    def decision(self, round_number: int) -> Decision:
        turn = _is_pruning_turn(round_number, self.begin_round, self.end_round, self.frequency)
        return Decision(turn, self.sparsity_at(round_number))


# --------------------------------------------------------------------------- adaptive


_STATE_KEYS = (
    "level", "prev_level", "can_undo", "frozen", "best", "latest", "last_observed_round",
    "observed_since_prune", "last_round", "last_decision",
)


@dataclass(frozen=True)
class AdaptiveSparsity(PruningSchedule):
    """Raise sparsity by ``step`` while held-out accuracy holds; undo the last rise when it drops.

    Configuration is frozen (the dataclass fields, ``get_config``); the accuracy history is
    mutable state, fed by ``observe`` and saved/restored with ``state()`` / ``restore()``.

    Use, once per aggregated round ``r`` (1-based)::

        d = schedule.decision(r)
        if d.backoff:  masks = masks_before_last_prune            # (and weights, if kept)
        elif d.prune:  weights, masks = prune_with_rules(..., d.target)   # or prune_to_sparsity
        schedule.observe(r, evaluate(global_model))              # higher is better

    ``schedule(r)`` returns ``(d.prune, d.target)`` like the other schedules, for callers that
    cannot restore masks (they then just stop rising after a drop). Levels, on pruning turns
    (every ``frequency`` rounds from ``begin_round`` and at ``end_round``, as elsewhere):

    * the first turn prunes to ``initial_sparsity``;
    * each later turn rises by ``step`` (capped at ``final_sparsity``; levels are
      ``initial + k * step``, not accumulated, so no float drift) if the latest observed accuracy
      is within ``tolerance`` (absolute) of the best seen, or none was observed yet; otherwise it
      holds and does not prune (so threshold rules do not bite again while accuracy suffers);
    * when an accuracy observed after the last prune is below ``best - tolerance`` and that prune
      raised sparsity, the next decision (turn or not) is a backoff to the level before it (0.0
      before the first prune). A backoff is final: the schedule never rises again (no
      prune/undo oscillation). A drop with nothing to undo just holds.

    ``decision`` advances the state; calling it again for the same round returns the same
    decision, for an earlier round raises ``ValueError``. ``wants_backoff()`` peeks without
    advancing.
    """

    schedule_name: ClassVar[str] = "adaptive"
    initial_sparsity: float
    final_sparsity: float
    step: float
    tolerance: float
    begin_round: int
    end_round: int
    frequency: int = 1

    def __post_init__(self) -> None:
        # It acts on accuracy observed after a round, so it cannot start before round 1.
        _check_range(self.begin_round, self.end_round, self.frequency, first=1)
        _check_sparsities(self.initial_sparsity, self.final_sparsity)
        if not check_real("step", self.step) > 0:
            raise ValueError(f"step must be a finite number > 0, got {self.step}")
        if not check_real("tolerance", self.tolerance) >= 0:
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance}")
        object.__setattr__(self, "_st", self._fresh_state())

    # ------------------------------------------------------------------ state

    @staticmethod
    def _fresh_state() -> dict[str, Any]:
        return {
            "level": None,  # steps taken: None = no prune yet, -1 = backed off to before the first
            "prev_level": None,  # level before the last rise (restore target)
            "can_undo": False,  # the last prune raised sparsity and was not undone
            "frozen": False,  # a backoff happened: no more rises
            "best": None,
            "latest": None,
            "last_observed_round": None,
            "observed_since_prune": False,
            "last_round": None,  # round of the last decision, and that decision (cache)
            "last_decision": None,
        }

    def state(self) -> dict[str, Any]:
        """JSON-serialisable snapshot of the mutable state (not the config: see ``get_config``)."""
        s = dict(self._st)  # type: ignore[attr-defined]
        if s["last_decision"] is not None:
            s["last_decision"] = asdict(s["last_decision"])
        return s

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a snapshot taken by ``state()`` (on a schedule built from the same config)."""
        if set(state) != set(_STATE_KEYS):
            raise ValueError(
                f"state keys {sorted(state)} do not match AdaptiveSparsity's {sorted(_STATE_KEYS)}"
            )
        s = dict(state)
        if s["last_decision"] is not None:
            s["last_decision"] = Decision(**s["last_decision"])
        object.__setattr__(self, "_st", s)

    # ------------------------------------------------------------------ levels

    def _target(self, level: int | None) -> float:
        if level is None or level < 0:
            return 0.0
        return min(round(self.initial_sparsity + level * self.step, 12), self.final_sparsity)

    @property
    def sparsity(self) -> float:
        """Sparsity the schedule believes the model is at (0.0 before the first prune)."""
        return self._target(self._st["level"])  # type: ignore[attr-defined]

    def sparsity_at(self, round_number: int) -> float:
        """``sparsity``: the level the decisions so far have the model at. Which level a later
        round reaches depends on the accuracy still to be observed, so the round is not used."""
        return self.sparsity

    def _holds(self) -> bool:
        st = self._st  # type: ignore[attr-defined]
        return st["latest"] is None or st["latest"] >= st["best"] - self.tolerance

    def wants_backoff(self) -> bool:
        """Whether the next decision will be a backoff (given what was observed so far)."""
        st = self._st  # type: ignore[attr-defined]
        return bool(
            st["can_undo"] and st["observed_since_prune"] and not self._holds()
        )

    # ------------------------------------------------------------------ protocol

    def observe(self, round_number: int, accuracy: float) -> None:
        """Record the held-out accuracy (higher is better) of the global model after ``round``."""
        accuracy = float(accuracy)
        if not math.isfinite(accuracy):
            raise ValueError(f"accuracy must be finite, got {accuracy}")
        st = self._st  # type: ignore[attr-defined]
        last = st["last_observed_round"]
        if last is not None and round_number < last:
            raise ValueError(f"observed round {round_number} after round {last}")
        st["latest"] = accuracy
        st["last_observed_round"] = int(round_number)
        st["observed_since_prune"] = True
        if st["best"] is None or accuracy > st["best"]:
            st["best"] = accuracy

    def decision(self, round_number: int) -> Decision:
        """The decision for the round just aggregated (advances the state once per round)."""
        st = self._st  # type: ignore[attr-defined]
        r = int(round_number)
        if st["last_round"] is not None:
            if r < st["last_round"]:
                raise ValueError(f"decision for round {r} after round {st['last_round']}")
            if r == st["last_round"]:
                return st["last_decision"]
        turn = _is_pruning_turn(r, self.begin_round, self.end_round, self.frequency)
        if self.wants_backoff():
            st["level"] = st["prev_level"]
            st["can_undo"] = False
            st["frozen"] = True
            d = Decision(prune=False, target=self._target(st["level"]), backoff=True)
        elif turn and not st["frozen"] and st["level"] is None:
            self._rise(st, -1, 0)
            d = Decision(prune=True, target=self._target(0))
        elif (
            turn and not st["frozen"] and self._holds()
            and self._target(st["level"]) < self.final_sparsity
        ):
            self._rise(st, st["level"], st["level"] + 1)
            d = Decision(prune=True, target=self._target(st["level"]))
        else:
            d = Decision(prune=False, target=self._target(st["level"]))
        st["last_round"], st["last_decision"] = r, d
        return d

    def _rise(self, st: dict[str, Any], old: int, new: int) -> None:
        st["prev_level"], st["level"] = old, new
        st["can_undo"] = self._target(new) > self._target(old)
        st["observed_since_prune"] = False


# --------------------------------------------------------------------------- config

#: name in a config (the task file's `[pruning] schedule`) -> class; a new schedule is one more line here
SCHEDULES: dict[str, type[PruningSchedule]] = {
    cls.schedule_name: cls for cls in (PolynomialDecay, ConstantSparsity, AdaptiveSparsity)
}


def schedule_from_config(d: Mapping[str, Any]) -> PruningSchedule:
    """Build a schedule from ``{"schedule": name, **parameters}``.

    Names and parameters: ``"polynomial"`` (``initial_sparsity``, ``final_sparsity``,
    ``begin_round``, ``end_round``, ``power`` default 3.0, ``frequency`` default 1),
    ``"constant"`` (``target_sparsity``, ``begin_round``, ``end_round``, ``frequency``, all but the
    first default 1), ``"adaptive"`` (``initial_sparsity``, ``final_sparsity``, ``step``,
    ``tolerance``, ``begin_round``, ``end_round``, ``frequency`` default 1). Raises ``ValueError``
    naming the offending key: a missing or unknown ``schedule``, a parameter the schedule does not
    take, a missing required parameter, or a bad value.
    """
    cls, params = parse_config("schedule", SCHEDULES, d)
    return cls(**params)

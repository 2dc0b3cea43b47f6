"""The pruning controller: every pruning decision of a federation, in pure NumPy.

The aggregator owns the model (Keras) and asks the controller, round by round:

* ``initial(weights, masks)``: the model before round 1 (pruned at initialization when
  ``begin_round = 0``, each unit rescaled to its norm);
* ``device_target(r)``: the sparsity devices that prune themselves aim for in round ``r``;
* ``gradient_fraction(r, masks)``: how many pruned positions' gradients to ask devices for
  (regrowth candidates, in rounds that end with a pruning turn);
* ``step(r, weights, masks, gradients)``: the masks after aggregating round ``r``: a pruning step
  by the task's rule per layer (or global magnitude), regrowth from the devices' gradients, a
  backoff to the masks before the last prune, or, with device-side masks, a fresh global mask;
* ``observe(r, accuracy)``, ``state()``, ``restore(state)``: what the schedule learns, and its
  snapshot for the checkpoint;
* ``structured_due(r)``: whether round ``r`` ends with structured pruning (the surgery on the
  model itself is the aggregator's: it needs Keras).

It never asks which schedule it holds: every schedule answers the same calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fedprune.pruning.masks import (
    Masks,
    kept_jaccard,
    prune_globally,
    prune_to_sparsity,
    prune_with_rules,
    rescale_units_to_norms,
)
from fedprune.pruning.regrowth import gradient_scores, regrow

if TYPE_CHECKING:
    from fedprune.task import PruningSection

log = logging.getLogger(__name__)

#: each device's ``(gradients at pruned positions, or None; sample count)``
GradientReports = Sequence[tuple[Sequence[np.ndarray] | None, int]]


@dataclass(frozen=True)
class PruneStep:
    """The global weights and masks after a round's pruning decision."""

    weights: list[np.ndarray]
    masks: Masks
    pruned: bool  # the masks changed this round: a pruning step, or a backoff
    # Jaccard index of the kept set after this step with the kept set before it (1 = unchanged):
    # how much the global mask churns from round to round (None: nothing masked).
    mask_overlap: float | None = None


class PruningController:
    """The schedule, rule, regrowth and backoff of one federation's ``[pruning]`` section.

    ``layer_of`` maps the index of each masked weight tensor to its layer's name (the rule for a
    layer is looked up by name); set it again when the architecture changes.
    """

    def __init__(self, section: PruningSection, layer_of: Mapping[int, str]) -> None:
        self.section = section
        self.layer_of = dict(layer_of)
        self.device_masks = section.enabled and section.mask_owner == "device"
        self.schedule = section.schedule_object() if section.enabled else None
        self._masks_before_prune: Masks | None = None  # what a backoff restores

    def use_layers(self, layer_of: Mapping[int, str]) -> None:
        """Prune the kernels of a (new) architecture: ``layer_of`` as in the class docstring.
        ``ValueError`` when ``[pruning.layers]`` names a layer that is not among them."""
        unknown = sorted(set(self.section.layers) - set(layer_of.values()))
        if unknown:
            raise ValueError(f"[pruning.layers] names layers that are not prunable here: {unknown}; "
                             f"prunable: {sorted(set(layer_of.values()))}")
        self.layer_of = dict(layer_of)

    def initial(self, weights: list[np.ndarray], masks: Masks) -> tuple[list[np.ndarray], Masks]:
        """The model before round 1: pruned at initialization if the schedule prunes at round 0
        (every update is then sparse from round 1), each unit rescaled to its initial norm."""
        if self.schedule is None:
            return weights, masks
        d = self.schedule.decision(0)
        if not d.prune or self.device_masks:
            return weights, masks
        pruned, masks = self.prune(weights, masks, d.target)
        log.info("pruned the initial model to sparsity %.3f before round 1", d.target)
        return rescale_units_to_norms(weights, pruned, masks), masks

    def device_target(self, round_number: int) -> float | None:
        """The sparsity devices prune to in this round (device-side masks only, else None)."""
        return self._device_sparsity(round_number) if self.device_masks else None

    def _device_sparsity(self, round_number: int) -> float:
        # 0 before begin_round: the schedule's sparsity there is its initial one (the round clipped
        # to the ramp, as tfmot computes it), but tfmot does not prune before begin_step, and
        # aggregator masks do not either. Devices pruned to it from round 1 until 2026-12-07 (issue 19).
        return self.schedule.sparsity_at(round_number) if round_number >= self.section.begin_round else 0.0

    def gradient_fraction(self, round_number: int, masks: Masks) -> float | None:
        """Ask devices for gradients at pruned positions in rounds that end with a pruning turn."""
        regrowth = self.regrowth_at(round_number)
        if regrowth <= 0 or self.schedule is None or self.device_masks or not any(m is not None for m in masks):
            return None
        # A schedule decides once per round: asking here, before aggregation, does not advance it.
        turn = self.schedule.decision(round_number).prune
        return min(1.0, 2 * regrowth) if turn else None  # candidates for twice the swaps

    def regrowth_at(self, round_number: int) -> float:
        """The fraction of kept weights a pruning turn after this round swaps: ``regrowth``, or
        with ``regrowth_decay = "cosine"`` that falling along half a cosine from ``begin_round`` to
        0 at ``end_round`` (RigL's annealing, Evci et al., "Rigging the Lottery", ICML 2020: large
        swaps while the mask is far from good, small ones once training has settled on it)."""
        s = self.section
        if s.regrowth_decay == "constant" or s.end_round <= s.begin_round:
            return s.regrowth
        span = s.end_round - s.begin_round
        progress = min(max(round_number - s.begin_round, 0), span) / span
        return s.regrowth * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, round_number: int, weights: list[np.ndarray], masks: Masks,
             gradients: GradientReports = ()) -> PruneStep:
        """The masks after aggregating round ``round_number`` into ``weights`` (under ``masks``),
        with how much of the kept set stayed (``PruneStep.mask_overlap``)."""
        step = self._step(round_number, weights, masks, gradients)
        return dataclasses.replace(step, mask_overlap=kept_jaccard(masks, step.masks))

    def _step(self, round_number: int, weights: list[np.ndarray], masks: Masks,
              gradients: GradientReports) -> PruneStep:
        if self.schedule is None:
            return PruneStep(weights, masks, False)
        if self.device_masks:
            # The global mask afresh by magnitude of the average (positions may come back if the
            # devices kept them).
            fresh = [None if m is None else np.ones(m.shape, bool) for m in masks]
            weights, masks = prune_to_sparsity(weights, fresh, self._device_sparsity(round_number))
            return PruneStep(weights, masks, True)
        d = self.schedule.decision(round_number)
        if d.backoff and self._masks_before_prune is not None:
            # Accuracy fell after the last rise: revive what it pruned (from zero) and retrain.
            log.warning("round %d: accuracy fell after the last pruning step; back to sparsity %.3f",
                        round_number, d.target)
            return PruneStep(weights, self._masks_before_prune, True)
        if not d.prune:
            return PruneStep(weights, masks, False)
        self._masks_before_prune = masks
        weights, masks = self.prune(weights, masks, d.target)
        if self.section.regrowth > 0:
            weights, masks = self._regrow(round_number, weights, masks, gradients)
        return PruneStep(weights, masks, True)

    def prune(self, weights: list[np.ndarray], masks: Masks, target: float) -> tuple[list[np.ndarray], Masks]:
        """One pruning step: the section's rule per layer, or global magnitude."""
        if self.section.scope == "global":
            return prune_globally(weights, masks, target, self.section.global_floor)
        rules = [None if m is None else self.section.rule_for(self.layer_of[i]) for i, m in enumerate(masks)]
        return prune_with_rules(weights, masks, rules, target)

    def _regrow(self, round_number: int, weights: list[np.ndarray], masks: Masks,
                gradients: GradientReports) -> tuple[list[np.ndarray], Masks]:
        scores = gradient_scores(gradients)
        if scores is None:
            return weights, masks
        weights, masks, swapped = regrow(weights, masks, scores, self.regrowth_at(round_number))
        log.info("round %d: regrowth swapped %d weights", round_number, swapped)
        return weights, masks

    def structured_due(self, round_number: int) -> bool:
        """Whether structured pruning (whole units and filters) follows this round."""
        return self.section.structured_fraction > 0 and round_number == self.section.structured_round

    def observe(self, round_number: int, accuracy: float) -> None:
        """The held-out accuracy of the global model after this round, for the schedule."""
        if self.schedule is not None:
            self.schedule.observe(round_number, accuracy)

    def state(self) -> dict[str, Any]:
        """The schedule's snapshot (JSON; empty for a stateless schedule), for the checkpoint."""
        return self.schedule.state() if self.schedule is not None else {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a snapshot from ``state()`` (an empty one, as older checkpoints hold, changes nothing)."""
        if self.schedule is not None and state:
            self.schedule.restore(state)

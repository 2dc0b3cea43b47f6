"""The federation's state at the start of a run: round 0's (the initial model, pruned at
initialization if the schedule says so), or the last checkpoint's with the rounds recorded
before it (``--resume``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprune.aggregator.checkpoint import FederationState, load_latest_checkpoint
from fedprune.aggregator.privacy import PrivacyAccountant, ReleasedRound
from fedprune.aggregator.records import METRICS_FILE, RoundRecord, read_metrics
from fedprune.aggregator.run_folder import CHECKPOINTS, FederationError

if TYPE_CHECKING:
    from fedprune.pruning.controller import PruningController
    from fedprune.task import Task

__all__ = ["initial_state", "restore_run"]

log = logging.getLogger(__name__)


def initial_state(model: Any, task: Task, controller: PruningController) -> FederationState:
    """Round 0: the initial model (pruned at initialization if the schedule says so)."""
    from fedprune.models import full_masks, get_layer_weights

    weights, pruning = get_layer_weights(model), task.pruning
    masks = full_masks(model, pruning.leave_dense) if pruning.enabled else [None] * len(weights)
    weights, masks = controller.initial(weights, masks)
    # Under DP the draw of devices must be secret (privacy amplification by sampling): OS entropy.
    selection_rng = np.random.default_rng(None if task.privacy.enabled else task.seed)
    return FederationState(0, weights, masks, selection_rng.bit_generator.state, {"bytes_down": 0, "bytes_up": 0})


def restore_run(run_dir: Path, controller: PruningController,
                accountant: PrivacyAccountant | None) -> tuple[FederationState, list[RoundRecord]]:
    """The last checkpoint's state and the records of the rounds up to it; the pruning schedule's
    state restored into ``controller``, the rounds already released replayed into ``accountant``
    (they count against the privacy budget)."""
    restored = load_latest_checkpoint(Path(run_dir) / CHECKPOINTS)
    if restored is None:
        raise FederationError(f"--resume: no readable checkpoint in {Path(run_dir) / CHECKPOINTS}")
    controller.restore(restored.schedule_state)
    history = read_metrics(Path(run_dir) / METRICS_FILE, restored.completed_rounds)
    if accountant is not None:
        accountant.replay([ReleasedRound(rec.population or rec.selected, rec.selected) for rec in history])
    log.info("resuming after round %d from %s", restored.completed_rounds, run_dir)
    return restored, history

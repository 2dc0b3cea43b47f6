"""What a run records: one line of metrics.jsonl per completed round (``RoundRecord``), re-read on
resume, and summary.json at the end. (Checkpoints are ``checkpoint.py``'s.)"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprune.aggregator.privacy import ACCOUNTANT_DESCRIPTION, PrivacyAccountant
from fedprune.fileio import atomic_write_bytes
from fedprune.pruning.masks import Masks, layer_sparsities, sparsity

if TYPE_CHECKING:
    from fedprune.aggregator.collect import Gathered
    from fedprune.aggregator.strategies.base import Strategy
    from fedprune.task import FederationSection, Task


log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class RoundRecord:
    """What one completed round did; one line of metrics.jsonl."""

    round: int
    attempts: int
    selected: int
    reported: int
    rejected: int
    accuracy: float
    loss: float
    sparsity: float  # of the prunable kernels (fedprune.models.PRUNABLE_KERNELS not left dense)
    layer_sparsity: dict[str, float]
    pruned_this_round: bool
    bytes_down: int
    bytes_up: int
    wall_s: float
    train_loss: float
    rejections: dict[str, int] = field(default_factory=dict)
    mask_agreement: float | None = None  # device-side masks: mean pairwise Jaccard of the kept sets
    # Jaccard index of the global mask's kept set with the previous round's (1 = unchanged)
    mask_overlap: float | None = None
    population: int | None = None  # devices online when this round's devices were drawn
    epsilon: float | None = None  # DP-FedAvg: epsilon so far, at the task's privacy.delta
    # What became of the selected devices (summed over the round's attempts): every one of them
    # reported, was rejected, went offline during the round (dropped out, even if back since), or is
    # counted lost (online all round, but no update by the deadline).
    received: int = 0  # update messages that arrived, accepted or not
    offline: int = 0
    lost: int = 0
    # Where the round's time went, in seconds. The critical device is the accepted one whose update
    # arrived last (not counting simulator waiting): its training, and the rest of its
    # task-to-update time (links, broker, its own decoding and encoding) as transfer.
    train_s: float = 0.0
    transfer_s: float = 0.0
    encode_s: float = 0.0  # encoding the task
    decode_s: float = 0.0  # checking and decoding the updates
    aggregate_s: float = 0.0  # aggregation (streaming: with folding each update in) and the pruning step
    evaluate_s: float = 0.0
    # The round's time as a fleet with one processor per device would take it: wall time less what
    # simulated devices report waiting for their process's shared trainer (``sim_wait_s``).
    fleet_s: float = 0.0
    sparsity_all: float = 0.0  # of all the model's weights: biases, normalization and dense layers too
    device_errors: dict[str, str] = field(default_factory=dict)  # device -> the failure it reported
    redelivered: int = 0  # byte-identical copies of accepted updates, dropped (not rejections)


@dataclass
class RunResult:
    run_dir: Path
    rounds: list[RoundRecord]
    final_accuracy: float
    final_sparsity: float  # of the prunable kernels
    parameters: int
    exports: list[dict] = field(default_factory=list)
    final_sparsity_all: float = 0.0  # of all the model's weights
    not_pruned: dict[str, str] = field(default_factory=dict)  # layer -> why pruning leaves it dense


@dataclass(frozen=True)
class RoundOutcome:
    """What aggregating, pruning and evaluating a round gave, and what that took."""

    accuracy: float
    loss: float
    masks: Masks
    pruned: bool
    mask_agreement: float | None
    epsilon: float | None
    aggregate_s: float
    evaluate_s: float
    weight_count: int = 0  # weights in the whole model, for the sparsity over all of them
    mask_overlap: float | None = None  # the pruning step's (PruneStep.mask_overlap)


def sparsity_of_all(masks: Masks, weight_count: int) -> float:
    """Pruned positions over all ``weight_count`` weights of the model (0 when it is not known)."""
    pruned = sum(int(m.size - np.count_nonzero(m)) for m in masks if m is not None)
    return pruned / weight_count if weight_count else 0.0


def round_record(round_number: int, gathered: Gathered, outcome: RoundOutcome, names: list[str],
                 wall_s: float, private: bool) -> RoundRecord:
    """The record of a completed round. ``private``: under DP nothing computed from the devices'
    data leaves the aggregator un-noised, so their training loss is not recorded."""
    results, totals = gathered.last.results, gathered.totals
    train_losses = [float("nan")] if private else [res.metrics.get("loss", float("nan")) for res in results]
    train_s, transfer_s, sim_saved_s = gathered.last.critical_path()
    return RoundRecord(
        round=round_number,
        attempts=gathered.attempt,
        selected=len(gathered.selected),
        reported=len(results),
        rejected=sum(gathered.rejections.values()),
        accuracy=outcome.accuracy,
        loss=outcome.loss,
        sparsity=sparsity(outcome.masks),
        layer_sparsity=layer_sparsities(outcome.masks, names),
        pruned_this_round=outcome.pruned,
        bytes_down=totals.bytes_down,
        bytes_up=totals.bytes_up,
        wall_s=wall_s,
        train_loss=float(np.mean(train_losses)),
        rejections=gathered.rejections,
        mask_agreement=outcome.mask_agreement,
        mask_overlap=outcome.mask_overlap,
        population=gathered.population,
        epsilon=outcome.epsilon,
        received=totals.received,
        offline=totals.offline,
        lost=totals.lost,
        train_s=train_s,
        transfer_s=transfer_s,
        encode_s=totals.encode_s,
        decode_s=totals.decode_s,
        aggregate_s=outcome.aggregate_s + gathered.last.fold_s,  # with the folding as updates came
        evaluate_s=outcome.evaluate_s,
        fleet_s=wall_s - sim_saved_s,
        sparsity_all=sparsity_of_all(outcome.masks, outcome.weight_count),
        device_errors=dict(totals.failures),
        redelivered=totals.redelivered,
    )


def run_result(run_dir: Path, history: list[RoundRecord], weights: list[np.ndarray], masks: Masks,
               exports: list[dict], not_pruned: dict[str, str]) -> RunResult:
    """The run's outcome from its records and its final weights and masks."""
    parameters = sum(int(w.size) for w in weights)
    return RunResult(run_dir=run_dir, rounds=history,
                     final_accuracy=history[-1].accuracy if history else float("nan"),
                     final_sparsity=sparsity(masks), parameters=parameters, exports=exports,
                     final_sparsity_all=sparsity_of_all(masks, parameters), not_pruned=not_pruned)


def run_complete(fed: FederationSection, history: list[RoundRecord]) -> bool:
    """Whether a run with these records has done its rounds, or reached federation.stop_at_accuracy."""
    last = history[-1] if history else None
    if last is not None and fed.stop_at_accuracy and last.accuracy >= fed.stop_at_accuracy:
        log.info("round %d reached held-out accuracy %.4f >= federation.stop_at_accuracy %.4f: the run ends here",
                 last.round, last.accuracy, fed.stop_at_accuracy)
        return True
    return bool(last) and last.round >= fed.rounds


def append_metrics(run_dir: Path, record: RoundRecord) -> None:
    """Add the round's line to the run's metrics.jsonl."""
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(asdict(record)) + "\n")


def read_metrics(path: Path, up_to_round: int) -> list[RoundRecord]:
    """The records of rounds up to ``up_to_round`` (the last checkpointed), on resume; the file is
    rewritten with only those."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = RoundRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        if rec.round <= up_to_round:
            records.append(rec)
    # A crash between writing metrics and the checkpoint leaves a line for an unsaved round: drop it.
    atomic_write_bytes(path, "".join(json.dumps(asdict(r)) + "\n" for r in records).encode())
    return records


def aggregation_summary(task: Task, strategy: Strategy, accountant: PrivacyAccountant | None) -> dict[str, Any]:
    """For summary.json: how updates were combined, and the privacy spent."""
    agg, privacy = task.aggregation, task.privacy
    out: dict[str, Any] = {"strategy": type(strategy).__name__, "method": agg.method, "clip_norm": agg.clip_norm}
    if accountant is not None:
        out["privacy"] = {"epsilon": accountant.epsilon(),
                          "epsilon_if_draw_known": accountant.epsilon_without_sampling(),
                          "delta": privacy.delta,
                          "noise_multiplier": privacy.noise_multiplier, "clip_norm": privacy.clip_norm,
                          "clip_on_device": privacy.clip_on_device, "rounds": len(accountant.rounds),
                          "accountant": ACCOUNTANT_DESCRIPTION}
    return out


def write_summary(run_dir: Path, result: RunResult, totals: dict[str, float], **sections: Any) -> None:
    """summary.json: ``sections`` (structured_pruning, aggregation, pruning), the final figures,
    the byte totals and the exports."""
    summary = {
        **sections,
        "final_accuracy": result.final_accuracy,
        "final_sparsity": result.final_sparsity,
        "final_sparsity_all_weights": result.final_sparsity_all,
        "rounds": len(result.rounds),
        **totals,
        "exports": result.exports,
    }
    atomic_write_bytes(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2).encode())

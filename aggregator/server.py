"""The round loop: select devices, send them the global model, collect their updates until a
quorum or a deadline, aggregate, prune on the schedule, evaluate, checkpoint.

Each step is a call to one collaborator: ``channel`` (the broker: budgets, inbox, signing),
``collect`` (the task out, each update in through ``intake.check_update``), ``strategies``, the
pruning controller (``fedprune.pruning.controller``: every pruning decision), ``structured_step``
(the model surgery), ``records`` (metrics.jsonl, summary.json), ``checkpoint`` and ``export``.
What stays here is the order of the steps, the quorum and retries, and the federation's state.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from fedprune.aggregator.channel import DeviceChannel, run_signing_key, task_budget
from fedprune.aggregator.checkpoint import FederationState, load_latest_checkpoint, save_checkpoint
from fedprune.aggregator.collect import AttemptCollector, Collected, Gathered, RoundProgress, publish_round, train_task
from fedprune.aggregator.export import export_models, latency_ms
from fedprune.aggregator.intake import RoundContext
from fedprune.aggregator.privacy import PrivacyAccountant, ReleasedRound
from fedprune.aggregator.records import RoundOutcome, RoundRecord, RunResult, aggregation_summary, append_metrics
from fedprune.aggregator.records import read_metrics, round_record, write_summary
from fedprune.aggregator.registry import DeviceRegistry
from fedprune.aggregator.strategies import mask_agreement, strategy_for_task
from fedprune.aggregator.structured_step import prune_structured
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.architecture import layer_classes, model_from_architecture_json
from fedprune.converters.codec import MaskLayout
from fedprune.converters.protocol import RoundAnnouncement, Topics, encode_task
from fedprune.converters.signing import SigningKey, VerifyKey
from fedprune.data import Dataset
from fedprune.pruning.controller import PruningController
from fedprune.pruning.masks import sparsity
from fedprune.task import Task

__all__ = ["Aggregator", "FederationError", "RoundProgress", "RoundRecord", "RunResult"]

log = logging.getLogger(__name__)

# Before round 1: wait until no presence has arrived for this long (retained presences of a large
# fleet arrive over about a second), but no longer than the second figure.
PRESENCE_QUIET_S = 0.25
PRESENCE_SETTLE_MAX_S = 5.0


class FederationError(RuntimeError):
    """The federation cannot go on (no devices, a round failed all its retries)."""


class Aggregator:
    """One federation's aggregator: built from a task, it owns the global model; ``run()`` runs it."""

    def __init__(self, task: Task, dataset: Dataset, broker_url: str, run_dir: Path, *, resume: bool = False,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 on_update: Callable[[RoundProgress], None] | None = None, export_tflite: bool = True,
                 signing_key: SigningKey | None = None) -> None:
        """``signing_key`` signs every message to devices; default: ``<run_dir>/aggregator.key``,
        made there if missing (``channel.run_signing_key``), so a resumed run keeps its devices' key."""
        from fedprune.keras_setup import keras  # TensorFlow only once an aggregator is built
        from fedprune.models import build_model

        self.task, self.dataset, self.run_dir = task, dataset, Path(run_dir)
        self.on_round, self.on_update, self.export_tflite = on_round, on_update, export_tflite
        self.topics = Topics(task.federation.id)
        self.registry = DeviceRegistry()
        self.strategy = strategy_for_task(task)
        privacy = task.privacy
        self.accountant = PrivacyAccountant(privacy.noise_multiplier, privacy.delta) if privacy.enabled else None
        self.controller = PruningController(task.pruning, {})
        self.device_masks = self.controller.device_masks
        self._buffers: UpdateBuffers | None = None  # made by run(): where values-only updates decode
        self.session_id = secrets.token_hex(8)
        keras.utils.set_random_seed(task.seed)
        self._use_model(build_model(task.model.factory, dataset.input_shape, dataset.num_classes))
        self.state = self._initial_state()
        self.history: list[RoundRecord] = []
        self.structured_report: dict | None = None
        if resume:
            self._resume()
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state.rng_state
        budget = task_budget(task, self.architecture.names, self.shapes)  # per device and round, for this model
        key = signing_key or run_signing_key(self.run_dir)
        self.channel = DeviceChannel(broker_url, task, self.registry, budget, key,
                                     on_connected=self._publish_architecture)  # budgets, inbox, signed publishing

    @property
    def verify_key(self) -> VerifyKey:
        """The public key devices must trust (``fedprune-agent --aggregator-key``)."""
        return self.channel.publisher.verify_key

    def _initial_state(self) -> FederationState:
        """Round 0: the initial model (pruned at initialization if the schedule says so)."""
        from fedprune.models import full_masks, get_layer_weights

        weights, pruning = get_layer_weights(self.model), self.task.pruning
        masks = full_masks(self.model, pruning.leave_dense) if pruning.enabled else [None] * len(weights)
        weights, masks = self.controller.initial(weights, masks)
        # Under DP the draw of devices must be secret (privacy amplification by sampling): OS entropy.
        selection_rng = np.random.default_rng(None if self.task.privacy.enabled else self.task.seed)
        return FederationState(0, weights, masks, selection_rng.bit_generator.state, {"bytes_down": 0, "bytes_up": 0})

    def _resume(self) -> None:
        restored = load_latest_checkpoint(self.run_dir / "checkpoints")
        if restored is None:
            raise FederationError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if restored.model_json and restored.model_json != self.architecture.model_json:
            self._use_model(model_from_architecture_json(  # structurally pruned; checked like a device's
                restored.model_json, custom_objects=layer_classes(self.model)))
        if [tuple(w.shape) for w in restored.weights] != self.shapes:
            raise FederationError("--resume: the checkpoint was made for another model architecture")
        self.state = restored
        self.controller.restore(restored.schedule_state)
        self.history = read_metrics(self.run_dir / "metrics.jsonl", restored.completed_rounds)
        if self.accountant is not None:  # the rounds already released count against the budget
            self.accountant.replay([ReleasedRound(rec.population or rec.selected, rec.selected)
                                    for rec in self.history])
        log.info("resuming after round %d from %s", restored.completed_rounds, self.run_dir)

    def _use_model(self, model) -> None:
        """Make ``model`` the global model's architecture (at start, and after structured pruning)."""
        from fedprune.aggregator.evaluation import HeldOutEvaluator
        from fedprune.models import architecture_of, kernel_positions, prunable_layers

        self.model = model
        self._evaluate = HeldOutEvaluator(model, self.dataset.x_test, self.dataset.y_test)
        self.architecture = architecture_of(model)
        self.shapes = [tuple(s) for s in self.architecture.shapes]
        if self._buffers is not None:  # structured pruning changed the shapes
            self._buffers = UpdateBuffers(self.shapes, self._buffers.rows)
        leave = self.task.pruning.leave_dense
        self.layer_of = {i: name for name, i in kernel_positions(model, prunable_layers(model, leave)).items()}
        unknown = sorted(set(self.task.pruning.layers) - set(self.layer_of.values()))
        if unknown:
            raise ValueError(f"[pruning.layers] names layers that are not prunable here: {unknown}; "
                             f"prunable: {sorted(self.layer_of.values())}")
        self.controller.layer_of = self.layer_of

    def _publish_architecture(self) -> None:  # on every (re)connection, and after structured pruning
        self.channel.publisher.publish(self.topics.architecture, self.architecture.encode(), retain=True)

    # --- the run ---
    def run(self) -> RunResult:
        fed = self.task.federation
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "task.json").write_text(json.dumps(asdict(self.task), indent=2, default=str))
        if not self.device_masks:  # device-side masks: self-describing updates, decoded as they come
            self._buffers = UpdateBuffers(self.shapes, fed.devices_per_round)
        self.channel.session.start()
        try:
            self._wait_for_devices()
            for r in range(self.state.completed_rounds + 1, fed.rounds + 1):
                record = self._run_round(r)
                self._complete(record)
                if fed.stop_at_accuracy and record.accuracy >= fed.stop_at_accuracy:
                    log.info("round %d reached held-out accuracy %.4f >= federation.stop_at_accuracy %.4f: "
                             "the run ends here", r, record.accuracy, fed.stop_at_accuracy)
                    break
            self.channel.budgets.finish().log_summary()
            finished = RoundAnnouncement(self.state.completed_rounds, 0, [], time.time(), state="finished")
            self.channel.publisher.publish(self.topics.round, finished.encode(), retain=True).wait_for_publish(5)
        finally:
            self.channel.session.stop()
        return self._finish()

    def _wait_for_devices(self) -> None:
        fed = self.task.federation
        if self.state.completed_rounds == 0:
            # Also traces the evaluation, which round 1 would otherwise pay for.
            _, acc = self.evaluate(self.state.weights)
            log.info("initial model: held-out accuracy %.4f, sparsity %.3f", acc, sparsity(self.state.masks))
        n = self.registry.wait_for(fed.devices_per_round, fed.wait_for_devices_s)
        if n < fed.min_devices:
            raise FederationError(
                f"only {n} device(s) online after {fed.wait_for_devices_s:.0f} s; need at least "
                f"federation.min_devices = {fed.min_devices}. Start more agents or lower min_devices."
            )
        # Round 1 is drawn from every device already there, not from the first presences in.
        self.registry.wait_until_quiet(PRESENCE_QUIET_S, PRESENCE_SETTLE_MAX_S)

    def _complete(self, record: RoundRecord) -> None:
        """Record the round, then checkpoint it (a crash between the two is undone on resume)."""
        self.history.append(record)
        append_metrics(self.run_dir, record)
        self.state.rng_state = self.rng.bit_generator.state
        self.state.model_json = self.architecture.model_json
        save_checkpoint(self.run_dir / "checkpoints", self.state)
        if self.on_round:
            self.on_round(record)

    def _finish(self) -> RunResult:
        exports = (export_models(self.model, self.state.weights, self.run_dir, self.dataset)
                   if self.export_tflite else [])
        result = RunResult(run_dir=self.run_dir, rounds=self.history,
                           final_accuracy=self.history[-1].accuracy if self.history else float("nan"),
                           final_sparsity=sparsity(self.state.masks),
                           parameters=sum(int(w.size) for w in self.state.weights), exports=exports)
        write_summary(self.run_dir, result, self.state.totals, structured_pruning=self.structured_report,
                      aggregation=aggregation_summary(self.task, self.strategy, self.accountant))
        return result

    def _run_round(self, r: int) -> RoundRecord:
        start = time.monotonic()
        gathered = self._gather(r)
        t, results = time.perf_counter(), gathered.last.results
        weights = self.strategy.aggregate(self.state.weights, results, self.state.masks)
        step = self.controller.step(r, weights, self.state.masks, [(res.gradients, res.num_samples) for res in results])
        agreement = mask_agreement(results) if self.device_masks else None  # how much the devices' masks agreed
        epsilon = None
        if self.accountant is not None:
            epsilon = self.accountant.record_round(gathered.population, len(gathered.selected))
            log.info("round %d: DP-FedAvg epsilon %.3f at delta %g", r, epsilon, self.task.privacy.delta)
        weights, masks = self._structured(step.weights, step.masks) if self.controller.structured_due(r) \
            else (step.weights, step.masks)
        aggregate_s = time.perf_counter() - t
        t = time.perf_counter()
        loss, acc = self.evaluate(weights)
        evaluate_s = time.perf_counter() - t
        self.controller.observe(r, acc)
        self.state.schedule_state = self.controller.state()
        self.state.weights, self.state.masks, self.state.completed_rounds = weights, masks, r
        self.state.totals["bytes_down"] += gathered.totals.bytes_down
        self.state.totals["bytes_up"] += gathered.totals.bytes_up
        outcome = RoundOutcome(acc, loss, masks, step.pruned, agreement, epsilon, aggregate_s, evaluate_s)
        return round_record(r, gathered, outcome, self.architecture.names, time.monotonic() - start,
                            private=self.accountant is not None)

    def _gather(self, r: int) -> Gathered:
        """Run attempts of round ``r`` until a quorum of updates comes in (or every retry failed)."""
        fed = self.task.federation
        self.channel.budgets.start_window(r).log_summary()
        rejections: dict[str, int] = {}
        rejection_acked: set[str] = set()  # at most one rejection acknowledged per device and round
        totals = Collected()
        for attempt in range(1, fed.max_round_retries + 2):
            online = self.registry.online()
            if len(online) < fed.min_devices:
                self.registry.wait_for(fed.min_devices, fed.wait_for_devices_s)
                online = self.registry.online()
            k = min(fed.devices_per_round, len(online))
            selected = sorted(self.rng.choice(online, size=k, replace=False).tolist()) if k else []
            collected = self._collect(r, attempt, selected, rejections, rejection_acked)
            totals.add(collected)
            self.channel.count_dropped(r, rejections)
            if len(collected.results) >= fed.min_devices:
                return Gathered(attempt, selected, len(online), collected, totals, rejections)
            log.warning("round %d attempt %d: %d of %d selected devices reported, quorum is %d; retrying",
                        r, attempt, len(collected.results), len(selected), fed.min_devices)
        raise FederationError(
            f"round {r} failed {fed.max_round_retries + 1} times without a quorum of "
            f"{fed.min_devices} updates; the last checkpoint is round {self.state.completed_rounds}"
        )

    def _collect(self, r: int, attempt: int, selected: list[str], rejections: dict[str, int],
                 rejection_acked: set[str]) -> Collected:
        """Send the task to the selected devices and gather valid updates until all or the deadline."""
        fed, transport = self.task.federation, self.task.transport
        deadline = time.monotonic() + fed.round_timeout_s
        t = time.perf_counter()
        task = train_task(self.task, r, attempt, self.architecture.digest, self.state.weights, self.state.masks,
                          self.session_id, device_sparsity=self.controller.device_target(r),
                          gradient_fraction=self.controller.gradient_fraction(r, self.state.masks))
        payload = encode_task(task, self.architecture.names, transport.compression)
        ctx = RoundContext(r, attempt, tuple(selected), self.registry.known, self.topics, self.shapes,
                           self.state.masks, self.architecture.names, transport.max_message_bytes,
                           transport.uplink_precision, self.device_masks, self.state.weights,
                           layout=MaskLayout.of(self.shapes, self.state.masks))  # every update decodes against it
        encode_s = time.perf_counter() - t
        link = self.channel.link()
        self.channel.listen(selected)  # before the tasks go out: the broker then routes every answer here
        published = publish_round(link, ctx, payload, fed.round_timeout_s, name_devices=self.accountant is None)
        collector = AttemptCollector(link, ctx, rejections, self._buffers, self.on_update, rejection_acked)
        out = collector.collect(published, deadline)
        out.encode_s, out.bytes_down = encode_s, len(payload) * len(selected)
        return out

    def _structured(self, weights: list[np.ndarray], masks: list) -> tuple[list[np.ndarray], list]:
        """Remove whole units and filters, rebuild the smaller model and announce its architecture."""
        x = self.dataset.x_test
        done = prune_structured(self.model, weights, masks, self.task.pruning,
                                lambda model, w: latency_ms(model, w, x))
        self._use_model(done.model)
        self.structured_report = done.report
        self._publish_architecture()  # retained: devices rebuild before they take the next task
        return done.weights, done.masks

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        """(loss, accuracy) of the global model with ``weights`` on the held-out set."""
        from fedprune.models import set_layer_weights

        set_layer_weights(self.model, weights)
        return self._evaluate()

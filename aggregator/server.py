"""The round loop: select devices, send them the global model, collect their updates until a
quorum or a deadline, aggregate, prune on the schedule, evaluate, checkpoint.

Each step is a call to one collaborator: ``channel`` (the broker: budgets, inbox, signing),
``collect`` (the task out, each update in through ``intake.check_update``; ``downlink``: what each
device is sent), ``strategies``, the pruning controller (``fedprune.pruning.controller``),
``structured_step`` (the model surgery), ``records``, ``checkpoint``, ``export``, ``model_files``
(the trainable and final model files for devices), ``run_state``, ``run_status`` (for the status
page and the wait notices) and ``tensorboard_log``. What stays here is the order of the steps, the
quorum and retries, and the federation's state.
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

from fedprune.aggregator.channel import open_channel
from fedprune.aggregator.checkpoint import save_checkpoint
from fedprune.aggregator.collect import AttemptCollector, Collected, Gathered, RoundProgress, publish_round, train_task
from fedprune.aggregator.downlink import Downlink
from fedprune.aggregator.export import export_models, latency_ms
from fedprune.aggregator.intake import RoundContext
from fedprune.aggregator.privacy import PrivacyAccountant
from fedprune.aggregator.model_files import DeviceModelFiles
from fedprune.aggregator.records import RoundOutcome, RoundRecord, RunResult, aggregation_summary, append_metrics
from fedprune.aggregator.records import round_record, run_complete, run_result, write_summary
from fedprune.aggregator.registry import DeviceRegistry, OtherFederations, wait_for_devices
from fedprune.aggregator.run_folder import FederationError, check_new_run, check_resumable
from fedprune.aggregator.run_state import initial_state, restore_run
from fedprune.aggregator.run_status import RunStatus
from fedprune.aggregator.selection import DeviceSelection, can_ever_train
from fedprune.aggregator.strategies import mask_agreement, strategy_for_task
from fedprune.aggregator.structured_step import prune_structured
from fedprune.aggregator.tensorboard_log import TensorBoardLog
from fedprune.aggregator.round_fold import RoundFold, buffer_rows
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.aggregator.workers import worker_pool
from fedprune.architecture import layer_classes, model_from_architecture_json
from fedprune.converters.codec import MaskLayout
from fedprune.converters.protocol import RoundAnnouncement, Topics
from fedprune.converters.signing import SigningKey, VerifyKey
from fedprune.data import Dataset
from fedprune.pruning.controller import PruningController
from fedprune.pruning.masks import sparsity
from fedprune.task import Task

__all__ = ["Aggregator", "FederationError", "RoundProgress", "RoundRecord", "RunResult"]

log = logging.getLogger(__name__)


class Aggregator:
    """One federation's aggregator: built from a task, it owns the global model; ``run()`` runs it."""

    def __init__(self, task: Task, dataset: Dataset, broker_url: str, run_dir: Path, *, resume: bool = False,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 on_update: Callable[[RoundProgress], None] | None = None, export_tflite: bool = True,
                 signing_key: SigningKey | None = None, workers: int = 0) -> None:
        """``signing_key`` signs every message to devices (default: ``channel.run_signing_key``'s, so a
        resumed run keeps its devices' key); ``workers``: aggregation worker processes (``workers``)."""
        from fedprune.keras_setup import keras  # TensorFlow only once an aggregator is built
        from fedprune.models import build_model

        self.task, self.dataset, self.run_dir = task, dataset, Path(run_dir)
        (check_resumable if resume else check_new_run)(self.run_dir)  # never two runs' records in one folder
        self.on_round, self.on_update, self.export_tflite = on_round, on_update, export_tflite
        self.topics = Topics(task.federation.id)
        self.registry, self.others = DeviceRegistry(), OtherFederations(task.federation.id)
        self.status = RunStatus(task, self.registry, self.others, name=self.run_dir.name)
        self.strategy = strategy_for_task(task)
        privacy = task.privacy
        self.accountant = PrivacyAccountant(privacy.noise_multiplier, privacy.delta) if privacy.enabled else None
        self.controller = PruningController(task.pruning, {})
        self.device_masks = self.controller.device_masks
        self.selection = DeviceSelection(self.registry, device_side_pruning=self.device_masks)
        self._buffers: UpdateBuffers | None = None  # made by run(): where values-only updates decode
        keras.utils.set_random_seed(task.seed)
        self._use_model(build_model(task.model.factory, dataset.input_shape, dataset.num_classes))
        self.state = initial_state(self.model, task, self.controller)
        self.history: list[RoundRecord] = []
        self.structured_report: dict | None = None
        if resume:
            self._resume()
        self.session_id = self.state.session = self.state.session or secrets.token_hex(8)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state.rng_state
        self.channel = open_channel(broker_url, task, self.registry, self.others, self.architecture, self.run_dir,
                                    signing_key, on_connected=self._publish_architecture)
        self.model_files = DeviceModelFiles(self.channel.publisher, self.topics, self.selection,
                                            task.training.batch_size)
        self.workers = worker_pool(workers, broker_url, task, self.strategy, self.architecture)
        self.fleet_size: int | None = None  # a simulation's devices that connect: round 1 waits for them all (reproducible)

    @property
    def verify_key(self) -> VerifyKey:
        """The public key devices must trust (``fedprune-agent --aggregator-key``)."""
        return self.channel.publisher.verify_key

    def _resume(self) -> None:
        restored, self.history = restore_run(self.run_dir, self.controller, self.accountant)
        if restored.model_json and restored.model_json != self.architecture.model_json:
            self._use_model(model_from_architecture_json(  # structurally pruned; checked like a device's
                restored.model_json, custom_objects=layer_classes(self.model)))
        if [tuple(w.shape) for w in restored.weights] != self.shapes:
            raise FederationError("--resume: the checkpoint was made for another model architecture")
        self.state = restored
        self.downlink.restore(restored.downlink_residual)
        self.status.rounds_restored(self.history)

    def _use_model(self, model) -> None:
        """Make ``model`` the global model's architecture (at start, and after structured pruning)."""
        from fedprune.aggregator.evaluation import HeldOutEvaluator
        from fedprune.models import architecture_of, kernel_positions, prunable_layers

        self.model = model
        self._evaluate = HeldOutEvaluator(model, self.dataset.x_test, self.dataset.y_test)
        self.architecture = architecture_of(model)
        self.shapes = [tuple(s) for s in self.architecture.shapes]
        self.downlink = Downlink(self.task.transport, self.architecture.names)  # a new one for new shapes
        if self._buffers is not None:  # structured pruning changed the shapes
            self._buffers = UpdateBuffers(self.shapes, self._buffers.rows)
        self.layer_of = kernel_positions(model, prunable_layers(model, self.task.pruning.leave_dense))
        self.controller.use_layers(self.layer_of)

    def _publish_architecture(self) -> None:
        """The architecture, and its trainable file once built (retained: on every (re)connection,
        since a restarted broker has forgotten them, and after structured pruning)."""
        self.channel.publisher.publish(self.topics.architecture, self.architecture.encode(), retain=True)
        self.model_files.republish(self.architecture.digest)

    # --- the run ---
    def run(self) -> RunResult:
        fed = self.task.federation
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "task.json").write_text(json.dumps(asdict(self.task), indent=2, default=str))
        if not self.device_masks:  # device-side masks: self-describing updates, decoded as they come
            self._buffers = UpdateBuffers(self.shapes, buffer_rows(self.strategy, fed.devices_per_round))
        self.channel.session.start()
        try:
            self.model_files.clear_earlier_run()
            with TensorBoardLog(self.run_dir) as self.tensorboard:
                if not run_complete(fed, self.history):  # a resumed run that had completed its rounds only finishes
                    self._wait_for_devices()
                for r in range(self.state.completed_rounds + 1, fed.rounds + 1):
                    self._complete(self._run_round(r))
                    if run_complete(fed, self.history):
                        break
            self.channel.budgets.finish().log_summary()
            exports = self._export()
            self.model_files.publish_final(exports, self.state.completed_rounds, float(sparsity(self.state.masks)),
                                           self.architecture.digest, self.state.issue())
            finished = RoundAnnouncement(self.state.completed_rounds, 0, [], time.time(), state="finished").encode()
            self.channel.publisher.publish(self.topics.round, finished, retain=True).wait_for_publish(5)
        finally:
            self.workers and self.workers.stop()
            self.channel.session.stop()
        return self._finish(exports)

    def _wait_for_devices(self) -> None:
        fed = self.task.federation
        if self.state.completed_rounds == 0:
            # Also traces the evaluation, which round 1 would otherwise pay for.
            _, acc = self.evaluate(self.state.weights)
            log.info("initial model: held-out accuracy %.4f, sparsity %.3f", acc, sparsity(self.state.masks))
        self.status.waiting_for_devices(fed.devices_per_round, fed.min_devices, fed.wait_for_devices_s)
        wait_for_devices(self.registry, self.others, fed, counts=can_ever_train, fleet_size=self.fleet_size)

    def _complete(self, record: RoundRecord) -> None:
        """Record the round, then checkpoint it (a crash between the two is undone on resume)."""
        self.history.append(record)
        append_metrics(self.run_dir, record)
        self.state.rng_state = self.rng.bit_generator.state
        self.state.model_json = self.architecture.model_json
        save_checkpoint(self.run_dir / "checkpoints", self.state)
        self.tensorboard.write(record)
        self.status.round_completed(record)
        if self.on_round:
            self.on_round(record)

    def _export(self) -> list[dict]:
        """The final global model as sparse TFLite files (float32 and int8) in the run folder."""
        self.status.phase("exporting the final model to TFLite")
        return export_models(self.model, self.state.weights, self.run_dir, self.dataset) if self.export_tflite else []

    def _finish(self, exports: list[dict]) -> RunResult:
        from fedprune.models import unpruned_layers

        result = run_result(self.run_dir, self.history, self.state.weights, self.state.masks, exports,
                            unpruned_layers(self.model, self.task.pruning.leave_dense))
        write_summary(self.run_dir, result, self.state.totals, structured_pruning=self.structured_report,
                      aggregation=aggregation_summary(self.task, self.strategy, self.accountant),
                      not_pruned=result.not_pruned)
        self.status.finished(result)
        return result

    def _run_round(self, r: int) -> RoundRecord:
        start = time.monotonic()
        gathered = self._gather(r)
        t, results = time.perf_counter(), gathered.last.results
        self.status.phase(f"round {r}: aggregating, pruning and evaluating")
        weights = gathered.last.fold.weights(results)  # streamed as the updates came, or all at once now
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
        self.state.downlink_residual = self.downlink.residual
        self.state.totals["bytes_down"] += gathered.totals.bytes_down
        self.state.totals["bytes_up"] += gathered.totals.bytes_up
        outcome = RoundOutcome(acc, loss, masks, step.pruned, agreement, epsilon, aggregate_s, evaluate_s,
                               weight_count=sum(int(w.size) for w in weights), mask_overlap=step.mask_overlap)
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
            selected, population = self.selection.draw(self.rng, fed, self._trainable_file)
            collected = self._collect(r, attempt, selected, rejections, rejection_acked)
            totals.add(collected)
            self.channel.count_dropped(r, rejections)
            if len(collected.results) >= fed.min_devices:
                return Gathered(attempt, selected, population, collected, totals, rejections)
            log.warning("round %d attempt %d: %d of %d selected devices reported, quorum is %d; retrying",
                        r, attempt, len(collected.results), len(selected), fed.min_devices)
        raise FederationError(f"round {r} failed {fed.max_round_retries + 1} times without a quorum of "
                              f"{fed.min_devices} updates; the last checkpoint is round {self.state.completed_rounds}")

    def _trainable_file(self):  # built (and published) when a device that trains without TensorFlow is online
        return self.model_files.trainable(self.model, self.architecture.digest, self.state.masks)

    def _collect(self, r: int, attempt: int, selected: list[str], rejections: dict[str, int],
                 rejection_acked: set[str]) -> Collected:
        """Send the task to the selected devices and gather valid updates until all or the deadline."""
        fed, transport = self.task.federation, self.task.transport
        deadline, t = time.monotonic() + fed.round_timeout_s, time.perf_counter()
        control, state = self.controller, self.state
        task = train_task(self.task, r, attempt, self.architecture.digest, state.weights, state.masks, self.session_id,
                          issued_us=state.issue(), device_sparsity=control.device_target(r),
                          gradient_fraction=control.gradient_fraction(r, state.masks))
        payloads = self.downlink.payloads(task, selected, self.registry)  # values-only where a device holds the masks
        ctx = RoundContext(r, attempt, tuple(selected), self.registry.known, self.topics, self.shapes,
                           self.state.masks, self.architecture.names, transport.max_message_bytes,
                           transport.uplink_precision, self.device_masks, self.state.weights,
                           layout=MaskLayout.of(self.shapes, self.state.masks))  # every update decodes against it
        encode_s = time.perf_counter() - t
        link = self.channel.link()
        self.channel.listen([] if self.workers else selected)  # before the tasks go out (workers: in collector)
        self.status.attempt_opened(r, attempt, selected, max([0, *map(len, payloads.values())]), fed.round_timeout_s)
        fold = RoundFold(self.strategy, self.state.weights, self.state.masks, self._buffers)
        make = self.workers.collector if self.workers else AttemptCollector  # workers: open on them when made
        collector = make(link, ctx, rejections, fold, self._progress, rejection_acked)
        published = publish_round(link, ctx, payloads, fed.round_timeout_s, name_devices=self.accountant is None)
        out = collector.collect(published, deadline)
        out.encode_s, out.bytes_down = encode_s, sum(len(payloads[d]) for d in selected)
        return out

    def _progress(self, progress: RoundProgress) -> None:
        self.status.progress(progress)
        if self.on_update:
            self.on_update(progress)

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

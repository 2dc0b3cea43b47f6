"""The round loop: select devices, send them the global model, collect their updates until a
quorum or a deadline, aggregate, prune on the schedule, evaluate, checkpoint."""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedprune.aggregator.checkpoint import FederationState, load_latest_checkpoint, save_checkpoint
from fedprune.fileio import atomic_write_bytes
from fedprune.aggregator.registry import DeviceRegistry
from fedprune.aggregator.privacy import ACCOUNTANT_DESCRIPTION, DPFedAvg, PrivacyAccountant, ReleasedRound
from fedprune.aggregator.robust import CoordinateMedian, Krum, MultiKrum, NormClipping, Strategy, TrimmedMean
from fedprune.aggregator.strategy import ClientResult, DeviceMaskAveraging, FedAvg, gradient_scores, mask_agreement
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.architecture import layer_classes, model_from_architecture_json
from fedprune.converters.codec import MaskLayout
from fedprune.converters.errors import CodecError
from fedprune.converters.protocol import (
    Ack,
    Encoding,
    Presence,
    RoundAnnouncement,
    Topics,
    TrainTask,
    decode_update,
    encode_task,
    peek_update,
)
from fedprune.data import Dataset
from fedprune.pruning.masks import (
    apply_masks,
    layer_sparsities,
    prune_globally,
    prune_to_sparsity,
    prune_with_rules,
    rescale_units_to_norms,
    sparsity,
)
from fedprune.pruning.regrowth import regrow
from fedprune.pruning.schedules import AdaptiveSparsity
from fedprune.task import Task
from fedprune.transport import MqttSession

log = logging.getLogger(__name__)

# Before round 1: wait until no presence has arrived for this long (retained presences of a large
# fleet arrive over about a second), but no longer than the second figure.
PRESENCE_QUIET_S = 0.25
PRESENCE_SETTLE_MAX_S = 5.0


class FederationError(RuntimeError):
    """The federation cannot go on (no devices, a round failed all its retries)."""


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
    sparsity: float
    layer_sparsity: dict[str, float]
    pruned_this_round: bool
    bytes_down: int
    bytes_up: int
    wall_s: float
    train_loss: float
    rejections: dict[str, int] = field(default_factory=dict)
    mask_agreement: float | None = None  # device-side masks: mean pairwise Jaccard of the kept sets
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
    aggregate_s: float = 0.0  # aggregation and the pruning step
    evaluate_s: float = 0.0
    # The round's time as a fleet with one processor per device would take it: wall time less what
    # simulated devices report waiting for their process's shared trainer (``sim_wait_s``).
    fleet_s: float = 0.0


@dataclass
class RunResult:
    run_dir: Path
    rounds: list[RoundRecord]
    final_accuracy: float
    final_sparsity: float
    parameters: int
    exports: list[dict] = field(default_factory=list)


class Aggregator:
    def __init__(
        self,
        task: Task,
        dataset: Dataset,
        broker_url: str,
        run_dir: Path,
        *,
        resume: bool = False,
        on_round: Callable[[RoundRecord], None] | None = None,
        on_update: Callable[[RoundProgress], None] | None = None,
        export_tflite: bool = True,
    ) -> None:
        from fedprune.keras_setup import keras  # TensorFlow only once an aggregator is built
        from fedprune.models import build_model, full_masks, get_layer_weights, weight_names

        self.task = task
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.on_round = on_round
        self.on_update = on_update
        self.export_tflite = export_tflite
        self.topics = Topics(task.federation.id)
        self.registry = DeviceRegistry()
        self.strategy = make_strategy(task)
        privacy = task.privacy
        self.accountant = PrivacyAccountant(privacy.noise_multiplier, privacy.delta) if privacy.enabled else None
        self.device_masks = task.pruning.enabled and task.pruning.mask_owner == "device"
        self._inbox: queue.Queue[tuple[str, bytes, float]] = queue.Queue()  # topic, payload, arrival
        self._buffers: UpdateBuffers | None = None  # made by run(): where values-only updates decode
        self.session_id = secrets.token_hex(8)

        keras.utils.set_random_seed(task.seed)
        self._use_model(build_model(task.model.factory, dataset.input_shape, dataset.num_classes))
        weights = get_layer_weights(self.model)
        self.schedule = task.pruning.schedule_object() if task.pruning.enabled else None
        self._masks_before_prune: list | None = None  # for the adaptive schedule's backoff
        masks = full_masks(self.model, task.pruning.leave_dense) if task.pruning.enabled else [None] * len(weights)
        prune_initial, initial_target = self.schedule(0) if self.schedule is not None else (False, 0.0)
        if prune_initial and not self.device_masks:
            # Pruning at initialization (begin_round = 0): every update is sparse from round 1.
            pruned, masks = self._prune(weights, masks, initial_target)
            weights = rescale_units_to_norms(weights, pruned, masks)
            log.info("pruned the initial model to sparsity %.3f before round 1", initial_target)
        # Under DP the draw of devices must be secret (privacy amplification by sampling): OS entropy.
        selection_rng = np.random.default_rng(None if task.privacy.enabled else task.seed)
        self.state = FederationState(0, weights, masks, selection_rng.bit_generator.state,
                                     {"bytes_down": 0, "bytes_up": 0})
        self.history: list[RoundRecord] = []
        self.structured_report: dict | None = None
        if resume:
            restored = load_latest_checkpoint(self.run_dir / "checkpoints")
            if restored is None:
                raise FederationError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
            if restored.model_json and restored.model_json != self.architecture.model_json:
                self._use_model(model_from_architecture_json(  # structurally pruned; checked like a device's
                    restored.model_json, custom_objects=layer_classes(self.model)))
            if [tuple(w.shape) for w in restored.weights] != self.shapes:
                raise FederationError("--resume: the checkpoint was made for another model architecture")
            self.state = restored
            if isinstance(self.schedule, AdaptiveSparsity) and restored.schedule_state:
                self.schedule.restore(restored.schedule_state)
            self.history = _read_metrics(self.run_dir / "metrics.jsonl", restored.completed_rounds)
            if self.accountant is not None:
                # The rounds already released count against the budget.
                self.accountant.replay([ReleasedRound(rec.population or rec.selected, rec.selected)
                                        for rec in self.history])
            log.info("resuming after round %d from %s", restored.completed_rounds, self.run_dir)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state.rng_state

        fed = task.federation
        self.session = MqttSession(
            broker_url,
            client_id=f"fedprune-aggregator-{fed.id}",
            subscriptions=[self.topics.all_presence, self.topics.all_updates],
            on_message=self._on_message,
            on_connected=self._publish_architecture,
            max_payload_bytes=task.transport.max_payload_bytes,
            max_message_bytes=task.transport.max_message_bytes,
            clean_session=False,  # the broker keeps updates that arrive while we reconnect
        )

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

    # --- MQTT side (network thread) ---
    def _on_message(self, topic: str, payload: bytes) -> None:
        if "/presence/" in topic:
            try:
                device_id = self.topics.device_from_topic(topic)
                if not payload:  # a cleared retained presence
                    self.registry.update(device_id, False, 0)
                    return
                p = Presence.decode(payload)
                if p.device_id != device_id:
                    log.warning("presence on %s claims device %r; ignored", topic, p.device_id)
                    return
                self.registry.update(device_id, p.online, p.num_samples)
            except (CodecError, ValueError) as e:
                log.warning("ignored bad presence message on %s: %s", topic, e)
        else:
            self._inbox.put((topic, payload, time.monotonic()))

    def _publish_architecture(self) -> None:
        self.session.publish(self.topics.architecture, self.architecture.encode(), retain=True)

    # --- the run ---
    def run(self) -> RunResult:
        fed = self.task.federation
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "task.json").write_text(json.dumps(asdict(self.task), indent=2, default=str))
        if not self.device_masks:  # device-side masks: self-describing updates, decoded as they come
            self._buffers = UpdateBuffers(self.shapes, fed.devices_per_round)
        self.session.start()
        try:
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
            for r in range(self.state.completed_rounds + 1, fed.rounds + 1):
                record = self._run_round(r)
                self.history.append(record)
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(asdict(record)) + "\n")
                self.state.rng_state = self.rng.bit_generator.state
                self.state.model_json = self.architecture.model_json
                save_checkpoint(self.run_dir / "checkpoints", self.state)
                if self.on_round:
                    self.on_round(record)
                if fed.stop_at_accuracy and record.accuracy >= fed.stop_at_accuracy:
                    log.info("round %d reached held-out accuracy %.4f >= federation.stop_at_accuracy %.4f: "
                             "the run ends here", r, record.accuracy, fed.stop_at_accuracy)
                    break
            self.session.publish(
                self.topics.round,
                RoundAnnouncement(self.state.completed_rounds, 0, [], time.time(), state="finished").encode(),
                retain=True,
            ).wait_for_publish(5)
        finally:
            self.session.stop()
        exports = self._export() if self.export_tflite else []
        result = RunResult(
            run_dir=self.run_dir,
            rounds=self.history,
            final_accuracy=self.history[-1].accuracy if self.history else float("nan"),
            final_sparsity=sparsity(self.state.masks),
            parameters=sum(int(w.size) for w in self.state.weights),
            exports=exports,
        )
        summary = {
            "structured_pruning": self.structured_report,
            "aggregation": self._aggregation_summary(),
            "final_accuracy": result.final_accuracy,
            "final_sparsity": result.final_sparsity,
            "rounds": len(self.history),
            **self.state.totals,
            "exports": exports,
        }
        atomic_write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        return result

    def _run_round(self, r: int) -> RoundRecord:
        fed = self.task.federation
        start = time.monotonic()
        rejections: dict[str, int] = {}
        totals = _Collected()
        for attempt in range(1, fed.max_round_retries + 2):
            online = self.registry.online()
            if len(online) < fed.min_devices:
                self.registry.wait_for(fed.min_devices, fed.wait_for_devices_s)
                online = self.registry.online()
            k = min(fed.devices_per_round, len(online))
            selected = sorted(self.rng.choice(online, size=k, replace=False).tolist()) if k else []
            population = len(online)
            collected = self._collect(r, attempt, selected, rejections)
            totals.add(collected)
            results = collected.results
            if len(results) >= fed.min_devices:
                break
            log.warning(
                "round %d attempt %d: %d of %d selected devices reported, quorum is %d; retrying",
                r, attempt, len(results), len(selected), fed.min_devices,
            )
        else:
            raise FederationError(
                f"round {r} failed {fed.max_round_retries + 1} times without a quorum of "
                f"{fed.min_devices} updates; the last checkpoint is round {self.state.completed_rounds}"
            )

        t = time.perf_counter()
        weights, masks, pruned, agreement = self._aggregate_and_prune(r, results)
        epsilon = None
        if self.accountant is not None:
            epsilon = self.accountant.record_round(population, len(selected))
            log.info("round %d: DP-FedAvg epsilon %.3f at delta %g", r, epsilon, self.task.privacy.delta)
        if self.task.pruning.structured_fraction > 0 and r == self.task.pruning.structured_round:
            weights, masks = self._prune_structured(weights, masks)
        aggregate_s = time.perf_counter() - t
        t = time.perf_counter()
        loss, acc = self.evaluate(weights)
        evaluate_s = time.perf_counter() - t
        if isinstance(self.schedule, AdaptiveSparsity):
            self.schedule.observe(r, acc)
            self.state.schedule_state = self.schedule.state()
        self.state.weights, self.state.masks, self.state.completed_rounds = weights, masks, r
        self.state.totals["bytes_down"] += totals.bytes_down
        self.state.totals["bytes_up"] += totals.bytes_up
        # Under DP, nothing computed from the devices' data leaves the aggregator un-noised.
        train_losses = [float("nan")] if self.accountant else [res.metrics.get("loss", float("nan")) for res in results]
        train_s, transfer_s, sim_saved_s = collected.critical_path()
        wall_s = time.monotonic() - start
        return RoundRecord(
            round=r,
            attempts=attempt,
            selected=len(selected),
            reported=len(results),
            rejected=sum(rejections.values()),
            accuracy=acc,
            loss=loss,
            sparsity=sparsity(masks),
            layer_sparsity=layer_sparsities(masks, self.architecture.names),
            pruned_this_round=pruned,
            bytes_down=totals.bytes_down,
            bytes_up=totals.bytes_up,
            wall_s=wall_s,
            train_loss=float(np.mean(train_losses)),
            rejections=rejections,
            mask_agreement=agreement,
            population=population,
            epsilon=epsilon,
            received=totals.received,
            offline=totals.offline,
            lost=totals.lost,
            train_s=train_s,
            transfer_s=transfer_s,
            encode_s=totals.encode_s,
            decode_s=totals.decode_s,
            aggregate_s=aggregate_s,
            evaluate_s=evaluate_s,
            fleet_s=wall_s - sim_saved_s,
        )

    def _aggregate_and_prune(self, r: int, results: list[ClientResult]) -> tuple[list, list, bool, float | None]:
        """The new global weights and masks after round ``r``, whether a pruning step ran, and (with
        device-side masks) how much the devices' masks agreed."""
        agreement = None
        if self.device_masks:
            # Each weight averaged over the devices that kept it; then the global mask, fresh, by
            # magnitude of that average (positions may come back if the devices kept them).
            weights = DeviceMaskAveraging().aggregate(results)
            agreement = mask_agreement(results)
            fresh = [None if m is None else np.ones(m.shape, bool) for m in self.state.masks]
            weights, masks = prune_to_sparsity(weights, fresh, self.schedule.sparsity_at(r))
            pruned = True
        else:
            weights = self.strategy.aggregate(self.state.weights, results, self.state.masks)
            masks = self.state.masks
            pruned = False
            if self.schedule is not None:
                if isinstance(self.schedule, AdaptiveSparsity):
                    d = self.schedule.decision(r)
                    prune_now, target, backoff = d.prune, d.target, d.backoff
                else:
                    (prune_now, target), backoff = self.schedule(r), False
                if backoff and self._masks_before_prune is not None:
                    # Accuracy fell after the last rise: revive what it pruned (from zero) and retrain.
                    masks, pruned = self._masks_before_prune, True
                    log.warning("round %d: accuracy fell after the last pruning step; back to sparsity %.3f", r, target)
                elif prune_now:
                    self._masks_before_prune = masks
                    weights, masks = self._prune(weights, masks, target)
                    pruned = True
                    scores = gradient_scores(results)
                    if self.task.pruning.regrowth > 0 and scores is not None:
                        weights, masks, swapped = regrow(weights, masks, scores, self.task.pruning.regrowth)
                        log.info("round %d: regrowth swapped %d weights", r, swapped)
        return weights, masks, pruned, agreement

    def _collect(self, r: int, attempt: int, selected: list[str], rejections: dict[str, int]) -> "_Collected":
        """Send the task to the selected devices and gather valid updates until all or the deadline."""
        fed, transport = self.task.federation, self.task.transport
        deadline = time.monotonic() + fed.round_timeout_s
        out = _Collected()
        t = time.perf_counter()
        task = TrainTask(
            round=r,
            attempt=attempt,
            architecture_digest=self.architecture.digest,
            weights=self.state.weights,
            masks=self.state.masks,
            training=self._training_settings(r),
            uplink_precision=transport.uplink_precision,
            deadline_s=fed.round_timeout_s,
            downlink_precision=transport.downlink_precision,
            session=self.session_id,
            update_content=transport.update,
            error_feedback=transport.error_feedback,
            stochastic_rounding=transport.stochastic_rounding,
            compression=transport.compression,
            device_sparsity=self.schedule.sparsity_at(r) if self.device_masks else None,
            gradient_fraction=self._gradient_fraction(r),
        )
        payload = encode_task(task, self.architecture.names, transport.compression)
        layout = MaskLayout.of(self.shapes, self.state.masks)  # every update of the round decodes against it
        out.encode_s = time.perf_counter() - t
        for device_id in selected:
            self.session.publish(self.topics.task(device_id), payload, retain=True)
        self.session.publish(
            self.topics.round,
            # Under DP the announcement names no device: who was drawn stays between each device and us.
            RoundAnnouncement(r, attempt, [] if self.accountant else selected,
                              time.time() + fed.round_timeout_s).encode(),
            retain=True,
        )
        published = time.monotonic()
        out.bytes_down = len(payload) * len(selected)
        results: dict[str, ClientResult] = {}
        waiting = set(selected)
        rejected_due: set[str] = set()
        self._progress(r, attempt, selected, results, rejected_due)
        while waiting and time.monotonic() < deadline:
            if not any(self.registry.is_online(d) for d in waiting):
                log.warning("round %d: every device still due (%s) is offline; closing early", r, sorted(waiting))
                break
            try:
                topic, data, arrived = self._inbox.get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            out.bytes_up += len(data)
            out.received += 1
            t = time.perf_counter()
            result, reason, device_id = self._check_update(topic, data, r, attempt, selected, results, layout)
            out.decode_s += time.perf_counter() - t
            if result is None:
                key = reason.split(":")[0]
                rejections[key] = rejections.get(key, 0) + 1
                log.warning("round %d: rejected update on %s: %s", r, topic, reason)
                if device_id:
                    self._ack(Ack(r, device_id, False, reason))
                if device_id in waiting:  # it stays due: a valid update may still come (the bad one may be forged)
                    rejected_due.add(device_id)
                self._progress(r, attempt, selected, results, rejected_due)
                continue
            results[result.device_id] = result
            out.paths[result.device_id] = arrived - published
            waiting.discard(result.device_id)
            self._ack(Ack(r, result.device_id, True))
            self._progress(r, attempt, selected, results, rejected_due)
        for device_id in selected:  # clear the retained tasks: the round is closed
            self.session.publish(self.topics.task(device_id), b"", retain=True)
        out.results = list(results.values())
        dropped = {d for d in waiting if self.registry.went_offline_since(d, published)}
        lost = waiting - dropped - rejected_due  # the rejected ones are counted in `rejections`
        out.offline, out.lost = len(dropped), len(lost)
        if lost:
            log.warning("round %d attempt %d: %d selected device(s), online all round, sent no update by the "
                        "deadline: %s", r, attempt, len(lost), sorted(lost)[:20])
        return out

    def _progress(self, r: int, attempt: int, selected: list[str], results: dict, rejected: set[str]) -> None:
        """Tell ``on_update`` how many selected devices have reported, or had an update rejected."""
        if self.on_update:
            self.on_update(RoundProgress(r, attempt, len(selected), len(results), len(rejected - set(results))))

    def _check_update(self, topic, data, r, attempt, selected, results,
                      layout: MaskLayout | None = None) -> tuple[ClientResult | None, str, str]:
        try:
            device_id = self.topics.device_from_topic(topic)
        except ValueError:
            return None, f"bad topic: {topic}", ""
        limit = self.task.transport.max_message_bytes
        try:
            peeked = peek_update(data, limit)
            header = peeked[0]
        except CodecError as e:
            return None, f"undecodable: {e.reason}", device_id
        if header.device_id != device_id:
            return None, f"device mismatch: header says {header.device_id!r}, topic says {device_id!r}", device_id
        if not self.registry.known(device_id):
            return None, f"unknown device: {device_id}", device_id
        if (header.round, header.attempt) != (r, attempt):
            return None, (f"wrong round: update is for round {header.round} attempt {header.attempt}, "
                          f"open is {r} attempt {attempt}"), device_id
        if device_id not in selected:
            return None, f"not selected: {device_id} was not selected for round {r}", device_id
        if device_id in results:
            return None, f"duplicate: {device_id} already reported round {r}", device_id
        if header.error:
            return None, f"device error: {header.error}", device_id
        asked = self.task.transport.uplink_precision
        if header.precision.value != asked:
            return None, f"wrong encoding: update is {header.precision.value}, the task asked for {asked}", device_id
        # Each accepted update of the round its own row of the reserved buffers.
        out = self._buffers.row(len(results)) if self._buffers and header.encoding == Encoding.VALUES_ONLY else None
        try:
            update = decode_update(data, self.shapes, self.state.masks, limit, names=self.architecture.names,
                                   layout=layout, peeked=peeked, out=out)
        except CodecError as e:
            return None, f"undecodable: {e.reason}", device_id
        if self.device_masks:
            if update.masks is None or update.content != "weights":
                return None, "wrong encoding: device-side pruning needs weights with the device's own masks", device_id
            return ClientResult(device_id, update.num_samples, update.tensors, update.metrics, update.masks), "", device_id
        tensors = update.tensors  # values-only: exact zeros at pruned positions already
        if update.encoding != Encoding.VALUES_ONLY:
            tensors = apply_masks(tensors, self.state.masks)
        if update.content == "weights":
            tensors = [t - w for t, w in zip(tensors, self.state.weights)]
        return ClientResult(device_id, update.num_samples, tensors, update.metrics,
                            gradients=update.gradients), "", device_id

    def _training_settings(self, r: int) -> dict:
        """The task's ``training`` object for round ``r`` (its learning rate on the schedule); with
        privacy.clip_on_device, the norm devices clip to."""
        training = self.task.training
        settings = asdict(training)
        settings.pop("final_learning_rate")
        settings["learning_rate"] = training.learning_rate_at(r, self.task.federation.rounds)
        if self.task.privacy.enabled and self.task.privacy.clip_on_device:
            settings["clip_norm"] = self.task.privacy.clip_norm
        return settings

    def _aggregation_summary(self) -> dict:
        """For summary.json: how updates were combined, and the privacy spent."""
        agg, privacy = self.task.aggregation, self.task.privacy
        out: dict = {"strategy": type(self.strategy).__name__, "method": agg.method, "clip_norm": agg.clip_norm}
        if self.accountant is not None:
            out["privacy"] = {"epsilon": self.accountant.epsilon(),
                              "epsilon_if_draw_known": self.accountant.epsilon_without_sampling(),
                              "delta": privacy.delta,
                              "noise_multiplier": privacy.noise_multiplier, "clip_norm": privacy.clip_norm,
                              "clip_on_device": privacy.clip_on_device, "rounds": len(self.accountant.rounds),
                              "accountant": ACCOUNTANT_DESCRIPTION}
        return out

    def _gradient_fraction(self, r: int) -> float | None:
        """Ask devices for gradients at pruned positions in rounds that end with a pruning turn."""
        p = self.task.pruning
        if p.regrowth <= 0 or self.schedule is None or self.device_masks or not any(m is not None for m in self.state.masks):
            return None
        # An adaptive schedule caches its decision per round, so asking here does not advance it.
        turn = self.schedule(r)[0]
        return min(1.0, 2 * p.regrowth) if turn else None  # candidates for twice the swaps

    def _prune(self, weights: list[np.ndarray], masks: list, target: float) -> tuple[list[np.ndarray], list]:
        """One pruning step on the aggregated model: the task's rule per layer, or global magnitude."""
        p = self.task.pruning
        if p.scope == "global":
            return prune_globally(weights, masks, target)
        rules = [None if m is None else p.rule_for(self.layer_of[i]) for i, m in enumerate(masks)]
        return prune_with_rules(weights, masks, rules, target)

    def _prune_structured(self, weights: list[np.ndarray], masks: list) -> tuple[list[np.ndarray], list]:
        """Remove whole units and filters, rebuild the smaller model and announce its architecture."""
        from fedprune.pruning.structured import apply_structured, count_flops, plan_structured

        p = self.task.pruning
        plan = plan_structured(self.model, weights, p.structured_fraction, norm=p.structured_norm,
                               leave=p.leave_dense)
        before = {"parameters": int(sum(w.size for w in weights)), "flops": count_flops(self.model),
                  "latency_ms": self._latency_ms(self.model, weights)}
        old_model = self.model
        new_model, new_weights = apply_structured(old_model, weights, plan)
        # Cut the masks exactly as the weights: run them through the same surgery.
        as_arrays = [np.zeros(w.shape, np.float32) if m is None else m.astype(np.float32)
                     for w, m in zip(weights, masks)]
        _, cut = apply_structured(old_model, as_arrays, plan)
        new_masks = [None if m is None else c > 0.5 for m, c in zip(masks, cut)]
        new_weights = apply_masks(new_weights, new_masks)
        self._use_model(new_model)
        after = {"parameters": int(sum(w.size for w in new_weights)), "flops": count_flops(new_model),
                 "latency_ms": self._latency_ms(new_model, new_weights)}
        self.structured_report = {"before": before, "after": after,
                                  "kept_units": {k: int(v.size) for k, v in plan.keep.items()}}
        log.warning("structured pruning: %s parameters -> %s, FLOPs %s -> %s, TFLite latency %.3f -> %.3f ms",
                    f"{before['parameters']:,}", f"{after['parameters']:,}", f"{before['flops']:,}",
                    f"{after['flops']:,}", before["latency_ms"], after["latency_ms"])
        self._publish_architecture()  # retained: devices rebuild before they take the next task
        return new_weights, new_masks

    def _latency_ms(self, model, weights: list[np.ndarray]) -> float:
        import tempfile

        from fedprune.converters.tflite_export import export_sparse_tflite
        from fedprune.models import set_layer_weights
        from fedprune.pruning.structured import measure_latency_ms

        set_layer_weights(model, weights)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_sparse_tflite(model, Path(tmp) / "m.tflite")
            return float(measure_latency_ms(exported.path, self.dataset.x_test[:50], runs=200))

    def _ack(self, ack: Ack) -> None:
        self.session.publish(self.topics.ack(ack.device_id), ack.encode())

    # --- evaluation and export ---
    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float]:
        from fedprune.models import set_layer_weights

        set_layer_weights(self.model, weights)
        return self._evaluate()

    def _export(self) -> list[dict]:
        from fedprune.converters.tflite_export import export_sparse_tflite
        from fedprune.models import set_layer_weights

        set_layer_weights(self.model, self.state.weights)
        out = []
        for precision in ("float32", "int8"):
            result = export_sparse_tflite(
                self.model,
                self.run_dir / f"model-{precision}.tflite",
                precision=precision,
                representative_x=self.dataset.x_test,
                eval_x=self.dataset.x_test,
                eval_y=self.dataset.y_test,
            )
            out.append({"path": str(result.path), "precision": precision, "size_bytes": result.size_bytes,
                        "accuracy": result.accuracy, "runtime": result.runtime})
            log.info("wrote %s (%d bytes, TFLite accuracy %.4f on %s)", result.path, result.size_bytes,
                     result.accuracy or float("nan"), result.runtime)
        return out


def make_strategy(task: Task) -> Strategy:
    """The aggregation strategy the task asks for (device-side masks use DeviceMaskAveraging instead)."""
    agg, privacy = task.aggregation, task.privacy
    if privacy.enabled:
        return DPFedAvg(privacy.clip_norm, privacy.noise_multiplier, task.federation.devices_per_round)
    strategy: Strategy = {
        "fedavg": FedAvg,
        "median": CoordinateMedian,
        "trimmed_mean": lambda: TrimmedMean(agg.trim_fraction),
        "krum": lambda: Krum(agg.byzantine),
        "multi_krum": lambda: MultiKrum(agg.byzantine, agg.multi_krum_keep or None),
    }[agg.method]()
    return NormClipping(strategy, agg.clip_norm) if agg.clip_norm > 0 else strategy


@dataclass(frozen=True)
class RoundProgress:
    """Where the open round stands (for progress displays): selected devices that reported or
    whose update was rejected so far."""

    round: int
    attempt: int
    selected: int
    reported: int
    rejected: int


@dataclass
class _Collected:
    """What one attempt of a round gathered, and what it cost."""

    results: list[ClientResult] = field(default_factory=list)
    paths: dict[str, float] = field(default_factory=dict)  # device -> seconds from task sent to update in
    bytes_down: int = 0
    bytes_up: int = 0
    received: int = 0
    offline: int = 0
    lost: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0

    def add(self, other: "_Collected") -> None:
        for name in ("bytes_down", "bytes_up", "received", "offline", "lost", "encode_s", "decode_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def critical_path(self) -> tuple[float, float, float]:
        """(training, transfer) of the update that arrived last once each device's simulator
        waiting (``sim_wait_s``) is taken out, which bounds the round; and how much sooner than
        the real last arrival that is (0 for real devices)."""
        train = transfer = 0.0
        longest = last = 0.0
        for res in self.results:
            path = self.paths.get(res.device_id, 0.0)
            own = max(0.0, path - float(res.metrics.get("sim_wait_s", 0.0)))
            last = max(last, path)
            if own >= longest:
                longest = own
                train = min(own, float(res.metrics.get("compute_s", res.metrics.get("train_s", 0.0))))
                transfer = own - train
        return train, transfer, last - longest


def _read_metrics(path: Path, up_to_round: int) -> list[RoundRecord]:
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

"""One device's side of the protocol, without any I/O: messages in, messages out.

``DeviceSession`` holds what a device knows between messages (the architecture, a task waiting
for its architecture, the tasks already taken on, error-feedback residuals) and turns incoming
MQTT messages into training jobs and training results into outgoing messages. It opens no socket,
starts no thread and imports no TensorFlow, so the same logic drives:

- the real agent (``fedprune.edge_agent.agent``: a paho session, training in a worker);
- the fleet simulator (many sessions on asyncio MQTT clients, one shared trainer);
- a lean agent that trains in a child process.

This is the "sans-IO" pattern (as in h11 or hyper-h2): the transport and the trainer are the
caller's, so each can be swapped and tested alone.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fedprune.architecture import ArchitectureError, check_architecture
from fedprune.error_feedback import ErrorFeedback
from fedprune.converters.chunking import retained_subscriptions
from fedprune.converters.errors import CodecError
from fedprune.converters.frame import unpack_frame
from fedprune.converters.mask_coding import mask_digest
from fedprune.converters.model_messages import FINAL_PRECISIONS, FinalModel, decode_final_model, decode_trainable_model
from fedprune.converters.signing import VerifyKey, open_signed
from fedprune.converters.text import one_line
from fedprune.converters.protocol import (
    TRAINERS,
    Ack,
    Architecture,
    Encoding,
    Presence,
    Topics,
    TrainTask,
    Update,
    decode_task,
    encode_update,
    issued_us_of,
    task_mask_digest,
    valid_device_id,
)
from fedprune import __version__
from fedprune.converters.log_rate import worth_logging
from fedprune.edge_agent.freshness import NewestIssued
from fedprune.edge_agent.trainable_files import TrainableFiles
from fedprune.edge_agent.update_pipeline import OutgoingUpdate, UpdateStep, default_steps, run_steps

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What local training hands back to the device session."""

    delta: list[np.ndarray]  # trained weights minus the task's weights, masked
    masks: list[np.ndarray | None]  # the masks trained under (the device's own with device-side pruning)
    metrics: dict[str, float]
    gradients: list[np.ndarray] | None = None  # regrowth: loss gradient at the reported positions
    gradient_masks: list[np.ndarray] | None = None  # the reported (pruned) positions of each tensor


class Trainer(Protocol):
    """Local training (``fedprune.edge_agent.trainer.KerasTrainer`` is the real one).

    A trainer may also have ``prepare(architecture)``: get ready to train that architecture (build
    and trace) before its first task; ``prepare_trainer`` calls it where it exists. ``seed``
    (given by the simulator, which shares one trainer between devices): the task's own seed for its
    batches, so that it trains the same whichever device the trainer served before.
    """

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray,
              seed: int | None = None) -> TrainResult: ...


def prepare_trainer(trainer: Trainer, architecture: Architecture) -> None:
    """Let ``trainer`` get ready for ``architecture`` now (while the device is idle), if it can;
    a failure is logged, and the first task then pays for the set-up instead."""
    prepare = getattr(trainer, "prepare", None)
    if prepare is None:
        return
    try:
        prepare(architecture)
    except Exception as e:  # noqa: BLE001 - a warm-up must not take the device down
        log.warning("could not prepare the trainer for architecture %s: %s", architecture.digest[:8], e)


@dataclass(frozen=True)
class Outgoing:
    """A message to publish."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass
class TrainJob:
    """A task accepted for training; ``task`` is decoded on the worker, off the network thread."""

    architecture: Architecture
    payload: bytes
    task: TrainTask | None = field(default=None, repr=False)
    key: tuple[str, int, int] = ("", 0, 0)  # (aggregator session, round, attempt) of the task
    # The update as the steps left it, kept until ``sent`` runs what they left for after publishing.
    outgoing: OutgoingUpdate | None = field(default=None, repr=False)


class DeviceSession:
    """The protocol state of one device. Thread-safe: ``receive`` may run on a network thread
    while ``finish`` runs on a training worker.

    ``trainer``: what the device trains with (announced in its presence); a ``"litert"`` device
    takes a task only once it holds its architecture's trainable file, which it receives into
    ``trainable_files``. ``runtime``: its TFLite runtime, announced. ``final_model``: the
    precision of the final global model to receive after the last round (None: not received).
    ``aggregator_key``: the one key whose signature this device accepts. Every message it
    receives is opened with it before anything else looks at it (``receive``), so a message of a
    """

    def __init__(
        self,
        device_id: str,
        num_samples: int,
        *,
        aggregator_key: VerifyKey,
        federation: str = "default",
        max_message_bytes: int = 64_000_000,
        state_dir: str | Path | None = None,
        seed: int | None = None,
        trainer: str = "keras",
        runtime: str = "",
        trainable_files: TrainableFiles | None = None,
        final_model: str | None = None,
    ) -> None:
        if not valid_device_id(device_id):
            raise ValueError(f"device id {device_id!r} must be 1-128 printable characters without '/', '+', '#'")
        if trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {list(TRAINERS)}, got {trainer!r}")
        if trainer == "litert" and trainable_files is None:
            raise ValueError("a device that trains without TensorFlow needs a TrainableFiles store for its files")
        if final_model is not None and final_model not in FINAL_PRECISIONS:
            raise ValueError(f"final_model must be one of {list(FINAL_PRECISIONS)} or None, got {final_model!r}")
        if not isinstance(aggregator_key, VerifyKey):
            raise ValueError("a device needs the aggregator's public key (a VerifyKey) to accept its messages")
        self.device_id = device_id
        self.aggregator_key = aggregator_key
        self.refused_messages = 0  # unsigned, forged or undecodable messages, each logged
        self.num_samples = int(num_samples)
        self.trainer, self.runtime = trainer, runtime
        self.trainable_files = trainable_files
        self.final_model_precision = final_model
        self.topics = Topics(federation)
        self.max_message_bytes = max_message_bytes
        # Residuals of lossy transport; on disk (atomically) when the device has a state folder.
        self.error_feedback = ErrorFeedback(Path(state_dir) / "error_feedback.npz" if state_dir else None)
        self.rng = np.random.default_rng(seed)  # stochastic rounding
        # What every trained update goes through, in order (fedprune.edge_agent.update_pipeline).
        self.update_steps: list[UpdateStep] = default_steps(self.error_feedback, self.rng)
        self._lock = threading.Lock()
        self._architecture: Architecture | None = None
        self._pending_task: bytes | None = None
        self._seen: set[tuple[str, int, int]] = set()  # (aggregator session, round, attempt) taken on
        self.newest = NewestIssued(state_dir, aggregator_key.key_id.hex())  # older tasks, final models: replays
        # The last update sent, by its task's key: sent again when that task comes again (below).
        self._last_answer: tuple[tuple[str, int, int], Outgoing] | None = None
        self.completed_rounds: list[int] = []
        # The masks of the last task decoded: a values-only task's values align with them.
        self._held_masks: list[np.ndarray | None] | None = None
        self._held_digest = ""

    @property
    def architecture(self) -> Architecture | None:
        """The architecture last announced by the aggregator (None before the first)."""
        return self._architecture

    # --- what to subscribe to and announce ---
    @property
    def subscriptions(self) -> list[str]:
        out = [self.topics.architecture, self.topics.task(self.device_id), self.topics.ack(self.device_id)]
        if self.trainer == "litert":
            out += retained_subscriptions(self.topics.trainable_model)
        if self.final_model_precision is not None:
            out += retained_subscriptions(self.topics.final_model(self.final_model_precision))
        return out

    def presence(self, online: bool) -> Outgoing:
        """The retained presence message; ``online=False`` is also the last will."""
        with self._lock:
            held = self._held_digest
        body = Presence(self.device_id, online, self.num_samples if online else 0, __version__ if online else "",
                        self.trainer, self.runtime, mask_digest=held)
        return Outgoing(self.topics.presence(self.device_id), body.encode(), retain=True)

    # --- messages in ---
    def receive(self, topic: str, payload: bytes) -> TrainJob | Outgoing | FinalModel | None:
        """Take one incoming message; returns a job when a task is ready to train, the update to
        send again when a task already answered comes again, and the final global model when it
        arrives (for the caller to install).

        Every non-empty payload must be a message the aggregator signed for ``topic``; anything
        else is refused (logged and counted) before its content is read.
        """
        if not payload:
            return None  # an empty retained message clears a task, a model file: nothing to do
        try:
            message = open_signed(topic, payload, self.aggregator_key, self.max_message_bytes)
        except CodecError as e:
            self._refuse(topic, e.reason)
            return None
        if topic == self.topics.trainable_model and self.trainable_files is not None:
            return self._take_trainable_file(message)
        if self.final_model_precision is not None and topic == self.topics.final_model(self.final_model_precision):
            try:
                model = decode_final_model(message, self.max_message_bytes)
            except CodecError as e:
                self._refuse(topic, e.reason)
                return None
            with self._lock:
                refusal = self.newest.refusal("final model", model.issued_us)
                if refusal is None:
                    self.newest.take("final model", model.issued_us)
            if refusal is not None:
                self._refuse(topic, refusal)
                return None
            return model
        if topic == self.topics.architecture:
            try:
                arch = Architecture.decode(message)
                check_architecture(arch.model_json)  # refuse code before any trainer sees it
            except (CodecError, ArchitectureError) as e:
                self._refuse(topic, str(e))
                return None
            with self._lock:
                self._architecture = arch
                pending, self._pending_task = self._pending_task, None
            log.info("%s: took architecture %s (%d tensors)", self.device_id, one_line(arch.digest, 32),
                     len(arch.names))
            return self._accept_task(pending) if pending else None
        if topic == self.topics.task(self.device_id):
            return self._accept_task(message)
        if topic == self.topics.ack(self.device_id):
            try:
                ack = Ack.decode(message)
            except CodecError as e:
                self._refuse(topic, e.reason)
                return None
            if not ack.accepted:
                log.warning("%s: aggregator rejected the update for round %s: %s", self.device_id,
                            one_line(str(ack.round), 20), one_line(str(ack.reason)))
        return None

    def _take_trainable_file(self, payload: bytes) -> TrainJob | Outgoing | None:
        try:
            model = decode_trainable_model(payload, self.max_message_bytes)
        except CodecError as e:
            self._refuse(self.topics.trainable_model, e.reason)
            return None
        if self.trainable_files.add(model):
            log.info("%s: received the trainable TFLite file of architecture %s (batch %d, %d bytes)", self.device_id,
                     model.architecture_digest[:8], model.batch_size, len(model.content))
        with self._lock:
            pending, self._pending_task = self._pending_task, None
        return self._accept_task(pending) if pending else None

    def _ready_for(self, architecture_digest: object) -> bool:
        """Whether a task of that architecture can be trained now (call with the lock held)."""
        if self._architecture is None or architecture_digest != self._architecture.digest:
            return False
        return self.trainer != "litert" or self.trainable_files.get(self._architecture.digest) is not None

    def _refuse(self, topic: str, reason: str) -> None:
        with self._lock:
            self.refused_messages += 1
            count = self.refused_messages
        if worth_logging(count):  # whoever can publish on our topics decides how many there are
            log.error("%s: refused a message on %s: %s (%d refused so far)", self.device_id, one_line(topic),
                      one_line(reason), count)

    def _accept_task(self, payload: bytes) -> TrainJob | Outgoing | None:
        refusal = None
        with self._lock:
            try:
                _, header, _ = unpack_frame(payload, self.max_message_bytes)
                key = (str(header.get("session", "")), int(header["round"]), int(header["attempt"]))
                issued = issued_us_of(header)
            except (CodecError, KeyError, TypeError, ValueError) as e:
                log.error("%s: ignored undecodable task: %s", self.device_id, one_line(str(e)))
                return None
            # Before it may wait for its architecture, so that a replay cannot displace a waiting task.
            if key not in self._seen:
                refusal = self.newest.refusal("task", issued)
            if refusal is None:
                return self._take_task(payload, header, key, issued)
        self._refuse(self.topics.task(self.device_id), refusal)
        return None

    def _take_task(self, payload: bytes, header: dict, key: tuple[str, int, int],
                   issued: int | None) -> TrainJob | Outgoing | None:
        """``_accept_task`` for a task not refused (called holding the lock)."""
        if not self._ready_for(header.get("architecture_digest")):
            # Its architecture (retained, or a new one), and for a device without TensorFlow
            # its trainable file, will follow. Newest from now: an older task cannot take its place.
            self._pending_task = payload
            self.newest.take("task", issued)
            return None
        if key in self._seen:
            # A task already taken on, again: a retained task redelivered after a reconnect, or
            # a resumed aggregator (same session) asking once more. The update may never have
            # reached it (its earlier process took it, or the broker restarted), so the device
            # sends the same bytes again rather than training again; an aggregator that has
            # them already drops the copy as a redelivery. Still training: the update follows.
            answered = self._last_answer
            return answered[1] if answered is not None and answered[0] == key else None
        self._seen.add(key)
        self.newest.take("task", issued)
        return TrainJob(self._architecture, payload, key=key)

    def decode(self, job: TrainJob) -> TrainTask | None:
        """Decode the job's task (on the worker); None, logged, if it is undecodable."""
        if job.task is None:
            arch = job.architecture
            with self._lock:
                held = self._held_masks
            try:
                job.task = decode_task(job.payload, arch.names, arch.shapes, self.max_message_bytes, held_masks=held)
            except CodecError as e:
                log.error("%s: ignored undecodable task: %s", self.device_id, e)
                return None
            self._hold(job.task, mask_digest(job.task.masks))
        return job.task

    def take_decoded(self, job: TrainJob, task: TrainTask) -> TrainTask | None:
        """``decode`` for a task already decoded from the same bytes (the simulator decodes a
        round's task once for all its devices): a values-only one only if this device holds its
        masks, else it goes to ``decode``, which refuses it."""
        try:
            digest, values_only = task_mask_digest(job.payload, self.max_message_bytes)
        except CodecError:
            return self.decode(job)
        with self._lock:
            held = self._held_digest if self._held_masks is not None else None
        if values_only and digest != held:
            return self.decode(job)
        job.task = task
        self._hold(task, digest)
        return task

    def _hold(self, task: TrainTask, digest: str) -> None:
        """The masks of the task taken on: a values-only task's values align with them."""
        with self._lock:
            self._held_masks, self._held_digest = list(task.masks), digest

    # --- messages out ---
    def failure(self, job: TrainJob, error: str) -> Outgoing:
        """The update that tells the aggregator training failed, and why."""
        task = self._task(job)
        # One line of at most 200 characters: the aggregator logs it and echoes it back.
        update = Update(task.round, task.attempt, self.device_id, self.num_samples, error=one_line(error))
        return Outgoing(self.topics.update(self.device_id), encode_update(update, task.masks))

    def finish(self, job: TrainJob, result: TrainResult) -> Outgoing:
        """Run the trained delta through ``update_steps`` (clipping, error feedback, encoding) to
        the update to publish. Raises ValueError if it cannot be encoded.

        Call ``sent`` once it is published, so error feedback records what actually left.
        """
        task = self._task(job)
        own_masks = task.device_sparsity is not None  # device-side pruning: send our own mask
        update = Update(task.round, task.attempt, self.device_id, self.num_samples, result.metrics,
                        list(result.delta), precision=task.uplink_precision, compression=task.compression,
                        encoding=Encoding.SELF_DESCRIBING if own_masks else Encoding.VALUES_ONLY,
                        gradients=result.gradients, gradient_masks=result.gradient_masks)
        outgoing = OutgoingUpdate(task, job.architecture, update, result.masks if own_masks else task.masks)
        payload = run_steps(self.update_steps, outgoing)
        job.outgoing = outgoing
        return Outgoing(self.topics.update(self.device_id), payload)

    def sent(self, job: TrainJob, message: Outgoing) -> None:
        """Record a published update: the round is done, and the steps do what they do after
        publishing (error feedback keeps what was lost)."""
        task = self._task(job)
        if job.outgoing is not None:
            job.outgoing.sent()
        log.info("%s: sent update for round %d (%d bytes)", self.device_id, task.round, len(message.payload))
        self.completed_rounds.append(task.round)
        with self._lock:
            self._last_answer = (job.key, message)

    @staticmethod
    def _task(job: TrainJob) -> TrainTask:
        if job.task is None:
            raise RuntimeError("decode(job) must succeed before the job's update is built")
        return job.task


def run_job(session: DeviceSession, job: TrainJob, trainer: Trainer, x: np.ndarray, y: np.ndarray) -> Outgoing | None:
    """Decode, train and encode one job; a training failure becomes a failure update.

    The one place the job's life is written down, shared by every transport; returns the message
    to publish (then call ``session.sent``), or None when the task was undecodable.
    """
    task = session.decode(job)
    if task is None:
        return None
    try:
        result = trainer.train(job.architecture, task, x, y)
    except Exception as e:  # any training failure goes back to the aggregator, not into a log only
        # One line (the aggregator is told the same); the traceback only at DEBUG: a device whose
        # data does not fit the model printed one every round.
        log.error("%s: training for round %d failed: %s: %s; the aggregator is told", session.device_id,
                  task.round, type(e).__name__, e)
        log.debug("%s: training for round %d failed", session.device_id, task.round, exc_info=True)
        return session.failure(job, f"{type(e).__name__}: {e}")
    try:
        return session.finish(job, result)
    except ValueError as e:
        log.error("%s: cannot encode the update for round %d: %s", session.device_id, task.round, e)
        return None
    except Exception as e:  # a defect in the encoding (seen: NumPy's int32 indices on a 32-bit board)
        # With its traceback: this is a bug to report, not a property of the data. The aggregator is
        # told, so its round does not wait for this device until the deadline.
        log.exception("%s: encoding the update for round %d failed; the aggregator is told", session.device_id,
                      task.round)
        return session.failure(job, f"encoding the update failed: {type(e).__name__}: {e}")

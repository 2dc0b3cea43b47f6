"""The agent's MQTT side: presence, the architecture, tasks in, updates out.

Network callbacks only enqueue; training runs on a worker thread so the MQTT keepalive never
stalls behind a long ``fit``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from converters.error_feedback import ErrorFeedback
from converters.errors import CodecError
from converters.frame import unpack_frame
from converters.protocol import (
    Ack,
    Encoding,
    Architecture,
    Presence,
    Topics,
    TrainTask,
    Update,
    decode_task,
    decode_update,
    encode_update,
)
from fedprune import __version__
from fedprune.clipping import clip_to_norm
from fedprune.transport import MqttSession, PayloadTooLarge

log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What the agent needs of local training (edge_agent.trainer.KerasTrainer is the real one)."""

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray): ...


class EdgeAgent:
    """One device's session with the federation."""

    def __init__(
        self,
        broker_url: str,
        device_id: str,
        x: np.ndarray,
        y: np.ndarray,
        trainer: Trainer,
        *,
        federation: str = "default",
        max_payload_bytes: int = 1_000_000,
        max_message_bytes: int = 64_000_000,
        executor: Executor | None = None,
        state_dir: str | Path | None = None,
        seed: int | None = None,
    ) -> None:
        from converters.protocol import valid_device_id

        if not valid_device_id(device_id):
            raise ValueError(f"device id {device_id!r} must be 1-128 printable characters without '/', '+', '#'")
        self.device_id = device_id
        self.x, self.y = x, y
        self.trainer = trainer
        self.topics = Topics(federation)
        self.max_message_bytes = max(max_message_bytes, max_payload_bytes)
        # Residuals of lossy transport; on disk (atomically) when the agent has a state folder.
        self.error_feedback = ErrorFeedback(Path(state_dir) / "error_feedback.npz" if state_dir else None)
        self.rng = np.random.default_rng(seed)  # stochastic rounding
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{device_id}")
        self._own_executor = executor is None
        self._lock = threading.Lock()
        self._architecture: Architecture | None = None
        self._pending_task: bytes | None = None
        self._seen: set[tuple[str, int, int]] = set()  # (aggregator session, round, attempt) taken on
        self.completed_rounds: list[int] = []

        offline = Presence(device_id, online=False).encode()
        self.session = MqttSession(
            broker_url,
            client_id=f"fedprune-{federation}-{device_id}",
            subscriptions=[self.topics.architecture, self.topics.task(device_id), self.topics.ack(device_id)],
            on_message=self._on_message,
            on_connected=self._announce,
            will=(self.topics.presence(device_id), offline, True),
            max_payload_bytes=max_payload_bytes,
            max_message_bytes=self.max_message_bytes,
        )

    def start(self, timeout_s: float | None = 30.0) -> "EdgeAgent":
        """Connect; ``timeout_s=None`` returns at once and keeps retrying in the background."""
        self.session.start(timeout_s)
        return self

    def stop(self) -> None:
        offline = Presence(self.device_id, online=False).encode()
        self.session.stop(publish_first=(self.topics.presence(self.device_id), offline, True))
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def _announce(self) -> None:
        presence = Presence(self.device_id, True, int(len(self.x)), __version__)
        self.session.publish(self.topics.presence(self.device_id), presence.encode(), retain=True)

    # --- network thread ---
    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.architecture:
            try:
                arch = Architecture.decode(payload)
            except CodecError as e:
                log.error("%s: ignored bad architecture message: %s", self.device_id, e)
                return
            with self._lock:
                self._architecture = arch
                pending, self._pending_task = self._pending_task, None
            if pending:
                self._accept_task(pending)
        elif topic == self.topics.task(self.device_id):
            if payload:  # an empty retained message clears the task after its round
                self._accept_task(payload)
        elif topic == self.topics.ack(self.device_id):
            try:
                ack = Ack.decode(payload)
            except CodecError as e:
                log.warning("%s: ignored bad ack: %s", self.device_id, e)
                return
            if not ack.accepted:
                log.warning("%s: aggregator rejected the update for round %d: %s", self.device_id, ack.round, ack.reason)

    def _accept_task(self, payload: bytes) -> None:
        with self._lock:
            try:
                _, header, _ = unpack_frame(payload, self.max_message_bytes)
                key = (str(header.get("session", "")), int(header["round"]), int(header["attempt"]))
            except (CodecError, KeyError, TypeError, ValueError) as e:
                log.error("%s: ignored undecodable task: %s", self.device_id, e)
                return
            if self._architecture is None or header.get("architecture_digest") != self._architecture.digest:
                self._pending_task = payload  # its architecture (retained, or a new one) will follow
                return
            if key in self._seen:
                return  # a redelivery of a task already taken on
            self._seen.add(key)
            arch = self._architecture
        self._executor.submit(self._run_task, arch, payload)

    # --- worker thread ---
    def _run_task(self, arch: Architecture, payload: bytes) -> None:
        try:
            task = decode_task(payload, arch.names, arch.shapes, self.max_message_bytes)
        except CodecError as e:
            log.error("%s: ignored undecodable task: %s", self.device_id, e)
            return
        try:
            result = self.trainer.train(arch, task, self.x, self.y)
            if task.training.get("clip_norm"):  # DP-FedAvg clipping on the device (docs/robustness.md)
                result.delta = clip_to_norm(result.delta, float(task.training["clip_norm"]))[0]
        except Exception as e:  # any training failure goes back to the aggregator, not into a log only
            log.exception("%s: training for round %d failed", self.device_id, task.round)
            self._send(Update(task.round, task.attempt, self.device_id, int(len(self.x)),
                              error=f"{type(e).__name__}: {e}"[:500]), task)
            return
        own_masks = task.device_sparsity is not None  # device-side pruning: send our own mask
        if task.update_content == "weights" or own_masks:
            tensors = [w + d for w, d in zip(task.weights, result.delta)]
            content = "weights"
        else:
            tensors, content = result.delta, "delta"
        lossy = task.uplink_precision != "float32"
        use_ef = task.error_feedback and lossy and content == "delta"
        if use_ef:
            tensors = self.error_feedback.compensate(tensors, task.masks)
        update = Update(task.round, task.attempt, self.device_id, int(len(self.x)), result.metrics, tensors,
                        content=content, precision=task.uplink_precision, compression=task.compression,
                        encoding=Encoding.SELF_DESCRIBING if own_masks else Encoding.VALUES_ONLY,
                        gradients=result.gradients, gradient_masks=result.gradient_masks)
        payload = self._send(update, task, result.masks, arch.names)
        if use_ef and payload is not None:
            sent = decode_update(payload, arch.shapes, task.masks, self.max_message_bytes, names=arch.names)
            self.error_feedback.record(tensors, sent.tensors)

    def _send(self, update: Update, task: TrainTask, masks=None, names=None) -> bytes | None:
        try:
            payload = encode_update(update, task.masks if masks is None else masks, names=names, rng=self.rng,
                                    stochastic=task.stochastic_rounding)
            self.session.publish(self.topics.update(self.device_id), payload)
        except (PayloadTooLarge, ValueError) as e:
            log.error("%s: cannot send the update for round %d: %s", self.device_id, task.round, e)
            return None
        log.info("%s: sent update for round %d (%d bytes)", self.device_id, task.round, len(payload))
        self.completed_rounds.append(task.round)
        return payload

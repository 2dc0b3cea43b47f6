"""The agent's MQTT shell: a paho session around a ``DeviceSession``.

Network callbacks only hand messages to the device session; training runs on a worker thread so
the MQTT keepalive never stalls behind a long ``fit``. The trainer is either in this process
(``KerasTrainer``: the simulator, many devices sharing one TensorFlow) or a child process per
round (``ChildProcessTrainer``: a real device, whose agent then never loads TensorFlow).
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedprune.converters.signing import VerifyKey
from fedprune.edge_agent.device import DeviceSession, Outgoing, Trainer, TrainJob, prepare_trainer, run_job
from fedprune.edge_agent.emulation import SlowLink
from fedprune.transport import MqttSession, PayloadTooLarge

log = logging.getLogger(__name__)


class EdgeAgent:
    """One device's session with the federation."""

    def __init__(
        self,
        broker_url: str,
        device_id: str,
        x: np.ndarray | None,
        y: np.ndarray | None,
        trainer: Trainer,
        *,
        aggregator_key: VerifyKey,
        num_samples: int | None = None,
        federation: str = "default",
        max_payload_bytes: int = 1_000_000,
        max_message_bytes: int = 64_000_000,
        executor: Executor | None = None,
        state_dir: str | Path | None = None,
        seed: int | None = None,
        link: SlowLink | None = None,
    ) -> None:
        """``x``, ``y``: the local data, for an in-process trainer; a trainer that reads the data
        itself (``ChildProcessTrainer``) takes None and ``num_samples``. ``aggregator_key``: the
        public key whose signature every message from the aggregator must carry. ``link``: an
        emulated slow uplink (``fedprune.edge_agent.emulation``)."""
        if num_samples is None:
            if x is None:
                raise ValueError("give the local data (x, y) or num_samples")
            num_samples = len(x)
        self.device = DeviceSession(device_id, num_samples, aggregator_key=aggregator_key, federation=federation,
                                    max_message_bytes=max(max_message_bytes, max_payload_bytes),
                                    state_dir=state_dir, seed=seed)
        self.device_id = device_id
        self.x, self.y = x, y
        self.trainer = trainer
        self.link = link
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{device_id}")
        self._own_executor = executor is None
        will = self.device.presence(online=False)
        self.session = MqttSession(
            broker_url,
            client_id=f"fedprune-{federation}-{device_id}",
            subscriptions=self.device.subscriptions,
            on_message=self._on_message,
            on_connected=lambda: self._publish(self.device.presence(online=True)),
            will=(will.topic, will.payload, will.retain),
            max_payload_bytes=max_payload_bytes,
            max_message_bytes=self.device.max_message_bytes,
        )

    @property
    def completed_rounds(self) -> list[int]:
        return self.device.completed_rounds

    @property
    def error_feedback(self):
        return self.device.error_feedback

    def start(self, timeout_s: float | None = 30.0) -> "EdgeAgent":
        """Connect; ``timeout_s=None`` returns at once and keeps retrying in the background."""
        self.session.start(timeout_s)
        return self

    def stop(self) -> None:
        offline = self.device.presence(online=False)
        close = getattr(self.trainer, "close", None)
        if close is not None:  # a child-process trainer stops its child
            close()
        self.session.stop(publish_first=(offline.topic, offline.payload, offline.retain))
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def _publish(self, message: Outgoing) -> None:
        if self.link is not None:
            self.link.wait(len(message.payload))
        self.session.publish(message.topic, message.payload, retain=message.retain)

    def _on_message(self, topic: str, payload: bytes) -> None:  # network thread
        job = self.device.receive(topic, payload)
        if job is not None:
            self._executor.submit(self._run, job)
        elif topic == self.device.topics.architecture and self.device.architecture is not None:
            # Trace the training step now, on the training thread, not when the first task is due.
            self._executor.submit(prepare_trainer, self.trainer, self.device.architecture)

    def _run(self, job: TrainJob) -> None:  # worker thread
        message = run_job(self.device, job, self.trainer, self.x, self.y)
        if message is None:
            return
        try:
            self._publish(message)
        except (PayloadTooLarge, ValueError) as e:
            log.error("%s: cannot send the update for round %d: %s", self.device_id, job.task.round, e)
            return
        self.device.sent(job, message)

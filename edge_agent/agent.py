"""The agent's MQTT shell: a paho session around a ``DeviceSession``.

Network callbacks only hand messages to the device session; training runs on a worker thread so
the MQTT keepalive never stalls behind a long ``fit``. The trainer is either in this process
(``KerasTrainer``: the simulator, many devices sharing one TensorFlow) or a child process per
round (``ChildProcessTrainer``: a real device, whose agent then never loads TensorFlow). The final
global model, when the aggregator publishes it, is installed on the same worker, after the last
round's training child has exited (so an older round's export never replaces it).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedprune.converters.model_messages import FinalModel
from fedprune.converters.protocol import TOPIC_ROOT
from fedprune.converters.signing import VerifyKey
from fedprune.edge_agent.device import DeviceSession, Outgoing, Trainer, TrainJob, prepare_trainer, run_job
from fedprune.edge_agent.emulation import SlowLink
from fedprune.edge_agent.final_model import install_final_model
from fedprune.edge_agent.model_store import ModelStore
from fedprune.edge_agent.trainable_files import TrainableFiles
from fedprune.transport import MqttSession, PayloadTooLarge, parse_broker_url

log = logging.getLogger(__name__)


def _log_failure(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        e = future.exception()
        log.error("the agent's worker thread failed: %s: %s", type(e).__name__, e, exc_info=e)


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
        trainer_kind: str = "keras",
        runtime: str = "",
        trainable_files: TrainableFiles | None = None,
        final_model: str | None = None,
    ) -> None:
        """``x``, ``y``: the local data, for an in-process trainer; a trainer that reads the data
        itself (``ChildProcessTrainer``) takes None and ``num_samples``. ``aggregator_key``: the
        public key whose signature every message from the aggregator must carry. ``link``: an
        emulated slow uplink (``fedprune.edge_agent.emulation``). ``trainer_kind``, ``runtime``:
        what the presence announces (``"litert"`` devices receive trainable files into
        ``trainable_files``, which their trainer reads). ``final_model``: the precision of the final
        global model to install into ``<state_dir>/model`` after the last round (None: none)."""
        if num_samples is None:
            if x is None:
                raise ValueError("give the local data (x, y) or num_samples")
            num_samples = len(x)
        if final_model is not None and state_dir is None:
            raise ValueError("installing the final model needs a state folder (state_dir)")
        self.device = DeviceSession(device_id, num_samples, aggregator_key=aggregator_key, federation=federation,
                                    max_message_bytes=max(max_message_bytes, max_payload_bytes),
                                    state_dir=state_dir, seed=seed, trainer=trainer_kind, runtime=runtime,
                                    trainable_files=trainable_files, final_model=final_model)
        self.models = ModelStore(Path(state_dir) / "model", writer=True) if final_model is not None else None
        self.device_id = device_id
        self.x, self.y = x, y
        self.trainer = trainer
        self.link = link
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{device_id}")
        self._own_executor = executor is None
        self.federation = federation
        # Federations whose aggregator has announced its model on this broker: on an open broker the
        # agent reads every federation's architecture topic, to name the federation it may have
        # meant when its own has none (a secured broker's connection file carries the federation).
        self.aggregators_seen: set[str] = set()
        self._warned_federations: frozenset[str] = frozenset()
        self._hint_since: float | None = None  # since when federation_hint() has had something to say
        self._training: tuple[int, float] | None = None  # (round, time.monotonic() it started)
        self._lock = threading.Lock()
        subscriptions = list(self.device.subscriptions)
        if parse_broker_url(broker_url).username is None:
            subscriptions = [ARCHITECTURES if t == self.device.topics.architecture else t for t in subscriptions]
        will = self.device.presence(online=False)
        self.session = MqttSession(
            broker_url,
            client_id=f"fedprune-{federation}-{device_id}",
            subscriptions=subscriptions,
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
        if topic.endswith(ARCHITECTURE_SUFFIX) and topic != self.device.topics.architecture:
            federation = topic[len(TOPIC_ROOT) + 1:-len(ARCHITECTURE_SUFFIX)]
            with self._lock:
                (self.aggregators_seen.add if payload else self.aggregators_seen.discard)(federation)
            return
        job = self.device.receive(topic, payload)
        if isinstance(job, Outgoing):  # a task already answered came again: the same update again
            log.info("%s: the task it answered came again; sending the same update again", self.device_id)
            self._submit(self._publish, job)
        elif isinstance(job, TrainJob):
            self._submit(self._run, job)
        elif isinstance(job, FinalModel):
            self._submit(self._install_final, job)
        elif topic == self.device.topics.architecture and self.device.architecture is not None:
            # Trace the training step now, on the training thread, not when the first task is due.
            self._submit(prepare_trainer, self.trainer, self.device.architecture)

    def _submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the worker thread; whatever it raises is logged with its traceback
        (an exception left in an unread future vanished: an agent that failed after training said
        nothing and waited for the next task)."""
        self._executor.submit(fn, *args).add_done_callback(_log_failure)

    def _install_final(self, model: FinalModel) -> None:  # worker thread
        wait_idle = getattr(self.trainer, "wait_idle", None)
        if wait_idle is not None:  # a child still exporting the last round's model installs it first
            wait_idle()
        install_final_model(self.models, model)

    def _run(self, job: TrainJob) -> None:  # worker thread
        self._training = (job.key[1], time.monotonic())
        try:
            message = run_job(self.device, job, self.trainer, self.x, self.y)
        finally:
            self._training = None
        if message is None:
            return
        try:
            self._publish(message)
        except (PayloadTooLarge, ValueError) as e:
            log.error("%s: cannot send the update for round %d: %s", self.device_id, job.task.round, e)
            return
        self.device.sent(job, message)

    # --- what it is waiting for (fedprune.wait_notices) ---
    def federation_hint(self) -> str:
        """What to do when no aggregator has announced this agent's federation while one has
        announced another ("" otherwise)."""
        if self.device.architecture is not None:
            return ""
        with self._lock:
            others = sorted(self.aggregators_seen - {self.federation})
        if not others:
            return ""
        return (f"no aggregator has announced federation '{self.federation}' on this broker, but one announces "
                f"federation {', '.join(repr(f) for f in others)}: start the agent with --federation {others[0]} "
                "(config: broker.federation)")

    def check_federation(self, settle_s: float = 2.0) -> None:
        """Warn (once per set of federations seen) when the agent's federation has had no
        aggregator for ``settle_s`` while another has one: the commonest reason a newcomer's agent
        never trains. (Retained architectures arrive in any order after a connection.)"""
        hint, now = self.federation_hint(), time.monotonic()
        if not hint:
            self._hint_since = None
            return
        if self._hint_since is None:
            self._hint_since = now
        with self._lock:
            seen = frozenset(self.aggregators_seen)
        if now - self._hint_since >= settle_s and seen != self._warned_federations:
            log.warning("%s: %s", self.device_id, hint)
            self._warned_federations = seen

    def activity(self) -> str:
        """One line: what the agent is doing or waiting for."""
        session = self.session
        if not session.connected.is_set():
            failed = (f"; {session.failed_attempts} attempt(s) failed, the last: {session.last_failure}"
                      if session.failed_attempts else "")
            return f"{self.device_id}: connecting to the MQTT broker at {session.address.url}{failed}"
        training = self._training
        if training is not None:
            return f"{self.device_id}: training round {training[0]} ({time.monotonic() - training[1]:.0f} s so far)"
        if self.device.architecture is None:
            hint = self.federation_hint()
            return (f"{self.device_id}: waiting for the aggregator of federation '{self.federation}' to announce "
                    f"its model" + (f"; {hint}" if hint else ""))
        done = self.completed_rounds
        return (f"{self.device_id}: waiting for a task from the aggregator of federation '{self.federation}' "
                f"(rounds done: {', '.join(map(str, done[-5:])) if done else 'none yet'})")


ARCHITECTURE_SUFFIX = "/model/architecture"
ARCHITECTURES = f"{TOPIC_ROOT}/+{ARCHITECTURE_SUFFIX}"  # every federation's architecture (an open broker)

"""One aggregation worker: takes a share of the round's updates from the broker, checks, decodes
and folds them, and hands its partial sums to the coordinator (``workers``).

The worker is a child process of the aggregator (``multiprocessing``, spawn: no TensorFlow, no
model, no signing key here; it imports only the intake, the codecs and the strategies' running
sums). It talks to the coordinator through one pipe, in messages that are tuples:

    coordinator -> worker   ("open", AttemptSpec)    subscribe, get ready, answer ("ready", round, attempt)
                            ("verdict", "fold"|"drop")  the answer to a claim
                            ("close", round, attempt)   answer ("partial", round, attempt, Partial)
                            ("stop",)
    worker -> coordinator   ("started", worker_id)
                            ("reject", topic, Rejection, bytes)          counted and acknowledged there
                            ("claim", round, attempt, ClientResult without its tensors, digest, bytes)
                            ("over budget", [device, ...])

Claim before fold: an update that passes the checks is folded only once the coordinator has
granted the claim, so no device's update is in two workers' sums (QoS 1 may deliver a copy to a
second worker). The updates come through a shared subscription (``$share/<group>/...``) of each
device's update topic: the broker hands each message to one worker of the group. Updates of
devices not selected for the open attempt are dropped unread, as the aggregator alone never
subscribes to them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.intake import Rejection, RoundContext, check_update
from fedprune.aggregator.peer_budgets import Budget, PeerBudgets
from fedprune.aggregator.round_fold import RoundFold
from fedprune.aggregator.strategies.base import Strategy
from fedprune.aggregator.strategies.running import RunningAggregate
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.converters.chunking import Reassembler
from fedprune.converters.codec import MaskLayout
from fedprune.converters.protocol import Topics
from fedprune.pruning.masks import Masks
from fedprune.transport import MqttSession

__all__ = ["AttemptSpec", "Partial", "WorkerSettings", "run_worker", "shared_updates_topic"]

log = logging.getLogger(__name__)


def shared_updates_topic(topics: Topics) -> str:
    """The shared subscription of every device's updates: one group per federation, so the broker
    hands each update to one worker of that federation's aggregator.

    One filter for all devices, not one per device as the aggregator alone subscribes: Mosquitto
    takes turns within each filter, so with a filter per device (one update each per attempt)
    every update went to the same worker."""
    group = topics.root.replace("/", "-")  # "fedprune-v1-<federation>": a level without '/', '+', '#'
    return f"$share/{group}/{topics.all_updates}"


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs for its whole life: where the broker is and the transport's bounds."""

    worker_id: int
    broker_url: str
    federation: str
    max_payload_bytes: int
    max_message_bytes: int
    max_inbox_bytes: int


@dataclass(frozen=True)
class AttemptSpec:
    """One attempt of a round, as a worker checks and folds its updates (a ``RoundContext`` less
    the registry, plus the strategy and the per-device budget)."""

    round: int
    attempt: int
    selected: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    masks: Masks
    names: tuple[str, ...]
    max_message_bytes: int
    uplink_precision: str
    device_masks: bool
    global_weights: list[np.ndarray]
    strategy: Strategy
    budget: Budget


@dataclass
class Partial:
    """A worker's share of an attempt: its running sums and the devices folded into them."""

    worker_id: int
    running: RunningAggregate
    folded: list[str] = field(default_factory=list)
    decode_s: float = 0.0
    fold_s: float = 0.0
    inbox_dropped: int = 0  # updates the worker's full inbox dropped since its last partial


class _Attempt:
    """The open attempt in a worker: its checks and its sums."""

    def __init__(self, spec: AttemptSpec, topics: Topics, buffers: UpdateBuffers | None) -> None:
        selected = frozenset(spec.selected)
        self.spec = spec
        # Only the selected devices' topics are subscribed: every device heard from is a known one.
        self.ctx = RoundContext(spec.round, spec.attempt, selected, selected.__contains__, topics, spec.shapes,
                                spec.masks, spec.names, spec.max_message_bytes, spec.uplink_precision,
                                spec.device_masks, spec.global_weights, layout=MaskLayout.of(spec.shapes, spec.masks))
        self.fold = RoundFold(spec.strategy, spec.global_weights, spec.masks, buffers)
        if not self.fold.streaming:
            raise ValueError(f"aggregation workers need a strategy that streams, not {spec.strategy.strategy_name}")
        self.partial: Partial | None = None


class Worker:
    """The worker's loop (``run``): control messages from the pipe, updates from the broker."""

    def __init__(self, settings: WorkerSettings, conn: Any) -> None:
        self.settings, self.conn = settings, conn
        self.topics = Topics(settings.federation)
        self.inbox = BoundedInbox(settings.max_inbox_bytes)
        self.budgets = PeerBudgets(self.topics, lambda device: False, Budget(1, 1))  # replaced by each "open"
        self.window = -1
        self._over: list[str] = []  # devices over budget, from the network thread
        self._over_lock = threading.Lock()
        self.pending: list[tuple] = []  # control messages that came while a claim waited for its verdict
        self.attempt: _Attempt | None = None
        self.buffers: UpdateBuffers | None = None
        self.buffer_shapes: tuple[tuple[int, ...], ...] = ()
        self.session = MqttSession(
            settings.broker_url, client_id=f"fedprune-aggregator-{settings.federation}-worker-{settings.worker_id}",
            subscriptions=[shared_updates_topic(self.topics)], on_message=self._on_message, admit=self._admit,
            max_payload_bytes=settings.max_payload_bytes, max_message_bytes=settings.max_message_bytes,
            # Clean: a killed worker's session (and its unacknowledged updates) goes with it; the
            # coordinator retries that attempt rather than wait for a redelivery.
            clean_session=True,
            reassembler=Reassembler(max(settings.max_message_bytes, settings.max_payload_bytes),
                                    max_pending_bytes=settings.max_inbox_bytes))

    # --- the network thread ---
    def _admit(self, topic: str, size: int) -> bool:
        return self.budgets.admit(topic, size)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload, time.monotonic()))

    def _over_budget(self, device: str) -> None:
        with self._over_lock:
            self._over.append(device)

    # --- the worker's own thread ---
    def run(self) -> None:
        self.session.start()
        # The broker handles one connection's packets in order: once this publish is acknowledged,
        # the shared subscription (sent on connecting) is in place, and no update is missed.
        ready = f"{self.topics.root}/aggregator-worker/{self.settings.worker_id}/ready"
        self.session.publish(ready, b"").wait_for_publish(30)
        self.conn.send(("started", self.settings.worker_id))
        try:
            while True:
                message = self.pending.pop(0) if self.pending else self._next_control()
                if message is not None and not self._control(message):
                    return
                self._report_over_budget()
                if self.attempt is not None:
                    self._take_one()
        finally:
            self.session.stop()

    def _next_control(self) -> tuple | None:
        """The next control message: waited for between attempts, polled during one."""
        if self.attempt is None or self.conn.poll(0):
            return self.conn.recv()
        return None

    def _control(self, message: tuple) -> bool:
        """Act on a control message; False to stop."""
        kind = message[0]
        if kind == "open":
            self._open(message[1])
        elif kind == "close":
            self._close(message[1], message[2])
        elif kind == "stop":
            return False
        else:
            log.warning("worker %d: unexpected %r from the coordinator, ignored", self.settings.worker_id, kind)
        return True

    def _open(self, spec: AttemptSpec) -> None:
        if spec.round != self.window:  # budgets are per round, as the coordinator's
            selected = frozenset(spec.selected)
            self.budgets = PeerBudgets(self.topics, selected.__contains__, spec.budget, self._over_budget)
            self.window = spec.round
        else:
            self.budgets.known = frozenset(spec.selected).__contains__
        if not spec.device_masks and (self.buffers is None or self.buffer_shapes != spec.shapes):
            # (new shapes after structured pruning)
            self.buffers, self.buffer_shapes = UpdateBuffers(spec.shapes, 1), spec.shapes
        self.attempt = _Attempt(spec, self.topics, None if spec.device_masks else self.buffers)
        self.attempt.partial = Partial(self.settings.worker_id, self.attempt.fold.running)
        self.conn.send(("ready", spec.round, spec.attempt))

    def _close(self, round_number: int, attempt: int) -> None:
        current = self.attempt
        if current is None or (current.spec.round, current.spec.attempt) != (round_number, attempt):
            log.warning("worker %d: asked to close round %d attempt %d, which is not open here",
                        self.settings.worker_id, round_number, attempt)
            self.conn.send(("partial", round_number, attempt, None))
            return
        self.attempt = None
        current.partial.inbox_dropped = self.inbox.take_drops()[0]
        self.conn.send(("partial", round_number, attempt, current.partial))

    def _report_over_budget(self) -> None:
        with self._over_lock:
            over, self._over = self._over, []
        if over:
            self.conn.send(("over budget", over))

    def _take_one(self) -> None:
        try:
            topic, data, _ = self.inbox.get(timeout=0.05)
        except queue.Empty:
            return
        current = self.attempt
        if _device_of(self.topics, topic) not in current.ctx.selected:
            return  # not selected for this attempt: the aggregator alone would not have heard it
        partial = current.partial
        t = time.perf_counter()
        got = check_update(current.ctx, topic, data, (), current.fold.row(0))
        partial.decode_s += time.perf_counter() - t
        if isinstance(got, Rejection):
            self.conn.send(("reject", topic, got, len(data)))
            return
        digest = hashlib.blake2b(data, digest_size=16).digest()
        kept = dataclasses.replace(got, delta=[])  # what the round's record keeps; the tensors stay here
        self.conn.send(("claim", current.ctx.round, current.ctx.attempt, kept, digest, len(data)))
        if self._verdict() == "fold":
            t = time.perf_counter()
            current.fold.take(got)
            partial.fold_s += time.perf_counter() - t
            partial.folded.append(got.device_id)

    def _verdict(self) -> str:
        """Wait for the coordinator's answer to a claim; other control messages wait their turn."""
        while True:
            message = self.conn.recv()
            if message[0] == "verdict":
                return message[1]
            self.pending.append(message)


def _device_of(topics: Topics, topic: str) -> str:
    try:
        return topics.device_from_topic(topic)
    except ValueError:
        return ""


def run_worker(settings: WorkerSettings, conn: Any, log_level: int = logging.WARNING) -> None:
    """A worker process's entry point (``multiprocessing`` target)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker-{settings.worker_id} %(levelname)s %(message)s")
    try:
        Worker(settings, conn).run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the coordinator is gone or stopping: nothing to hand in

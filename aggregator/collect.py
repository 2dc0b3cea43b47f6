"""Sending a round's task and collecting the updates of one attempt.

``publish_round`` sends the task to every selected device (retained, so a device that reconnects
still gets it) and announces the round; an ``AttemptCollector`` then takes the updates as they
arrive, each checked and decoded by ``intake.check_update``, acknowledges each accepted one (and
the first rejected one of a device in a round: a peer that sends a thousand bad messages gets one
answer, not a thousand), and closes the attempt when every selected device has reported, when
every device still due has gone offline, or at the deadline. It counts what became of the
selected devices: reported, rejected, offline (went offline during the attempt) or lost (online
all along, but sent nothing by the deadline).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from fedprune.aggregator.device_publisher import DevicePublisher
from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.intake import Rejection, RoundContext, check_update
from fedprune.aggregator.registry import DeviceRegistry
from fedprune.aggregator.round_fold import RoundFold
from fedprune.aggregator.strategies.base import ClientResult
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.pruning.masks import Masks
from fedprune.converters.log_rate import worth_logging
from fedprune.converters.protocol import Ack, RoundAnnouncement, Topics, TrainTask
from fedprune.converters.text import one_line
from fedprune.task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundProgress:
    """Where the open round stands (for progress displays): selected devices that reported or
    whose update was rejected so far."""

    round: int
    attempt: int
    selected: int
    reported: int
    rejected: int
    # The update this report follows (none before the first): whose, its size, why it was refused.
    device_id: str = ""
    update_bytes: int = 0
    refused: str = ""


@dataclass
class Collected:
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
    failures: dict[str, str] = field(default_factory=dict)  # device -> the failure it reported
    redelivered: int = 0  # byte-identical copies of updates already accepted (QoS 1 delivers at least once)
    fold_s: float = 0.0  # folding the updates into the running sums as they came
    fold: RoundFold | None = None  # the attempt's aggregation: fold.weights(results) is the new model

    def add(self, other: Collected) -> None:
        for name in ("bytes_down", "bytes_up", "received", "offline", "lost", "encode_s", "decode_s", "redelivered",
                     "fold_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)

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


@dataclass
class Gathered:
    """A round's updates once a quorum reported: its last attempt, and sums over all attempts."""

    attempt: int
    selected: list[str]
    population: int  # devices online when the last attempt's devices were drawn
    last: Collected
    totals: Collected
    rejections: dict[str, int]  # rejected updates by kind, over all attempts


@dataclass(frozen=True)
class DeviceLink:
    """What collecting updates reads and writes: the aggregator's way to devices (signed), the
    federation's topics, the device registry, and the queue the network thread puts update
    messages in as ``(topic, payload, time.monotonic() of arrival)``."""

    publisher: DevicePublisher
    topics: Topics
    registry: DeviceRegistry
    inbox: BoundedInbox
    ignored: Callable[[str], bool] = lambda device: False  # a device over its budget for the round


def training_settings(task: Task, round_number: int) -> dict[str, Any]:
    """The task's ``training`` object for a round (its learning rate on the schedule); with
    privacy.clip_on_device, the norm devices clip to."""
    training = task.training
    settings = asdict(training)
    settings.pop("final_learning_rate")
    settings.pop("decay_begin_round")
    settings["learning_rate"] = training.learning_rate_at(round_number, task.federation.rounds)
    if task.privacy.enabled and task.privacy.clip_on_device:
        settings["clip_norm"] = task.privacy.clip_norm
    return settings


def train_task(task: Task, round_number: int, attempt: int, architecture_digest: str, weights: list[np.ndarray],
               masks: Masks, session: str, *, device_sparsity: float | None,
               gradient_fraction: float | None, issued_us: int | None = None) -> TrainTask:
    """What the selected devices are sent for an attempt: the global model and how to train it
    and send the update, as the task's ``[training]`` and ``[transport]`` say."""
    transport = task.transport
    return TrainTask(
        round=round_number, attempt=attempt, architecture_digest=architecture_digest, weights=weights, masks=masks,
        training=training_settings(task, round_number), uplink_precision=transport.uplink_precision,
        deadline_s=task.federation.round_timeout_s, downlink_precision=transport.downlink_precision,
        session=session, update_content=transport.update, error_feedback=transport.error_feedback,
        stochastic_rounding=transport.stochastic_rounding, compression=transport.compression,
        device_sparsity=device_sparsity, gradient_fraction=gradient_fraction,
        uplink_sparsifier=transport.sparsifier_config() if device_sparsity is None else None,
        issued_us=issued_us,
    )


#: the most bytes of a round's tasks published and not yet acknowledged by the broker (``publish_round``)
TASKS_IN_FLIGHT_BYTES = 32 * 2**20


def publish_round(link: DeviceLink, ctx: RoundContext, payloads: Mapping[str, bytes], timeout_s: float,
                  name_devices: bool) -> float:
    """Send each selected device its task (``payloads``, by device) and announce the attempt
    (naming the devices only with ``name_devices``: under DP who was drawn stays between each
    device and the aggregator). Returns when the first task went out (``time.monotonic()``): the
    round's clock starts there, as devices may train while later tasks wait for room.

    At most ``TASKS_IN_FLIGHT_BYTES`` of tasks wait for the broker's acknowledgement at a time:
    each device's task is signed for its own topic, so a round's tasks are as many copies of the
    model, and with the outbox bounded only by count, a thousand dense digits tasks (0.6 MB each)
    held the aggregator 80-180 MB above its size at a hundred a round (bench_fleet.py)."""
    pending: deque[tuple[Any, int]] = deque()
    started = time.monotonic()
    in_flight, deadline = 0, started + timeout_s
    for device_id in ctx.selected:
        info = link.publisher.publish(link.topics.task(device_id), payloads[device_id], retain=True)
        pending.append((info, len(payloads[device_id])))
        in_flight += len(payloads[device_id])
        while in_flight > TASKS_IN_FLIGHT_BYTES:
            oldest, size = pending.popleft()
            in_flight -= size
            try:  # a broker that does not answer: the round's deadline, not this loop, decides
                oldest.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
    announcement = RoundAnnouncement(ctx.round, ctx.attempt, list(ctx.selected) if name_devices else [],
                                     time.time() + timeout_s)
    link.publisher.publish(link.topics.round, announcement.encode(), retain=True)
    return started


class AttemptCollector:
    """Collects one attempt's updates (``collect``); ``rejections`` counts rejected updates by
    kind, and ``rejection_acked`` holds the devices whose rejection was acknowledged: both are
    shared by the attempts of a round. ``fold`` takes each accepted update (into the strategy's
    running sums, or kept); reserved ``UpdateBuffers`` alone keep every update."""

    def __init__(self, link: DeviceLink, ctx: RoundContext, rejections: dict[str, int],
                 fold: RoundFold | UpdateBuffers | None = None,
                 on_progress: Callable[[RoundProgress], None] | None = None,
                 rejection_acked: set[str] | None = None) -> None:
        self.link, self.ctx, self.rejections = link, ctx, rejections
        self.rejection_acked = set() if rejection_acked is None else rejection_acked
        self.fold = fold if isinstance(fold, RoundFold) else RoundFold(None, ctx.global_weights, ctx.masks, fold)
        self.on_progress = on_progress
        self.results: dict[str, ClientResult] = {}
        self.waiting = set(ctx.selected)
        self.rejected_due: set[str] = set()  # due devices with an update rejected (maybe forged)
        self.accepted_digests: dict[str, bytes] = {}  # device -> digest of its accepted update's bytes
        self.out = Collected()

    def collect(self, published: float, deadline: float) -> Collected:
        """Take updates until every selected device reported, every device still due is offline,
        or ``deadline`` (``time.monotonic()``); the tasks were sent at ``published``."""
        r, registry = self.ctx.round, self.link.registry
        self._progress()
        while self.waiting and time.monotonic() < deadline:
            self._forget_ignored()
            if not self.waiting:
                break
            if not any(registry.is_online(d) for d in self.waiting):
                log.warning("round %d: every device still due (%s) is offline; closing early", r, sorted(self.waiting))
                break
            try:
                topic, data, arrived = self.link.inbox.get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            self._take(topic, data, arrived - published)
        return self._close(published)

    def _forget_ignored(self) -> None:
        """A selected device over its budget is ignored for the rest of the round: not waited for
        (counted once, as the round's ``over budget``)."""
        over = {d for d in self.waiting if self.link.ignored(d)}
        if over:
            self.waiting -= over
            self.rejected_due |= over

    def _take(self, topic: str, data: bytes, path_s: float) -> None:
        self.out.bytes_up += len(data)
        self.out.received += 1
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in self.accepted_digests.values() and self._redelivered(topic, digest):
            return
        t = time.perf_counter()
        # A row of the reserved buffers: the same one for every update when the strategy streams.
        got = check_update(self.ctx, topic, data, self.results, self.fold.row(len(self.results)))
        self.out.decode_s += time.perf_counter() - t
        if not isinstance(got, Rejection):
            t = time.perf_counter()
            got = self.fold.take(got)  # folded into the running sums (streaming), or kept
            self.out.fold_s += time.perf_counter() - t
        if isinstance(got, Rejection):
            self._reject(topic, got)
        else:
            self.results[got.device_id] = got
            self.accepted_digests[got.device_id] = digest
            self.out.paths[got.device_id] = path_s
            self.waiting.discard(got.device_id)
            self._ack(Ack(self.ctx.round, got.device_id, True))
        refused = got.reason if isinstance(got, Rejection) else ""
        self._progress(got.device_id, len(data), refused)

    def _redelivered(self, topic: str, digest: bytes) -> bool:
        """Whether the update is a byte-identical copy of one this attempt accepted from the same
        device (a redelivery, or a device answering a resumed aggregator again): dropped, counted
        apart from rejections."""
        try:
            device_id = self.ctx.topics.device_from_topic(topic)
        except ValueError:
            return False
        if self.accepted_digests.get(device_id) != digest:
            return False
        self.out.redelivered += 1
        log.info("round %d: %s sent its accepted update again; the copy is dropped", self.ctx.round, device_id)
        return True

    def _reject(self, topic: str, rejection: Rejection) -> None:
        count = self.rejections[rejection.kind] = self.rejections.get(rejection.kind, 0) + 1
        if worth_logging(count):  # the reason is one line of bounded length (intake.Rejection)
            log.warning("round %d: rejected update on %s: %s (%d %r so far this round)", self.ctx.round,
                        one_line(topic), rejection.reason, count, rejection.kind)
        if rejection.device_id and rejection.device_id not in self.rejection_acked:
            self.rejection_acked.add(rejection.device_id)
            self._ack(Ack(self.ctx.round, rejection.device_id, False, rejection.reason))
        if rejection.device_id in self.waiting and rejection.kind == "device error":
            # The device itself says it cannot train this round: its slot closes now, not at the deadline.
            self.waiting.discard(rejection.device_id)
            self.out.failures[rejection.device_id] = rejection.reason.removeprefix("device error: ")
        elif rejection.device_id in self.waiting:  # it stays due: a valid update may still come
            self.rejected_due.add(rejection.device_id)

    def _close(self, published: float) -> Collected:
        """Clear the retained tasks (the attempt is closed) and count who did not report."""
        for device_id in self.ctx.selected:
            self.link.publisher.clear(self.link.topics.task(device_id))
            # A device that answered decoded the task: it holds its masks (values-only next time).
            answered = device_id in self.results or device_id in self.out.failures
            self.link.registry.holds_masks(device_id, self.ctx.layout.digest if answered else "")
        self.out.results = sorted(self.results.values(), key=lambda r: r.device_id)  # not arrival order
        self.out.fold = self.fold
        dropped = {d for d in self.waiting if self.link.registry.went_offline_since(d, published)}
        lost = self.waiting - dropped - self.rejected_due  # the rejected ones are counted in `rejections`
        self.out.offline, self.out.lost = len(dropped), len(lost)
        if lost:
            log.warning("round %d attempt %d: %d selected device(s), online all round, sent no update by the "
                        "deadline: %s", self.ctx.round, self.ctx.attempt, len(lost), sorted(lost)[:20])
        return self.out

    def _ack(self, ack: Ack) -> None:
        """Acknowledgements are informational: with the outbox full, one is dropped, not waited for."""
        self.link.publisher.publish(self.link.topics.ack(ack.device_id), ack.encode(), best_effort=True)

    def _progress(self, device_id: str = "", update_bytes: int = 0, refused: str = "") -> None:
        """Tell ``on_progress`` how many selected devices have reported, or had an update rejected
        (or reported a failure), and which update came in last."""
        if self.on_progress:
            rejected = len((self.rejected_due | set(self.out.failures)) - set(self.results))
            self.on_progress(RoundProgress(self.ctx.round, self.ctx.attempt, len(self.ctx.selected),
                                           len(self.results), rejected, device_id, update_bytes, refused))

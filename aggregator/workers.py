"""Aggregation workers, the coordinator's side: ``fedprune-aggregator --workers N``.

N worker processes (``worker_process``) take the round's updates from the broker through a
shared subscription, check, decode and fold them; the aggregator (the coordinator) keeps the
round: it decides which device's update counts (a worker claims a device before folding it:
claim before fold, so nothing is folded twice), counts rejections and duplicates once across
workers, acknowledges devices, closes the attempt on quorum or deadline as without workers, and
merges the workers' partial sums in worker-id order. The compensated sums add exactly (to about
2^-100), so the new global weights equal one process's.

Coordination runs over one ``multiprocessing`` pipe per worker, not the broker: the workers are
the aggregator's own children on its host, the pipe is private to them (nothing to sign, no topic
another client could publish on), and a claim's round trip is tens of microseconds. A worker on
another host is not built.

A worker that dies (or hangs) during an attempt: its partial sums are lost with it, and a device
it had folded cannot be taken out of anyone's sum, so the coordinator drops the whole attempt
(its accepted devices count as lost), starts the worker again, and retries the round through the
usual retry path: nothing is counted twice, and the devices train again in the new attempt.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from multiprocessing.connection import wait
from typing import Any, Callable

from fedprune.aggregator.channel import task_budget
from fedprune.aggregator.collect import AttemptCollector, Collected, DeviceLink, RoundProgress
from fedprune.aggregator.intake import Rejection, RoundContext
from fedprune.aggregator.peer_budgets import Budget
from fedprune.aggregator.round_fold import RoundFold
from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.run_folder import FederationError
from fedprune.aggregator.worker_process import AttemptSpec, Partial, WorkerSettings, run_worker
from fedprune.converters.protocol import Ack, Architecture
from fedprune.converters.quantize import value_section_size
from fedprune.task import Task

__all__ = ["WorkerCollector", "WorkerPool", "worker_pool", "workers_refusal"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a spawned worker imports numpy and the codecs, then connects
READY_TIMEOUT_S = 60.0
PARTIAL_TIMEOUT_S = 60.0
# Rejections a single process decides before it looks at whether the device already reported
# (``intake._header_problem``'s order); any other rejection of a device already accepted is a duplicate.
BEFORE_DUPLICATE = ("bad topic", "unknown device", "wrong round", "not selected")


def workers_refusal(strategy: Strategy, task: Task, architecture: Architecture | None = None) -> str | None:
    """Why ``--workers`` cannot run ``task`` with ``strategy`` (None: it can). ``architecture``:
    the model, to check its updates go in one MQTT message each."""
    import numpy as np

    if strategy.running([np.zeros(1, np.float32)], [None]) is None:
        return (f"--workers needs a strategy that streams (fedavg, dp_fedavg, norm_clipping around fedavg, "
                f"device_mask_averaging); {strategy.strategy_name} needs every update of a round in one process: "
                "run without --workers")
    if architecture is not None:
        dense = dense_update_bytes(architecture, task)
        if dense > task.transport.max_payload_bytes:
            # The broker hands each message of a shared subscription to one worker: the chunks of
            # one update could reach two, and neither could put it back together.
            return (f"--workers needs every update in one MQTT message, but this model's dense "
                    f"{task.transport.uplink_precision} updates take about {dense} bytes, over "
                    f"transport.max_payload_bytes ({task.transport.max_payload_bytes}); raise it to at least {dense} "
                    "(and the broker's message size limit) or run without --workers")
    return None


def dense_update_bytes(architecture: Architecture, task: Task) -> int:
    """About the most bytes one of this task's updates takes: every value at the task's uplink
    precision, its masks as bitmaps, twice that with regrowth (a gradient report), and 64 kB for
    headers and metrics. An estimate (``largest_update_bytes``, every precision and a gradient
    section always, is 3x too strict for the digits CNN at int8)."""
    counts = [math.prod(s) for s in architecture.shapes]
    values = sum(value_section_size(n, task.transport.uplink_precision) + (n + 7) // 8 for n in counts)
    return (2 if task.pruning.regrowth > 0 else 1) * values + 65536


def worker_pool(count: int, broker_url: str, task: Task, strategy: Strategy,
                architecture: Architecture) -> WorkerPool | None:
    """The pool of ``count`` workers for this federation (None for 0), started at the first
    attempt; FederationError saying why when ``task`` cannot run with workers."""
    if not count:
        return None
    refusal = workers_refusal(strategy, task, architecture)
    if refusal:
        raise FederationError(refusal)
    return WorkerPool(count, broker_url, task, task_budget(task, architecture.names, architecture.shapes))


class WorkerHandle:
    """One worker process and the coordinator's end of its pipe."""

    def __init__(self, worker_id: int, settings: WorkerSettings, log_level: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # the aggregator holds TensorFlow and threads: never fork
        self.worker_id = worker_id
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=run_worker, args=(settings, child, log_level),
                                   name=f"fedprune-aggregation-worker-{worker_id}", daemon=True)
        self.process.start()
        child.close()

    def expect(self, kind: str, timeout_s: float) -> tuple:
        """The next message, which must be of ``kind``; ConnectionError if the worker died or took too long."""
        if not self.conn.poll(timeout_s):
            raise ConnectionError(f"aggregation worker {self.worker_id} sent no {kind!r} within {timeout_s:.0f} s")
        message = self.conn.recv()
        if message[0] != kind:
            raise ConnectionError(f"aggregation worker {self.worker_id} sent {message[0]!r}, expected {kind!r}")
        return message

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class WorkerPool:
    """The aggregator's N workers: started with ``start``, each attempt opened on all of them
    (``open_attempt``, which starts again any that died), stopped with ``stop``."""

    def __init__(self, count: int, broker_url: str, task: Task, budget: Budget) -> None:
        """``budget``: what one device may send per round (each worker holds it to this)."""
        if count < 1:
            raise ValueError(f"--workers must be at least 1, got {count}")
        transport = task.transport
        self.settings = [WorkerSettings(i, broker_url, task.federation.id, transport.max_payload_bytes,
                                        transport.max_message_bytes, transport.max_inbox_bytes) for i in range(count)]
        self.budget = budget
        self.workers: list[WorkerHandle] = []
        self.over_budget: dict[int, set[str]] = {}  # round -> devices over budget at any worker
        self.log_level = logging.getLogger("fedprune").getEffectiveLevel()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def start(self) -> None:
        self.workers = [WorkerHandle(s.worker_id, s, self.log_level) for s in self.settings]
        for worker in self.workers:
            self._started(worker)
        log.info("%d aggregation workers connected", len(self.workers))

    def _started(self, worker: WorkerHandle) -> None:
        try:
            worker.expect("started", START_TIMEOUT_S)
        except (ConnectionError, EOFError) as e:
            worker.process.join(1)
            why = str(e) or f"aggregation worker {worker.worker_id} exited (code {worker.process.exitcode})"
            raise ConnectionError(f"{why} before it connected to the broker: see its log lines above; it connects "
                                  "with the aggregator's broker URL") from None

    def open_attempt(self, spec: AttemptSpec) -> None:
        """Open ``spec`` on every worker (started on the first call) and wait until each is ready;
        a worker that died, or does not answer, is started again."""
        if not self.workers:
            self.start()
        for i, worker in enumerate(self.workers):
            if not worker.process.is_alive():
                log.warning("aggregation worker %d is gone (exit code %s); starting it again", worker.worker_id,
                            worker.process.exitcode)
                self._replace(i)
        for worker in self.workers:
            worker.conn.send(("open", spec))
        for i, worker in enumerate(self.workers):
            if not self._ready(worker):
                log.warning("aggregation worker %d did not get ready for round %d attempt %d; starting it again",
                            worker.worker_id, spec.round, spec.attempt)
                self._replace(i).conn.send(("open", spec))
                if not self._ready(self.workers[i]):
                    raise ConnectionError(f"aggregation worker {worker.worker_id} started again but did not get "
                                          f"ready within {READY_TIMEOUT_S:.0f} s; is the broker reachable?")

    def _replace(self, i: int) -> WorkerHandle:
        self.workers[i].stop()
        worker = self.workers[i] = WorkerHandle(self.settings[i].worker_id, self.settings[i], self.log_level)
        self._started(worker)
        return worker

    @staticmethod
    def _ready(worker: WorkerHandle) -> bool:
        """Whether ``worker`` says it is ready within ``READY_TIMEOUT_S``. What an attempt that was
        given up on left in the pipe is dropped on the way (a claim: answered "drop")."""
        until = time.monotonic() + READY_TIMEOUT_S
        try:
            while worker.conn.poll(max(0.0, until - time.monotonic())):
                message = worker.conn.recv()
                if message[0] == "ready":
                    return True
                if message[0] == "claim":
                    worker.conn.send(("verdict", "drop"))
        except (EOFError, OSError):
            pass
        return False

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def collector(self, link: DeviceLink, ctx: RoundContext, rejections: dict[str, int], fold: RoundFold,
                  on_progress: Callable[[RoundProgress], None] | None = None,
                  rejection_acked: set[str] | None = None) -> WorkerCollector:
        """A ``WorkerCollector`` for one attempt (``AttemptCollector``'s arguments); the attempt is
        open on every worker when this returns, so the tasks may go out."""
        return WorkerCollector(self, link, ctx, rejections, fold, on_progress, rejection_acked)


def attempt_spec(ctx: RoundContext, strategy: Strategy, budget: Budget) -> AttemptSpec:
    return AttemptSpec(ctx.round, ctx.attempt, tuple(ctx.selected), tuple(tuple(s) for s in ctx.shapes), ctx.masks,
                       tuple(ctx.names), ctx.max_message_bytes, ctx.uplink_precision, ctx.device_masks,
                       list(ctx.global_weights), strategy, budget)


class WorkerCollector(AttemptCollector):
    """An ``AttemptCollector`` whose updates the workers check, decode and fold: it opens the
    attempt on the workers when made (before the tasks go out), answers their claims, counts
    their rejections, and at the close merges their partial sums into ``fold``."""

    def __init__(self, pool: WorkerPool, link: DeviceLink, ctx: RoundContext,
                 rejections: dict[str, int], fold: RoundFold,
                 on_progress: Callable[[RoundProgress], None] | None = None,
                 rejection_acked: set[str] | None = None) -> None:
        super().__init__(link, ctx, rejections, fold, on_progress, rejection_acked)
        self.pool = pool
        self.granted: dict[int, set[str]] = {s.worker_id: set() for s in pool.settings}
        self.failed: str = ""  # why the attempt cannot be aggregated (a worker died)
        self.published = time.monotonic()
        self.dead: set[int] = set()
        pool.open_attempt(attempt_spec(ctx, fold.strategy, pool.budget))

    def collect(self, published: float, deadline: float) -> Collected:
        self.published = published
        r, registry = self.ctx.round, self.link.registry
        self._progress()
        while self.waiting and time.monotonic() < deadline and not self.failed:
            if not any(registry.is_online(d) for d in self.waiting):
                log.warning("round %d: every device still due (%s) is offline; closing early", r, sorted(self.waiting))
                break
            self._serve(min(0.5, max(0.0, deadline - time.monotonic())))
        partials = self._partials()
        if self.failed:
            return self._abandon()
        for partial in partials:  # in worker-id order: the same sums whichever worker took what
            self.fold.running.merge(partial.running)
            self.out.decode_s += partial.decode_s
            self.out.fold_s += partial.fold_s
        return self._close(published)

    def _serve(self, timeout_s: float, closing: bool = False) -> list[tuple[int, Any]]:
        """Answer what the workers sent within ``timeout_s``; the partials among it."""
        live = [w for w in self.pool.workers if w.worker_id not in self.dead]
        by_conn = {w.conn: w for w in live}
        by_sentinel = {w.process.sentinel: w for w in live}
        partials = []
        if not live:
            time.sleep(timeout_s)
            return partials
        for ready in wait([*by_conn, *by_sentinel], timeout_s):
            worker = by_conn.get(ready) or by_sentinel[ready]
            if worker.worker_id in self.dead:
                continue
            try:
                if ready not in by_conn and worker.conn.poll(0):
                    continue  # it exited, but what it sent first is read first
                message = worker.conn.recv() if ready in by_conn else None
            except (EOFError, OSError):
                message = None
            if message is None:
                self.dead.add(worker.worker_id)
                self.failed = self.failed or f"aggregation worker {worker.worker_id} died"
                continue
            if message[0] == "partial":
                if tuple(message[1:3]) == (self.ctx.round, self.ctx.attempt):  # not a given-up attempt's
                    partials.append((worker.worker_id, message[3]))
            else:
                self._handle(worker, message, closing)
        return partials

    def _handle(self, worker, message: tuple, closing: bool) -> None:
        kind = message[0]
        if kind == "claim":
            _, r, attempt, result, digest, size = message
            open_here = (r, attempt) == (self.ctx.round, self.ctx.attempt) and not closing
            verdict = self._claim(worker.worker_id, result, digest, size, open_here)
            worker.conn.send(("verdict", verdict))
        elif kind == "reject":
            _, topic, rejection, size = message
            self._count_in(size)
            if rejection.device_id in self.results and rejection.kind not in BEFORE_DUPLICATE:
                rejection = Rejection(f"duplicate: {rejection.device_id} already reported round {self.ctx.round}",
                                      rejection.device_id)
            self._reject(topic, rejection)
            self._progress(rejection.device_id, size, rejection.reason)
        elif kind == "over budget":
            over = set(message[1])
            self.pool.over_budget.setdefault(self.ctx.round, set()).update(over)
            self.rejections["over budget"] = len(self.pool.over_budget[self.ctx.round])
            self.rejected_due |= over & self.waiting
            self.waiting -= over
        else:
            log.warning("aggregation worker %d sent %r, ignored", worker.worker_id, kind)

    def _count_in(self, size: int) -> None:
        self.out.bytes_up += size
        self.out.received += 1

    def _claim(self, worker_id: int, result: ClientResult, digest: bytes, size: int, open_here: bool) -> str:
        """Whether ``worker_id`` may fold ``result``'s update ("fold") or must drop it ("drop"),
        and the same bookkeeping ``AttemptCollector._take`` does for an update in one process."""
        self._count_in(size)
        device = result.device_id
        if not open_here:  # came after the close: too late for this attempt, as in one process
            self._reject(self.ctx.topics.update(device), Rejection(
                f"wrong round: update for round {self.ctx.round} attempt {self.ctx.attempt} came after it closed",
                device))
            return "drop"
        if device in self.accepted_digests:
            if self.accepted_digests[device] == digest:
                self.out.redelivered += 1
                log.info("round %d: %s sent its accepted update again; the copy is dropped", self.ctx.round, device)
            else:
                self._reject(self.ctx.topics.update(device),
                             Rejection(f"duplicate: {device} already reported round {self.ctx.round}", device))
            return "drop"
        self.results[device] = result
        self.accepted_digests[device] = digest
        self.out.paths[device] = time.monotonic() - self.published
        self.waiting.discard(device)
        self.granted[worker_id].add(device)
        self._ack(Ack(self.ctx.round, device, True))
        self._progress(device, size, "")
        return "fold"

    def _partials(self) -> list[Partial]:
        """Close the attempt on every worker and take their partial sums, sorted by worker id;
        sets ``failed`` when one is missing or does not hold what it was granted."""
        for worker in self.pool.workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send(("close", self.ctx.round, self.ctx.attempt))
                except OSError:
                    pass
        got: dict[int, Any] = {}
        until = time.monotonic() + PARTIAL_TIMEOUT_S
        while {w.worker_id for w in self.pool.workers} - self.dead - set(got) and time.monotonic() < until:
            got.update(self._serve(min(0.5, until - time.monotonic()), closing=True))
        dropped = sum(p.inbox_dropped for p in got.values() if p is not None)
        if dropped:  # counted as the coordinator's own full inbox is (``DeviceChannel.count_dropped``)
            self.rejections["inbox full"] = self.rejections.get("inbox full", 0) + dropped
            log.warning("round %d: the aggregation workers' inboxes were full: dropped %d update(s)", self.ctx.round,
                        dropped)
        out = []
        for worker_id in sorted(self.granted):
            partial = got.get(worker_id)
            if partial is None or set(partial.folded) != self.granted[worker_id]:
                self.failed = self.failed or f"aggregation worker {worker_id} handed in no partial sums"
                continue
            out.append(partial)
        return out

    def _abandon(self) -> Collected:
        """The attempt cannot be aggregated: its accepted updates count as lost, none as reported,
        so the round retries (the devices train again) instead of counting anything twice."""
        accepted = set(self.results)
        log.warning("round %d attempt %d: %s; its partial sums are lost, so the %d update(s) accepted in this "
                    "attempt are dropped and the attempt is retried", self.ctx.round, self.ctx.attempt, self.failed,
                    len(accepted))
        self.waiting |= accepted
        self.results.clear()
        return self._close(self.published)

"""One simulated device: a ``DeviceSession`` on its own asyncio MQTT connection, training on the
process's shared trainer, with its profile's speed, availability and links.

Time is real: link delays and the extra training time of a slower device are slept (without
holding the trainer), so updates reach the aggregator when such a fleet's would. What is an
artefact of simulating on one host is reported, not hidden: each update's metrics carry
``sim_wait_s``, the time the device spent waiting for the shared trainer or for a thread of the
shared pool that decodes tasks (plus, for a device faster than this host, the training time it
would not have needed), and ``compute_s``, its
emulated training time (measured ``train_s`` times the profile's ``speed``; absent at speed 1, where
it is ``train_s``, as the aggregator reads it). The aggregator
subtracts ``sim_wait_s`` to give the round time of a fleet whose devices each have a processor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from fedprune.converters.protocol import Architecture, TrainTask
from fedprune.edge_agent.device import (DeviceSession, Outgoing, Trainer, TrainJob, TrainResult, prepare_trainer,
                                        run_job)
from fedprune.simulation.fleet.connection import AsyncConnection, MqttError
from fedprune.simulation.fleet.profiles import DeviceBehaviour
from fedprune.simulation.fleet.shared_tasks import SharedTasks
from fedprune.transport import PayloadTooLarge

log = logging.getLogger(__name__)

_RECONNECT_MAX_S = 30.0


_TRAIN_STREAM = 7  # seed-sequence tag of a device's training (profiles.py tags its other streams)


class _TimedTrainer:
    """The shared trainer as one device sees it: adds its emulated compute time and the time it
    waited for the trainer (and, before, ``waited_s`` for other shared resources) to the result's
    metrics."""

    def __init__(self, shared: Trainer, speed: float, enqueued: float, waited_s: float = 0.0,
                 seed_key: tuple[int, ...] = ()) -> None:
        self.shared, self.speed, self.enqueued, self.waited_s = shared, speed, enqueued, waited_s
        self.seed_key = seed_key  # (task seed, device index): with the round, the seed of its training
        self.extra_s = 0.0  # what to sleep after training: a slower device is not done yet
        self.train_s = 0.0  # this host's training time (the simulator's efficiency: its share of a round)

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray) -> TrainResult:
        # Seeded by device and round, not by the order the shared trainer took the devices in.
        if self.seed_key:
            key = [*self.seed_key, _TRAIN_STREAM, task.round, task.attempt]
            result = self.shared.train(architecture, task, x, y,
                                       seed=int(np.random.SeedSequence(key).generate_state(1)[0]))
        else:
            result = self.shared.train(architecture, task, x, y)
        real = time.perf_counter() - self.enqueued  # queued + trained
        train_s = float(result.metrics.get("train_s", real))
        self.train_s = train_s
        compute_s = train_s * self.speed
        self.extra_s = max(0.0, compute_s - train_s)
        if compute_s != train_s:  # at speed 1 the aggregator takes train_s for it: 5 bytes an update saved
            result.metrics["compute_s"] = compute_s
        result.metrics["sim_wait_s"] = self.waited_s + max(0.0, real - train_s) + max(0.0, train_s - compute_s)
        return result


@dataclass
class DeviceStats:
    connects: int = 0
    updates_sent: int = 0
    dropouts: int = 0
    link_delay_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    train_s_by_round: dict[int, float] = field(default_factory=dict)  # this host's training time


class SimulatedDevice:
    """Lives in a fleet's event loop: ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        session: DeviceSession,
        behaviour: DeviceBehaviour,
        x: np.ndarray,
        y: np.ndarray,
        *,
        broker_url: str,
        federation: str,
        trainer: Trainer,
        executor: Executor,
        tasks: SharedTasks,
        connect_slots: asyncio.Semaphore,
        max_payload_bytes: int,
        rejoin_s: float,
    ) -> None:
        self.session = session
        self.behaviour = behaviour
        self.x, self.y = x, y
        self.trainer = trainer
        self.executor = executor
        self.tasks = tasks
        self.connect_slots = connect_slots
        self.rejoin_s = rejoin_s
        self.stats = DeviceStats()
        self.connected = asyncio.Event()
        self._rng = behaviour.link_rng()
        self._drop = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()
        self._conn: AsyncConnection | None = None
        will = session.presence(online=False)
        self._connection_args = dict(
            broker_url=broker_url, client_id=f"fedprune-{federation}-{session.device_id}",
            subscriptions=session.subscriptions, will=(will.topic, will.payload, will.retain),
            max_payload_bytes=max_payload_bytes, max_message_bytes=session.max_message_bytes,
        )

    @property
    def device_id(self) -> str:
        return self.session.device_id

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected (reconnecting with backoff) until ``stop``; go offline on a dropout."""
        backoff = 1.0
        while not stop.is_set():
            try:
                async with self.connect_slots:
                    conn = await AsyncConnection(**self._connection_args).__aenter__()
                self._conn = conn
                try:
                    await self._publish(self.session.presence(online=True))
                    self.stats.connects += 1
                    self.connected.set()
                    backoff = 1.0
                    await self._serve(conn, stop)
                    if stop.is_set():
                        await self._publish(self.session.presence(online=False))
                finally:
                    self.connected.clear()
                    self._conn = None
                    await conn.__aexit__(None, None, None)
            except MqttError as e:
                if stop.is_set():
                    break
                log.info("%s: connection lost (%s); reconnecting in %.0f s", self.device_id, e, backoff)
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX_S)
                continue
            if self._drop.is_set():  # dropped out mid-round: offline for a while, then back
                self._drop.clear()
                await _sleep_unless(stop, self.rejoin_s)
        for job in list(self._jobs):
            job.cancel()

    async def _serve(self, conn: AsyncConnection, stop: asyncio.Event) -> None:
        """Hand messages to the session until stop, a dropout, or a lost connection."""
        reader = asyncio.ensure_future(self._read(conn))
        stopper = asyncio.ensure_future(_first(stop, self._drop))
        try:
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # re-raise a lost connection
        finally:
            for t in (reader, stopper):
                t.cancel()

    async def _read(self, conn: AsyncConnection) -> None:
        async for topic, payload in conn.messages():
            job = self.session.receive(topic, self.tasks.intern(payload))
            if isinstance(job, Outgoing):  # a task it answered came again: the same update again
                t = asyncio.ensure_future(self._publish(job))
                self._jobs.add(t)
                t.add_done_callback(self._jobs.discard)
            elif isinstance(job, TrainJob):  # (a simulated device receives no final model: it installs none)
                t = asyncio.ensure_future(self._train(job))
                self._jobs.add(t)
                t.add_done_callback(self._jobs.discard)
            elif topic == self.session.topics.architecture and self.session.architecture is not None:
                # As a real device would, on the training thread (a cache hit for all but the first).
                asyncio.get_running_loop().run_in_executor(
                    self.executor, prepare_trainer, self.trainer, self.session.architecture)

    async def _train(self, job: TrainJob) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._link_sleep(self.behaviour.downlink.delay_s(len(job.payload), self._rng))
            # A real device decodes its task at once; here a hundred share a few threads (and one
            # decoding of the bytes they all got), and the wait for a thread is the simulator's,
            # as the wait for the shared trainer is.
            submitted = time.perf_counter()
            started, task = await loop.run_in_executor(None, _started_and, self.tasks.decode, self.session, job)
            if task is None:
                return
            if self.behaviour.drops_out(task.round, task.attempt):
                log.info("%s: drops out of round %d", self.device_id, task.round)
                self.stats.dropouts += 1
                await self._publish(self.session.presence(online=False))
                self._drop.set()
                return
            timed = _TimedTrainer(self.trainer, self.behaviour.profile.speed, time.perf_counter(),
                                  waited_s=started - submitted, seed_key=(self.behaviour.seed, self.behaviour.index))
            message = await loop.run_in_executor(self.executor, run_job, self.session, job, timed, self.x, self.y)
            if message is None:
                return
            self.stats.train_s_by_round[task.round] = self.stats.train_s_by_round.get(task.round, 0.0) + timed.train_s
            await asyncio.sleep(timed.extra_s)
            await self._link_sleep(self.behaviour.uplink.delay_s(len(message.payload), self._rng))
            await self._publish(message)
            self.stats.updates_sent += 1
            await loop.run_in_executor(None, self.session.sent, job, message)
        except (MqttError, PayloadTooLarge, ValueError) as e:
            # The aggregator sees no update and counts it lost; the log says why.
            log.error("%s: could not send its update: %s", self.device_id, e)
            self.stats.errors.append(str(e))

    async def _link_sleep(self, delay_s: float) -> None:
        self.stats.link_delay_s += delay_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    async def _publish(self, message) -> None:
        if self._conn is None:
            raise MqttError(f"{self.device_id}: offline")
        await self._conn.publish(message.topic, message.payload, retain=message.retain)


def _started_and(fn, *args):
    """(when the call started, its result): how long a job waited for its executor's thread."""
    return time.perf_counter(), fn(*args)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass

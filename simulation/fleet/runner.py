"""Many simulated devices on one asyncio event loop, in a thread of their own.

One process holds a range of the fleet's device indices: each device gets its shard of the data
(the partition of the whole fleet, so several processes or hosts that take different ranges form
one federation), its own MQTT connection and client id, its own ``DeviceSession`` (error-feedback
residuals included), and its behaviour from the task's ``[simulation]`` profiles (its tier's
trainer among them: Keras, or the TensorFlow-free LiteRT trainer). The devices of a tier share
one trainer, and all trainers run one device at a time on a single worker thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedprune.converters.protocol import Architecture, RoundAnnouncement, Topics
from fedprune.converters.errors import CodecError
from fedprune.converters.signing import VerifyKey, open_signed
from fedprune.edge_agent.device import DeviceSession, Trainer, prepare_trainer
from fedprune.edge_agent.trainable_files import TrainableFiles
from fedprune.simulation.fleet.connection import AsyncConnection, MqttError
from fedprune.simulation.fleet.device import SimulatedDevice
from fedprune.simulation.fleet.profiles import DeviceBehaviour, draw_behaviours
from fedprune.simulation.fleet.shared_tasks import SharedTasks
from fedprune.task import Task

log = logging.getLogger(__name__)


def device_id(index: int) -> str:
    return f"sim-{index:03d}"


def device_seed(task_seed: int, index: int) -> int:
    """The seed of device ``index``'s own randomness (stochastic rounding)."""
    return task_seed * 100_003 + index


class Fleet:
    """Devices ``indices`` of a fleet, each with ``shards[index]`` of ``(x, y)``.

    ``start()`` connects them (at most ``connect_concurrency`` handshakes at a time) and returns
    once every device that is online by its profile is connected; ``stop()`` disconnects them
    cleanly. ``finished`` is set when the aggregator announces the end of a run this fleet saw open.
    """

    def __init__(
        self,
        task: Task,
        x: np.ndarray,
        y: np.ndarray,
        shards: list[np.ndarray],
        indices: range,
        broker_url: str,
        trainers: dict[str, Trainer],
        *,
        aggregator_key: VerifyKey,
        connect_concurrency: int = 32,
        hostile: frozenset[int] = frozenset(),
        hostile_trainers: dict[str, Trainer] | None = None,
        trainable_files: TrainableFiles | None = None,
        runtime: str = "",
    ) -> None:
        """``aggregator_key``: the key every device accepts the aggregator's messages signed with.
        ``trainers``: the trainer of each kind the profiles name (``"keras"``, ``"litert"``).
        ``hostile``: indices of devices that train with ``hostile_trainers`` of their kind
        (``fedprune.simulation.attacks``). ``trainable_files``: where the ``"litert"`` devices'
        sessions put the trainable files their trainer reads; ``runtime``: the TFLite runtime
        their presence announces."""
        self.behaviours: list[DeviceBehaviour] = draw_behaviours(task.simulation, indices, task.seed)
        kinds = {b.profile.trainer for b in self.behaviours}
        if kinds - set(trainers):
            raise ValueError(f"the fleet's profiles train with {sorted(kinds)}; trainers given: {sorted(trainers)}")
        if hostile and not kinds <= set(hostile_trainers or {}):
            raise ValueError("hostile devices need a hostile trainer of each kind the profiles name")
        if "litert" in kinds and trainable_files is None:
            raise ValueError("devices that train without TensorFlow need a TrainableFiles store")
        self.task = task
        self.aggregator_key = aggregator_key
        self.broker_url = broker_url
        self.trainers = trainers
        self.hostile, self.hostile_trainers = hostile, hostile_trainers or {}
        self.trainable_files, self.runtime = trainable_files, runtime
        self.connect_concurrency = connect_concurrency
        self._data = [(x[shards[i]], y[shards[i]]) for i in indices]
        self.devices: list[SimulatedDevice] = []
        self.finished = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-train")
        self.tasks = SharedTasks()  # every selected device gets the same task bytes: decoded once

    @property
    def online_count(self) -> int:
        """How many devices connect at all (by their profile's availability)."""
        return sum(b.online for b in self.behaviours)

    def connected_count(self) -> int:
        return sum(d.connected.is_set() for d in self.devices)

    def start(self, timeout_s: float = 300.0) -> "Fleet":
        self._thread = threading.Thread(target=self._run_loop, name="fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise ConnectionError(f"only {self.connected_count()} of {self.online_count} simulated devices "
                                  f"connected to {self.broker_url} within {timeout_s:.0f} s")
        if self._error is not None:
            raise self._error
        # What exists now (TensorFlow, a thousand connections and sessions) lives as long as the
        # fleet: out of the cyclic collector's reach, a full collection no longer walks it. One
        # took 0.3 s with 1,000 devices, a pause of every device's network and training.
        gc.collect()  # garbage first: what is frozen is never collected
        gc.freeze()
        return self

    def prepare(self, architecture: Architecture) -> None:
        """Trace the shared trainer's training step for ``architecture`` before the first round, as
        devices that have been running for a while have done: round 1 then shows the steady
        training time, not one simulator-wide warm-up. (A hostile trainer wraps this one.)"""
        for trainer in self.trainers.values():
            prepare_trainer(trainer, architecture)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the fleet did not stop within %.0f s", timeout_s)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def wait_finished(self, timeout_s: float | None = None) -> bool:
        return self.finished.wait(timeout_s)

    def stats(self) -> dict:
        """Counters of this process's devices; ``train_s_by_round``: the seconds its shared
        trainers spent training, by round (the simulator's efficiency, beside the round's wall)."""
        by_round: dict[int, float] = {}
        for d in self.devices:
            for r, s in d.stats.train_s_by_round.items():
                by_round[r] = by_round.get(r, 0.0) + s
        return {
            "devices": len(self.behaviours),
            "online": self.online_count,
            "updates_sent": sum(d.stats.updates_sent for d in self.devices),
            "dropouts": sum(d.stats.dropouts for d in self.devices),
            "send_errors": sum(len(d.stats.errors) for d in self.devices),
            "link_delay_s": sum(d.stats.link_delay_s for d in self.devices),
            "train_s": sum(by_round.values()),
            "train_s_by_round": {str(r): s for r, s in sorted(by_round.items())},  # str: as JSON gives it back
        }

    # --- the event loop's side ---
    def _run_loop(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_default_executor(ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleet-codec"))
        self._stop = asyncio.Event()
        slots = asyncio.Semaphore(self.connect_concurrency)
        t = self.task
        for b, (x, y) in zip(self.behaviours, self._data):
            kind = b.profile.trainer
            session = DeviceSession(device_id(b.index), len(x), aggregator_key=self.aggregator_key,
                                    federation=t.federation.id,
                                    max_message_bytes=max(t.transport.max_message_bytes, t.transport.max_payload_bytes),
                                    seed=device_seed(t.seed, b.index), trainer=kind,
                                    runtime=self.runtime if kind == "litert" else "",
                                    trainable_files=self.trainable_files if kind == "litert" else None)
            self.devices.append(SimulatedDevice(
                session, b, x, y, broker_url=self.broker_url, federation=t.federation.id,
                trainer=(self.hostile_trainers if b.index in self.hostile else self.trainers)[kind],
                executor=self._executor, tasks=self.tasks, connect_slots=slots,
                max_payload_bytes=t.transport.max_payload_bytes, rejoin_s=t.simulation.rejoin_s))
        online = [d for d, b in zip(self.devices, self.behaviours) if b.online]
        tasks = [asyncio.ensure_future(d.run(self._stop)) for d in online]
        watcher = asyncio.ensure_future(self._watch_rounds())
        started = time.monotonic()
        await asyncio.wait([asyncio.ensure_future(d.connected.wait()) for d in online] or
                           [asyncio.ensure_future(asyncio.sleep(0))])
        log.info("%d simulated devices connected in %.1f s (%d offline by their profile)",
                 len(online), time.monotonic() - started, len(self.devices) - len(online))
        self._ready.set()
        await self._stop.wait()
        watcher.cancel()
        await asyncio.gather(watcher, *tasks, return_exceptions=True)

    async def _watch_rounds(self) -> None:
        """Set ``finished`` when the aggregator, seen running, announces the end of its run."""
        topics = Topics(self.task.federation.id)
        name = f"fedprune-{self.task.federation.id}-fleet-{self.behaviours[0].index if self.behaviours else 0}"
        seen_open = False
        while True:
            try:
                async with AsyncConnection(self.broker_url, name, subscriptions=[topics.round]) as conn:
                    async for topic, payload in conn.messages():
                        try:
                            state = RoundAnnouncement.decode(open_signed(
                                topic, payload, self.aggregator_key, 1 << 20)).state
                        except CodecError:
                            continue
                        seen_open = seen_open or state == "open"
                        if seen_open and state == "finished":
                            self.finished.set()
            except MqttError as e:
                log.info("round watcher: %s; reconnecting", e)
                await asyncio.sleep(1.0)

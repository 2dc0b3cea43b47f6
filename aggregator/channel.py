"""The aggregator's side of the broker, as far as devices can reach it.

What devices send comes in through per-device budgets (``peer_budgets``, charged on the network
thread before anything is buffered) and a queue bounded in bytes (``inbox``); the broker routes
here the presences of every device but only the updates of the devices drawn for the open
attempt (``listen``), and stops routing those of a device past its budget. What goes to devices
goes out signed (``device_publisher``). ``Aggregator`` (``server``) owns one ``DeviceChannel``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedprune.aggregator.collect import DeviceLink
from fedprune.aggregator.device_publisher import DevicePublisher
from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.peer_budgets import Budget, PeerBudgets, default_budget
from fedprune.aggregator.registry import DeviceRegistry, OtherFederations, take_presence
from fedprune.aggregator_key import load_or_create_signing_key, public_key_file
from fedprune.converters.chunking import Reassembler
from fedprune.converters.protocol import Architecture, Topics
from fedprune.converters.signing import SigningKey
from fedprune.task import Task
from fedprune.transport import MqttSession, parse_broker_url

__all__ = ["DeviceChannel", "open_channel", "run_signing_key", "task_budget"]

log = logging.getLogger(__name__)

OTHER_PRESENCE_MAX_BYTES = 4096  # a presence is a few hundred bytes of JSON


def run_signing_key(run_dir: Path) -> SigningKey:
    """The key in ``<run_dir>/aggregator.key``, made there (with its ``aggregator.pub``) if there
    is none, so a resumed run keeps the key its devices trust."""
    path = Path(run_dir) / "aggregator.key"
    key, created = load_or_create_signing_key(path)
    if created:
        log.info("new signing key in %s; devices trust it with --aggregator-key %s (also in %s)", path,
                 key.public.text, public_key_file(path))
    return key


def task_budget(task: Task, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> Budget:
    """The task file's per-device budget, each 0 filled in from the model."""
    transport = task.transport
    derived = default_budget(names, shapes, task.federation.max_round_retries + 1, transport.max_payload_bytes,
                             transport.max_message_bytes)
    return Budget(transport.max_device_messages_per_round or derived.messages,
                  transport.max_device_bytes_per_round or derived.bytes)


def open_channel(broker_url: str, task: Task, registry: DeviceRegistry, others: OtherFederations,
                 architecture: Architecture, run_dir: Path, signing_key: SigningKey | None,
                 on_connected: Callable[[], None]) -> DeviceChannel:
    """The aggregator's channel for ``task``: budgets for ``architecture``, messages signed with
    ``signing_key`` (default: the run folder's, ``run_signing_key``), and on an open broker every
    federation's presences (``others`` names the one devices wait on when it is not ours)."""
    topics = Topics(task.federation.id)
    presences = topics.all_presence if parse_broker_url(broker_url).username else OtherFederations.FILTER
    budget = task_budget(task, architecture.names, architecture.shapes)  # per device and round, for this model
    return DeviceChannel(broker_url, task, registry, budget, signing_key or run_signing_key(run_dir),
                         on_connected=on_connected, presences=presences, on_other_presence=others.take)


class DeviceChannel:
    """The aggregator's MQTT session with the bounds and signing around it. ``on_connected`` runs
    after every (re)connection (the aggregator republishes its architecture there)."""

    def __init__(self, broker_url: str, task: Task, registry: DeviceRegistry, budget: Budget, signing_key: SigningKey,
                 on_connected: Callable[[], None], presences: str | None = None,
                 on_other_presence: Callable[[str, bytes], None] | None = None) -> None:
        """``presences``: the topic filter of the presences to read (default: this federation's);
        ``on_other_presence`` gets those of other federations it matches."""
        transport = task.transport
        self.topics, self.registry, self._on_connected = Topics(task.federation.id), registry, on_connected
        self._presences, self._on_other_presence = presences or self.topics.all_presence, on_other_presence
        self.inbox = BoundedInbox(transport.max_inbox_bytes)  # (topic, payload, arrival)
        self.budgets = PeerBudgets(self.topics, registry.known, budget, on_over_budget=self._stop_hearing)
        self.session = MqttSession(
            broker_url, client_id=f"fedprune-aggregator-{task.federation.id}",
            subscriptions=[self._presences], on_message=self._on_message, on_connected=self._connected,
            admit=self._admit, max_payload_bytes=transport.max_payload_bytes,
            max_message_bytes=transport.max_message_bytes,
            clean_session=False,  # the broker keeps updates that arrive while we reconnect
            # Each device's partial messages in a room of its own: none can evict another's.
            reassembler=Reassembler(max(transport.max_message_bytes, transport.max_payload_bytes),
                                    max_pending_bytes=transport.max_inbox_bytes),
        )
        self.publisher = DevicePublisher(self.session, signing_key)

    def link(self) -> DeviceLink:
        """What collecting an attempt's updates reads and writes."""
        return DeviceLink(self.publisher, self.topics, self.registry, self.inbox, self.budgets.ignored)

    def listen(self, devices: Sequence[str]) -> None:
        """Receive the updates of ``devices`` (the attempt's selection) and of no other device.
        Called before their tasks go out: the broker then routes every answer here."""
        wanted = {self.topics.update(d) for d in devices if not self.budgets.ignored(d)}
        current = {t for t in self.session.subscriptions if t != self._presences}
        self.session.unsubscribe(sorted(current - wanted))
        self.session.subscribe(sorted(wanted - current))

    def count_dropped(self, r: int, rejections: dict[str, int]) -> None:
        """Count in the round's rejections what never reached the checks: the devices over their
        budget (once each), the updates of devices never announced, and the messages the full
        inbox dropped; log the inbox's drops in one line (the budgets log their own)."""
        over, unknown = self.budgets.so_far()
        if over:
            rejections["over budget"] = over
        if unknown:
            rejections["unknown device"] = unknown
        dropped, dropped_bytes = self.inbox.take_drops()
        if dropped:
            rejections["inbox full"] = rejections.get("inbox full", 0) + dropped
            log.warning("round %d: the inbox was full (%d bytes): dropped %d message(s), %d bytes",
                        r, self.inbox.max_bytes, dropped, dropped_bytes)

    # --- the network thread ---
    def _admit(self, topic: str, size: int) -> bool:
        if self._on_other_presence is not None and not topic.startswith(self.topics.root + "/"):
            # Another federation's presence (an open broker): read only to name it in a hint,
            # charged to no budget; anything large there is no presence.
            return size <= OTHER_PRESENCE_MAX_BYTES
        return self.budgets.admit(topic, size)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if "/presence/" in topic:
            if topic.startswith(self.topics.root + "/"):
                take_presence(self.registry, self.topics, topic, payload)
            elif self._on_other_presence is not None:
                self._on_other_presence(topic, payload)
        else:
            self.inbox.put((topic, payload, time.monotonic()))  # full: dropped, counted per attempt

    def _stop_hearing(self, device: str) -> None:
        """A device over its budget: the broker stops routing its updates here."""
        self.session.unsubscribe([self.topics.update(device)])

    def _connected(self) -> None:
        # A persistent session (clean_session=False) of an aggregator of protocol version 1 was
        # subscribed to every device's updates: drop that, or the broker still routes them all here.
        self.session.client.unsubscribe(self.topics.all_updates)
        self._on_connected()

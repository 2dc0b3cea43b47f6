"""Who may read and write which topics of a federation: one policy for both brokers.

A device (its MQTT username is its device id) may read the broadcast topics (the architecture,
its trainable file and the final model, each with its retained chunks, and the open round) and
its own task and ack topics, and write only its own update and presence
topics. It cannot read another device's task, see anyone's updates, or forge the global model.
The aggregator may read and write everything under its federation's root.

:meth:`AccessPolicy.mosquitto_acl` writes the policy as a Mosquitto ``acl_file``; the embedded
broker asks :meth:`AccessPolicy.allows` (``fedprune.aggregator.broker_auth``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from fedprune.converters.protocol import Topics, valid_device_id


class Access(Enum):
    READ = "read"  # subscribe to (a filter) or receive (a topic)
    WRITE = "write"  # publish, including a last will


@dataclass(frozen=True)
class AccessPolicy:
    federation: str
    aggregator_user: str

    @property
    def topics(self) -> Topics:
        return Topics(self.federation)

    def device_grants(self, device_id: str) -> dict[Access, tuple[str, ...]]:
        t = self.topics
        return {
            # '<topic>/#' also covers the topic itself, and its retained chunks '<topic>/chunk/<i>'
            Access.READ: (t.architecture, t.round, t.task(device_id), t.ack(device_id), f"{t.trainable_model}/#",
                          f"{t.root}/model/final/#"),
            Access.WRITE: (t.update(device_id), t.presence(device_id)),
        }

    def allows(self, username: str | None, topic: str, access: Access) -> bool:
        """Whether ``username`` may read (subscribe to a filter, receive a topic) or write ``topic``.

        A filter is allowed only if every topic it can match is: a device subscribing to
        ``.../device/+/update`` is refused even though it may write its own update topic.
        """
        if not username:
            return False
        if username == self.aggregator_user:
            return filter_within(topic, f"{self.topics.root}/#")
        if not valid_device_id(username):
            return False
        return any(filter_within(topic, grant) for grant in self.device_grants(username)[access])

    def mosquitto_acl(self) -> str:
        """The policy as a Mosquitto ``acl_file`` (``%u``: the connecting client's username)."""
        t = self.topics
        pattern = self.device_grants("%u")
        lines = [
            f"# fedprune access control for federation {self.federation!r}, written by",
            "# fedprune-aggregator init-broker. Devices log in with their device id as username.",
            "# Pattern lines apply to every user; a device reads the broadcasts and its own task and",
            "# ack, and writes only its own update and presence.",
        ]
        lines += [f"pattern read {topic}" for topic in pattern[Access.READ]]
        lines += [f"pattern write {topic}" for topic in pattern[Access.WRITE]]
        lines += ["", "# The aggregator: everything in its federation.", f"user {self.aggregator_user}",
                  f"topic readwrite {t.root}/#", ""]
        return "\n".join(lines)


def filter_within(requested: str, grant: str) -> bool:
    """Whether every topic that the filter (or plain topic) ``requested`` matches is matched by
    the filter ``grant``: a wildcard in ``requested`` is allowed only where ``grant`` has one."""
    req, allowed = requested.split("/"), grant.split("/")
    for i, g in enumerate(allowed):
        if g == "#":
            return True  # the levels before matched; '#' covers the rest (and the parent level)
        if i >= len(req):
            return False
        r = req[i]
        if r == "#":
            return False  # matches deeper levels that the grant does not cover
        if g != "+" and r != g:
            return False
    return len(req) == len(allowed)

"""Which MQTT broker a simulation uses, and a private Mosquitto the simulator starts by itself.

The embedded broker (amqtt, in the aggregator's process) serves a small federation; it does not
serve a thousand devices (on a fresh clone, 1,000 simulated devices on it ended with "no
connection to the MQTT broker ... within 30 s" after minutes). Mosquitto does. So
``fedprune-simulate`` picks, unless told (``--broker``):

- ``auto`` (the default): the embedded broker for up to ``EMBEDDED_MAX_DEVICES`` devices in this
  process; beyond that a private Mosquitto if one is installed (``mosquitto`` on ``PATH`` or in
  ``/usr/sbin``), else the embedded broker with a warning that says what to install;
- ``embedded``, ``mosquitto``: that one, whatever the fleet's size;
- ``mqtt://host:port`` (or ``mqtts://``): a broker that already runs.

The private Mosquitto listens on a free loopback port with a configuration of its own in a
temporary folder (anonymous clients on 127.0.0.1 only, no persistence, queues sized for a burst
of updates: ``max_queued_messages 10000`` since Mosquitto silently drops QoS 1 messages beyond
it), and is stopped, and its folder removed, when the simulation ends.
"""

from __future__ import annotations

import logging
import sys

from fedprune.mosquitto import MosquittoProcess, mosquitto_executable
from fedprune.simulation.processes import exit_with_parent

log = logging.getLogger(__name__)

__all__ = ["BrokerChoice", "EMBEDDED_MAX_DEVICES", "PrivateMosquitto", "choose_broker", "mosquitto_executable"]

#: the most devices in one process that ``auto`` puts on the embedded broker
EMBEDDED_MAX_DEVICES = 200
_KEYWORDS = ("auto", "embedded", "mosquitto")


class BrokerChoice:
    """What ``choose_broker`` decided: ``kind`` is ``"embedded"``, ``"mosquitto"`` (a private one
    to start) or ``"url"`` (``url`` names it); ``why`` says why, for the line the simulator prints."""

    def __init__(self, kind: str, why: str, url: str | None = None) -> None:
        self.kind, self.why, self.url = kind, why, url

    def __repr__(self) -> str:
        return f"BrokerChoice({self.kind!r}, {self.why!r}, url={self.url!r})"


def choose_broker(requested: str | None, devices: int) -> BrokerChoice:
    """The broker for a simulation of ``devices`` devices in this process; ``requested`` is
    ``--broker`` (None: ``auto``). Raises ValueError for a request it cannot serve."""
    requested = requested or "auto"
    if requested not in _KEYWORDS:
        if "://" not in requested:
            raise ValueError(f"--broker {requested!r}: give auto, embedded, mosquitto or a URL such as "
                             "mqtt://127.0.0.1:1883")
        return BrokerChoice("url", "given with --broker", requested)
    found = mosquitto_executable()
    if requested == "embedded":
        return BrokerChoice("embedded", "asked for with --broker embedded")
    if requested == "mosquitto":
        if found is None:
            raise ValueError("--broker mosquitto: no mosquitto program found; install it "
                             "(apt-get install mosquitto) or use --broker embedded")
        return BrokerChoice("mosquitto", "asked for with --broker mosquitto")
    if devices <= EMBEDDED_MAX_DEVICES:
        return BrokerChoice("embedded", f"{devices} devices (up to {EMBEDDED_MAX_DEVICES} use the embedded broker)")
    if found is not None:
        return BrokerChoice("mosquitto", f"{devices} devices: more than the embedded broker serves "
                                         f"(it takes up to {EMBEDDED_MAX_DEVICES})")
    log.warning("%d devices are more than the embedded broker serves (up to %d) and no mosquitto program was "
                "found: trying the embedded broker; if devices cannot connect, install Mosquitto "
                "(apt-get install mosquitto) or pass --broker mqtt://HOST:PORT", devices, EMBEDDED_MAX_DEVICES)
    return BrokerChoice("embedded", f"{devices} devices, but no Mosquitto is installed")


class PrivateMosquitto(MosquittoProcess):
    """A Mosquitto process of the simulator's own, on 127.0.0.1 and a free port (``with`` starts
    it, and stops it and removes its folder): no cap on connections (what bounds them is the
    open-files limit it inherits from the simulator, which raises it:
    ``simulation.processes.raise_open_files_limit``), errors and warnings only in its log, and on
    Linux it ends with the simulator, even one killed outright."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host=host, extra_config="max_connections -1", log_types=("error", "warning"),
                         preexec_fn=exit_with_parent if sys.platform == "linux" else None,
                         prefix="fedprune-sim-mosquitto-")
        if self.executable is None:
            raise RuntimeError("no mosquitto program found: install it (apt-get install mosquitto)")

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
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedprune.simulation.processes import exit_with_parent

log = logging.getLogger(__name__)

__all__ = ["BrokerChoice", "EMBEDDED_MAX_DEVICES", "PrivateMosquitto", "choose_broker", "mosquitto_executable"]

#: the most devices in one process that ``auto`` puts on the embedded broker
EMBEDDED_MAX_DEVICES = 200
_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_KEYWORDS = ("auto", "embedded", "mosquitto")


def mosquitto_executable() -> str | None:
    """The ``mosquitto`` program (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _FALLBACK_PATHS if os.path.isfile(p) and os.access(p, os.X_OK)), None)


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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class PrivateMosquitto:
    """A Mosquitto process of the simulator's own, on 127.0.0.1 and a free port (``with`` starts
    and stops it)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        executable = mosquitto_executable()
        if executable is None:
            raise RuntimeError("no mosquitto program found: install it (apt-get install mosquitto)")
        self.executable, self.host, self.port = executable, host, 0
        self.workdir = Path(tempfile.mkdtemp(prefix="fedprune-sim-mosquitto-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def version(self) -> str:
        """``mosquitto version 2.0.11`` as the program prints it ("" if it does not say)."""
        try:
            out = subprocess.run([self.executable, "-h"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        first = (out.stdout or out.stderr).splitlines()
        return first[0].strip() if first else ""

    def config_text(self) -> str:
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true", "persistence false",
                 # No cap on connections (ten thousand simulated devices; the default, said here so it
                 # stays): what bounds them is the open-files limit it inherits from the simulator,
                 # which raises it (simulation.processes.raise_open_files_limit).
                 "max_connections -1",
                 "max_queued_messages 10000", "max_inflight_messages 20", "sys_interval 0",
                 f"log_dest file {self.workdir / 'mosquitto.log'}", "log_type error", "log_type warning"]
        if os.geteuid() == 0:  # as root it would switch to the `mosquitto` user, who cannot write the log here
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> PrivateMosquitto:
        for _ in range(3):  # another process may take the free port first
            self.port = _free_port(self.host)
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self.config_text())
            with open(self.workdir / "mosquitto.out", "ab") as out:
                self._proc = subprocess.Popen([self.executable, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                              start_new_session=True,  # Ctrl-C goes to the simulator
                                              # and it ends with the simulator, even one killed outright
                                              preexec_fn=exit_with_parent if sys.platform == "linux" else None)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._proc.poll() is None and not _port_open(self.host, self.port):
                time.sleep(0.02)
            if self._proc.poll() is None and _port_open(self.host, self.port):
                log.info("private Mosquitto (pid %d) on %s", self._proc.pid, self.url)
                return self
            self.stop()
        raise RuntimeError(f"the private Mosquitto did not start on {self.host}: {self.log_tail()}")

    def log_tail(self, lines: int = 10) -> str:
        text = ""
        for name in ("mosquitto.out", "mosquitto.log"):
            path = self.workdir / name
            if path.is_file():
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no log)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> PrivateMosquitto:
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

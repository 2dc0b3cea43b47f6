"""A private Mosquitto broker in a child process: the simulator's (``fedprune-simulate`` above
200 devices) and the tests'.

Each :class:`MosquittoProcess` runs ``mosquitto -c CONFIG`` with a config generated in its own
temporary directory, listening on a loopback port only. Nothing is shared with a system-wide
Mosquitto.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["MosquittoProcess", "free_port", "mosquitto_available", "mosquitto_executable"]

_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS may hand it out again: use it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_executable() -> str | None:
    """The ``mosquitto`` program (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_available() -> bool:
    return mosquitto_executable() is not None


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """A Mosquitto 2 broker in a child process, on 127.0.0.1 and a port of its own.

    The simulator's private broker (``fedprune.simulation.private_broker``) and the tests' brokers
    are both this class.

    Config (see :meth:`config_text`): anonymous clients allowed (Mosquitto 2 refuses them on a
    configured listener otherwise), no persistence, ``max_queued_messages 10000`` (the default
    1000 silently drops QoS 1 messages to a slow subscriber during a burst of updates),
    ``max_inflight_messages 20`` (Mosquitto's default; messages beyond it wait in the queue),
    no ``$SYS`` updates. Its log goes to ``mosquitto.log`` in the temporary directory, and its
    stdout/stderr to ``mosquitto.out`` there.

    ``start``/``stop``/``restart``/``kill`` may be called repeatedly; the port and the log file
    survive a restart, so clients can reconnect to the same URL. Leaving the ``with`` block (or
    :meth:`close`) also removes the temporary directory.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", extra_config: str = "", base_config: str | None = None,
        *, log_types: tuple[str, ...] = ("error", "warning", "notice", "information"),
        preexec_fn: Callable[[], None] | None = None, prefix: str = "fedprune-mosquitto-",
    ) -> None:
        """``base_config``: listeners and security to use instead of one anonymous plain-text
        listener on ``port`` (e.g. the mosquitto.conf of ``init-broker``, which names its port).
        ``log_types``: what its log keeps (connections are logged with ``information``);
        ``preexec_fn``: run in the child before Mosquitto starts (e.g. to end with the parent);
        ``prefix``: of its temporary folder's name."""
        self.executable = mosquitto_executable()
        self.log_types, self.preexec_fn, self.prefix = log_types, preexec_fn, prefix
        self.base_config = base_config
        self.host = host
        self._auto_port = port is None
        self.port = free_port(host) if port is None else int(port)
        self.extra_config = extra_config
        self._tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def workdir(self) -> Path:
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=self.prefix))
        return self._tmpdir

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        if self.base_config is not None:
            head = [self.base_config]
        else:
            head = [f"listener {self.port} {self.host}", "allow_anonymous true", "persistence false",
                    "max_queued_messages 10000", "max_inflight_messages 20", "sys_interval 0"]
        return "\n".join(
            [
                *head,
                f"log_dest file {self.log_path}",
                *(f"log_type {kind}" for kind in self.log_types),
                "connection_messages true",
                "log_timestamp true",
                # Started as root, Mosquitto drops to the `mosquitto` user, which cannot write
                # the log in this root-only temp dir; stay root (it warns on stderr about it).
                # init-broker's config names its own user (the owner of its files).
                "user root" if os.geteuid() == 0 and not re.search(r"(?m)^user ", head[0]) else "",
                self.extra_config,
                "",
            ]
        )

    @property
    def version(self) -> str:
        """``mosquitto version 2.0.11`` as the program prints it ("" if it does not say)."""
        try:
            out = subprocess.run([self.executable or "mosquitto", "-h"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        first = (out.stdout or out.stderr).splitlines()
        return first[0].strip() if first else ""

    @property
    def output_path(self) -> Path:
        """Its stdout/stderr: what it prints before the log file is open (config errors)."""
        return self.workdir / "mosquitto.out"

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.output_path, self.log_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"[{path.name}]\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no log)"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start Mosquitto; return once the port accepts TCP connections."""
        if self.executable is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        if self.running:
            raise RuntimeError(f"mosquitto already running on {self.url} (pid {self.pid})")
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"mosquitto could not bind {self.host}:{self.port}: address in use\n"
                        f"--- log tail ---\n{self.log_tail()}"
                    ) from None
                self.port = free_port(self.host)  # another process took it; pick again
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> MosquittoProcess:
        self.config_path.write_text(self.config_text())
        # Both files are appended to across restarts: only what this start adds counts.
        offsets = {path: _size(path) for path in (self.output_path, self.log_path)}
        self._log_handle = open(self.output_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C in the terminal goes to its starter, not to it
            preexec_fn=self.preexec_fn,
        )

        def new_output() -> str:
            return "".join(_read_from(path, offset) for path, offset in offsets.items())

        # Wait for its own "running" line (a notice) before probing the port: a probe alone could
        # reach another process already listening there while this one fails to bind.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                if "Address already in use" in new_output():
                    raise _PortTaken
                raise RuntimeError(
                    f"mosquitto exited with code {code} while starting on {self.url}\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            running = " running" in _read_from(self.log_path, offsets[self.log_path]) or "notice" not in self.log_types
            if running and _port_open(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"mosquitto did not accept connections on {self.url} within {timeout} s\n"
            f"--- log tail ---\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything cleanly (for fault tests)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5.0)
        self._reap()

    def restart(self, timeout: float = 10.0) -> MosquittoProcess:
        """Stop and start again on the same port (clients see their connection drop)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and remove the temporary directory."""
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._log_handle is not None and self._proc is None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> MosquittoProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<MosquittoProcess {self.url} {state}>"


class _PortTaken(Exception):
    pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""

"""An MQTT broker that runs inside the aggregator's own process.

Why an embedded broker
----------------------
A user who runs the aggregator on a laptop should not have to install, configure and start a
separate broker first. ``amqtt`` is a pure-Python MQTT broker, so ``pip install
fedprune[aggregator]`` is all that is needed; :class:`EmbeddedBroker` runs it on its own thread
and event loop so that the rest of the aggregator can stay synchronous (paho-mqtt clients).
For a real fleet, point devices and aggregator at Mosquitto instead: it is faster, and it is
what the tests also run against.

What it does and does not do
----------------------------
* MQTT 3.1.1 only: amqtt 0.12.1 refuses MQTT 5 clients, so every fedprune client speaks 3.1.1.
* No limit on packet size and no limit on queued messages: amqtt keeps unbounded queues. The
  application must bound its payloads (and chunk anything larger) itself; nothing here will
  refuse an oversize message, and a slow subscriber can make the broker's memory grow.
* It binds only the address it is given (127.0.0.1 by default) and loads exactly the plugins it
  needs: anonymous authentication, or with a :class:`BrokerSecurity` (the folder written by
  ``fedprune-aggregator init-broker``) TLS with that server certificate, logins from that
  Mosquitto password file and the federation's access policy (``fedprune.aggregator.broker_auth``), the
  same rules the generated Mosquitto config enforces. amqtt's defaults would bind 0.0.0.0:1883
  and load event/packet logging and ``$SYS`` plugins, so listeners and plugins are always passed
  explicitly. Without logins on an address other than loopback it warns: anyone who reaches it
  can then publish a forged architecture or task, and read every update.
* With logins, two amqtt 0.12.1 behaviours are closed here (``scripts/probe_broker.py`` and
  ``tests/test_broker_probes.py`` probe both brokers alike):
  - amqtt acts on a CONNECT's client id (deletes that client's session and subscriptions, and
    disconnects it) *before* its auth plugins refuse a wrong password: so every CONNECT is read
    and checked here first (:func:`_admit`), and only a valid login reaches amqtt, with its
    client id replaced by its username, as Mosquitto's ``use_username_as_clientid`` (in the
    generated config) does: a device cannot take over another client's session either;
  - when a client connects, amqtt sends it the retained messages of *every* client's
    subscriptions, without asking the topic plugins: :class:`_GuardedBroker` sends only those of
    its own subscriptions that it may read.
* Known amqtt 0.12.1 behaviours to design around (checked against its source and tests):
  - the broker never closes a connection whose keep-alive has expired (its read-timeout
    handler is a no-op), so a client that goes silent without closing its socket (power loss,
    network cut) does *not* trigger its last will here; a closed or reset socket does;
  - because every client is anonymous, it keeps no offline messages for ``clean_session=False``
    clients, and drops a disconnected session within about a second;
  - a subscriber receives a message at its subscription QoS, not ``min(publish, subscription)``;
  - ``Broker.shutdown()`` can hang forever on Python < 3.12 if a client packet arrives at that
    moment (seen); :meth:`EmbeddedBroker.stop` therefore closes every client socket first. To
    clients, a stop looks like the network dropping (MQTT 3.1.1 has no server DISCONNECT).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BrokerSecurity", "EmbeddedBroker"]

logger = logging.getLogger(__name__)

# amqtt logs every connection, packet and state transition at INFO/DEBUG; "transitions" is the
# state-machine library it uses. Quiet them unless the user already chose a level.
_NOISY_LOGGERS = ("amqtt", "transitions")

_ANONYMOUS_AUTH_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"
_LISTENER = "default"  # amqtt requires a listener named "default"
_SETTLE_ITERATIONS = 10  # at shutdown: loop turns for a just-accepted socket to be registered
_CONNECTION_CLOSE_S = 2.0  # at shutdown: for amqtt to process the closed client connections
_SHUTDOWN_S = 5.0  # at shutdown: for Broker.shutdown(), after which its tasks are cancelled
_CONNECT_TIMEOUT_S = 10.0  # with logins: a connection that sends no whole CONNECT by then is closed
_MQTT_311 = 4  # protocol level
_CONNACK_BAD_PROTOCOL, _CONNACK_NOT_AUTHORIZED = 0x01, 0x05


@dataclass(frozen=True)
class BrokerSecurity:
    """Logins, access policy and (optionally) TLS for the embedded broker."""

    password_file: Path
    federation: str
    aggregator_user: str
    certfile: Path | None = None  # server certificate (PEM); with keyfile, the broker speaks TLS only
    keyfile: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.certfile is None or self.keyfile is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certfile, self.keyfile)
        return ctx

    def plugins(self) -> dict[str, dict[str, str]]:
        policy = {"federation": self.federation, "aggregator_user": self.aggregator_user}
        return {
            "fedprune.aggregator.broker_auth.PasswordFileAuth": {"password_file": str(self.password_file), **policy},
            "fedprune.aggregator.broker_auth.FederationTopicAccess": policy,
        }


def _quiet_noisy_loggers() -> None:
    for name in _NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt broker running on its own thread and event loop.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with EmbeddedBroker() as broker:          # port 0: a free port is picked
            client.connect("127.0.0.1", broker.port)

    A stopped broker can be started again; with ``port=0`` it may get a different port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, security: BrokerSecurity | None = None) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in 0..65535, not {port}")
        self._host = host
        self._security = security
        self._ssl = security.ssl_context() if security is not None else None
        self._requested_port = int(port)
        self._bound_port: int | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._stop_requested = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ public API

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port the broker listens on (the real one when constructed with port 0)."""
        if self._bound_port is None:
            raise RuntimeError("EmbeddedBroker is not running: call start() first")
        return self._bound_port

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the running broker (``mqtts://`` with TLS)."""
        host = f"[{self._host}]" if ":" in self._host else self._host  # IPv6 literal
        return f"{'mqtts' if self._ssl else 'mqtt'}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._bound_port is not None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start the broker; return once its listening socket is open.

        Raises RuntimeError if it cannot listen (address in use, bad host) or does not come up
        within ``timeout`` seconds.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(f"EmbeddedBroker already running on {self.url}")
            if importlib.util.find_spec("amqtt") is None:
                raise RuntimeError(
                    "the embedded MQTT broker needs amqtt: pip install 'fedprune[aggregator]' "
                    "(or amqtt==0.12.1), or use an external broker such as Mosquitto"
                )
            _quiet_noisy_loggers()
            self._started.clear()
            self._stop_requested.clear()
            self._start_error = None
            self._bound_port = None
            self._thread = threading.Thread(
                target=self._thread_main,
                name=f"embedded-mqtt-broker-{self._host}:{self._requested_port}",
                daemon=True,
            )
            self._thread.start()

            where = f"{self._host}:{self._requested_port}"
            if not self._started.wait(timeout):
                self._request_stop()
                self._thread.join(timeout)
                self._thread = None
                raise RuntimeError(f"embedded MQTT broker did not start on {where} within {timeout} s")
            if self._start_error is not None:
                err = self._start_error
                self._thread.join(timeout)
                self._thread = None
                verb = "listen on" if isinstance(err, OSError) else "start on"
                raise RuntimeError(f"embedded MQTT broker could not {verb} {where}: {err}") from err
            logger.info("embedded MQTT broker listening on %s", self.url)
            if self._security is None and not _is_loopback(self._host):
                logger.warning(
                    "the embedded MQTT broker on %s takes anyone who can reach it, without a login: they can "
                    "publish a forged model or task and read every update. Use it so on a network you trust "
                    "only; for a fleet, write logins with `fedprune-aggregator init-broker` and pass "
                    "--broker-dir (or run Mosquitto)", self.url)
            return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and join its thread. Safe to call more than once."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._request_stop()
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"embedded MQTT broker on {self._host} did not stop within {timeout} s")
            self._thread = None
            if self._bound_port is not None:
                logger.info("embedded MQTT broker on %s:%d stopped", self._host, self._bound_port)
            self._bound_port = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"listening on {self._host}:{self._bound_port}" if self.running else "stopped"
        return f"<EmbeddedBroker {state}>"

    # ------------------------------------------------------------------ broker thread

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {
                # "external": amqtt opens no socket itself; _serve() runs the TCP server and hands
                # each connection to Broker.external_connected() (amqtt's documented hook for
                # servers it does not own). So this class knows the port it got with port 0,
                # without amqtt internals, and owns every client socket, which _shutdown() must
                # close before amqtt shuts down. "bind" is unused for this type but must be
                # present, or amqtt skips the listener.
                _LISTENER: {"type": "external", "bind": f"{self._host}:{self._requested_port}"},
            },
            # Explicit plugins only: with a plugin dict amqtt enables auth filtering, and with no
            # auth plugin at all every client would be refused.
            "plugins": (self._security.plugins() if self._security is not None
                        else {_ANONYMOUS_AUTH_PLUGIN: {"allow_anonymous": True}}),
        }

    def _request_stop(self) -> None:
        self._stop_requested.set()
        loop, stop_event = self._loop, self._stop_event
        if loop is None or stop_event is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed: the thread is ending
            loop.call_soon_threadsafe(stop_event.set)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - report, never kill the thread silently
            if not self._started.is_set():
                self._start_error = exc
            else:
                logger.exception("embedded MQTT broker failed")
        finally:
            try:
                _cancel_remaining_tasks(loop)
                loop.run_until_complete(asyncio.sleep(0))  # pending close callbacks
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                self._loop = None
                self._stop_event = None
                asyncio.set_event_loop(None)
                loop.close()
                self._started.set()  # never leave start() waiting

    async def _serve(self) -> None:
        # amqtt is an optional dependency (fedprune[aggregator]); start() checked it is there.
        from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter

        from fedprune.aggregator.broker_auth import LoginCheck

        self._stop_event = asyncio.Event()
        broker = _guarded_broker_class()(self._config(), loop=asyncio.get_running_loop())
        loop = asyncio.get_running_loop()
        connections: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        security = self._security
        login = (LoginCheck(str(security.password_file), security.federation, security.aggregator_user)
                 if security is not None else None)

        async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                amqtt_reader: Any = StreamReaderAdapter(reader)
                if login is not None:
                    amqtt_reader = await _admit(reader, writer, login)
                    if amqtt_reader is None:
                        return
                await broker.external_connected(amqtt_reader, StreamWriterAdapter(writer), listener_name=_LISTENER)
            except Exception:  # noqa: BLE001 - one bad connection must not end the server task noisily
                logger.debug("MQTT connection ended with an error", exc_info=True)

        def connection_done(writer: asyncio.StreamWriter) -> None:
            connections.pop(writer, None)
            # amqtt's StreamWriterAdapter.close() drains before closing, so a socket whose peer
            # vanished may never be closed; and a task cancelled before it ran closes nothing.
            writer.close()

        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Synchronous on purpose: asyncio calls it inside connection_made, so every accepted
            # socket is registered here before anything can cancel its task.
            task = loop.create_task(serve_connection(reader, writer))
            connections[writer] = task
            task.add_done_callback(lambda _task: connection_done(writer))

        try:
            await broker.start()
            server = await asyncio.start_server(on_connection, self._host, self._requested_port, ssl=self._ssl)
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            if broker.transitions.state == "started":
                await broker.shutdown()
            return
        try:
            self._bound_port = int(server.sockets[0].getsockname()[1])
            self._started.set()
            if not self._stop_requested.is_set():  # stop() may have come before the event existed
                await self._stop_event.wait()
        finally:
            await self._shutdown(broker, server, connections)

    async def _shutdown(
        self,
        broker: Any,
        server: asyncio.AbstractServer,
        connections: dict[asyncio.StreamWriter, asyncio.Task[None]],
    ) -> None:
        """Close every client connection first, then shut amqtt down.

        amqtt's own shutdown cancels each connection's reader task while the client may still
        be sending. On Python < 3.12, asyncio.wait_for() swallows a cancellation that arrives
        just as its inner read completes (cpython gh-86296); the reader then keeps running and
        Broker.shutdown() waits for it forever (seen: a subscriber's PUBACK arriving at the
        moment of shutdown hung it in most runs). With the sockets closed first, every reader
        ends on EOF by itself and amqtt has nothing left to cancel.
        """
        # Stop accepting without closing the server yet: on Python 3.11 a socket accepted in
        # the same loop iteration as Server.close() is leaked (the accept task then fails an
        # assertion in Server._attach() before the transport owns the socket). Unregistering
        # the listening socket first, then letting already-accepted sockets reach
        # on_connection(), leaves close() nothing to race with.
        loop = asyncio.get_running_loop()
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(_SETTLE_ITERATIONS):
            await asyncio.sleep(0)
        server.close()
        for writer in list(connections):
            writer.transport.abort()
        if connections:
            _, pending = await asyncio.wait(list(connections.values()), timeout=_CONNECTION_CLOSE_S)
            if pending:
                logger.debug("%d MQTT connection(s) still closing at shutdown", len(pending))
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=_SHUTDOWN_S)
        except asyncio.TimeoutError:
            logger.warning("amqtt did not shut down within %s s; cancelling its tasks", _SHUTDOWN_S)
        except Exception:  # noqa: BLE001
            logger.exception("embedded MQTT broker did not shut down cleanly")
        for writer in list(connections):  # stragglers; their tasks are cancelled afterwards
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # run the aborted transports' connection_lost (closes sockets)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


async def _admit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, login: Any) -> Any:
    """Read the connection's CONNECT and check its login before amqtt sees it.

    Returns a reader for amqtt that replays the CONNECT, its client id replaced by the username
    (one session per login), then the rest of the stream; or None after answering a refused
    login with a CONNACK (or a malformed or missing CONNECT with nothing).
    """
    from amqtt.adapters import StreamReaderAdapter
    from amqtt.mqtt.connect import ConnectPacket

    try:
        packet = await asyncio.wait_for(ConnectPacket.from_stream(StreamReaderAdapter(reader)), _CONNECT_TIMEOUT_S)
        if packet.variable_header is None or packet.payload is None:
            raise ValueError("not a CONNECT packet")
    except Exception as e:  # noqa: BLE001 - whatever came instead of a CONNECT, the connection ends here
        logger.info("closed a connection that sent no valid MQTT CONNECT within %g s (%s)", _CONNECT_TIMEOUT_S,
                    type(e).__name__)
        return None
    if packet.proto_level != _MQTT_311:
        await _refuse(writer, _CONNACK_BAD_PROTOCOL)
        return None
    refusal = login.refusal(packet.username, packet.password, packet.will_topic if packet.will_flag else None)
    if refusal is not None:
        logger.warning("%s (client id %s)", refusal, repr(packet.client_id)[:80])
        await _refuse(writer, _CONNACK_NOT_AUTHORIZED)
        return None
    packet.client_id = packet.username
    packet.client_id_is_random = False
    return _ReplayReader(packet.to_bytes(), StreamReaderAdapter(reader))


async def _refuse(writer: asyncio.StreamWriter, code: int) -> None:
    writer.write(bytes([0x20, 0x02, 0x00, code]))  # CONNACK, no session present
    with contextlib.suppress(ConnectionError):
        await writer.drain()


class _ReplayReader:
    """An amqtt reader adapter that returns ``prefix`` first, then what ``reader`` reads."""

    def __init__(self, prefix: bytes, reader: Any) -> None:
        self._prefix = prefix
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._prefix:
            return await self._reader.read(n)
        if n == -1 or n >= len(self._prefix):
            head, self._prefix = self._prefix, b""
            return head if n in (-1, len(head)) else head + await self._reader.read(n - len(head))
        head, self._prefix = self._prefix[:n], self._prefix[n:]
        return head

    def feed_eof(self) -> None:
        self._reader.feed_eof()


def _guarded_broker_class() -> type:
    """amqtt's Broker, sending a client only the retained messages of its own subscriptions that
    the topic plugins let it read (amqtt 0.12.1 sends those of everyone's, unchecked)."""
    from amqtt.broker import Broker
    from amqtt.contexts import Action

    class _GuardedBroker(Broker):
        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session) -> None:
            topic_filter, qos = subscription
            if all(s.client_id != session.client_id for s, _ in self._subscriptions.get(topic_filter, ())):
                return  # amqtt calls this for every filter anyone subscribed to, when a client connects
            handler = self._get_handler(session)
            if handler is None:
                return
            sends = []
            for topic, retained in list(self._retained_messages.items()):
                if self._matches(topic, topic_filter) and await self._topic_filtering(
                        session, topic=topic, action=Action.RECEIVE):
                    sends.append(asyncio.ensure_future(
                        handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
            if sends:
                await asyncio.wait(sends)

    return _GuardedBroker


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel whatever is still pending once _serve() returned (normally nothing) and wait."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("embedded broker task ended with %r", task.exception())

"""A live status page for a run: ``--status-port`` on fedprune-aggregator and fedprune-simulate.

The standard library's ``ThreadingHTTPServer`` on a daemon thread: no dependency, and a page read
by a person or two needs no more. It serves the page's files, shipped inside the package
(``status_web/``: HTML, JS and CSS, no CDN, since the machines are often offline), and
``status.json``, the run's ``RunStatus.snapshot()``. Read-only (GET and HEAD; anything else is
refused), on 127.0.0.1 unless told otherwise, and nothing secret in it: no broker address,
credential or weight. On loopback it answers only requests addressed to a loopback name, so a web
page elsewhere cannot read it through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from types import TracebackType
from typing import Any, Callable

__all__ = ["StatusPage"]

log = logging.getLogger(__name__)

_HTML, _JS, _CSS = "text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8"
_FILES = {"/": ("index.html", _HTML), "/index.html": ("index.html", _HTML), "/app.js": ("app.js", _JS),
          "/style.css": ("style.css", _CSS)}
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no NaN, and a browser refuses it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class StatusPage:
    """``with StatusPage(status.snapshot, port=8080) as page: print(page.url)``; port 0 picks a free one."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0) -> None:
        self.snapshot, self.host = snapshot, host
        self.loopback = _is_loopback(host)
        try:
            self._server = ThreadingHTTPServer((host, port), self._handler())
        except OSError as e:
            raise OSError(f"the status page cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                          "--status-port (0 picks a free one)") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-page", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host if ':' not in host or host.startswith('[') else f'[{host}]'}:{self.port}/"

    def __enter__(self) -> "StatusPage":
        if not self.loopback:
            log.warning("the status page listens on %s:%d: whoever reaches it sees the run's progress, the device "
                        "ids and which devices each round drew (read-only; no credentials or weights)",
                        self.host, self.port)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        page = self
        web = files("fedprune.aggregator.status_web")

        class Handler(BaseHTTPRequestHandler):
            server_version = "fedprune-status"

            def do_GET(self) -> None:  # noqa: N802 - http.server's interface
                self._answer(body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                host = self.headers.get("Host") or ""
                name = host if host.endswith("]") else host.rsplit(":", 1)[0]  # without the port
                if page.loopback and name not in _LOOPBACK_NAMES:
                    return self._send(403, b"a loopback status page answers only loopback host names\n", "text/plain")
                path = self.path.split("?", 1)[0]
                if path == "/status.json":
                    data = json.dumps(_finite(page.snapshot()), allow_nan=False).encode()
                    return self._send(200, data, "application/json", body)
                if path in _FILES:
                    name, kind = _FILES[path]
                    return self._send(200, web.joinpath(name).read_bytes(), kind, body)
                return self._send(404, b"not found\n", "text/plain", body)

            def _send(self, code: int, data: bytes, kind: str, body: bool = True) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for k, v in _HEADERS.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                log.debug("status page: " + format, *args)

        return Handler

"""A WebSocket server for browsers and tools: `--stream ws://HOST:PORT` (port 8765).

Unlike the UDP protocols this stream listens: it starts an HTTP + WebSocket
server on HOST:PORT (ws://0.0.0.0:8765 to let other machines in; the default
host 127.0.0.1 admits only this one). GET / serves a page that shows the
stream live (capture/web/index.html); the WebSocket endpoint is /ws and sends
one JSON text message per frame:

    {"frame": 42,                      frame index
     "time_s": 1.4,                    frame time in the take, seconds
     "face": true,                     false: only frame, time_s, face, image_size
     "image_size": [640, 480],         width, height in pixels
     "blendshapes": {"eyeBlinkLeft": 0.0123, ...},   the 52 ARKit names, 0..1, 4 decimals
     "head": {"yaw_rad": 0.1, "pitch_rad": -0.05, "roll_rad": 0.0,
              "position_cm": [x, y, z]},             engine/pose.py conventions; camera x right, y down, z forward
     "eyes": {"left": [yaw, pitch, roll], "right": [yaw, pitch, roll]},  radians, the subject's left eye first
     "landmarks": [[x, y], ...]}       image pixels, 0.1 px (478 MediaPipe points; 68 when replaying a track)

A value that is not a finite number is sent as null.

Who may connect. The server binds 127.0.0.1 unless the URL names another
host. A web page's WebSocket is not bound by the browser's same-origin rule,
so the handshake's Origin header is checked: a client without one (a
program), a page from this server itself (Origin equal to the Host it asked
for) and pages served from this machine (localhost, 127.0.0.0/8, [::1]) are let
in; any other origin gets 403, unless ``?origins=https://a.example,https://b.example``
names it (``origins=*`` admits every origin). While bound to a loopback address
the Host header must name a loopback host too, so a page that rebinds its own
domain name to 127.0.0.1 is refused as well.

Hostile peers. At most ``max_clients`` connections (default 64; never more than
a quarter of the process's open-file limit) are open at once, pages and
handshakes included; the ones beyond are reset on arrival, said once on
stderr, so a flood of connections cannot use up file descriptors or memory.
A handshake must arrive within 5 s. Incoming messages are read and dropped;
one over 4 KiB closes that connection (1009). Errors inside the server (bad
handshakes, garbage, resets) are counted, never printed as tracebacks, and
never reach the capture thread.

Sending never blocks capture: send() builds the JSON on the caller's thread
(nothing at all while no client is connected) and hands it to the server's
event loop, which runs on its own daemon thread. Each client keeps only the
newest message: a client that reads slowly skips frames instead of building a
backlog, and one that stops reading stalls only itself. latency_s gets one
entry per frame, when its message was first written to a client's socket
(minus frame.captured_s); frames that reached no client are not counted.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import resource
import sys
import threading
import time
from importlib import resources
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from capture.streams import Stream, StreamError, StreamFrame
from engine.arkit import ARKIT_NAMES

WS_PATH = "/ws"
PAGE_PATHS = ("/", "/index.html")
#: How long close() lets a client answer the closing handshake before dropping it.
CLOSE_TIMEOUT_S = 0.5
#: How long a connection may take to send its handshake (or page request).
OPEN_TIMEOUT_S = 5.0
#: Open connections at most, unless ?max_clients= says otherwise.
DEFAULT_MAX_CLIENTS = 64
#: Connections the system queues for accept(), and asyncio accepts in one go: what can be open
#: beyond max_clients for a moment before those over the limit are reset.
ACCEPT_BACKLOG = 16
#: Largest message a client may send (they are ignored anyway), bytes.
MAX_INCOMING_BYTES = 4096
LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


def is_loopback(host: str | None) -> bool:
    """'localhost', '127.0.0.5', '::1', '[::1]' -> True; other names and addresses -> False."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(authority: str) -> str:
    """'example.com:8765' -> 'example.com', '[::1]:80' -> '::1'."""
    return urlsplit("//" + authority).hostname or ""


def origin_allowed(origin: str | None, host_header: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a handshake with this Origin may connect (policy in the module docstring).

    allowed holds the extra origins of ?origins= (lower case, no trailing slash); None admits all.
    """
    if origin is None or allowed is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in allowed:
        return True
    if origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if host_header and parts.netloc == host_header.strip().lower():
        return True  # our own page
    return is_loopback(parts.hostname)


def _parse_origins(text: str) -> frozenset[str] | None:
    if text.strip() == "*":
        return None
    origins = frozenset(o.strip().lower().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins - {"null"}:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise StreamError(f"ws:// origins must be like https://example.com[:port], * or null; got {origin!r}")
    return origins


def _parse_max_clients(text: str) -> int:
    """?max_clients=N, clamped to a quarter of the open-file limit (so capture keeps files to open)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise StreamError(f"ws:// max_clients must be a whole number >= 1, got {text!r}")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        value = min(value, max(1, soft // 4))
    return value


def _quiet_logger() -> logging.Logger:
    """websockets logs handshake failures with tracebacks; a hostile peer must not fill stderr."""
    logger = logging.getLogger("capture.webstream.server")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def _rounded(values, digits: int):
    """Array -> nested lists rounded to digits, non-finite values as None (JSON null)."""
    array = np.round(np.asarray(values, dtype=np.float64), digits)
    if np.isfinite(array).all():
        return array.tolist()
    return np.where(np.isfinite(array), array, None).tolist()


def frame_message(frame: StreamFrame) -> str:
    """The JSON text message for one frame (schema in the module docstring)."""
    time_s = float(frame.time_s)
    message: dict = {"frame": int(frame.index), "time_s": round(time_s, 4) if math.isfinite(time_s) else None,
                     "face": bool(frame.face_found), "image_size": [int(v) for v in frame.image_size]}
    if frame.face_found:
        if frame.blendshapes is not None:
            message["blendshapes"] = dict(zip(ARKIT_NAMES, _rounded(frame.blendshapes, 4), strict=True))
        if frame.head_ypr_rad is not None:
            yaw, pitch, roll = _rounded(frame.head_ypr_rad, 5)
            position = _rounded(frame.head_position_cm, 2) if frame.head_position_cm is not None else None
            message["head"] = {"yaw_rad": yaw, "pitch_rad": pitch, "roll_rad": roll, "position_cm": position}
        if frame.eyes_ypr_rad is not None:
            left, right = _rounded(np.reshape(frame.eyes_ypr_rad, (2, 3)), 5)
            message["eyes"] = {"left": left, "right": right}
        if frame.landmarks_px is not None:
            message["landmarks"] = _rounded(np.asarray(frame.landmarks_px)[:, :2], 1)
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def page_html() -> bytes:
    """The page, with the 52 ARKit names filled in so it can lay out its bars before a face is seen."""
    text = resources.files("capture").joinpath("web/index.html").read_text(encoding="utf-8")
    return text.replace("__ARKIT_NAMES__", json.dumps(list(ARKIT_NAMES))).encode("utf-8")


class _Client:
    """One connected WebSocket: a single slot for the newest message, and a flag that it is full."""

    def __init__(self):
        self.ready = asyncio.Event()
        self.latest: tuple[str, float, int] | None = None  # message, captured_s, sequence number


class WebSocketStream(Stream):
    """The server described in the module docstring; close() stops it within about a second."""

    scheme = "ws"
    default_port = 8765

    def __init__(self, host: str, port: int, **options: str):
        unknown = sorted(set(options) - {"origins", "max_clients"})
        if unknown:
            raise StreamError(f"unknown ws:// option(s) {', '.join(unknown)}; known: origins, max_clients")
        super().__init__(host, port)
        self.allowed_origins = _parse_origins(options["origins"]) if "origins" in options else frozenset()
        self.max_clients = _parse_max_clients(options.get("max_clients", str(DEFAULT_MAX_CLIENTS)))
        self.loopback_only = is_loopback(host)
        self.open_connections = 0  # TCP connections, pages and handshakes included (loop thread)
        self.refused = 0  # connections reset because max_clients were open
        self.rejected = 0  # handshakes refused for their Origin or Host
        self.errors = 0  # exceptions inside the server, swallowed
        self._page = page_html()
        self._clients: set[_Client] = set()  # these two touched only on the loop's thread
        self._connections: set[ServerConnection] = set()
        self.clients = 0  # connected WebSocket clients, readable from any thread
        self._sequence = 0  # messages handed to the loop
        self._last_counted = 0  # newest sequence number already in latency_s
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._swallow)
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"ws-stream-{port}", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        except OSError as exc:
            self._stop_loop()
            raise StreamError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        except Exception:
            self._stop_loop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    @property
    def page_url(self) -> str:
        """Where a browser shows the stream."""
        return f"http://{self.host}:{self.port}/"

    async def _start(self):
        return await serve(self._serve_client, self.host, self.port, process_request=self._http,
                           compression=None, close_timeout=CLOSE_TIMEOUT_S, open_timeout=OPEN_TIMEOUT_S,
                           max_size=MAX_INCOMING_BYTES, max_queue=4, create_connection=self._connection_class(),
                           logger=_quiet_logger(), backlog=ACCEPT_BACKLOG)

    def _connection_class(self) -> type[ServerConnection]:
        """ServerConnection that counts open TCP connections and resets those beyond max_clients."""
        stream = self

        class CappedConnection(ServerConnection):
            counted = False

            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                if stream.open_connections >= stream.max_clients:
                    stream._refuse()
                    transport.abort()  # its socket closes on the loop's next turn
                else:
                    self.counted = True
                    stream.open_connections += 1

            def connection_lost(self, exc) -> None:
                if self.counted:
                    stream.open_connections -= 1
                super().connection_lost(exc)

        return CappedConnection

    def _refuse(self) -> None:
        self.refused += 1
        if self.refused == 1:
            print(f"capture: warning: {self.url}: {self.max_clients} connections open; refusing more "
                  "(?max_clients= raises the limit)", file=sys.stderr)

    def _swallow(self, loop, context) -> None:
        """The loop's exception handler: whatever a peer provokes is counted, never raised or printed."""
        self.errors += 1

    def _http(self, connection: ServerConnection, request):
        """Plain HTTP: the page at /, 404 elsewhere; /ws goes on to the WebSocket handshake
        once its Host and Origin pass (module docstring)."""
        host = request.headers.get("Host")
        if self.loopback_only and not is_loopback(_host_of(host or "")):
            self.rejected += 1
            return connection.respond(403, "Forbidden: this server answers only to localhost.\n")
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            if not origin_allowed(request.headers.get("Origin"), host, self.allowed_origins):
                self.rejected += 1
                return connection.respond(403, "Forbidden: pages from this origin may not connect "
                                               "(see ?origins= in capture's README).\n")
            return None
        if path not in PAGE_PATHS:
            return connection.respond(404, f"Not found. The page is at /, the stream at {WS_PATH}.\n")
        response = connection.respond(200, "")
        response.body = self._page
        del response.headers["Content-Type"], response.headers["Content-Length"]
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.headers["Content-Length"] = str(len(self._page))
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _serve_client(self, connection: ServerConnection) -> None:
        client = _Client()
        self._clients.add(client)
        self._connections.add(connection)
        self.clients = len(self._clients)
        reader = asyncio.create_task(self._ignore_incoming(connection))
        try:
            while True:
                waiter = asyncio.create_task(client.ready.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():  # the reader ended: the connection is closing
                    waiter.cancel()
                    break
                client.ready.clear()
                message, captured_s, sequence = client.latest
                await connection.send(message)
                if sequence > self._last_counted:  # first client to get this frame
                    self._last_counted = sequence
                    self.sent += 1
                    self.latency_s.append(time.perf_counter() - captured_s)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            self._connections.discard(connection)
            self.clients = len(self._clients)
            reader.cancel()

    @staticmethod
    async def _ignore_incoming(connection: ServerConnection) -> None:
        """Reads (and drops) what a client sends, so pings and the close handshake keep flowing."""
        try:
            async for _ in connection:
                pass
        except ConnectionClosed:
            pass

    def summary(self) -> str:
        line = f"{self.url}: {self.sent} of {self.offered} frames reached a client"
        if self.refused or self.rejected:
            line += f" ({self.refused} connections over the limit reset, {self.rejected} refused for their origin)"
        return line

    def _publish(self, message: str, captured_s: float, sequence: int) -> None:
        for client in self._clients:
            client.latest = (message, captured_s, sequence)
            client.ready.set()

    def send(self, frame: StreamFrame) -> None:
        if self._closed or self.clients == 0:
            return
        message = frame_message(frame)
        self._sequence += 1
        try:
            self._loop.call_soon_threadsafe(self._publish, message, frame.captured_s, self._sequence)
        except RuntimeError:  # the loop stopped underneath us (close() from another thread)
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # bounded inside _shutdown; the outer timeout only guards against a wedged loop
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=CLOSE_TIMEOUT_S + 2.0)
        finally:
            self._stop_loop()

    async def _shutdown(self) -> None:
        """Stops listening and closes every connection, dropping those that do not answer in time.

        A client that stopped reading leaves our send waiting on a full socket,
        and the closing handshake queues behind it: only aborting the TCP
        connection frees it.
        """
        self._server.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            for connection in self._connections:
                connection.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _stop_loop(self) -> None:
        async def cancel_the_rest():
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=0.5)

        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(timeout=1.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():
            self._loop.close()

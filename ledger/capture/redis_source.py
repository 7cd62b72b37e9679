"""Redis source: Celery events arrive by pub/sub, as Celery sends them.

Kombu publishes each event message with ``PUBLISH /{db}.{exchange}/{routing_key} <envelope>``
(``fanout_patterns``; ``/{db}.{exchange}`` without it), the envelope being kombu's JSON with a
base64 ``body``. We ``PSUBSCRIBE /{db}.{exchange}/*`` and ``SUBSCRIBE /{db}.{exchange}``.

Redis keeps nothing for a subscriber that is not connected, and drops a subscriber whose
output buffer passes ``client-output-buffer-limit pubsub`` (32 MB by default) — that is how
a slow consumer loses most of a burst. So reading is decoupled from everything else: a
dedicated thread does nothing but ``recv()`` into an in-memory queue (it releases the GIL
while blocked and holds it only to append a chunk), and the event loop parses, decodes and
commits at its own pace. A burst becomes memory in this process, never a dropped
subscriber. A small RESP parser (just what pub/sub replies need) avoids a client library's
per-message overhead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ledger.capture.batch import Batcher
from ledger.capture.decode import Decoder
from ledger.db import Backoff

log = logging.getLogger(__name__)

PING_AFTER = 15.0  # seconds of silence before the reader PINGs Redis
DEAD_AFTER = 15.0  # ...and how long it then waits for any reply before reconnecting
_RESET = None  # marker in the chunk queue: the connection was lost, drop any partial frame
_GLOB_SPECIAL = "\\*?[]"


@dataclass(slots=True, frozen=True)
class RedisAddress:
    host: str | None
    port: int
    path: str | None  # Unix socket
    db: int
    username: str | None
    password: str | None
    tls: bool
    tls_verify: ssl.VerifyMode = ssl.CERT_REQUIRED
    tls_ca: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """``redis://``, ``rediss://``, ``redis+socket:///path`` and ``unix:///path``."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        scheme = parts.scheme.lower()
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if scheme in ("redis+socket", "unix", "socket"):
            db = query.get("db") or query.get("virtual_host") or "0"
            return cls(None, 0, unquote(parts.path), int(db), username, password, False)
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {url!r}")
        db_text = parts.path.strip("/") or query.get("db") or "0"
        reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
        verify = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(reqs, ssl.CERT_REQUIRED)
        return cls(
            parts.hostname or "localhost",
            parts.port or 6379,
            None,
            int(db_text),
            username,
            password,
            scheme == "rediss",
            verify,
            query.get("ssl_ca_certs"),
        )

    def connect(self, timeout: float = 5.0) -> socket.socket:
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.path)
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.tls:
                context = ssl.create_default_context(cafile=self.tls_ca)
                if self.tls_verify != ssl.CERT_REQUIRED:
                    context.check_hostname = False
                context.verify_mode = self.tls_verify
                sock = context.wrap_socket(sock, server_hostname=self.host)
        try:  # a big kernel buffer absorbs a burst while the reader thread waits for the GIL
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        except OSError:
            pass
        return sock

    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def _command(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)


def channels(db: int, exchange: str) -> tuple[str, str]:
    """(pattern for PSUBSCRIBE, channel for SUBSCRIBE) where kombu publishes ``exchange``."""
    base = f"/{db}.{exchange}"
    return _glob_escape(base) + "/*", base


def client_name(exchange: str) -> str:
    return "ledger-capture:" + "".join(ch if ch.isalnum() or ch in "._-:" else "_" for ch in exchange)


class _ReaderThread(threading.Thread):
    """Reads raw bytes off the pub/sub socket as fast as Redis sends them. Nothing else."""

    def __init__(self, address: RedisAddress, exchange: str, chunks: deque, wake) -> None:
        super().__init__(name="ledger-capture-redis-reader", daemon=True)
        self.address, self.exchange = address, exchange
        self.chunks, self.wake = chunks, wake
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None
        self.bytes_read = 0

    def run(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while not self.stopping.is_set():
            try:
                self._session(backoff)
            except (OSError, ConnectionError, RuntimeError) as exc:
                if self.stopping.is_set():
                    break
                delay = backoff.next_delay()
                log.warning("capture: Redis %s: %s; reconnecting in %.1fs", self.address.where(), exc, delay)
                self.chunks.append(_RESET)
                self.wake()
                self.stopping.wait(delay)
            finally:
                self._close()

    def _session(self, backoff: Backoff) -> None:
        sock = self.sock = self.address.connect()
        if self.address.password is not None:
            auth = ("AUTH", self.address.username, self.address.password) if self.address.username else ("AUTH", self.address.password)
            sock.sendall(_command(*auth))
            reply = _read_line(sock)
            if not reply.startswith(b"+"):
                raise RuntimeError(f"AUTH refused: {reply.decode(errors='replace')}")
        # A name operators (and tests) can find in CLIENT LIST.
        sock.sendall(_command("CLIENT", "SETNAME", client_name(self.exchange)))
        reply = _read_line(sock)
        if not reply.startswith(b"+"):
            log.warning("capture: Redis CLIENT SETNAME refused: %s", reply.decode(errors="replace").strip())
        pattern, plain = channels(self.address.db, self.exchange)
        sock.sendall(_command("PSUBSCRIBE", pattern) + _command("SUBSCRIBE", plain))
        sock.settimeout(1.0)  # so stop() is noticed within a second
        log.info("capture: subscribed to Redis %s channels %s and %s", self.address.where(), pattern, plain)
        backoff.reset()
        recv, append, wake = sock.recv, self.chunks.append, self.wake
        last_data = pinged = time.monotonic()
        while not self.stopping.is_set():
            try:
                data = recv(4 << 20)
            except TimeoutError:
                # A quiet channel or a dead link? PING when quiet; no answer at all -> reconnect.
                now = time.monotonic()
                if now - last_data > PING_AFTER and now - pinged > PING_AFTER:
                    sock.sendall(_command("PING"))
                    pinged = now
                if now - last_data > PING_AFTER + DEAD_AFTER:
                    raise ConnectionError(f"no reply from Redis for {now - last_data:.0f}s")
                continue
            if not data:
                raise ConnectionError("connection closed by Redis")
            last_data = time.monotonic()
            self.bytes_read += len(data)
            append(data)
            wake()
        # Stopping: keep what already reached our socket, then let go.
        sock.settimeout(0.05)
        try:
            while data := recv(4 << 20):
                self.bytes_read += len(data)
                append(data)
        except (TimeoutError, BlockingIOError, OSError):
            pass
        wake()

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def stop(self) -> None:
        self.stopping.set()


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("connection closed by Redis")
        data += chunk
    return data


class RespParser:
    """Incremental parser for the replies a subscribed connection gets (arrays of bulk
    strings and integers, plus simple strings and errors)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def reset(self) -> None:
        self.buf.clear()

    def feed(self, data: bytes) -> list[list]:
        buf = self.buf
        buf += data
        frames: list[list] = []
        pos, n = 0, len(buf)
        find = buf.find
        while pos < n:
            kind = buf[pos]
            eol = find(b"\r\n", pos)
            if eol < 0:
                break
            if kind == 0x2A:  # '*' array
                count = int(buf[pos + 1 : eol])
                items: list = []
                p = eol + 2
                complete = True
                for _ in range(count):
                    if p >= n:
                        complete = False
                        break
                    e = find(b"\r\n", p)
                    if e < 0:
                        complete = False
                        break
                    head = buf[p]
                    if head == 0x24:  # '$' bulk string
                        size = int(buf[p + 1 : e])
                        start = e + 2
                        end = start + size
                        if end + 2 > n:
                            complete = False
                            break
                        items.append(bytes(buf[start:end]))
                        p = end + 2
                    else:  # ':' integer, '+' simple string, '-' error
                        items.append(bytes(buf[p:e]))
                        p = e + 2
                if not complete:
                    break
                frames.append(items)
                pos = p
            else:  # '+OK', '-ERR ...', ':1' outside an array
                frames.append([bytes(buf[pos:eol])])
                pos = eol + 2
        if pos:
            del buf[:pos]
        return frames


class RedisSource:
    """Feeds Redis pub/sub event messages into a ``Batcher``."""

    name = "redis"

    def __init__(self, url: str, exchange: str, decoder: Decoder, batcher: Batcher) -> None:
        self.address = RedisAddress.from_url(url)
        self.exchange, self.decoder, self.batcher = exchange, decoder, batcher
        self.ready = asyncio.Event()
        self.messages = 0
        self.subscriptions = 0  # how many times (re)subscribed
        self._chunks: deque = deque()
        self._waiting = False
        self._wake_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: _ReaderThread | None = None

    def _wake(self) -> None:
        # Called from the reader thread: only cross threads when the loop is idle-waiting.
        if self._waiting:
            self._waiting = False
            self._loop.call_soon_threadsafe(self._wake_event.set)  # type: ignore[union-attr]

    def backlog_bytes(self) -> int:
        return sum(len(c) for c in list(self._chunks) if c is not None)

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set, then decode whatever was already received."""
        self._loop = asyncio.get_running_loop()
        self._thread = _ReaderThread(self.address, self.exchange, self._chunks, self._wake)
        self._thread.start()
        parser = RespParser()
        chunks, batcher, decoder = self._chunks, self.batcher, self.decoder
        stop_task = asyncio.ensure_future(stopping.wait())
        last_warn = 0.0
        drained = False
        try:
            while True:
                if stopping.is_set() and not drained:
                    # Stop reading, wait for the reader to let go, then decode what it read.
                    self._thread.stop()
                    await asyncio.to_thread(self._thread.join, 5)
                    drained = True
                if not chunks:
                    if drained:
                        break
                    self._waiting = True
                    self._wake_event.clear()
                    if chunks:  # appended between the check and _waiting = True
                        self._waiting = False
                        continue
                    wake = asyncio.ensure_future(self._wake_event.wait())
                    await asyncio.wait([wake, stop_task], return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    self._waiting = False
                    continue
                # Take a bounded slice of work, then yield so the writer can commit.
                taken = 0
                while chunks and taken < (1 << 20):
                    chunk = chunks.popleft()
                    if chunk is _RESET:
                        parser.reset()
                        self.ready.clear()
                        continue
                    taken += len(chunk)
                    for frame in parser.feed(chunk):
                        self._frame(frame, decoder, batcher)
                await batcher.room()
                await asyncio.sleep(0)
                if len(chunks) > 64:
                    now = time.monotonic()
                    if now - last_warn > 10:
                        last_warn = now
                        log.warning("capture: %d MB received from Redis and not yet decoded", self.backlog_bytes() >> 20)
        finally:
            stop_task.cancel()
            self._thread.stop()
            self._thread.join(timeout=3)

    def _frame(self, frame: list, decoder: Decoder, batcher: Batcher) -> None:
        kind = frame[0]
        if kind == b"pmessage" and len(frame) == 4:
            decoder.redis_message(frame[3], frame[2], batcher.current.events, batcher.current.rejects)
            self.messages += 1
            batcher.added(len(frame[3]))
        elif kind == b"message" and len(frame) == 3:
            decoder.redis_message(frame[2], frame[1], batcher.current.events, batcher.current.rejects)
            self.messages += 1
            batcher.added(len(frame[2]))
        elif kind == b"subscribe":
            self.subscriptions += 1
            self.ready.set()  # both subscriptions are in place (SUBSCRIBE was sent second)
        elif kind == b"pong":
            pass  # the reader's keep-alive
        elif kind.startswith(b"-"):
            log.error("capture: Redis replied %s", kind.decode(errors="replace"))

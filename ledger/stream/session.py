"""One websocket connection: authentication, the client's messages, a bounded outgoing
queue drained by its own sender task, and heartbeats.

The hub only ever calls `offer`, which appends to the queue without awaiting. When the
queue is full the client is too slow: it is sent where to resume and closed (4429), and
nothing else waits for it."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from ledger.api.auth import Principal, bearer_token
from ledger.db import TRANSIENT_ERRORS
from ledger.stream.hub import Hub
from ledger.stream.protocol import Auth, Ping, Pong, ProtocolError, Unsubscribe, parse
from ledger.stream.subscription import Subscription
from ledger.stream.topics import topic_for

log = logging.getLogger(__name__)

# Close codes (4000-4999 are the application's): also listed in README.md.
CLOSE_SHUTDOWN = 1001
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_HEARTBEAT = 4408
CLOSE_OVERFLOW = 4429

MAX_SUBSCRIPTIONS = 100
MAX_FRAME = 64 * 1024  # bytes a client message may have
CLOSE_GRACE = 5.0  # seconds a closing socket gets to take its last message

_CONTROL, _DATA, _SNAPSHOT = 0, 1, 2

Authenticate = Callable[[str | None], Awaitable[Principal | None]]


class Session:
    def __init__(self, websocket: WebSocket, hub: Hub, *, queue_size: int, heartbeat: float,
                 auth_required: bool, authenticate: Authenticate) -> None:
        self.ws, self.hub = websocket, hub
        self.max_queue, self.heartbeat = queue_size, heartbeat
        self.auth_required, self.authenticate = auth_required, authenticate
        self.queue: deque[tuple[bytes, Subscription | None, int, int]] = deque()
        self.subs: dict[str, Subscription] = {}
        self.principal: Principal | None = None
        self.closing: tuple[int, str] | None = None
        self._final: bytes | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._closing = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()

    # --- the outgoing queue (called synchronously, also by the hub) --------------------------

    def offer(self, data: bytes, sub: Subscription | None = None, seq: int = 0, *, snapshot: bool = False) -> None:
        if self.closing is not None:
            return
        if len(self.queue) >= self.max_queue:
            self.overflow()
            return
        self.queue.append((data, sub, seq, _SNAPSHOT if snapshot else (_DATA if sub is not None else _CONTROL)))
        self._wake.set()

    def control(self, message: dict[str, Any]) -> None:
        message.setdefault("seq", self.hub.position())
        self.offer(orjson.dumps(message))

    async def room(self, n: int) -> None:
        """Wait until `n` more messages fit (catch-up respects the client's pace)."""
        while self.closing is None and len(self.queue) > self.max_queue - n:
            self._room.clear()
            await self._room.wait()

    def resume_positions(self) -> dict[str, int | None]:
        """Per subscription, the `since` that continues exactly after what was handed to the
        socket (None: its snapshot never left, subscribe afresh)."""
        first_unsent: dict[Subscription, int] = {}
        for _data, sub, seq, kind in self.queue:
            if sub is not None and kind == _DATA and sub not in first_unsent:
                first_unsent[sub] = seq
        out: dict[str, int | None] = {}
        for sub_id, sub in self.subs.items():
            if not sub.snapshot_sent:
                out[sub_id] = None
            elif sub in first_unsent:
                out[sub_id] = first_unsent[sub] - 1
            else:
                out[sub_id] = sub.effective_position()
        return out

    def overflow(self) -> None:
        if self.closing is not None:
            return
        self._finish(CLOSE_OVERFLOW, "client too slow", "overflow",
                     f"more than {self.max_queue} messages waited for this client; resubscribe with since")

    def shutdown(self) -> None:
        self._finish(CLOSE_SHUTDOWN, "server shutting down", "closing",
                     "this replica is shutting down; reconnect and resubscribe with since")

    def _finish(self, code: int, reason: str, kind: str, detail: str) -> None:
        if self.closing is not None:
            return
        positions = self.resume_positions()
        known = [p for p in positions.values() if p is not None]
        message = {
            "type": kind,
            "seq": self.hub.position(),
            "resume_from": min(known) if known else self.hub.position(),
            "subs": positions,
            "detail": detail,
        }
        self._drop_all()
        self.queue.clear()
        self._final = orjson.dumps(message)
        self.closing = (code, reason)
        self._closing.set()
        self._wake.set()
        self._room.set()

    def _error_and_close(self, code: int, error: str, detail: str) -> None:
        if self.closing is not None:
            return
        self._drop_all()
        self.queue.clear()
        self._final = orjson.dumps({"type": "error", "error": error, "detail": detail, "seq": self.hub.position()})
        self.closing = (code, detail[:120])
        self._closing.set()
        self._wake.set()
        self._room.set()

    def _drop(self, sub: Subscription) -> None:
        sub.state = "closed"
        self.hub.remove(sub)
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()

    def _drop_all(self) -> None:
        for sub in self.subs.values():
            self._drop(sub)

    # --- the connection ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        if not await self._authenticate():
            return
        self.hub.sessions.add(self)
        self.control({"type": "welcome", "heartbeat": self.heartbeat,
                      "principal": self.principal.token_id if self.principal else None})
        reader = asyncio.create_task(self._reader(), name="stream-reader")
        sender = asyncio.create_task(self._sender(), name="stream-sender")
        beat = asyncio.create_task(self._heartbeats(), name="stream-heartbeat")
        closer = asyncio.create_task(self._grace(), name="stream-closer")
        try:
            await asyncio.wait({reader, sender, closer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.closing = self.closing or (1000, "")
            self._drop_all()
            self.hub.sessions.discard(self)
            for task in (reader, sender, beat, closer):
                task.cancel()
            await asyncio.gather(reader, sender, beat, closer, return_exceptions=True)

    async def _authenticate(self) -> bool:
        if not self.auth_required:
            return True
        token = bearer_token(self.ws.headers)
        if token is None:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=max(self.heartbeat, 1.0) * 2)
            except asyncio.TimeoutError:
                return await self._refuse(CLOSE_UNAUTHENTICATED, "unauthenticated",
                                          "no Authorization header and no auth message in time")
            if message["type"] == "websocket.disconnect":
                return False
            try:
                first = parse(message.get("text") or message.get("bytes") or b"")
            except ProtocolError as exc:
                first = exc
            if not isinstance(first, Auth):
                return await self._refuse(
                    CLOSE_UNAUTHENTICATED, "unauthenticated",
                    'send an "Authorization: Bearer <token>" header, or {"type": "auth", "token": "<token>"}'
                    " as the first message")
            token = first.token
        principal = await self.authenticate(token)
        if principal is None:
            return await self._refuse(CLOSE_UNAUTHENTICATED, "invalid_token", "the token is unknown or revoked")
        if not principal.allows("read"):
            return await self._refuse(CLOSE_FORBIDDEN, "insufficient_scope", "the stream needs the 'read' scope")
        self.principal = principal
        return True

    async def _refuse(self, code: int, error: str, detail: str) -> bool:
        try:
            await self.ws.send_text(orjson.dumps({"type": "error", "error": error, "detail": detail,
                                                  "seq": self.hub.position()}).decode())
            await self.ws.close(code, error)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        return False

    async def _sender(self) -> None:
        queue, ws = self.queue, self.ws
        while self.closing is None:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            data, sub, _seq, kind = queue.popleft()
            if kind == _SNAPSHOT and sub is not None:
                sub.snapshot_sent = True
            if len(queue) < self.max_queue // 2 + 1:
                self._room.set()
            await ws.send_text(data.decode())
        code, reason = self.closing
        if self._final is not None:
            await ws.send_text(self._final.decode())
        await ws.close(code, reason)

    async def _grace(self) -> None:
        """Once closing, the sender gets CLOSE_GRACE seconds to deliver the last message."""
        await self._closing.wait()
        await asyncio.sleep(CLOSE_GRACE)

    async def _heartbeats(self) -> None:
        while self.closing is None:
            await asyncio.sleep(self.heartbeat)
            silent = self._loop.time() - self.last_heard
            if silent > 2 * self.heartbeat:
                self._error_and_close(CLOSE_HEARTBEAT, "heartbeat_timeout",
                                      f"nothing heard from the client for {silent:.1f}s")
                return
            self.control({"type": "ping"})

    async def _reader(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.last_heard = self._loop.time()
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes") or b""
            if len(frame) > MAX_FRAME:
                self.control({"type": "error", "error": "too_large",
                              "detail": f"message: larger than {MAX_FRAME} bytes"})
                continue
            self._handle(frame)

    def _handle(self, frame: str | bytes) -> None:
        try:
            message = parse(frame)
        except ProtocolError as exc:
            self.control({"type": "error", "error": exc.error, "detail": exc.detail, "sub": exc.sub})
            return
        if isinstance(message, Ping):
            self.control({"type": "pong", "id": message.id})
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Auth):
            self.control({"type": "error", "error": "already_authenticated",
                          "detail": "auth: only the first message may authenticate"})
        elif isinstance(message, Unsubscribe):
            sub = self.subs.pop(message.sub, None)
            if sub is None:
                self.control({"type": "error", "error": "unknown_sub", "sub": message.sub,
                              "detail": f"sub: no subscription {message.sub!r} on this socket"})
                return
            self._drop(sub)
            self.control({"type": "unsubscribed", "sub": message.sub})
        else:
            self._subscribe(message)

    def _subscribe(self, message: Any) -> None:
        if message.sub in self.subs:
            self.control({"type": "error", "error": "duplicate_sub", "sub": message.sub,
                          "detail": f"sub: {message.sub!r} is already subscribed on this socket"})
            return
        if len(self.subs) >= MAX_SUBSCRIPTIONS:
            self.control({"type": "error", "error": "too_many_subs", "sub": message.sub,
                          "detail": f"sub: at most {MAX_SUBSCRIPTIONS} subscriptions per socket"})
            return
        sub = Subscription(self.hub, self, message.sub, topic_for(message), message.since)
        self.subs[message.sub] = sub
        self.hub.add(sub)
        self.control({"type": "subscribed", "sub": message.sub, "topic": message.topic,
                      "since": message.since, "seq": self.hub.position(sub.source)})
        sub.task = asyncio.create_task(self._run_subscription(sub), name=f"stream-sub-{message.sub}")

    async def _run_subscription(self, sub: Subscription) -> None:
        try:
            await sub.run()
        except asyncio.CancelledError:
            raise
        except TRANSIENT_ERRORS as exc:
            log.warning("subscription %s failed: database unavailable (%s)", sub.id, exc)
            self._fail(sub, "database_unavailable", "the database is not reachable; subscribe again with since")
        except Exception:
            log.exception("subscription %s failed", sub.id)
            self._fail(sub, "internal", "internal error; subscribe again with since")

    def _fail(self, sub: Subscription, error: str, detail: str) -> None:
        if self.subs.get(sub.id) is sub:
            del self.subs[sub.id]
            self._drop(sub)
            self.control({"type": "error", "error": error, "detail": detail, "sub": sub.id,
                          "resume_from": sub.position if sub.snapshot_sent else None})

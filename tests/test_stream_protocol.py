"""/v1/stream on a real uvicorn replica with a real websockets client: each topic's snapshot
then live changes, unsubscribe, auth failures, malformed messages, heartbeats, and the
/v1/tasks/{id}/wait long poll. Changes come from real-format events folded by the projector."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest
import websockets

from ledger.api.tokens import create_token, hash_token, revoke_token
from tests.support.api import running_api
from tests.support.stream import (
    StreamClient,
    lifecycle,
    project,
    record,
    recv_json,
    worker_heartbeat,
    worker_online,
    ws_url,
)
from tests.support.waiting import wait_until

HEARTBEAT = 0.5


def _id() -> str:
    return str(uuid.uuid4())


async def test_each_topic_starts_with_a_snapshot_then_pushes_changes(database_url: str, conn: asyncpg.Connection) -> None:
    t1, t2, t3, group = _id(), _id(), _id(), _id()
    await record(conn, [worker_online("celery@a"), *lifecycle(t1, group=(group, 0)), *lifecycle(t3, name="tests.other")])
    before = await project(database_url)

    async with running_api(database_url, stream_heartbeat=HEARTBEAT) as api, StreamClient.connect(api) as c:
        welcome = await c.wait_for(lambda m: m["type"] == "welcome")
        assert welcome["seq"] == before
        await c.subscribe("task", "task", task_id=t1)
        await c.subscribe("group", "group", group_id=group)
        await c.subscribe("worker", "worker", hostname="celery@a")
        await c.subscribe("workers", "workers")
        await c.subscribe("adds", "tasks", filter={"name": "tests.add"})
        await c.subscribe("log", "log", types=["task-*"])
        subs = ("task", "group", "worker", "workers", "adds", "log")
        for sub in subs:
            await c.live(sub)

        snap = {m["sub"]: m for m in c.messages if m["type"] == "snapshot"}
        assert set(snap) == set(subs)
        assert all(m["seq"] == before for s, m in snap.items() if s != "log")
        assert [(i["kind"], i["key"], i["data"]["state"]) for i in snap["task"]["items"]] == [("task", t1, "SUCCESS")]
        assert [(i["kind"], i["key"]) for i in snap["group"]["items"]] == [("group", group), ("task", t1)]
        assert [i["key"] for i in snap["worker"]["items"]] == ["celery@a"]
        assert [i["key"] for i in snap["workers"]["items"]] == ["celery@a"]
        assert [i["key"] for i in snap["adds"]["items"]] == [t1]  # t3 is tests.other
        assert snap["log"]["items"] == [] and snap["log"]["seq"] == before  # the raw log has no state

        # live: a second member joins the group, on another worker
        mark = len(c.messages)
        last = await record(conn, [worker_online("celery@b"), *lifecycle(t2, worker="celery@b", group=(group, 1))])
        await project(database_url)
        await c.wait_for(lambda m: m["type"] == "event" and m["seq"] == last, start=mark)
        await c.wait_for(lambda m: m["type"] == "changes" and m["sub"] == "group" and m["seq"] == last, start=mark)
        assert c.changes("task") == []  # t1 did not change
        group_changes = c.changes("group")
        assert {(k, key) for _, k, key, _ in group_changes} == {("task", t2), ("group", group)}
        assert group_changes[-1][0] == last
        assert c.changes("adds")[-1][2:] == (t2, "SUCCESS")
        assert all(key == "celery@b" for _, _, key, _ in c.changes("workers"))
        assert c.changes("worker") == []  # celery@a did not change
        events = [m["event"] for m in c.of("log") if m["type"] == "event"]
        assert [e["type"] for e in events] == ["task-sent", "task-received", "task-started", "task-succeeded"]
        assert all(m["seq"] == m["event"]["seq"] > before for m in c.of("log") if m["type"] == "event")
        for sub in subs:  # positions only grow
            seqs = [m["seq"] for m in c.of(sub) if m["type"] in ("snapshot", "changes", "event", "live")]
            assert seqs == sorted(seqs), sub

        # unsubscribe: nothing more for it, the others continue
        await c.send({"type": "unsubscribe", "sub": "group"})
        await c.wait_for(lambda m: m["type"] == "unsubscribed" and m["sub"] == "group")
        mark = len(c.messages)
        last = await record(conn, [*lifecycle(_id(), group=(group, 2)), worker_heartbeat("celery@a", processed=9)])
        await project(database_url)
        await c.wait_for(lambda m: m["type"] == "changes" and m["sub"] == "worker" and m["seq"] == last, start=mark)
        assert [m for m in c.messages[mark:] if m.get("sub") == "group"] == []
        assert c.changes("worker")[-1][:3] == (last, "worker", "celery@a")


async def test_malformed_messages_get_clear_errors_and_the_socket_lives_on(database_url: str) -> None:
    cases = [
        ("{not json", "bad_json", "not valid JSON", None),
        ("[1, 2]", "bad_message", "message: must be a JSON object", None),
        ('{"type": "subscribe!"}', "bad_message", "type: must be one of", None),
        ('{"type": "subscribe", "sub": "a", "topic": "planets"}', "bad_subscribe", "topic: must be one of", "a"),
        ('{"type": "subscribe", "sub": "b", "topic": "task"}', "bad_subscribe", "task_id: Field required", "b"),
        ('{"type": "subscribe", "sub": "c", "topic": "task", "task_id": "x", "since": -4}', "bad_subscribe",
         "since: Input should be greater than or equal to 0", "c"),
        ('{"type": "subscribe", "sub": "d", "topic": "tasks", "filter": {"colour": "red"}}', "bad_subscribe",
         "filter.colour: unknown filter", "d"),
        ('{"type": "subscribe", "sub": "e", "topic": "tasks", "filter": {"received_after": "soon"}}',
         "bad_subscribe", "filter.received_after:", "e"),
        ('{"type": "subscribe", "sub": "", "topic": "workers"}', "bad_subscribe", "sub: String should have at least 1", ""),
        ('{"type": "subscribe", "sub": "f", "topic": "log", "types": "task-sent"}', "bad_subscribe", "types:", "f"),
        ('{"type": "unsubscribe", "sub": "nobody"}', "unknown_sub", "sub: no subscription 'nobody'", "nobody"),
        ('{"type": "auth", "token": "again"}', "already_authenticated", "auth:", None),
        ('{"type": "ping", "extra": 1}', "bad_message", "extra: Extra inputs are not permitted", None),
    ]
    async with running_api(database_url, stream_heartbeat=HEARTBEAT) as api, StreamClient.connect(api) as c:
        for frame, code, detail, sub in cases:
            mark = len(c.messages)
            await c.send(frame)
            error = await c.wait_for(lambda m: m["type"] == "error", start=mark)
            assert error["error"] == code, (frame, error)
            assert detail in error["detail"], (frame, error)
            assert error.get("sub") == sub, (frame, error)
            assert isinstance(error["seq"], int)
        # a frame far too large is refused, not read
        await c.send('{"type": "ping", "id": "' + "x" * 70_000 + '"}')
        assert (await c.wait_for(lambda m: m["type"] == "error" and m["error"] == "too_large"))["detail"].startswith("message:")
        # the same id twice
        await c.subscribe("w", "workers")
        await c.live("w")
        await c.subscribe("w", "workers")
        dup = await c.wait_for(lambda m: m["type"] == "error" and m["error"] == "duplicate_sub")
        assert dup["sub"] == "w"
        # still serving: ping answered, new subscriptions work
        await c.send({"type": "ping", "id": 7})
        assert (await c.wait_for(lambda m: m["type"] == "pong"))["id"] == 7
        await c.subscribe("ok", "task", task_id="t")
        await c.live("ok")
        assert not c.closed.is_set()


async def _refused(api, *, headers=None, first=None, code: int, error: str) -> None:
    async with websockets.connect(ws_url(api), additional_headers=headers) as ws:
        if first is not None:
            await ws.send(first)
        message = await recv_json(ws)
        assert message["type"] == "error" and message["error"] == error, message
        with pytest.raises(websockets.ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == code, (ws.close_code, ws.close_reason)


async def test_auth_failures_are_closed_with_a_clear_code(database_url: str, conn: asyncpg.Connection) -> None:
    # `ledger token create` always grants at least read; a row without scopes is what an
    # operator who stripped a token's scopes in SQL would leave
    no_scope = "ldg_noscope_secret"
    await conn.execute("INSERT INTO ledger.api_tokens (token_id, token_hash, scopes) VALUES ('noscope', $1, '{}')",
                       hash_token(no_scope))
    revoked = await create_token(conn, ["read"], "revoked")
    await revoke_token(conn, revoked.split("_")[1])
    async with running_api(database_url, stream_heartbeat=HEARTBEAT) as api:
        await _refused(api, code=4401, error="unauthenticated")  # nothing at all (times out)
        await _refused(api, first='{"type": "subscribe", "sub": "a", "topic": "workers"}', code=4401,
                       error="unauthenticated")  # first message is not auth
        await _refused(api, first="not json", code=4401, error="unauthenticated")
        await _refused(api, headers={"Authorization": "Bearer nope"}, code=4401, error="invalid_token")
        await _refused(api, first=orjson.dumps({"type": "auth", "token": "nope"}), code=4401, error="invalid_token")
        await _refused(api, headers={"Authorization": f"Bearer {revoked}"}, code=4401, error="invalid_token")
        await _refused(api, headers={"Authorization": f"Bearer {no_scope}"}, code=4403, error="insufficient_scope")
        # every real scope includes read; both ways of authenticating work
        for scope in ("read", "control", "admin"):
            for header in (True, False):
                async with StreamClient.connect(api, scope, header=header) as c:
                    assert (await c.wait_for(lambda m: m["type"] in ("welcome", "error")))["type"] == "welcome"
        # the long poll is an API route like the others
        async with api.client(None) as http:
            r = await http.get("/v1/tasks/x/wait", params={"timeout": 0})
            assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        async with api.client(token=no_scope) as http:
            assert (await http.get("/v1/tasks/x/wait", params={"timeout": 0})).status_code == 403


async def test_silent_peer_is_dropped_and_a_live_one_kept(database_url: str) -> None:
    # 1 s: slack for a loaded machine, where the answering client's pong may be late
    async with running_api(database_url, stream_heartbeat=2 * HEARTBEAT) as api:
        async with StreamClient.connect(api, name="silent") as silent, StreamClient.connect(api, name="live") as live:
            silent.answer_pings = False
            await silent.wait_for(lambda m: m["type"] == "ping")  # the server pings...
            await asyncio.wait_for(silent.closed.wait(), 20 * HEARTBEAT)  # ...and drops who never answers
            assert silent.ws.close_code == 4408
            assert silent.messages[-1]["error"] == "heartbeat_timeout"
            # the client that answers is still there well past the silent one's deadline
            pings = 0

            def fourth_ping(m: dict) -> bool:
                nonlocal pings
                pings += m["type"] == "ping"
                return pings == 4

            await live.wait_for(fourth_ping, start=len(live.messages))
            assert not live.closed.is_set()
            await live.send({"type": "ping", "id": "from-client"})
            assert (await live.wait_for(lambda m: m["type"] == "pong"))["id"] == "from-client"
        hub = api.app.state.stream_hub
        assert not hub.sessions  # both cleaned up


async def test_wait_long_poll(database_url: str, conn: asyncpg.Connection) -> None:
    done, pending, failing = _id(), _id(), _id()
    await record(conn, lifecycle(done))
    await record(conn, lifecycle(pending)[:2])  # sent, received
    await project(database_url)
    async with running_api(database_url, stream_heartbeat=HEARTBEAT) as api, api.client() as http:
        # already final: answers at once
        r = await http.get(f"/v1/tasks/{done}/wait", params={"timeout": 30})
        assert r.status_code == 200
        body = r.json()
        assert body["final"] is True and body["task"]["state"] == "SUCCESS" and body["task"]["task_id"] == done
        # not final: current state at the timeout
        r = await http.get(f"/v1/tasks/{pending}/wait", params={"timeout": 0.3})
        assert r.status_code == 200 and r.json()["final"] is False and r.json()["task"]["state"] == "RECEIVED"
        # becomes final while waiting (and is unknown when the wait starts): answered when it happens
        waiting = asyncio.create_task(http.get(f"/v1/tasks/{failing}/wait", params={"timeout": 30}))
        await wait_until(lambda: failing in api.app.state.stream_hub.waiters, 10, "the long poll to register")
        assert not waiting.done()
        await record(conn, lifecycle(failing, fail=True))
        await project(database_url)
        r = await asyncio.wait_for(waiting, 10)
        assert r.status_code == 200 and r.json()["final"] is True and r.json()["task"]["state"] == "FAILURE"
        assert r.json()["task"]["exception"] == "ValueError('boom')"
        # unknown after the timeout: 404
        r = await http.get(f"/v1/tasks/{_id()}/wait", params={"timeout": 0.1})
        assert r.status_code == 404 and r.json()["error"] == "task_not_found"
        # bad timeouts name the field
        for bad in ("-1", "301", "soon"):
            r = await http.get(f"/v1/tasks/{done}/wait", params={"timeout": bad})
            assert r.status_code == 422 and r.json()["field"] == "timeout", r.json()
        assert not api.app.state.stream_hub.waiters  # nothing left behind


async def test_a_chords_callback_is_not_pushed_as_a_member_of_its_header_group(
    database_url: str, conn: asyncpg.Connection
) -> None:
    group, callback, members = _id(), _id(), [_id(), _id()]
    async with running_api(database_url, stream_heartbeat=HEARTBEAT) as api, StreamClient.connect(api) as c:
        await c.subscribe("live", "group", group_id=group)
        await c.live("live")
        header = []
        for i, m in enumerate(members):
            events = lifecycle(m, group=(group, i))
            for e in events:
                e["chord_id"] = callback
            header += events
        await record(conn, header)
        await project(database_url)
        # Celery sends the callback with the header's group id and no index
        cb_events = lifecycle(callback, name="tests.tsum")
        for e in cb_events:
            e["group_id"] = group
        last = await record(conn, cb_events)
        await project(database_url)
        await c.subscribe("task", "task", task_id=callback)  # a barrier: the callback's change is out
        await c.wait_for(lambda m: m["type"] == "snapshot" and m["sub"] == "task" and m["seq"] >= last)
        await c.subscribe("resumed", "group", group_id=group, since=0)
        await c.subscribe("snap", "group", group_id=group)
        await c.live("resumed")
        await c.live("snap")
        for sub in ("live", "resumed"):
            assert {key for _, _, key, _ in c.changes(sub)} == {group, *members}, sub
        [snap] = [m for m in c.of("snap") if m["type"] == "snapshot"]
        assert [i["key"] for i in snap["items"]] == [group, *members]

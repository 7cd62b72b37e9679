"""RabbitMQ source: a durable queue bound to the event exchange with ``#``.

The exchange is declared exactly as Celery declares it (topic, durable), so whichever side
starts first, both agree. The queue is durable and not exclusive: while capture is down it
keeps buffering events (as long as RabbitMQ itself stays up: Celery publishes events as
transient messages), and several capture processes may share it.

Messages are consumed with manual acks and a prefetch window; a message is acked only after
the batch holding it has committed (one ``multiple=True`` ack of the batch's last delivery
tag). A crash before that means redelivery, which the log's idempotency key absorbs. This
uses aiormq, the AMQP client underneath aio-pika, directly: it hands over raw deliveries
without building a wrapper object per message.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import aiormq
from aiormq.abc import DeliveredMessage

from ledger.capture.batch import Batcher
from ledger.capture.decode import Decoder
from ledger.db import Backoff

log = logging.getLogger(__name__)


def aiormq_url(url: str) -> str:
    """Kombu spellings (``pyamqp://``, ``amqp://guest@host//``) -> an aiormq URL."""
    parts = urlsplit(url)
    scheme = {"pyamqp": "amqp", "librabbitmq": "amqp", "pyamqps": "amqps"}.get(parts.scheme, parts.scheme)
    path = parts.path
    if path in ("", "/"):
        path = "/"  # default vhost
    elif path == "//":
        path = "/%2F"
    return urlunsplit(parts._replace(scheme=scheme, path=path))


async def declare(channel: aiormq.abc.AbstractChannel, exchange: str, queue: str) -> None:
    await channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    await channel.queue_declare(queue=queue, durable=True)
    await channel.queue_bind(queue=queue, exchange=exchange, routing_key="#")


class AmqpSource:
    """Feeds RabbitMQ deliveries into a ``Batcher``; acks after the writer commits."""

    name = "amqp"

    def __init__(self, url: str, exchange: str, queue: str, prefetch: int, decoder: Decoder, batcher: Batcher) -> None:
        self.url = aiormq_url(url)
        self.exchange, self.queue, self.prefetch = exchange, queue, prefetch
        self.decoder, self.batcher = decoder, batcher
        self.ready = asyncio.Event()
        self.messages = 0
        self.subscriptions = 0  # how many times (re)connected and consuming
        self.connection: aiormq.abc.AbstractConnection | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.consumer_tag: str | None = None
        self._cancelled: asyncio.Future | None = None  # set per connection in _open

    def _on_message(self, message: DeliveredMessage) -> None:
        # Runs without awaiting: deliveries are decoded in delivery order, which is what
        # makes one multiple=True ack per batch correct.
        batch = self.batcher.current
        props = message.header.properties
        self.decoder.body(message.body, message.delivery.routing_key, batch.events, batch.rejects, props.content_type)  # type: ignore[union-attr]
        self.messages += 1
        self.batcher.added(len(message.body), _Ack(message.channel, message.delivery.delivery_tag))  # type: ignore[union-attr]

    async def _consume(self, message: DeliveredMessage) -> None:
        self._on_message(message)

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set; the connection stays open for the final acks."""
        backoff = Backoff(base=0.1, cap=5.0)
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                try:
                    await self._open()
                    backoff.reset()
                    self.subscriptions += 1
                    self.ready.set()
                    log.info("capture: consuming RabbitMQ queue %r bound to exchange %r with '#'", self.queue, self.exchange)
                    closing = [self.connection.closing, self.channel.closing, self._cancelled]  # type: ignore[union-attr,list-item]
                    await asyncio.wait([stop, *closing], return_when=asyncio.FIRST_COMPLETED)
                    for fut in closing:
                        if fut.done() and not fut.cancelled():
                            log.warning("capture: RabbitMQ connection lost: %r", fut.exception() or fut.result())
                        fut.cancel()
                except Exception as exc:  # noqa: BLE001 - broker trouble: back off and reconnect
                    self.ready.clear()
                    if stopping.is_set():
                        break
                    delay = backoff.next_delay()
                    log.warning("capture: RabbitMQ %s: %s: %s; reconnecting in %.1fs", self._where(), type(exc).__name__, exc, delay)
                    await self._drop()
                    await asyncio.wait([stop], timeout=delay)
                    continue
                if not stopping.is_set():
                    self.ready.clear()
                    await self._drop()
            await self._cancel_consumer()
        finally:
            stop.cancel()

    async def _open(self) -> None:
        await self._drop()
        # Named, so operators (and tests) can find it: rabbitmqctl list_connections client_properties
        self.connection = await aiormq.connect(self.url, client_properties={"connection_name": f"ledger-capture:{self.queue}"})
        self.channel = await self.connection.channel()
        await self.channel.basic_qos(prefetch_count=self.prefetch)
        await declare(self.channel, self.exchange, self.queue)
        # The broker cancels the consumer if the queue is deleted: reconnect, which declares it again.
        cancelled = self._cancelled = asyncio.get_running_loop().create_future()
        self.channel.on_consumer_cancel_callbacks.add(
            lambda frame: cancelled.done() or cancelled.set_result(f"consumer cancelled by the broker ({frame!r})")
        )
        ok = await self.channel.basic_consume(self.queue, self._consume, no_ack=False)
        self.consumer_tag = ok.consumer_tag

    async def _cancel_consumer(self) -> None:
        channel, tag = self.channel, self.consumer_tag
        if channel is not None and tag is not None and not channel.is_closed:
            try:
                await asyncio.wait_for(channel.basic_cancel(tag), 5)
            except Exception as exc:  # noqa: BLE001
                log.warning("capture: cancelling the RabbitMQ consumer failed: %s", exc)

    async def _drop(self) -> None:
        connection, self.connection, self.channel, self.consumer_tag = self.connection, None, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception:  # noqa: BLE001 - it is already gone
                pass

    async def close(self) -> None:
        await self._drop()

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 5672}"


class _Ack:
    """Acks every delivery up to ``tag`` on the channel it came from, if still open.

    After a reconnect the old channel's tags mean nothing; those messages are redelivered
    on the new channel and deduplicated by the log."""

    __slots__ = ("channel", "tag")

    def __init__(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        self.channel, self.tag = channel, tag

    async def __call__(self) -> None:
        if self.channel.is_closed:
            return
        try:
            await self.channel.basic_ack(self.tag, multiple=True)
        except Exception as exc:  # noqa: BLE001 - the messages will be redelivered and deduplicated
            log.warning("capture: ack failed (%s); the batch will be redelivered and deduplicated", exc)

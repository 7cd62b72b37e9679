"""Capture: Celery events from the broker into the append-only log.

broker message -> ``decode`` (events and rejects) -> ``batch`` (size/latency bounded) ->
``ledger.log.recorder.append`` (one transaction, acked after commit on RabbitMQ).
Sources: ``redis_source`` (pub/sub) and ``amqp_source`` (durable queue).
"""

from ledger.capture.service import Capture

__all__ = ["Capture"]

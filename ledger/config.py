"""Settings: every option is an environment variable prefixed ``LEDGER_`` and a CLI flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "celery-ledger"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore")

    database_url: str | None = Field(
        None, description="PostgreSQL DSN. Unset: `ledger up` starts an embedded PostgreSQL."
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL (redis://, amqp://). Unset: `ledger up` starts an embedded Redis.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Where embedded PostgreSQL and Redis keep their data."
    )
    event_exchange: str = Field("celeryev", description="Celery's event exchange (Celery's event_exchange).")
    capture_queue: str = Field(
        "celery-ledger.capture",
        description="RabbitMQ: the durable queue capture declares, bound to the event exchange with '#'.",
    )
    capture_batch_size: int = Field(5000, ge=1, description="Commit a batch at this many events.")
    capture_batch_ms: float = Field(
        20.0, gt=0, description="...or when its oldest event has waited this many milliseconds."
    )
    capture_prefetch: int = Field(2000, ge=1, description="RabbitMQ prefetch (unacked messages in flight).")
    capture_max_event_bytes: int = Field(
        1_048_576, ge=1024, description="A message or event larger than this many bytes is quarantined, not stored."
    )
    enable_events_interval: float = Field(
        30.0,
        ge=0,
        description="Seconds between `enable_events` broadcasts so workers started without -E send task events; 0 turns it off.",
    )
    redact_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Argument names whose values capture replaces with '[redacted]' in args/kwargs (comma separated).",
    )
    host: str = Field("127.0.0.1", description="Address `ledger serve` listens on.")
    port: int = Field(8000, description="Port `ledger serve` listens on.")
    auth: bool = Field(True, description="Require bearer tokens on every route except /healthz.")
    projector_poll_interval: float = Field(
        1.0, gt=0, description="Seconds the projector waits for a NOTIFY before polling the log anyway."
    )
    projector_batch_size: int = Field(5000, ge=1, description="Events the projector folds per transaction.")
    ready_max_lag: int = Field(
        10_000, ge=0, description="/readyz reports not ready while the projector is more than this many events behind."
    )
    stream_queue_size: int = Field(
        1000, ge=1, description="Messages buffered per websocket before a slow client is cut off."
    )
    stream_heartbeat: float = Field(15.0, gt=0, description="Seconds between websocket heartbeats.")
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("redact_fields", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def require_database(self) -> str:
        if not self.database_url:
            raise SystemExit("LEDGER_DATABASE_URL (or --database-url) is required for this command")
        return self.database_url

    def require_broker(self) -> str:
        if not self.broker_url:
            raise SystemExit("LEDGER_BROKER_URL (or --broker-url) is required for this command")
        return self.broker_url

"""Client -> server messages of ``/v1/stream`` (see README.md, "Websocket protocol"), validated with pydantic.

Parsing never raises: a bad frame becomes a `ProtocolError` with a stable code and a
detail naming the field, which the session sends back as an ``error`` message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from ledger.api.models import TaskListQuery
from ledger.stream.filters import parse_filter

SubId = Annotated[str, Field(min_length=1, max_length=128)]
Since = Annotated[int | None, Field(None, ge=0, description="Deliver what matched after this log position.")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Auth(_Message):
    type: Literal["auth"]
    token: Annotated[str, Field(min_length=1, max_length=512)]


class Ping(_Message):
    type: Literal["ping"]
    id: Any = None


class Pong(_Message):
    type: Literal["pong"]
    id: Any = None


class Unsubscribe(_Message):
    type: Literal["unsubscribe"]
    sub: SubId


class _Subscribe(_Message):
    type: Literal["subscribe"]
    sub: SubId
    since: Since = None


class SubscribeTask(_Subscribe):
    topic: Literal["task"]
    task_id: Annotated[str, Field(min_length=1, max_length=255)]


class SubscribeGroup(_Subscribe):
    topic: Literal["group"]
    group_id: Annotated[str, Field(min_length=1, max_length=255)]


class SubscribeWorker(_Subscribe):
    topic: Literal["worker"]
    hostname: Annotated[str, Field(min_length=1, max_length=255)]


class SubscribeWorkers(_Subscribe):
    topic: Literal["workers"]


class SubscribeTasks(_Subscribe):
    topic: Literal["tasks"]
    filter: dict[str, Any] | None = Field(None, description="The filters of GET /v1/tasks (paging excluded).")
    _query: TaskListQuery | None = PrivateAttr(None)  # set by parse() from `filter`

    @property
    def query(self) -> TaskListQuery:
        assert self._query is not None
        return self._query
    limit: Annotated[int, Field(100, ge=0, le=1000, description="Snapshot size: the most recently changed matches.")] = 100


class SubscribeLog(_Subscribe):
    topic: Literal["log"]
    types: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, description="Event types; a trailing * matches a prefix ('task-*'). Unset: every event."
    )


Subscribe = Annotated[
    Union[SubscribeTask, SubscribeGroup, SubscribeWorker, SubscribeWorkers, SubscribeTasks, SubscribeLog],
    Field(discriminator="topic"),
]
ClientMessage = Annotated[Union[Auth, Ping, Pong, Unsubscribe], Field(discriminator="type")]

TOPICS = ("task", "group", "worker", "workers", "tasks", "log")
TYPES = ("auth", "subscribe", "unsubscribe", "ping", "pong")
_subscribe = TypeAdapter(Subscribe)
_other = TypeAdapter(ClientMessage)


@dataclass(slots=True)
class ProtocolError(Exception):
    error: str  # stable code
    detail: str  # names the field
    sub: str | None = None


def parse(frame: str | bytes) -> Any:
    """A validated message model, or raise ProtocolError."""
    try:
        raw = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", "message: must be a JSON object")
    kind = raw.get("type")
    sub = raw.get("sub") if isinstance(raw.get("sub"), str) else None
    if kind not in TYPES:
        raise ProtocolError("bad_message", f"type: must be one of {', '.join(TYPES)}", sub)
    if kind == "subscribe":
        topic = raw.get("topic")
        if topic not in TOPICS:
            raise ProtocolError("bad_subscribe", f"topic: must be one of {', '.join(TOPICS)}", sub)
        try:
            message = _subscribe.validate_python(raw)
        except ValidationError as exc:
            # loc starts with the topic tag; drop it so the detail names the field itself
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"][1:]) or "message"
            raise ProtocolError("bad_subscribe", f"{loc}: {err['msg']}", sub) from None
        if isinstance(message, SubscribeTasks):
            try:
                message._query = parse_filter(message.filter)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ProtocolError("bad_subscribe", f"filter.{loc}: {err['msg']}", sub) from None
            except ValueError as exc:
                raise ProtocolError("bad_subscribe", str(exc), sub) from None
        return message
    try:
        return _other.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][1:]) or "message"
        raise ProtocolError("bad_message", f"{loc}: {err['msg']}", sub) from None

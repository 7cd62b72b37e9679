"""Request (query) and response models. Query models parse and validate parameters; the
response models describe what handlers return, for /openapi.json. Handlers build plain
dicts in exactly these shapes (validating every row would cost more than the query).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


def _to_epoch(value: Any) -> Any:
    """A time given as epoch seconds or ISO 8601 (naive means UTC), as epoch seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("expected epoch seconds or an ISO 8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    return value


Epoch = Annotated[float, BeforeValidator(_to_epoch), Field(description="Epoch seconds, or ISO 8601 (UTC if naive).")]


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- native /v1 -------------------------------------------------------------------------

TaskOrder = Literal["newest", "oldest"]


class TaskListQuery(Query):
    """Time ranges include their `_after` bound and exclude their `_before` bound."""

    state: list[str] | None = Field(None, description="Task states (repeat or comma-separate).")
    name: list[str] | None = Field(None, description="Task names.")
    worker: list[str] | None = Field(None, description="Worker hostnames.")
    queue: str | None = None
    group: str | None = Field(None, description="Group id: members of this group.")
    root: str | None = Field(None, description="Root task id: every task of this workflow.")
    parent: str | None = Field(None, description="Parent task id: its direct children.")
    received_after: Epoch | None = None
    received_before: Epoch | None = None
    started_after: Epoch | None = None
    started_before: Epoch | None = None
    succeeded_after: Epoch | None = None
    succeeded_before: Epoch | None = None
    timestamp_after: Epoch | None = None
    timestamp_before: Epoch | None = None
    search: str | None = Field(None, min_length=1, max_length=200,
                               description="Substring searched (case-insensitive) in args, kwargs, result and exception.")
    order: TaskOrder = Field("newest", description="newest or oldest first (by first appearance in the log).")
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = Field(None, description="next_cursor of the previous page.")

    @field_validator("state", mode="after")
    @classmethod
    def _upper(cls, value: list[str] | None) -> list[str] | None:
        return [v.strip().upper() for v in value] if value else value


class Task(BaseModel):
    """One task as the projection holds it: Flower's task fields plus lineage and log positions."""

    task_id: str
    name: str | None
    state: str
    sent: float | None
    received: float | None
    started: float | None
    succeeded: float | None
    failed: float | None
    retried: float | None
    revoked: float | None
    rejected: float | None
    args: str | None
    kwargs: str | None
    result: str | None
    exception: str | None
    traceback: str | None
    eta: str | None
    expires: str | None
    retries: int | None
    runtime: float | None
    worker: str | None
    client: str | None
    exchange: str | None
    routing_key: str | None
    queue: str | None
    timestamp: float | None
    clock: int | None
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    group_index: int | None
    chord_id: str | None
    extra: dict[str, Any]
    first_seq: int
    last_seq: int


class TaskDetail(Task):
    children: list[str] = Field(description="Ids of the tasks this one started (parent_id = this task).")
    as_of_seq: int | None = Field(None, description="Set when the task was folded from the log as of a past position.")


class TaskPage(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last page.")


class AsOfQuery(Query):
    as_of_seq: int | None = Field(None, ge=0, description="Fold the log up to and including this seq.")
    as_of: Epoch | None = Field(None, description="Fold the log as recorded up to this time.")

    @model_validator(mode="after")
    def _one(self) -> AsOfQuery:
        if self.as_of_seq is not None and self.as_of is not None:
            raise ValueError("give as_of_seq or as_of, not both")
        return self


class LogEvent(BaseModel):
    seq: int
    type: str
    task_id: str | None
    hostname: str | None
    sent_at: float | None
    clock: int | None
    recorded_at: datetime
    routing_key: str | None
    payload: dict[str, Any]


class Timeline(BaseModel):
    task_id: str
    events: list[LogEvent]


class EventsQuery(Query):
    after: int = Field(0, ge=0, description="Return events with seq greater than this.")
    type: list[str] | None = Field(None, description="Event types (repeat or comma-separate).")
    task_id: str | None = None
    limit: int = Field(500, ge=1, le=5000)


class EventPage(BaseModel):
    events: list[LogEvent]
    next_after: int = Field(description="Pass as `after` to continue; equals `after` when nothing new.")


class TaskRef(BaseModel):
    task_id: str
    name: str | None
    state: str
    group_id: str | None
    group_index: int | None


class Group(BaseModel):
    group_id: str
    chord_id: str | None
    size: int | None
    states: dict[str, int] = Field(description="How many members are in each state.")
    first_seen: float | None
    last_seen: float | None
    first_seq: int
    last_seq: int


class GroupDetail(BaseModel):
    group: Group
    members: list[Task]
    as_of_seq: int | None = None


class TaskTree(BaseModel):
    task: TaskRef
    parent: TaskRef | None
    root: TaskRef | None
    children: list[TaskRef]
    group: Group | None
    group_members: list[TaskRef]
    chord: TaskRef | None = Field(description="The chord callback this task's group feeds, if any.")


WorkerStatus = Literal["online", "offline", "lost"]


class WorkersQuery(Query):
    status: list[WorkerStatus] | None = None


class Worker(BaseModel):
    hostname: str
    status: WorkerStatus
    pid: int | None
    freq: float | None
    sw_ident: str | None
    sw_ver: str | None
    sw_sys: str | None
    loadavg: list[float] | None
    active: int | None
    processed: int | None
    first_seen: float | None
    last_seen: float | None
    last_heartbeat: float | None
    offline_at: float | None
    first_seq: int
    last_seq: int


class WorkerList(BaseModel):
    workers: list[Worker]


class TaskName(BaseModel):
    name: str
    tasks: int
    first_seen: float | None
    last_seen: float | None


class TaskNameList(BaseModel):
    task_names: list[TaskName]


class Error(BaseModel):
    error: str = Field(description="A stable machine-readable code.")
    detail: str = Field(description="What went wrong, naming the field when a parameter is at fault.")
    field: str | None = None


# --- operations -------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class CaptureState(BaseModel):
    capture_id: str = Field(description="host:pid of the capture process.")
    broker: str
    connected: bool = Field(description="Subscribed (Redis) or consuming (RabbitMQ) at its last report.")
    stored: int = Field(description="Events this capture process has stored.")
    seconds_since_report: float


class Readiness(BaseModel):
    ready: bool
    database: bool
    last_seq: int | None
    checkpoint_seq: int | None
    lag: int | None
    max_lag: int
    captures: list[CaptureState] = Field(default_factory=list,
                                         description="Capture processes that reported in the last hour.")
    reason: str | None


# --- django-celery-results (/celery/...) -----------------------------------------------


class DCRTaskStatusBody(BaseModel):
    id: str
    status: str
    result: Any
    exc: str | None = Field(None, description="Only for FAILURE, RETRY and REVOKED.")
    traceback: str | None = Field(None, description="Only for FAILURE, RETRY and REVOKED.")


class DCRTaskStatus(BaseModel):
    task: DCRTaskStatusBody


class DCRTaskDoneBody(BaseModel):
    id: str
    executed: bool


class DCRTaskDone(BaseModel):
    task: DCRTaskDoneBody


class DCRGroupResult(BaseModel):
    result: Any
    status: str


class DCRGroupStatusBody(BaseModel):
    id: str
    results: list[DCRGroupResult]


class DCRGroupStatus(BaseModel):
    group: DCRGroupStatusBody


class DCRGroupDoneBody(BaseModel):
    id: str
    results: list[DCRTaskDoneBody]


class DCRGroupDone(BaseModel):
    group: DCRGroupDoneBody


# --- Flower (/api/...) ------------------------------------------------------------------


class FlowerTaskFields(BaseModel):
    args: str | None
    client: str | None
    clock: int | None
    eta: str | None
    exception: str | None
    exchange: str | None
    expires: str | None
    failed: float | None
    kwargs: str | None
    name: str | None
    received: float | None
    result: str | None
    retried: float | None
    retries: int | None
    revoked: float | None
    routing_key: str | None
    runtime: float | None
    sent: float | None
    started: float | None
    state: str
    succeeded: float | None
    timestamp: float | None
    traceback: str | None
    worker: str | None


class FlowerTaskInfo(FlowerTaskFields):
    model_config = ConfigDict(populate_by_name=True)
    task_id: str = Field(alias="task-id")


class FlowerListedTask(FlowerTaskFields):
    uuid: str


FlowerSort = Literal["name", "-name", "state", "-state", "received", "-received", "started", "-started"]


class FlowerTasksQuery(Query):
    limit: int | None = Field(None, ge=0, description="0 or absent: Flower's max_tasks bound, 10,000 (also the cap).")
    offset: int = Field(0)
    sort_by: FlowerSort | None = None
    workername: str | None = None
    taskname: str | None = None
    state: str | None = None
    received_start: str | None = Field(None, description="'%Y-%m-%d %H:%M', server local time (as Flower).")
    received_end: str | None = Field(None, description="'%Y-%m-%d %H:%M', server local time (as Flower).")
    search: str | None = Field(None, description="Flower's search syntax: words, result:, args:, kwargs:k=v, state:.")


class FlowerTaskTypes(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    task_types: list[str] = Field(alias="task-types")


class FlowerWorkersQuery(Query):
    workername: str | None = None
    status: bool = False
    refresh: bool = False


class FlowerWorkerStats(BaseModel):
    pid: int | None
    clock: str | None
    sw_ident: str | None
    sw_ver: str | None
    sw_sys: str | None
    freq: float | None
    loadavg: list[float] | None
    active: int | None
    processed: int | None


class FlowerWorker(BaseModel):
    stats: FlowerWorkerStats
    timestamp: float | None
    status: bool

-- Projections: pure folds of ledger.events. Each records the last seq it applied in
-- ledger.checkpoints, in the same transaction as its rows. All of them can be dropped
-- and rebuilt from the log (`ledger rebuild`).

CREATE TABLE ledger.checkpoints (
    projection  text        PRIMARY KEY,
    seq         bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per task; the fields of Flower's task info plus group, chord and lineage.
CREATE TABLE ledger.tasks (
    task_id      text PRIMARY KEY,
    name         text,
    state        text NOT NULL,
    -- times of each transition (sender's epoch seconds), as celery.events.state keeps them
    sent         double precision,
    received     double precision,
    started      double precision,
    succeeded    double precision,
    failed       double precision,
    retried      double precision,
    revoked      double precision,
    rejected     double precision,
    args         text,
    kwargs       text,
    result       text,
    exception    text,
    traceback    text,
    eta          text,
    expires      text,
    retries      integer,
    runtime      double precision,
    worker       text,
    client       text,
    exchange     text,
    routing_key  text,
    queue        text,
    "timestamp"  double precision,
    clock        bigint,
    parent_id    text,
    root_id      text,
    group_id     text,
    group_index  integer,
    chord_id     text,
    -- any other fields events carried (custom fields, terminated, signum, expired, ...)
    extra        jsonb NOT NULL DEFAULT '{}'::jsonb,
    first_seq    bigint NOT NULL,
    last_seq     bigint NOT NULL
);

CREATE INDEX tasks_last_seq ON ledger.tasks (last_seq);
CREATE INDEX tasks_state_last_seq ON ledger.tasks (state, last_seq);
CREATE INDEX tasks_name_last_seq ON ledger.tasks (name, last_seq);
CREATE INDEX tasks_worker_last_seq ON ledger.tasks (worker, last_seq);
CREATE INDEX tasks_group ON ledger.tasks (group_id, group_index) WHERE group_id IS NOT NULL;
CREATE INDEX tasks_root ON ledger.tasks (root_id) WHERE root_id IS NOT NULL;
CREATE INDEX tasks_parent ON ledger.tasks (parent_id) WHERE parent_id IS NOT NULL;
-- INCLUDE: a time window's page is chosen from the index alone (see api/queries.list_tasks).
CREATE INDEX tasks_received ON ledger.tasks (received) INCLUDE (first_seq, task_id);
CREATE INDEX tasks_timestamp ON ledger.tasks ("timestamp");

CREATE TABLE ledger.groups (
    group_id       text PRIMARY KEY,
    -- the chord callback's task id when this group is a chord header
    chord_id       text,
    size           integer,
    first_seen     double precision,
    last_seen      double precision,
    first_seq      bigint NOT NULL,
    last_seq       bigint NOT NULL
);

CREATE TABLE ledger.workers (
    hostname        text PRIMARY KEY,
    pid             integer,
    freq            double precision,
    sw_ident        text,
    sw_ver          text,
    sw_sys          text,
    loadavg         double precision[],
    active          integer,
    processed       integer,
    first_seen      double precision,
    last_seen       double precision,
    last_heartbeat  double precision,
    -- set by worker-offline; cleared when the worker comes back
    offline_at      double precision,
    first_seq       bigint NOT NULL,
    last_seq        bigint NOT NULL
);

CREATE TABLE ledger.task_names (
    name        text PRIMARY KEY,
    tasks       bigint NOT NULL DEFAULT 0,
    first_seen  double precision,
    last_seen   double precision,
    last_seq    bigint NOT NULL
);

-- The change feed: what the projector changed, by log position, written in the same
-- transaction as the rows. Websocket replicas tail it by seq, so every replica pushes the
-- same changes in the same order, and a client resumes with since=<seq>.
-- `data` is the entity's projection row after the change, as JSON (column names as above).
CREATE TABLE ledger.changes (
    seq    bigint NOT NULL,   -- the log position this change reflects
    kind   text   NOT NULL,   -- 'task' | 'group' | 'worker'
    key    text   NOT NULL,   -- task id | group id | hostname
    data   jsonb  NOT NULL,
    PRIMARY KEY (seq, kind, key)
);
CREATE INDEX changes_kind_key_seq ON ledger.changes (kind, key, seq);

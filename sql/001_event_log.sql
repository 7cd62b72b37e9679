-- The append-only event log: the single source of truth.
--
-- seq is commit-ordered: every append takes the transaction-scoped advisory lock
-- ledger.append_lock_id() before its INSERT draws seq values, and holds it until commit.
-- So a row with a smaller seq is never committed after a row with a larger seq, and a
-- reader tailing "seq > n" never sees a hole fill in behind it (holes left by rolled-back
-- or deduplicated appends stay holes forever).

CREATE SCHEMA IF NOT EXISTS ledger;

CREATE FUNCTION ledger.append_lock_id() RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT 7310432180001::bigint $$;

CREATE TABLE ledger.events (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Idempotency key: a hash of the event exactly as sent. A redelivered event is a no-op.
    event_key    bytea            NOT NULL,
    type         text             NOT NULL,
    task_id      text,
    hostname     text,
    -- The sender's own time.time() and Lamport clock, as sent (never localised).
    sent_at      double precision,
    clock        bigint,
    recorded_at  timestamptz      NOT NULL DEFAULT clock_timestamp(),
    routing_key  text,
    -- The event exactly as received (the element of a task.multi list, for batches).
    payload      jsonb            NOT NULL,
    CONSTRAINT events_event_key_unique UNIQUE (event_key)
);

CREATE INDEX events_task_id_seq ON ledger.events (task_id, seq) WHERE task_id IS NOT NULL;
CREATE INDEX events_type_seq ON ledger.events (type, seq);
CREATE INDEX events_recorded_at_brin ON ledger.events USING brin (recorded_at);

-- The database itself refuses to rewrite history.
CREATE FUNCTION ledger.refuse_rewrite() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger.% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON ledger.events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_rewrite();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON ledger.events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_rewrite();

-- Messages capture could not turn into events: kept with their raw bytes, never dropped.
CREATE TABLE ledger.quarantine (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- A hash of (raw, reason): a redelivered bad message is quarantined once.
    quarantine_key bytea       NOT NULL UNIQUE,
    received_at  timestamptz    NOT NULL DEFAULT clock_timestamp(),
    source       text           NOT NULL,
    routing_key  text,
    reason       text           NOT NULL,
    raw          bytea          NOT NULL
);

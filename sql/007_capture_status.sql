-- Each running capture process reports here every few seconds, so /readyz (served by
-- another process) can say whether events are flowing: a capture that lost its broker is
-- reported as such, and one that stopped reporting shows its silence.
CREATE TABLE ledger.capture_status (
    capture_id   text        PRIMARY KEY,   -- host:pid
    broker       text        NOT NULL,      -- the broker URL, password masked
    connected    boolean     NOT NULL,      -- subscribed (Redis) / consuming (RabbitMQ) now
    stored       bigint      NOT NULL,      -- events this process stored
    started_at   timestamptz NOT NULL,
    reported_at  timestamptz NOT NULL DEFAULT now()
);

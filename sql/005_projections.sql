-- Projection additions. Idempotent (IF NOT EXISTS): earlier drafts of this file were
-- applied as 005_projection_group_states.sql / 005_projection_extras.sql in some
-- development databases, which therefore apply this one too, harmlessly.

-- Groups count their members by state, so a group's progress (and django-celery-results'
-- "done" for a group) is one row away, and the change feed carries it.
ALTER TABLE ledger.groups ADD COLUMN IF NOT EXISTS states jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Workers listed by most recent activity.
CREATE INDEX IF NOT EXISTS workers_last_seen ON ledger.workers (last_seen);

-- `ledger rebuild` drops the secondary indexes of the big projection tables while it
-- replays (building an index once is far cheaper than maintaining it row by row) and
-- recreates them at the end. Their definitions wait here meanwhile, so a rebuild that dies
-- half way loses none: the next projector term or rebuild recreates them.
CREATE TABLE IF NOT EXISTS ledger.rebuild_dropped_indexes (
    name        text PRIMARY KEY,
    definition  text NOT NULL,
    dropped_at  timestamptz NOT NULL DEFAULT now()
);

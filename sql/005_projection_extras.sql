-- Groups count their members by state, so a group's progress (and django-celery-results'
-- "done" for a group) is one row away, and the change feed carries it.
ALTER TABLE ledger.groups ADD COLUMN states jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Workers listed by most recent activity; task names by most recent use.
CREATE INDEX workers_last_seen ON ledger.workers (last_seen);

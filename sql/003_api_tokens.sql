-- API bearer tokens. Only the sha256 of the secret is stored: a leaked table does not leak
-- tokens. A token is never deleted, only revoked, so `ledger token list` keeps the history.

CREATE TABLE ledger.api_tokens (
    token_id     text        PRIMARY KEY,           -- public id, also embedded in the token
    token_hash   bytea       NOT NULL UNIQUE,       -- sha256 of the whole token string
    scopes       text[]      NOT NULL CHECK (scopes <@ ARRAY['read', 'control', 'admin']::text[]),
    label        text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- The task list pages by first_seq (the position of a task's first event), which never
-- changes once the row exists, so keyset pages stay stable while tasks keep updating.
CREATE INDEX tasks_first_seq ON ledger.tasks (first_seq);
CREATE INDEX tasks_state_first_seq ON ledger.tasks (state, first_seq);
CREATE INDEX tasks_name_first_seq ON ledger.tasks (name, first_seq);

-- The operators' web console (operations.md §3): its sessions, and the indexes behind
-- the filters its pages offer.

-- A signed-in console session. The cookie carries a random token; only its SHA-256 is
-- stored, so a copy of this table signs nobody in. Removing an operator ends their
-- sessions; sign-out deletes the row.
CREATE TABLE console_sessions (
    token_sha256  bytea       PRIMARY KEY CHECK (octet_length(token_sha256) = 32),
    operator_id   bigint      NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    -- Every state-changing form of the session carries it (compared in constant time).
    csrf_token    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
CREATE INDEX console_sessions_operator ON console_sessions (operator_id);

-- The batches page filtered by status alone, newest first (by job, `batches_job_created`
-- serves; unfiltered, `batches_created`).
CREATE INDEX batches_status_created ON batches (status, created_at DESC);

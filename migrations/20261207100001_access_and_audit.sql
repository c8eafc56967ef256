-- Access (operations.md §1) and the audit log (§3).

-- The name of the API key that created the batch (`created_by` on the resource).
-- Batches written before keys had names have none.
ALTER TABLE batches ADD COLUMN created_by text;

-- An Idempotency-Key belongs to the API key that sent it: the same value from two keys
-- names two requests. (Old batches, without created_by, match no new request.)
ALTER TABLE batches DROP CONSTRAINT batches_idempotency_key_key;
CREATE UNIQUE INDEX batches_created_by_idempotency_key
    ON batches (created_by, idempotency_key);

-- Every change a caller makes, written in the same transaction as the change: who
-- (`key:<name>`, `operator:<name>`, `cli:<os user>`), what (`batch.retried`, …), to
-- what (an id), and the particulars. Never personal data: addresses appear masked.
CREATE TABLE audit_log (
    id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL CHECK (actor ~ '^(key|operator|cli):.+'),
    action  text        NOT NULL CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    target  text        NOT NULL,
    detail  jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- GET /v1/audit reads newest first, all of it or one actor's or one action's.
CREATE INDEX audit_log_newest ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_actor_newest ON audit_log (actor, at DESC, id DESC);
CREATE INDEX audit_log_action_newest ON audit_log (action, at DESC, id DESC);

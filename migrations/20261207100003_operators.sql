-- What operators see and do (operations.md §3): console users, and the indexes the
-- queue routes and the operator CLI read through.

-- The people who sign in to the web console, created by `invite-worker operators add`.
-- The password is stored only as an argon2id PHC string (`$argon2id$v=19$…`).
CREATE TABLE operators (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text        NOT NULL UNIQUE
                               CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    role           text        NOT NULL CHECK (role IN ('viewer', 'operator')),
    password_hash  text        NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Tasks apalis gave up on (`GET /v1/queue/dead`, `invite-worker tasks dead`): killed,
-- or failed with no attempt left. Only such rows enter the index, so it costs a write
-- only when a task dies, and listing them never reads the live or finished ones.
CREATE INDEX apalis_jobs_dead ON apalis.jobs (job_type, id)
 WHERE status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts);

-- Finished tasks, counted by `GET /v1/queue` (`done`) without reading the others. A
-- task becomes Done once; that update already writes a new index entry for every
-- index (its status is in the predicate of apalis' fetch index), so this adds one
-- small entry per task, gone when maintenance prunes the task.
CREATE INDEX apalis_jobs_done ON apalis.jobs (job_type) WHERE status = 'Done';

-- Sends of the last minute (`sent_last_minute`) are counted in the batches that were
-- live then: the live ones (`batches_live`) and the ones that finished since. A batch
-- finishes once, so its other updates (the tally) leave this index alone.
CREATE INDEX batches_finished ON batches ((coalesce(completed_at, cancelled_at)))
 WHERE status IN ('completed', 'cancelled');

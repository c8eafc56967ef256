-- invite-worker schema. The queue itself lives in apalis' own `apalis` schema; these
-- tables are the source of truth for what a recruiter sees. Every state machine below is
-- enforced here, so no code path (or hand-written SQL) can store an impossible state.

-- Ids that come from the web app: 1 to 128 characters of [A-Za-z0-9._:-].
CREATE DOMAIN external_id AS text
    CHECK (VALUE ~ '^[A-Za-z0-9._:-]{1,128}$');

-- A job opening. Closing it stops new invites (unsent items are skipped with job_closed).
CREATE TABLE jobs (
    id          external_id PRIMARY KEY,
    title       text        NOT NULL CHECK (length(title) BETWEEN 1 AND 500),
    status      text        NOT NULL CHECK (status IN ('open', 'closed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The latest email and name the web app gave for a candidate id ("latest request wins").
CREATE TABLE candidates (
    id          external_id PRIMARY KEY,
    email       text        NOT NULL,
    name        text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One bulk-invite request.
--   queued -> running -> completed      (every item sent, failed or skipped)
--   queued | running -> cancelled       (pending items skipped with reason cancelled)
--   completed -> running                (a retry of failed items)
CREATE TABLE batches (
    id                uuid        PRIMARY KEY,
    job_id            external_id NOT NULL REFERENCES jobs (id),
    duration_minutes  integer     NOT NULL CHECK (duration_minutes > 0),
    on_duplicate      text        NOT NULL CHECK (on_duplicate IN ('skip', 'send')),
    status            text        NOT NULL DEFAULT 'queued'
                                  CHECK (status IN ('queued', 'running', 'completed', 'cancelled')),
    total             integer     NOT NULL CHECK (total > 0),
    -- The tally. Moved only in the same transaction as the item it counts.
    pending           integer     NOT NULL CHECK (pending >= 0),
    sent              integer     NOT NULL DEFAULT 0 CHECK (sent >= 0),
    failed            integer     NOT NULL DEFAULT 0 CHECK (failed >= 0),
    skipped           integer     NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    -- What a person should read: [{candidate_id, code, message}], appended to, never rewritten.
    warnings          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- Idempotency-Key of the request that created it, and a hash of that request's body.
    idempotency_key   text        UNIQUE,
    request_hash      bytea,
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    cancelled_at      timestamptz,
    CONSTRAINT batch_counts_add_up CHECK (pending + sent + failed + skipped = total),
    -- A batch is live exactly while something is left to do.
    CONSTRAINT batch_live_iff_pending CHECK ((status IN ('queued', 'running')) = (pending > 0)),
    CONSTRAINT batch_completed_at CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
    CONSTRAINT batch_cancelled_at CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL))
);
CREATE INDEX batches_job_created ON batches (job_id, created_at DESC);
CREATE INDEX batches_created ON batches (created_at DESC);

-- One candidate of one batch.
--   pending -> sent | failed | skipped;  failed -> pending (retry)
-- reason: failed: invalid_email | rejected | retries_exhausted;
--         skipped: already_invited | job_closed | cancelled;  null otherwise.
CREATE TABLE batch_items (
    id               uuid        PRIMARY KEY,
    batch_id         uuid        NOT NULL REFERENCES batches (id),
    position         integer     NOT NULL,
    candidate_id     external_id NOT NULL REFERENCES candidates (id),
    email            text        NOT NULL,
    name             text,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'sent', 'failed', 'skipped')),
    reason           text,
    -- Sends tried (SMTP conversations started) since the item last became pending.
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- The mail server's last reply or the transport error, for people to read.
    last_error       text,
    -- The invitation whose link every attempt of this item carries.
    invitation_id    uuid,
    -- The one queue task (apalis.jobs.id) allowed to act on this item. Scheduling a retry
    -- replaces it in the same transaction, so a stale duplicate task finds a different id
    -- here and does nothing.
    task_id          text        NOT NULL,
    next_attempt_at  timestamptz,
    -- Set while a send is on its way (between the attempt's two transactions); a cancel
    -- waits for such sends to be recorded rather than racing them.
    sending_at       timestamptz,
    sent_at          timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (batch_id, candidate_id),
    CONSTRAINT item_reason_matches_status CHECK (
        (status IN ('pending', 'sent') AND reason IS NULL)
        OR (status = 'failed'  AND reason IN ('invalid_email', 'rejected', 'retries_exhausted'))
        OR (status = 'skipped' AND reason IN ('already_invited', 'job_closed', 'cancelled'))
    ),
    CONSTRAINT item_sent_has_invitation CHECK (status <> 'sent' OR (invitation_id IS NOT NULL AND sent_at IS NOT NULL))
);
CREATE INDEX batch_items_batch_status ON batch_items (batch_id, status, position);
-- The maintenance sweep looks only at pending items.
CREATE INDEX batch_items_pending ON batch_items (task_id) WHERE status = 'pending';

-- A unique, single-use link for one candidate and one job. The token itself is never
-- stored: only its SHA-256. EXPIRED is not stored either: a PENDING invitation whose
-- expires_at has passed reads as EXPIRED.
--   PENDING -> IN_PROGRESS (redeem) -> COMPLETED
--   PENDING -> REVOKED (revoke, cancel, or the item failed for good)
CREATE TABLE invitations (
    id                uuid        PRIMARY KEY,
    job_id            external_id NOT NULL REFERENCES jobs (id),
    candidate_id      external_id NOT NULL REFERENCES candidates (id),
    batch_id          uuid        NOT NULL REFERENCES batches (id),
    item_id           uuid        NOT NULL REFERENCES batch_items (id),
    token_hash        bytea       NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    status            text        NOT NULL DEFAULT 'PENDING'
                                  CHECK (status IN ('PENDING', 'IN_PROGRESS', 'COMPLETED', 'REVOKED')),
    duration_minutes  integer     NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- Set when the mail server accepted the message; expiry restarts from then.
    sent_at           timestamptz,
    expires_at        timestamptz NOT NULL,
    redeemed_at       timestamptz,
    completed_at      timestamptz,
    revoked_at        timestamptz,
    CONSTRAINT invitation_redeemed CHECK ((status IN ('IN_PROGRESS', 'COMPLETED')) = (redeemed_at IS NOT NULL)),
    CONSTRAINT invitation_completed CHECK ((status = 'COMPLETED') = (completed_at IS NOT NULL)),
    CONSTRAINT invitation_revoked CHECK ((status = 'REVOKED') = (revoked_at IS NOT NULL))
);
CREATE INDEX invitations_job_candidate ON invitations (job_id, candidate_id, created_at DESC);
CREATE INDEX invitations_item ON invitations (item_id);
ALTER TABLE batch_items
    ADD CONSTRAINT batch_items_invitation_fk FOREIGN KEY (invitation_id) REFERENCES invitations (id);

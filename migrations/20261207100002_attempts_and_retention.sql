-- Privacy and retention (operations.md §3 "Per-attempt history", §5): one row per send
-- attempt, what erasure and anonymization leave behind, and the indexes retention and
-- erasure read through.

-- One row per attempt of an item, written by the statement that records the attempt's
-- outcome (src/db/sql/record_outcomes.sql), in the same transaction. A deferred send
-- (its recipient domain paused) made no attempt and has no row.
--   number      1, 2, … per item, continuing across a retry of the item (the item's
--               own `attempts` restarts at 0 then; `attempts_made` below does not);
--   started_at  when phase 1 committed the attempt (batch_items.sending_at), or when
--               it was recorded for an item that ended without a send;
--   smtp_reply  the server's reply line or the connection error, addresses masked
--               (a***@example.com), as everything else a person reads next to logs;
--   worker      the process: `worker.name`, or host:pid.
-- No foreign key to batch_items: items are never deleted, and the check would cost an
-- index probe per attempt on the delivery path.
CREATE TABLE attempts (
    item_id      uuid        NOT NULL,
    number       integer     NOT NULL CHECK (number >= 1),
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('sent', 'transient', 'rejected',
                                                         'invalid_email', 'skipped',
                                                         'suppressed')),
    smtp_reply   text,
    worker       text        NOT NULL,
    PRIMARY KEY (item_id, number)
);
-- Retention deletes by age. Rows arrive in finished_at order, so a BRIN index is a few
-- pages and costs the insert almost nothing.
CREATE INDEX attempts_finished ON attempts USING brin (finished_at);

-- Attempts recorded for the item since it was created (never reset): the next
-- attempt's number. Not indexed, so moving it keeps the item's update HOT.
ALTER TABLE batch_items ADD COLUMN attempts_made integer NOT NULL DEFAULT 0
    CHECK (attempts_made >= 0);

-- When the item's email and name were erased (candidate erasure) or anonymized
-- (retention); its email is then '' and its name null.
ALTER TABLE batch_items ADD COLUMN erased_at timestamptz;
ALTER TABLE batch_items ADD CONSTRAINT item_erased_has_no_email
    CHECK (erased_at IS NULL OR (email = '' AND name IS NULL));

-- Erasure finds a candidate's items by the candidate id.
CREATE INDEX batch_items_candidate ON batch_items (candidate_id);

-- When retention anonymized the batch's items (retention.finished_batches_days).
ALTER TABLE batches ADD COLUMN anonymized_at timestamptz;

-- What retention looks for: finished batches not anonymized yet, by when they
-- finished; and batches that still remember an Idempotency-Key, by age.
CREATE INDEX batches_to_anonymize ON batches ((coalesce(completed_at, cancelled_at)))
    WHERE anonymized_at IS NULL AND status IN ('completed', 'cancelled');
CREATE INDEX batches_idempotency_created ON batches (created_at)
    WHERE idempotency_key IS NOT NULL;

-- Every address in `text` replaced by '[erased]': for replies kept with an item or an
-- attempt once its candidate's data is erased. An address is a run of characters with
-- an '@' between the delimiters `mask_addresses` uses (src/domain/email.rs).
CREATE FUNCTION erase_addresses(text text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(text, '[^\s<>"''()\[\],;:]*@[^\s<>"''()\[\],;:]*', '[erased]', 'g')
$$;

-- A batch's warnings with the message of each `invalid_email` warning (it quotes the
-- address as given) replaced, for the candidates in `erased` (null: every candidate).
-- Other warnings name ids only and stay as they are.
CREATE FUNCTION erase_warnings(warnings jsonb, erased text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_agg(
               CASE WHEN w ->> 'code' = 'invalid_email'
                         AND (erased IS NULL OR w ->> 'candidate_id' = ANY(erased))
                    THEN jsonb_set(w, '{message}',
                                   to_jsonb('the address could not be emailed (erased since)'::text))
                    ELSE w END
               ORDER BY n), '[]'::jsonb)
      FROM jsonb_array_elements(warnings) WITH ORDINALITY AS e(w, n)
$$;

-- The rule of a live invitation exists once (it was a Rust constant and a copy inside
-- prepare_items); the request that created a batch is remembered, so the worker's logs
-- for its items name the same request id as the API's; and a suppression list.

-- A live invitation blocks another for the same (job, candidate): PENDING and not
-- expired, or IN_PROGRESS. A one-expression SQL function, inlined by the planner where
-- it is called, so index conditions around it are kept.
CREATE FUNCTION invitation_is_live(status text, expires_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT status = 'IN_PROGRESS' OR (status = 'PENDING' AND expires_at > now())
$$;

-- EXPIRED is not stored: a PENDING invitation past its expires_at reads as EXPIRED.
CREATE FUNCTION invitation_status_now(status text, expires_at timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status = 'PENDING' AND expires_at <= now() THEN 'EXPIRED' ELSE status END
$$;

-- The x-request-id of the HTTP request that created the batch (null for batches created
-- before this column existed); phase 1 reads it with the item so the worker's spans
-- carry it.
ALTER TABLE batches ADD COLUMN request_id text
    CHECK (request_id IS NULL OR length(request_id) BETWEEN 1 AND 200);
ALTER TYPE prepare_item ADD ATTRIBUTE request_id text;

-- Suppression (the contract's "Deliverability"): an address a mail server refused as a
-- bad mailbox (5.1.x) is not tried again. Later items to it fail as `suppressed` in
-- phase 1, with no server contact, unless someone retried the item explicitly.

-- Addresses not to send to, lower-cased, with the reply that put them here.
CREATE TABLE suppressions (
    email       text        PRIMARY KEY CHECK (email = lower(email)),
    reply       text        NOT NULL,
    -- The item whose send was refused (kept when the item goes).
    item_id     uuid,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX suppressions_created ON suppressions (created_at DESC);

ALTER TABLE batch_items DROP CONSTRAINT item_reason_matches_status;
ALTER TABLE batch_items ADD CONSTRAINT item_reason_matches_status CHECK (
    (status IN ('pending', 'sent') AND reason IS NULL)
    OR (status = 'failed'  AND reason IN ('invalid_email', 'rejected', 'retries_exhausted',
                                          'suppressed'))
    OR (status = 'skipped' AND reason IN ('already_invited', 'job_closed', 'cancelled'))
);

-- Set by an explicit retry of the item (the retry route): someone asked, so the server
-- is tried again even for a suppressed address.
ALTER TABLE batch_items ADD COLUMN retry_requested boolean NOT NULL DEFAULT false;

ALTER TYPE prepare_item ADD ATTRIBUTE suppressed boolean;

-- prepare_items as before, with three changes: the live-invitation rule is the
-- function above, the item carries its batch's request id, and one more decision,
-- 'suppressed' (after job_closed and invalid_email), for an item whose address is on the
-- list and was not retried on request.
CREATE OR REPLACE FUNCTION prepare_items(p_items uuid[], p_tasks text[], p_mints uuid[],
                              p_hashes bytea[], p_ttl_hours integer)
RETURNS TABLE (ord integer, decision text, detail text, item prepare_item,
               invitation_id uuid, attempts integer)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    locked prepare_item[];
BEGIN
    IF cardinality(p_tasks) IS DISTINCT FROM cardinality(p_items)
       OR cardinality(p_mints) IS DISTINCT FROM cardinality(p_items)
       OR cardinality(p_hashes) IS DISTINCT FROM cardinality(p_items) THEN
        RAISE EXCEPTION 'prepare_items: % items, % tasks, % mints, % hashes',
            cardinality(p_items), cardinality(p_tasks), cardinality(p_mints),
            cardinality(p_hashes);
    END IF;

    WITH i AS MATERIALIZED (
            SELECT id, batch_id, task_id, status, attempts, candidate_id, email, name,
                   invitation_id, email_error,
                   NOT bi.retry_requested
                       AND EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(btrim(bi.email)))
                       AS suppressed
              FROM batch_items bi
             WHERE id = ANY(p_items)
             ORDER BY id
               FOR NO KEY UPDATE),
         b AS MATERIALIZED (
            SELECT id, job_id, status, on_duplicate, duration_minutes, request_id FROM batches
             WHERE id = ANY(ARRAY(SELECT batch_id FROM i))),
         j AS MATERIALIZED (
            SELECT id, title, status FROM jobs WHERE id = ANY(ARRAY(SELECT job_id FROM b)))
    SELECT coalesce(array_agg(ROW(i.id, i.batch_id, i.task_id, i.status, i.attempts,
                                  i.candidate_id, i.email, i.name, i.invitation_id,
                                  i.email_error, b.job_id, j.title, j.status, b.status,
                                  b.on_duplicate, b.duration_minutes, b.request_id,
                                  i.suppressed)::prepare_item),
                    '{}')
      INTO locked
      FROM i
      JOIN b ON b.id = i.batch_id
      JOIN j ON j.id = b.job_id;

    PERFORM pg_advisory_xact_lock(k)
       FROM (SELECT DISTINCT hashtextextended(l.job_id || '/' || l.candidate_id, 7141) AS k
               FROM unnest(locked) l
              WHERE l.status = 'pending' AND l.invitation_id IS NULL
                AND l.on_duplicate = 'skip' AND l.job_status <> 'closed'
              ORDER BY k) AS keys;

    RETURN QUERY
    WITH req AS (
            SELECT r.ord::integer AS ord, r.item_id, r.task AS req_task, r.mint_id, r.token_hash
              FROM unnest(p_items, p_tasks, p_mints, p_hashes)
                   WITH ORDINALITY AS r(item_id, task, mint_id, token_hash, ord)),
         joined AS (
            SELECT req.*, l AS item, l.id IS NOT NULL AND l.status = 'pending'
                       AND l.task_id = req.req_task AS ours
              FROM req
              LEFT JOIN unnest(locked) l ON l.id = req.item_id),
         claimed AS (
            SELECT j.*, row_number() OVER (PARTITION BY j.item_id, j.ours ORDER BY j.ord) AS nth
              FROM joined j),
         judged AS (
            SELECT c.*, CASE WHEN c.ours IS NOT TRUE THEN 'nothing'
                             WHEN c.nth > 1 THEN 'duplicate'
                             WHEN (c.item).job_status = 'closed' THEN 'job_closed'
                             WHEN (c.item).email_error IS NOT NULL THEN 'invalid_email'
                             WHEN (c.item).suppressed THEN 'suppressed'
                             ELSE 'go' END AS kind
              FROM claimed c),
         paired AS (
            SELECT g.*, row_number() OVER (
                       PARTITION BY g.kind = 'go' AND (g.item).invitation_id IS NULL,
                                    (g.item).job_id, (g.item).candidate_id
                       ORDER BY g.ord) AS pair_nth
              FROM judged g),
         d AS (
            SELECT p.ord, p.item_id, p.mint_id, p.token_hash, p.item,
                   CASE WHEN p.kind <> 'go' THEN p.kind
                        WHEN (p.item).invitation_id IS NULL AND (p.item).on_duplicate = 'skip'
                             AND p.pair_nth > 1 THEN 'already_invited'
                        ELSE 'send' END AS decision,
                   (p.item).invitation_id IS NULL AND (p.item).on_duplicate = 'skip'
                       AS unless_invited
              FROM paired p),
         running AS (
            UPDATE batches SET status = 'running'
             WHERE id = ANY(ARRAY(
                       SELECT b.id FROM batches b
                        WHERE b.id = ANY(ARRAY(SELECT (d.item).batch_id FROM d
                                                WHERE d.decision NOT IN ('nothing', 'duplicate')
                                                  AND (d.item).batch_status = 'queued'))
                          AND b.status = 'queued'
                        ORDER BY b.id
                          FOR NO KEY UPDATE))),
         minted AS (
            INSERT INTO invitations (id, item_id, token_hash, job_id, candidate_id, batch_id,
                                     duration_minutes, expires_at)
            SELECT d.mint_id, d.item_id, d.token_hash, (d.item).job_id, (d.item).candidate_id,
                   (d.item).batch_id, (d.item).duration_minutes,
                   now() + make_interval(hours => p_ttl_hours)
              FROM d
              LEFT JOIN LATERAL (
                    SELECT 1 AS found FROM invitations v
                     WHERE v.job_id = (d.item).job_id AND v.candidate_id = (d.item).candidate_id
                       AND invitation_is_live(v.status, v.expires_at)
                     LIMIT 1) live ON d.unless_invited
             WHERE d.decision = 'send' AND (d.item).invitation_id IS NULL
               AND live.found IS NULL
            RETURNING id, item_id),
         begun AS (
            UPDATE batch_items i
               SET invitation_id = coalesce(m.id, i.invitation_id),
                   attempts = i.attempts + 1, next_attempt_at = NULL, sending_at = now(),
                   updated_at = now()
              FROM d
              LEFT JOIN minted m ON m.item_id = d.item_id
             WHERE i.id = ANY(ARRAY(SELECT s.item_id FROM d s WHERE s.decision = 'send'))
               AND i.id = d.item_id AND d.decision = 'send'
               AND ((d.item).invitation_id IS NOT NULL OR m.id IS NOT NULL)
            RETURNING i.id, i.attempts, i.invitation_id)
    SELECT d.ord,
           CASE WHEN d.decision = 'send' AND b.id IS NULL THEN 'already_invited'
                ELSE d.decision END,
           CASE WHEN d.decision = 'invalid_email' THEN (d.item).email_error END,
           CASE WHEN d.decision = 'nothing' THEN NULL ELSE d.item END,
           b.invitation_id, b.attempts
      FROM d
      LEFT JOIN begun b ON b.id = d.item_id AND d.decision = 'send'
     ORDER BY d.ord;
END;
$fn$;

-- The page benchmark's history (`cargo bench --bench pages`): set-based inserts of a
-- realistic database of `seed.batches` batches of `seed.per_batch` items over
-- `seed.jobs` job openings, run in one transaction on a freshly migrated database.
-- The temporary table `seed` (batches, per_batch, jobs) holds the sizes.
--
-- What it looks like, newest last:
--   * 90 days of finished batches, then the last hour's (a quarter of them at most,
--     300 at most) every 12 s: mostly completed, every 37th cancelled at position 70;
--   * the newest 12 are live: 10 running (60 items done, the rest pending), 2 queued;
--   * items: mostly sent (1 attempt, every 13th 2), some failed (rejected with a 5.1.1
--     reply, retries_exhausted after 8 attempts, invalid_email), a few skipped
--     (already_invited; cancelled in cancelled batches);
--   * an invitation for each sent item (a quarter redeemed and completed, the rest
--     pending, or expired after a week as the link sweep stores it) and a revoked one
--     for each item that failed after a send; the attempt history of the last 30 days (attempts.retention 30 days);
--   * queue tasks as apalis and maintenance leave them: Pending for pending items,
--     Done for the last hour's finished items (older ones are deleted), 30 Killed;
--   * the audit log: batch.created for each batch, invitation.redeemed and .completed
--     for each completed invitation, batch.cancelled, tasks.retried, job.created.
-- Every CHECK holds; foreign keys are not checked while seeding
-- (session_replication_role = replica), every reference is made to exist.

SET LOCAL synchronous_commit = off;
SET LOCAL session_replication_role = replica;
-- The estimates of these statements are wild, and compiling them (JIT) took longer
-- than running them.
SET LOCAL jit = off;

-- Crockford base32 of `v`, `width` characters (a ULID is 10 of time + 16 of randomness).
CREATE FUNCTION pg_temp.b32(v bigint, width integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ',
                             ((v >> (5 * (width - 1 - i))) & 31)::integer + 1, 1), ''
                      ORDER BY i)
      FROM generate_series(0, width - 1) AS i
$$;

-- The first 14 characters of a ULID made at `at`: its time and a tag (the 12 after
-- them are the row's number in decimal digits, which are base32 digits too).
CREATE FUNCTION pg_temp.ulid_prefix(at timestamptz, tag integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_temp.b32((extract(epoch FROM at) * 1000)::bigint, 10) || pg_temp.b32(tag, 4)
$$;

-- The first 16 hex digits of a version-7 UUID made at `at` (the rest: '8' and the row's
-- number in 15 hex digits).
CREATE FUNCTION pg_temp.uuid7_prefix(at timestamptz, n bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7'
           || lpad(to_hex(n % 4096), 3, '0')
$$;

-- Indexes that back no constraint are dropped while the rows go in and built again
-- afterwards, as they were: a build sorts once, where a million inserts each find their
-- place (the candidate index's are all over it).
SET LOCAL maintenance_work_mem = '256MB';
CREATE TEMPORARY TABLE seed_indexes ON COMMIT DROP AS
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
  FROM pg_index i
 WHERE i.indrelid IN ('batch_items'::regclass, 'invitations'::regclass,
                      'attempts'::regclass, 'audit_log'::regclass)
   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid);
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT name FROM seed_indexes LOOP
        EXECUTE 'DROP INDEX ' || r.name;
    END LOOP;
END
$$;

INSERT INTO jobs (id, title, status, created_at, updated_at)
SELECT 'job-' || lpad(j::text, 4, '0'), 'Opening ' || j,
       CASE WHEN j % 10 = 0 THEN 'closed' ELSE 'open' END,
       now() - interval '120 days', now() - interval '120 days'
  FROM seed, generate_series(1, seed.jobs) AS j;

-- k: 1 (oldest) .. batches (newest). Tallies are placeholders that satisfy the checks;
-- they are set from the items below.
CREATE TEMPORARY TABLE seed_batches ON COMMIT DROP AS
SELECT k, at, (pg_temp.uuid7_prefix(at, k) || '8' || lpad(to_hex(k), 15, '0'))::uuid AS id,
       pg_temp.uuid7_prefix(at, k) AS uuid_prefix, pg_temp.ulid_prefix(at, 1) AS ulid_prefix,
       CASE WHEN k > seed.batches - 2 THEN 'queued'
            WHEN k > seed.batches - 12 THEN 'running'
            WHEN k % 37 = 0 THEN 'cancelled'
            ELSE 'completed' END AS status,
       'job-' || lpad(((k * 7) % seed.jobs + 1)::text, 4, '0') AS job_id,
       seed.per_batch AS total
  FROM seed, generate_series(1, seed.batches) AS k,
       LATERAL (SELECT least(300, seed.batches / 4) AS recent) r,
       LATERAL (SELECT CASE WHEN k > seed.batches - r.recent
                            THEN now() - (seed.batches - k) * interval '12 seconds'
                                 - interval '30 seconds'
                            ELSE now() - interval '1 hour'
                                 - (seed.batches - r.recent - k)
                                   * (interval '90 days' / greatest(seed.batches - r.recent, 1))
                       END AS at) t;

INSERT INTO batches (id, job_id, duration_minutes, on_duplicate, status, total, pending, sent,
                     failed, skipped, idempotency_key, request_hash, created_at, completed_at,
                     cancelled_at, request_id, created_by)
SELECT b.id, b.job_id, 30, 'skip', b.status, seed.per_batch,
       CASE WHEN b.status IN ('queued', 'running') THEN seed.per_batch ELSE 0 END,
       CASE WHEN b.status = 'completed' THEN seed.per_batch ELSE 0 END, 0,
       CASE WHEN b.status = 'cancelled' THEN seed.per_batch ELSE 0 END,
       CASE WHEN b.at > now() - interval '24 hours' THEN 'idem-' || b.k END,
       CASE WHEN b.at > now() - interval '24 hours' THEN sha256(('idem-' || b.k)::bytea) END,
       b.at,
       CASE WHEN b.status = 'completed' THEN b.at END,
       CASE WHEN b.status = 'cancelled' THEN b.at END,
       'req-' || b.k, 'recruiting-webapp'
  FROM seed, seed_batches b;

-- n: the item's number over the whole history, 1-based.
INSERT INTO batch_items (id, batch_id, position, candidate_id, email, name, status, reason,
                         attempts, last_error, invitation_id, task_id, sent_at, updated_at,
                         email_error, attempts_made)
SELECT (b.uuid_prefix || '8' || lpad(to_hex(n), 15, '0'))::uuid, b.id, pos, 'cand-' || c,
       CASE WHEN o.outcome = 'invalid_email' THEN 'c' || c || '-at-example.com'
            ELSE 'c' || c || '@example.com' END,
       'Candidate ' || c,
       o.status, o.reason, o.tries,
       CASE o.outcome
            WHEN 'rejected' THEN '550 5.1.1 <c***@example.com>: Recipient address rejected: User unknown in virtual mailbox table'
            WHEN 'retries_exhausted' THEN '421 4.7.0 Try again later, closing connection. (EHLO)'
            WHEN 'invalid_email' THEN 'not an email address: missing the @'
            WHEN 'sent_second' THEN '451 4.3.0 Temporary lookup failure'
       END,
       CASE WHEN o.status = 'sent' OR o.reason IN ('rejected', 'retries_exhausted')
            THEN (b.uuid_prefix || '9' || lpad(to_hex(n), 15, '0'))::uuid END,
       b.ulid_prefix || lpad(n::text, 12, '0'),
       CASE WHEN o.status = 'sent' THEN t.done_at END,
       coalesce(t.done_at, b.at),
       CASE WHEN o.outcome = 'invalid_email' THEN 'not an email address: missing the @' END,
       o.tries
  FROM seed_batches b,
       generate_series(1, b.total) AS pos,
       LATERAL (SELECT (b.k - 1)::bigint * b.total + pos AS n) nn,
       LATERAL (SELECT (n * 7919) % 400000 AS c) cc,
       LATERAL (SELECT CASE
                  WHEN b.status = 'queued' OR (b.status = 'running' AND pos > 60) THEN 'pending'
                  WHEN b.status = 'cancelled' AND pos > 70 THEN 'cancelled'
                  WHEN n % 29 = 0 THEN 'rejected'
                  WHEN n % 71 = 0 AND b.status <> 'running' THEN 'retries_exhausted'
                  WHEN n % 113 = 0 THEN 'invalid_email'
                  WHEN n % 97 = 0 THEN 'already_invited'
                  WHEN n % 13 = 0 THEN 'sent_second'
                  ELSE 'sent' END AS outcome) oo,
       LATERAL (SELECT oo.outcome,
                       CASE oo.outcome
                            WHEN 'pending' THEN 'pending'
                            WHEN 'cancelled' THEN 'skipped'
                            WHEN 'already_invited' THEN 'skipped'
                            WHEN 'sent' THEN 'sent'
                            WHEN 'sent_second' THEN 'sent'
                            ELSE 'failed' END AS status,
                       CASE WHEN oo.outcome IN ('pending', 'sent', 'sent_second') THEN NULL
                            ELSE oo.outcome END AS reason,
                       CASE oo.outcome
                            WHEN 'sent' THEN 1 WHEN 'sent_second' THEN 2 WHEN 'rejected' THEN 1
                            WHEN 'retries_exhausted' THEN 8 ELSE 0 END AS tries) o,
       -- When the item ended: 20 ms a position; retries take 40 minutes. Never later
       -- than now.
       LATERAL (SELECT CASE WHEN o.status = 'pending' THEN NULL
                            ELSE least(b.at + pos * interval '20 milliseconds'
                                       + CASE WHEN oo.outcome = 'retries_exhausted'
                                              THEN interval '40 minutes'
                                              WHEN oo.outcome = 'sent_second'
                                              THEN interval '5 seconds'
                                              ELSE interval '0' END,
                                       now() - interval '1 second') END AS done_at) t;

-- The tallies and when each finished batch finished: its last item.
UPDATE batches b
   SET pending = c.pending, sent = c.sent, failed = c.failed, skipped = c.skipped,
       completed_at = CASE WHEN b.status = 'completed' THEN c.last_at END,
       cancelled_at = CASE WHEN b.status = 'cancelled' THEN c.last_at END
  FROM (SELECT batch_id,
               count(*) FILTER (WHERE status = 'pending')::int AS pending,
               count(*) FILTER (WHERE status = 'sent')::int AS sent,
               count(*) FILTER (WHERE status = 'failed')::int AS failed,
               count(*) FILTER (WHERE status = 'skipped')::int AS skipped,
               max(updated_at) AS last_at
          FROM batch_items GROUP BY batch_id) c
 WHERE b.id = c.batch_id;

-- Invitations: one per sent item (every 4th redeemed and completed a day after, when
-- that is past), one revoked per item that failed after a send.
INSERT INTO invitations (id, job_id, candidate_id, batch_id, item_id, token_hash, status,
                         duration_minutes, created_at, sent_at, expires_at, redeemed_at,
                         completed_at, revoked_at)
SELECT i.invitation_id, b.job_id, i.candidate_id, i.batch_id, i.id,
       sha256(('bench-token-' || i.id)::bytea), s.status, 30, b.created_at,
       i.sent_at, coalesce(i.sent_at, i.updated_at) + interval '168 hours',
       CASE WHEN s.status = 'COMPLETED' THEN i.sent_at + interval '1 day' END,
       CASE WHEN s.status = 'COMPLETED' THEN i.sent_at + interval '1 day 30 minutes' END,
       CASE WHEN s.status = 'REVOKED' THEN i.updated_at END
  FROM batch_items i
  JOIN batches b ON b.id = i.batch_id,
       LATERAL (SELECT CASE WHEN i.status = 'failed' THEN 'REVOKED'
                            WHEN i.position % 4 = 0
                                 AND i.sent_at < now() - interval '1 day 30 minutes'
                            THEN 'COMPLETED'
                            -- What the link sweep stores once a sent link has expired.
                            WHEN i.sent_at + interval '168 hours' <= now() THEN 'EXPIRED'
                            ELSE 'PENDING' END AS status) s
 WHERE i.invitation_id IS NOT NULL;

-- The attempt history of the last 30 days.
INSERT INTO attempts (item_id, number, started_at, finished_at, outcome, smtp_reply, worker)
SELECT i.id, a.number, i.updated_at - (i.attempts_made - a.number) * interval '5 minutes'
       - interval '200 milliseconds',
       i.updated_at - (i.attempts_made - a.number) * interval '5 minutes',
       CASE WHEN a.number < i.attempts_made THEN 'transient'
            WHEN i.status = 'sent' THEN 'sent'
            WHEN i.reason = 'rejected' THEN 'rejected'
            ELSE 'transient' END,
       CASE WHEN a.number < i.attempts_made OR i.reason = 'retries_exhausted'
            THEN '421 4.7.0 Try again later, closing connection. (EHLO)'
            WHEN i.status = 'sent' THEN '250 2.0.0 Ok: queued as 4Xk2p1'
            ELSE '550 5.1.1 <c***@example.com>: Recipient address rejected: User unknown in virtual mailbox table' END,
       'worker-' || (i.position % 3 + 1)
  FROM batch_items i, generate_series(1, i.attempts_made) AS a(number)
 WHERE i.attempts_made > 0 AND i.updated_at > now() - interval '30 days';

-- Addresses refused as bad mailboxes.
INSERT INTO suppressions (email, reply, item_id, created_at)
SELECT DISTINCT ON (i.email) i.email, i.last_error, i.id, i.updated_at
  FROM batch_items i
 WHERE i.reason = 'rejected'
 ORDER BY i.email, i.updated_at DESC;

-- The queue: a Pending task for each pending item, Done for the items finished within
-- the last hour (maintenance deletes older ones), and 30 tasks apalis gave up on.
INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                         last_result, done_at, priority, metadata)
SELECT convert_to('{"item_id":"' || i.id || '"}', 'UTF8'), i.task_id,
       'invite-worker::send-invite',
       CASE WHEN i.status = 'pending' THEN 'Pending' ELSE 'Done' END,
       CASE WHEN i.status = 'pending' THEN 0 ELSE 1 END, 10, b.created_at,
       CASE WHEN i.status = 'pending' THEN NULL ELSE '{"Ok":null}'::jsonb END,
       CASE WHEN i.status = 'pending' THEN NULL ELSE i.updated_at END,
       0, ''::hstore
  FROM batch_items i
  JOIN batches b ON b.id = i.batch_id
 WHERE b.id IN (SELECT id FROM seed_batches WHERE at > now() - interval '2 hours')
   AND (i.status = 'pending' OR i.updated_at > now() - interval '1 hour');

INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                         last_result, done_at, priority, metadata)
SELECT convert_to('{"item_id":"' || i.id || '"}', 'UTF8'),
       pg_temp.ulid_prefix(i.updated_at, 2) || lpad(d::text, 12, '0'),
       'invite-worker::send-invite', 'Killed', 1, 10,
       i.updated_at, '{"Err":"the task payload could not be read"}'::jsonb, i.updated_at,
       0, ''::hstore
  FROM generate_series(1, 30) AS d
  JOIN seed_batches sb ON sb.k = d * 7
  JOIN batch_items i ON i.batch_id = sb.id AND i.position = 1;

-- The audit log.
INSERT INTO audit_log (at, actor, action, target, detail)
SELECT j.created_at, 'key:recruiting-webapp', 'job.created', j.id,
       jsonb_build_object('status', 'open')
  FROM jobs j;

INSERT INTO audit_log (at, actor, action, target, detail)
SELECT x.at, x.actor, x.action, x.target, x.detail
  FROM (SELECT b.created_at AS at, 'key:recruiting-webapp' AS actor,
               'batch.created' AS action, b.id::text AS target,
               jsonb_build_object('job_id', b.job_id, 'total', b.total) AS detail
          FROM batches b
        UNION ALL
        SELECT b.cancelled_at, CASE WHEN sb.k % 2 = 0 THEN 'operator:alice'
                                    ELSE 'key:recruiting-webapp' END,
               'batch.cancelled', b.id::text, jsonb_build_object('skipped', b.skipped)
          FROM batches b JOIN seed_batches sb ON sb.id = b.id
         WHERE b.status = 'cancelled'
        UNION ALL
        SELECT v.redeemed_at, 'key:recruiting-webapp', 'invitation.redeemed', v.id::text,
               '{}'::jsonb
          FROM invitations v WHERE v.status = 'COMPLETED'
        UNION ALL
        SELECT v.completed_at, 'key:recruiting-webapp', 'invitation.completed', v.id::text,
               '{}'::jsonb
          FROM invitations v WHERE v.status = 'COMPLETED'
        UNION ALL
        SELECT now() - d * interval '9 days', 'cli:ops', 'tasks.retried', 'dead',
               jsonb_build_object('retried', d)
          FROM generate_series(1, 8) AS d) x
 ORDER BY x.at;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT def FROM seed_indexes LOOP
        EXECUTE r.def;
    END LOOP;
END
$$;

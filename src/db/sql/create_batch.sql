-- A new batch: its items and one send-invite task per item, if the job is open; one
-- statement, so all of it or nothing (see db::tasks::create_batch). The job row is held
-- FOR SHARE meanwhile. The tasks are the rows apalis-postgres' push writes
-- (queries/task/sink.sql), in its format; a test compares the two.
--
-- $1 batch id, $2 job id, $3 duration, $4 on_duplicate, $5 total,
-- $6 warning candidate ids, $18 codes, $19 messages, $20 only-if-invited flags,
-- $7 idempotency key, $8 request hash, $21 request id, $22 created by (the API key's
-- name), $23 the audit log's actor,
-- $9..$14 items (id, candidate id, email, name, task id, email error),
-- $15 queue, $16 task max_attempts, $17 payloads.
WITH job AS (
   SELECT id, status FROM jobs WHERE id = $2 FOR SHARE),
warned AS (
   SELECT coalesce(jsonb_agg(jsonb_build_object('candidate_id', w.candidate_id,
                                                'code', w.code,
                                                'message', w.message)
                             ORDER BY w.n), '[]') AS warnings
     FROM unnest($6::text[], $18::text[], $19::text[], $20::bool[])
          WITH ORDINALITY AS w(candidate_id, code, message, if_invited, n)
    WHERE NOT w.if_invited
       OR EXISTS (SELECT 1 FROM invitations v
                   WHERE v.job_id = $2 AND v.candidate_id = w.candidate_id
                     AND invitation_is_live(v.status, v.expires_at))),
batch AS (
   INSERT INTO batches (id, job_id, duration_minutes, on_duplicate, total, pending,
                        warnings, idempotency_key, request_hash, request_id, created_by)
   SELECT $1, job.id, $3, $4, $5, $5, warned.warnings, $7, $8, $21, $22
     FROM job, warned
    WHERE job.status <> 'closed'
   RETURNING *),
items AS (
   INSERT INTO batch_items (id, batch_id, position, candidate_id, email, name, task_id,
                            email_error)
   SELECT t.id, batch.id, t.position, t.candidate_id, t.email, t.name, t.task_id,
          t.email_error
     FROM batch,
          unnest($9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[],
                 $14::text[])
          WITH ORDINALITY AS t(id, candidate_id, email, name, task_id, email_error,
                               position)),
tasks AS (
   INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                            priority, metadata)
   SELECT t.task_id, $15, t.payload, 'Pending', 0, $16, now(), 0, ''::hstore
     FROM batch, unnest($13::text[], $17::bytea[]) AS t(task_id, payload)),
audit AS (
   INSERT INTO audit_log (actor, action, target, detail)
   SELECT $23, 'batch.created', batch.id::text,
          jsonb_build_object('job_id', batch.job_id, 'total', batch.total)
     FROM batch)
SELECT job.status AS job_status, batch.* FROM job LEFT JOIN batch ON true

-- Phase 3 for a group of outcomes (see db::tasks::record_outcomes): each item still
-- pending under its task moves (locked in id order), its invitation too (sent: the
-- expiry starts now; ended otherwise: revoked), each batch's tally and warnings (batch
-- rows locked in id order, after every item), each attempt's row in the history, and
-- every task of the group ($9) is marked Done, and the webhook events of failed items
-- and completed batches are written (their deliveries by the trigger on webhook_events).
-- Every table but the few rows of webhook_endpoints is reached through an index
-- condition on keys given or computed first.
--
-- $1..$8, $10..$13 per outcome: item id, task id, status, reason, last error, retry's
-- new task id, retry's run_at, warning (JSON), address to suppress, attempt to give
-- back (a deferred send), the attempt's outcome (null: no attempt was made), its reply
-- (addresses masked); $9 the group's tasks; $14 this process' name.
WITH t AS (
   SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::timestamptz[], $8::text[], $10::text[], $11::bool[],
                        $12::text[], $13::text[])
       AS t(id, task_id, status, reason, last_error, new_task_id, run_at, warning, suppress,
            give_back, attempt, reply)),
locked AS MATERIALIZED (
   SELECT id, status, task_id, sending_at FROM batch_items
    WHERE id = ANY($1)
    ORDER BY id
      FOR NO KEY UPDATE),
applied AS (
   UPDATE batch_items i
      SET status = t.status, reason = t.reason,
          last_error = coalesce(t.last_error, i.last_error),
          task_id = coalesce(t.new_task_id, i.task_id), next_attempt_at = t.run_at,
          sending_at = NULL, updated_at = now(),
          attempts = i.attempts - CASE WHEN t.give_back THEN 1 ELSE 0 END,
          attempts_made = i.attempts_made + CASE WHEN t.attempt IS NULL THEN 0 ELSE 1 END,
          sent_at = CASE WHEN t.status = 'sent' THEN now() ELSE i.sent_at END
     FROM t
     JOIN locked l ON l.id = t.id
    WHERE i.id = ANY($1) AND i.id = t.id
      AND l.status = 'pending' AND l.task_id = t.task_id
   RETURNING i.id, t.task_id, i.batch_id, i.invitation_id, t.status, t.warning,
             t.attempt, t.reply, i.attempts_made, l.sending_at,
             CASE WHEN t.status = 'failed' THEN webhook_item(i) END AS failed_item),
history AS (
   INSERT INTO attempts (item_id, number, started_at, finished_at, outcome, smtp_reply,
                         worker)
   SELECT a.id, a.attempts_made, least(coalesce(a.sending_at, now()), now()), now(),
          a.attempt, a.reply, $14
     FROM applied a
    WHERE a.attempt IS NOT NULL),
sent_invitations AS (
   UPDATE invitations v
      SET sent_at = now(), expires_at = now() + (v.expires_at - v.created_at)
    WHERE v.id = ANY(ARRAY(SELECT invitation_id FROM applied WHERE status = 'sent'))),
revoked_invitations AS (
   UPDATE invitations v SET status = 'REVOKED', revoked_at = now()
    WHERE v.id = ANY(ARRAY(SELECT invitation_id FROM applied
                            WHERE status IN ('failed', 'skipped')))
      AND v.status = 'PENDING'),
counts AS (
   SELECT batch_id,
          count(*) FILTER (WHERE status = 'sent')::int AS sent,
          count(*) FILTER (WHERE status = 'failed')::int AS failed,
          count(*) FILTER (WHERE status = 'skipped')::int AS skipped,
          coalesce(jsonb_agg(warning::jsonb) FILTER (WHERE warning IS NOT NULL),
                   '[]'::jsonb) AS warnings
     FROM applied
    GROUP BY batch_id),
locked_batches AS MATERIALIZED (
   SELECT id FROM batches WHERE id = ANY(ARRAY(SELECT batch_id FROM counts))
    ORDER BY id
      FOR NO KEY UPDATE),
tally AS (
   UPDATE batches b
      SET pending = b.pending - (c.sent + c.failed + c.skipped),
          sent = b.sent + c.sent, failed = b.failed + c.failed,
          skipped = b.skipped + c.skipped,
          status = CASE WHEN b.pending = c.sent + c.failed + c.skipped
                        THEN 'completed' ELSE 'running' END,
          completed_at = CASE WHEN b.pending = c.sent + c.failed + c.skipped
                              THEN now() ELSE NULL END,
          warnings = b.warnings || (
              SELECT coalesce(jsonb_agg(w), '[]'::jsonb)
                FROM jsonb_array_elements(c.warnings) AS w
               WHERE NOT b.warnings @> jsonb_build_array(jsonb_build_object(
                         'candidate_id', w -> 'candidate_id', 'code', w -> 'code')))
     FROM counts c
    WHERE b.id = ANY(ARRAY(SELECT id FROM locked_batches)) AND b.id = c.batch_id
   -- Completed by this statement: the batch row is locked, so of two groups settling a
   -- batch's last items at once exactly one sees its pending count reach zero.
   RETURNING CASE WHEN b.status = 'completed' THEN webhook_batch(b) END AS completed),
events AS (
   INSERT INTO webhook_events (id, type, payload)
   SELECT webhook_message_id(), e.kind, webhook_body(e.kind, e.data)
     FROM (SELECT 'item.failed' AS kind, failed_item AS data FROM applied
            WHERE failed_item IS NOT NULL
           UNION ALL
           SELECT 'batch.completed', completed FROM tally WHERE completed IS NOT NULL) e
    WHERE EXISTS (SELECT 1 FROM webhook_endpoints w    -- webhook_subscribed(), inlined:
                   WHERE w.disabled_at IS NULL          -- planned once with the statement
                     AND e.kind = ANY(w.events))),
suppressed AS (
   INSERT INTO suppressions (email, reply, item_id)
   SELECT DISTINCT ON (lower(btrim(t.suppress))) lower(btrim(t.suppress)),
          coalesce(t.last_error, ''), t.id
     FROM t
     JOIN applied a ON a.id = t.id      -- only outcomes that were applied: not an item
    WHERE t.suppress IS NOT NULL        -- erased or finished meanwhile
   ON CONFLICT (email) DO NOTHING),
finished AS (
   UPDATE apalis.jobs
      SET status = 'Done', done_at = now(), lock_by = NULL,
          attempts = attempts + 1, last_result = '{"Ok":null}'
    WHERE id = ANY($9) AND status IN ('Pending', 'Queued', 'Running'))
SELECT id, task_id FROM applied

-- Candidate erasure (DELETE /v1/candidates/{id}): the items $2 of candidate $1, already
-- locked by the caller (in id order, none of them with a send on its way), lose their
-- email and name; replies kept with them and their attempts lose the addresses they
-- quote. A pending item is skipped as `cancelled` (it is never sent) and its batch's
-- tally moves with it, completing the batch when nothing else is pending (with its
-- batch.completed event). Every
-- PENDING invitation of the items is revoked. The batches' invalid_email warnings for
-- the candidate are reworded, and the candidate's addresses leave the suppression
-- list. Lock order as everywhere: items, invitations, batches (in id order),
-- suppressions. Answers how many items held data until now.
WITH before AS MATERIALIZED (
   SELECT id, batch_id, status, email, erased_at FROM batch_items
    WHERE id = ANY($2) AND candidate_id = $1),
erased AS (
   UPDATE batch_items i
      SET email = '', name = NULL, last_error = erase_addresses(i.last_error),
          email_error = 'the address was erased', erased_at = coalesce(i.erased_at, now()),
          status = CASE WHEN b.status = 'pending' THEN 'skipped' ELSE i.status END,
          reason = CASE WHEN b.status = 'pending' THEN 'cancelled' ELSE i.reason END,
          next_attempt_at = CASE WHEN b.status = 'pending' THEN NULL ELSE i.next_attempt_at END,
          sending_at = NULL, updated_at = now()
     FROM before b
    WHERE i.id = ANY($2) AND i.id = b.id),
history AS (
   UPDATE attempts a SET smtp_reply = erase_addresses(a.smtp_reply)
    WHERE a.item_id = ANY(ARRAY(SELECT id FROM before)) AND a.smtp_reply LIKE '%@%'),
revoked AS (
   UPDATE invitations v SET status = 'REVOKED', revoked_at = now()
    WHERE v.item_id = ANY(ARRAY(SELECT id FROM before)) AND v.status = 'PENDING'),
counts AS (
   SELECT batch_id, count(*) FILTER (WHERE status = 'pending')::int AS skipped
     FROM before GROUP BY batch_id),
locked_batches AS MATERIALIZED (
   SELECT id FROM batches WHERE id = ANY(ARRAY(SELECT batch_id FROM counts))
    ORDER BY id
      FOR NO KEY UPDATE),
tally AS (
   UPDATE batches b
      SET pending = b.pending - c.skipped, skipped = b.skipped + c.skipped,
          status = CASE WHEN c.skipped > 0 AND b.pending = c.skipped THEN 'completed'
                        ELSE b.status END,
          completed_at = CASE WHEN c.skipped > 0 AND b.pending = c.skipped THEN now()
                              ELSE b.completed_at END,
          warnings = erase_warnings(b.warnings, ARRAY[$1::text])
     FROM counts c
    WHERE b.id = ANY(ARRAY(SELECT id FROM locked_batches)) AND b.id = c.batch_id
   RETURNING CASE WHEN c.skipped > 0 AND b.status = 'completed' THEN webhook_batch(b) END
             AS completed),
events AS (
   INSERT INTO webhook_events (id, type, payload)
   SELECT webhook_message_id(), 'batch.completed', webhook_body('batch.completed', completed)
     FROM tally
    WHERE completed IS NOT NULL AND webhook_subscribed('batch.completed')),
unsuppressed AS (
   DELETE FROM suppressions s
    WHERE s.email = ANY(ARRAY(SELECT lower(btrim(email)) FROM before WHERE email <> '')))
SELECT count(*) FROM before WHERE erased_at IS NULL

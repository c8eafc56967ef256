-- Retention (retention.finished_batches_days): the items of batches that finished
-- (completed or cancelled) more than $1 days ago lose their email and name, replies
-- kept with them and their attempts lose the addresses they quote, and the batches'
-- invalid_email warnings (which quote the address) are reworded; at most $2 batches a
-- call, oldest first. Items are locked before their batch (the lock order of
-- db::delivery); a batch a retry made live meanwhile is left alone, and so are its
-- items. Invitations hold no email or name and are not touched (a live link of such a
-- batch keeps working).
WITH due AS (
   SELECT id FROM batches
    WHERE anonymized_at IS NULL AND status IN ('completed', 'cancelled')
      AND coalesce(completed_at, cancelled_at) < now() - make_interval(days => $1)
    ORDER BY coalesce(completed_at, cancelled_at)
    LIMIT $2),
locked_items AS MATERIALIZED (
   SELECT id, batch_id FROM batch_items
    WHERE batch_id = ANY(ARRAY(SELECT id FROM due))
    ORDER BY id
      FOR NO KEY UPDATE),
locked_batches AS MATERIALIZED (
   SELECT id FROM batches
    WHERE id = ANY(ARRAY(SELECT DISTINCT batch_id FROM locked_items))
      AND anonymized_at IS NULL AND status IN ('completed', 'cancelled')
    ORDER BY id
      FOR NO KEY UPDATE),
items AS (
   UPDATE batch_items i
      SET email = '', name = NULL, last_error = erase_addresses(i.last_error),
          email_error = 'the address was erased', erased_at = coalesce(i.erased_at, now()),
          updated_at = now()
    WHERE i.batch_id = ANY(ARRAY(SELECT id FROM locked_batches))
      AND i.status <> 'pending'
   RETURNING i.id),
history AS (
   UPDATE attempts a SET smtp_reply = erase_addresses(a.smtp_reply)
    WHERE a.item_id = ANY(ARRAY(SELECT id FROM items)) AND a.smtp_reply LIKE '%@%'),
anonymized AS (
   UPDATE batches b SET anonymized_at = now(), warnings = erase_warnings(b.warnings, NULL)
    WHERE b.id = ANY(ARRAY(SELECT id FROM locked_batches))
   RETURNING b.id)
SELECT (SELECT count(*) FROM anonymized) AS batches, (SELECT count(*) FROM items) AS items

-- Failed items back to pending under a new task ($1 item ids, $2 task ids), with a fresh
-- attempt budget and invitation, and a corrected address where one is given ($3; its
-- problem, if any, was refused before this). Retried on request, the item tries the
-- server even if its address is on the suppression list.
UPDATE batch_items i
   SET status = 'pending', reason = NULL, attempts = 0, last_error = NULL,
       invitation_id = NULL, sending_at = NULL, next_attempt_at = NULL,
       task_id = t.task_id, email = coalesce(t.email, i.email),
       email_error = CASE WHEN t.email IS NULL THEN i.email_error END,
       -- an erased item stays erased (and fails again) unless a new address is given
       erased_at = CASE WHEN t.email IS NULL THEN i.erased_at END,
       retry_requested = true,
       updated_at = now()
  FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(id, task_id, email)
 WHERE i.id = t.id

-- Pending items whose own task can no longer run (gone, killed, or out of apalis
-- attempts), unless a send of theirs may still be on its way (sending_at within $1
-- seconds): at most 1,000, locked, skipping items another process holds. Pending items
-- are found through the live batches (a batch is live exactly while it has some: the
-- batch_live_iff_pending check); no index of items reads their status.
SELECT i.id FROM batch_items i
  LEFT JOIN apalis.jobs j ON j.id = i.task_id
 WHERE i.batch_id = ANY(ARRAY(SELECT id FROM batches WHERE status IN ('queued', 'running')))
   AND i.status = 'pending'
   AND (j.id IS NULL
        OR j.status IN ('Done', 'Killed')
        OR (j.status = 'Failed' AND j.attempts >= j.max_attempts))
   AND (i.sending_at IS NULL OR i.sending_at < now() - make_interval(secs => $1))
 ORDER BY i.id
 LIMIT 1000
   FOR UPDATE OF i SKIP LOCKED

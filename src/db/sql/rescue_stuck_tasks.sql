-- Tasks of pending items that a worker took more than $1 seconds ago and never
-- finished become runnable again. Found through the pending items (through the live
-- batches, as in requeue_stranded_items.sql), so the cost does not grow with the
-- finished tasks kept.
UPDATE apalis.jobs j
   SET status = 'Pending', lock_by = NULL, lock_at = NULL, attempts = j.attempts + 1,
       last_result = '{"Err": "released: taken long ago and never finished"}'
  FROM batch_items i
 WHERE i.batch_id = ANY(ARRAY(SELECT id FROM batches WHERE status IN ('queued', 'running')))
   AND i.status = 'pending'
   AND j.id = i.task_id
   AND j.status IN ('Queued', 'Running')
   AND j.lock_at < now() - make_interval(secs => $1)

-- The workers of queue $1 that sent a heartbeat within $2 seconds, most recent first,
-- each with the tasks it has taken and not finished (found through apalis'
-- `idx_apalis_jobs_lock_by`; finishing a task clears its lock_by).
SELECT w.id AS name, w.last_seen,
       (SELECT count(*) FROM apalis.jobs j
         WHERE j.lock_by = w.id AND j.status IN ('Queued', 'Running')) AS in_flight
  FROM apalis.workers w
 WHERE w.worker_type = $1
   AND w.last_seen > now() - make_interval(secs => $2)
 ORDER BY w.last_seen DESC, w.id

-- Dead tasks of queue $1 (all, or those among the ids $2) made runnable now with a fresh
-- attempt budget, as apalis writes a new task.
UPDATE apalis.jobs
   SET status = 'Pending', attempts = 0, run_at = now(), lock_by = NULL, lock_at = NULL,
       done_at = NULL, last_result = NULL
 WHERE job_type = $1
   AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))
   AND ($2::text[] IS NULL OR id = ANY($2))

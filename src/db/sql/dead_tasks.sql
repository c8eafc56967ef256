-- Tasks of queue $1 that apalis gave up on (killed, or failed with no attempt left),
-- most recently made first (task ids are ULIDs), at most $2: read through the
-- `apalis_jobs_dead` index, whose predicate this repeats.
SELECT id, job, status, attempts, last_result, done_at
  FROM apalis.jobs
 WHERE job_type = $1
   AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))
 ORDER BY job_type DESC, id DESC
 LIMIT $2

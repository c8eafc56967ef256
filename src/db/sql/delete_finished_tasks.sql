-- Tasks of queue $1 that finished more than $2 seconds ago (done, killed, or failed
-- with no attempt left), found through the partial index apalis_jobs_finished.
DELETE FROM apalis.jobs
 WHERE job_type = $1
   AND status IN ('Done', 'Killed', 'Failed')
   AND (status <> 'Failed' OR attempts >= max_attempts)
   AND done_at < now() - make_interval(secs => $2)

-- The send-invite tasks of queue $1 by state, as operators name them (apalis' own
-- statuses: Pending, Queued and Running (taken), Done, Failed, Killed), and how long the
-- oldest due task has waited. A failed task with attempts left is fetched again like a
-- pending one (apalis' get_jobs), when its run_at comes. Each count reads only its own
-- rows, through an index: the runnable ones through apalis' fetch index (whose
-- predicate this repeats), the taken ones through its lock_by index (finishing a task
-- clears lock_by), the done and dead ones through the partial indexes that hold only
-- them.
SELECT (SELECT count(*) FROM apalis.jobs
         WHERE job_type = $1 AND run_at <= now()
           AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts)))
           AS pending,
       (SELECT count(*) FROM apalis.jobs
         WHERE job_type = $1 AND run_at > now()
           AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts)))
           AS scheduled,
       (SELECT count(*) FROM apalis.jobs
         WHERE lock_by IS NOT NULL AND job_type = $1 AND status IN ('Queued', 'Running'))
           AS running,
       (SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done') AS done,
       (SELECT count(*) FROM apalis.jobs
         WHERE job_type = $1
           AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts)))
           AS dead,
       coalesce(floor(extract(epoch FROM now() - (
           SELECT min(run_at) FROM apalis.jobs
            WHERE job_type = $1 AND run_at <= now()
              AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
       ))), 0)::bigint AS oldest_pending_age_secs

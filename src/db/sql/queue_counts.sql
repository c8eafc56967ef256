-- The send-invite tasks of queue $1 by state, as operators name them (apalis' own
-- statuses: Pending, Queued and Running (taken), Done, Failed, Killed), and how long the
-- oldest due task has waited. A failed task with attempts left is fetched again like a
-- pending one (apalis' get_jobs), when its run_at comes.
SELECT count(*) FILTER (WHERE runnable AND run_at <= now())         AS pending,
       count(*) FILTER (WHERE runnable AND run_at > now())          AS scheduled,
       count(*) FILTER (WHERE status IN ('Queued', 'Running'))      AS running,
       count(*) FILTER (WHERE status = 'Done')                      AS done,
       count(*) FILTER (WHERE status = 'Killed'
                           OR (status = 'Failed' AND NOT runnable)) AS dead,
       coalesce(floor(extract(epoch FROM now() - min(run_at)
                                FILTER (WHERE runnable AND run_at <= now()))), 0)::bigint
           AS oldest_pending_age_secs
  FROM (SELECT status, run_at,
               status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts)
                   AS runnable
          FROM apalis.jobs
         WHERE job_type = $1) AS t

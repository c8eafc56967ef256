-- How task $1 ended, written in place of apalis' own ack, if it is still taken:
-- $2 'Done', 'Killed' (never again) or 'Failed' (apalis runs it again after
-- attempts + 1 seconds, up to its max_attempts); $3 its result as apalis stores it.
UPDATE apalis.jobs
   SET status = $2, last_result = $3, attempts = attempts + 1, lock_by = NULL,
       done_at = now(),
       run_at = CASE WHEN $2 = 'Failed'
                     THEN now() + make_interval(secs => attempts + 1) ELSE run_at END
 WHERE id = $1 AND status IN ('Pending', 'Queued', 'Running')

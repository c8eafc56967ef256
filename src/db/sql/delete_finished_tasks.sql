-- Tasks of queue $1 that finished more than $2 seconds ago (done, killed, or failed
-- with no attempt left). Task ids are ULIDs, which sort by the time they were made, so
-- `id < $3` (the id of the cut-off time) lets the primary key find the candidates: the
-- tasks made before the cut-off, of which only the ones not yet finished remain after
-- earlier prunes. Finished tasks kept for the retention period are not read, however
-- many there are, and no index of its own costs a write per task.
DELETE FROM apalis.jobs
 WHERE id < $3
   AND job_type = $1
   AND status IN ('Done', 'Killed', 'Failed')
   AND (status <> 'Failed' OR attempts >= max_attempts)
   AND done_at < now() - make_interval(secs => $2)

-- Invitations of job $1 and/or candidate $2 (null: any), newest first, at most $3.
SELECT id, job_id, candidate_id, batch_id,
       invitation_status_now(status, expires_at) AS status,
       duration_minutes, sent_at, expires_at, redeemed_at
  FROM invitations
 WHERE ($1::text IS NULL OR job_id = $1) AND ($2::text IS NULL OR candidate_id = $2)
 ORDER BY created_at DESC, id DESC
 LIMIT $3

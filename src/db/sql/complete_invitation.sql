-- Invitation $1: IN_PROGRESS -> COMPLETED.
UPDATE invitations SET status = 'COMPLETED', completed_at = now()
 WHERE id = $1 AND status = 'IN_PROGRESS'
RETURNING id, job_id, candidate_id, batch_id, status, duration_minutes, sent_at,
          expires_at, redeemed_at

-- Invitation $1: PENDING (and not expired) -> REVOKED.
UPDATE invitations SET status = 'REVOKED', revoked_at = now()
 WHERE id = $1 AND status = 'PENDING' AND expires_at > now()
RETURNING id, job_id, candidate_id, batch_id, status, duration_minutes, sent_at,
          expires_at, redeemed_at

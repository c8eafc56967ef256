-- Consumes the live link whose token hashes to $1, in one atomic UPDATE: under any
-- number of concurrent redeems of one token exactly one matches status = 'PENDING'.
UPDATE invitations SET status = 'IN_PROGRESS', redeemed_at = now()
 WHERE token_hash = $1 AND status = 'PENDING' AND expires_at > now()
RETURNING id, job_id, candidate_id, batch_id, status, duration_minutes, sent_at,
          expires_at, redeemed_at

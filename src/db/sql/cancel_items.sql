-- Every pending item of batch $1 is skipped as cancelled, and its link (if minted and
-- still PENDING) is revoked.
WITH cancelled AS (
   UPDATE batch_items
      SET status = 'skipped', reason = 'cancelled', sending_at = NULL,
          next_attempt_at = NULL, updated_at = now()
    WHERE batch_id = $1 AND status = 'pending'
RETURNING invitation_id)
UPDATE invitations SET status = 'REVOKED', revoked_at = now()
 WHERE id IN (SELECT invitation_id FROM cancelled) AND status = 'PENDING'

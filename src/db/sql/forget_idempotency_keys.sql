-- Retention (retention.idempotency_hours): batches created more than $1 hours ago
-- forget their Idempotency-Key and the hash of the request that came with it, once
-- they are no longer live (a repeat of a running batch's request still finds it); at
-- most $2 a call, oldest first. A batch a retry made live meanwhile keeps its key.
UPDATE batches SET idempotency_key = NULL, request_hash = NULL
 WHERE id = ANY(ARRAY(
        SELECT id FROM batches
         WHERE idempotency_key IS NOT NULL
           AND created_at < now() - make_interval(hours => $1)
           AND status IN ('completed', 'cancelled')
         ORDER BY created_at
         LIMIT $2))
   AND status IN ('completed', 'cancelled')

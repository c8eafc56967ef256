-- Claims up to $1 deliveries for one attempt each, for $3 seconds (see
-- db::webhooks::claim): due pending ones, and claims whose lease ran out (the process
-- that held them died). At most $2 are in flight to one endpoint, counting live claims
-- of every process, and endpoints take turns (each one's first due delivery, then each
-- one's second, …), so one slow endpoint cannot hold every slot. Rows another process
-- is claiming are skipped, not waited for. A delivery whose endpoint was disabled
-- meanwhile (410 Gone while it was in flight elsewhere) comes back marked `disabled`:
-- it is recorded as failed, never sent.
WITH busy AS (
   SELECT endpoint_id, count(*) AS n FROM webhook_deliveries
    WHERE status = 'sending' AND locked_until > now()
    GROUP BY endpoint_id),
due AS (
   SELECT id, endpoint_id,
          row_number() OVER (PARTITION BY endpoint_id ORDER BY next_attempt_at, id) AS turn
     FROM webhook_deliveries
    WHERE (status = 'pending' AND next_attempt_at <= now())
       OR (status = 'sending' AND locked_until <= now())),
picked AS (
   SELECT due.id FROM due LEFT JOIN busy USING (endpoint_id)
    WHERE due.turn + coalesce(busy.n, 0) <= $2
    ORDER BY due.turn, due.id
    LIMIT $1),
locked AS (
   SELECT d.id FROM webhook_deliveries d
    WHERE d.id IN (SELECT id FROM picked)
      AND ((d.status = 'pending' AND d.next_attempt_at <= now())
           OR (d.status = 'sending' AND d.locked_until <= now()))
      FOR UPDATE SKIP LOCKED),
claimed AS (
   UPDATE webhook_deliveries d
      SET status = 'sending', next_attempt_at = NULL, attempts = d.attempts + 1,
          locked_until = now() + make_interval(secs => $3)
     FROM locked
    WHERE d.id = locked.id
   RETURNING d.id, d.event_id, d.endpoint_id, d.attempts)
SELECT c.id, c.event_id, c.endpoint_id, c.attempts AS attempt, e.payload::text AS body,
       w.url, w.secret, w.disabled_at IS NOT NULL AS disabled
  FROM claimed c
  JOIN webhook_events e ON e.id = c.event_id
  JOIN webhook_endpoints w ON w.id = c.endpoint_id

-- Items sent in the last minute. An item is sent while its batch is live, so they are
-- found in the batches live now (`batches_live`) or finished within the minute
-- (`batches_finished`), through the (batch_id, candidate_id) index of items: no index of
-- items reads their status or time, which would cost a write at every send.
SELECT count(*) FROM batch_items
 WHERE batch_id = ANY(ARRAY(
           SELECT id FROM batches WHERE status IN ('queued', 'running')
           UNION ALL
           SELECT id FROM batches
            WHERE status IN ('completed', 'cancelled')
              AND coalesce(completed_at, cancelled_at) > now() - interval '1 minute'))
   AND status = 'sent'
   AND updated_at > now() - interval '1 minute'

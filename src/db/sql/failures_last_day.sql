-- Failed items whose last change (their failure) is less than a day old, grouped by
-- reason and by the reply code of their last error, as `failure_groups.sql` does for
-- one batch. An item fails while its batch is live, so they are found in the batches
-- live now (`batches_live`) or finished within the day (`batches_finished`), as
-- `sent_last_minute.sql` finds sends: an index of items on their time would make every
-- item update write every index (no HOT updates), which the send path pays for.
SELECT reason, reply_code, count(*) AS count
  FROM (SELECT reason,
               substring(last_error FROM '^([2-5][0-9][0-9](?:[ -][2-5]\.[0-9]{1,3}\.[0-9]{1,3})?)(?:[ -]|$)')
                   AS reply_code
          FROM batch_items
         WHERE batch_id = ANY(ARRAY(
                   SELECT id FROM batches WHERE status IN ('queued', 'running')
                   UNION ALL
                   SELECT id FROM batches
                    WHERE status IN ('completed', 'cancelled')
                      AND coalesce(completed_at, cancelled_at) > now() - interval '24 hours'))
           AND status = 'failed'
           AND updated_at > now() - interval '24 hours') AS f
 GROUP BY reason, reply_code
 ORDER BY count(*) DESC, reason, reply_code NULLS LAST
 LIMIT 50

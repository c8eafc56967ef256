-- Failed items whose last change (their failure) is less than a day old, grouped by
-- reason and by the reply code of their last error, as `failure_groups.sql` does for
-- one batch. The partial index `batch_items_failed_recent` holds only failed items.
SELECT reason, reply_code, count(*) AS count
  FROM (SELECT reason,
               substring(last_error FROM '^([2-5][0-9][0-9](?:[ -][2-5]\.[0-9]{1,3}\.[0-9]{1,3})?)(?:[ -]|$)')
                   AS reply_code
          FROM batch_items
         WHERE status = 'failed' AND updated_at > now() - interval '24 hours') AS f
 GROUP BY reason, reply_code
 ORDER BY count(*) DESC, reason, reply_code NULLS LAST
 LIMIT 50

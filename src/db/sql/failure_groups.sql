-- The failed items of batch $1 grouped by reason and by the reply code of their last
-- error: the SMTP code and, when the server gave one, the enhanced status code
-- ("550 5.1.1"); null when the last error is no server reply (a refused connection, an
-- address that could not be sent to). Largest group first, then by reason and code so
-- the order is stable; at most 20 candidate ids each, in the batch's order.
SELECT reason, reply_code, count(*) AS count,
       (array_agg(candidate_id::text ORDER BY position))[1:20] AS candidate_ids
  FROM (SELECT reason, position, candidate_id,
               substring(last_error FROM '^([2-5][0-9][0-9](?:[ -][2-5]\.[0-9]{1,3}\.[0-9]{1,3})?)(?:[ -]|$)')
                   AS reply_code
          FROM batch_items
         WHERE batch_id = $1 AND status = 'failed') AS f
 GROUP BY reason, reply_code
 ORDER BY count(*) DESC, reason, reply_code NULLS LAST

-- Retention (retention.attempts_days): attempts that finished more than $1 days ago
-- are deleted, except those of items still pending; at most $2 a call. Numbering is
-- unaffected (batch_items.attempts_made).
DELETE FROM attempts a
 WHERE (a.item_id, a.number) IN (
        SELECT h.item_id, h.number FROM attempts h
         WHERE h.finished_at < now() - make_interval(days => $1)
           AND NOT EXISTS (SELECT 1 FROM batch_items i
                            WHERE i.id = h.item_id AND i.status = 'pending')
         LIMIT $2)

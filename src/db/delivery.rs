//! The worker's statements, each written for a whole group of items (see
//! `queue::group`), so a group costs a few round trips however large it is. They run
//! on the group writers' own connections, planned once and as index lookups only
//! (`db::writer_connection`): every row is found by the keys the statement is given.
//!
//! Lock order everywhere: item rows (in id order), then per-(job, candidate) advisory
//! locks (in key order), then batch rows (in id order). Every change to an item's
//! status moves its batch's tally in the same statement.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::states::{ItemReason, ItemStatus};

/// An item with what delivering it needs to know, read under the item's row lock.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LockedItem {
    pub id: Uuid,
    pub batch_id: Uuid,
    pub task_id: String,
    pub status: String,
    pub attempts: i32,
    pub candidate_id: String,
    pub email: String,
    pub name: Option<String>,
    pub invitation_id: Option<Uuid>,
    pub job_id: String,
    pub job_title: String,
    pub job_status: String,
    pub batch_status: String,
    pub on_duplicate: String,
    pub duration_minutes: i32,
}

/// Phase 1, first statement: locks the items (in id order) and reads them with their
/// batch and job; then, in the same statement, takes the advisory lock of every
/// (job, candidate) pair that may need the duplicate check (in key order), held until
/// the transaction ends. The check itself must run in a later statement, whose
/// snapshot is taken after the locks: that is what makes two batches racing for one
/// candidate see each other's invitation.
///
/// (The scalar subquery is evaluated once, before the first row is returned, and it
/// reads every locked item first: item locks, then pair locks, each set in order.)
pub async fn lock_for_prepare(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> sqlx::Result<Vec<LockedItem>> {
    sqlx::query_as(
        "WITH items AS MATERIALIZED (
            SELECT i.id, i.batch_id, i.task_id, i.status, i.attempts, i.candidate_id, i.email,
                   i.name, i.invitation_id, b.job_id, j.title AS job_title,
                   j.status AS job_status, b.status AS batch_status, b.on_duplicate,
                   b.duration_minutes
              FROM batch_items i
              JOIN batches b ON b.id = i.batch_id
              JOIN jobs j ON j.id = b.job_id
             WHERE i.id = ANY($1)
             ORDER BY i.id
               FOR UPDATE OF i),
         pair_locks AS MATERIALIZED (
            SELECT pg_advisory_xact_lock(k)
              FROM (SELECT DISTINCT hashtextextended(job_id || '/' || candidate_id, 7141) AS k
                      FROM items
                     WHERE status = 'pending' AND invitation_id IS NULL
                       AND on_duplicate = 'skip' AND job_status <> 'closed'
                     ORDER BY k) AS keys)
         SELECT * FROM items WHERE (SELECT count(*) FROM pair_locks) >= 0",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
}

/// One send attempt to begin in phase 1.
pub struct BeginAttempt<'a> {
    pub item: &'a LockedItem,
    /// The invitation to mint first (the item's first attempt); `None` when a later
    /// attempt reuses the one the item has.
    pub mint: Option<Mint>,
    /// Mint only if the candidate holds no live invitation for the job
    /// (`on_duplicate: skip`); the pair's advisory lock is held.
    pub unless_invited: bool,
}

/// An invitation to mint: its id (the link is derived from it) and the SHA-256 of its
/// token.
pub struct Mint {
    pub id: Uuid,
    pub token_hash: [u8; 32],
}

/// An attempt that began: the item, its new attempt count and its invitation.
#[derive(Debug, sqlx::FromRow)]
pub struct Begun {
    pub id: Uuid,
    pub attempts: i32,
    pub invitation_id: Uuid,
}

/// Phase 1, second statement: marks `queued` batches `running`, mints the invitations
/// of first attempts (those under `unless_invited` only when no live invitation
/// exists for the pair; expiring `ttl_hours` from now, moved again when the message is
/// accepted), and counts one more attempt on every item that may now be sent, marking
/// its send as under way. Returns the items that begin an attempt; an
/// `unless_invited` item missing from it was already invited.
pub async fn begin_attempts(
    tx: &mut PgConnection,
    attempts: &[BeginAttempt<'_>],
    queued_batches: &[Uuid],
    ttl_hours: u32,
) -> sqlx::Result<Vec<Begun>> {
    let column = |f: &dyn Fn(&BeginAttempt<'_>) -> Option<Uuid>| -> Vec<Option<Uuid>> {
        attempts.iter().map(f).collect()
    };
    sqlx::query_as(
        "WITH t AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::bool[], $5::text[],
                                 $6::text[], $7::uuid[], $8::int[])
                AS t(item_id, mint_id, token_hash, unless_invited, job_id, candidate_id,
                     batch_id, duration_minutes)),
         running AS (
            UPDATE batches SET status = 'running'
             WHERE id IN (SELECT id FROM batches WHERE id = ANY($9) AND status = 'queued'
                          ORDER BY id FOR UPDATE)),
         minted AS (
            INSERT INTO invitations (id, item_id, token_hash, job_id, candidate_id, batch_id,
                                     duration_minutes, expires_at)
            SELECT t.mint_id, t.item_id, t.token_hash, t.job_id, t.candidate_id, t.batch_id,
                   t.duration_minutes, now() + make_interval(hours => $10)
              FROM t
             WHERE t.mint_id IS NOT NULL
               AND NOT (t.unless_invited AND EXISTS (
                    SELECT 1 FROM invitations v
                     WHERE v.job_id = t.job_id AND v.candidate_id = t.candidate_id
                       AND (v.status = 'IN_PROGRESS'
                            OR (v.status = 'PENDING' AND v.expires_at > now()))))
            RETURNING id, item_id)
         UPDATE batch_items i
            SET invitation_id = coalesce(m.id, i.invitation_id),
                attempts = i.attempts + 1, next_attempt_at = NULL, sending_at = now(),
                updated_at = now()
           FROM t
           LEFT JOIN minted m ON m.item_id = t.item_id
          WHERE i.id = t.item_id AND (t.mint_id IS NULL OR m.id IS NOT NULL)
         RETURNING i.id, i.attempts, i.invitation_id",
    )
    .bind(column(&|a| Some(a.item.id)))
    .bind(column(&|a| a.mint.as_ref().map(|m| m.id)))
    .bind(
        attempts
            .iter()
            .map(|a| a.mint.as_ref().map(|m| m.token_hash.to_vec()))
            .collect::<Vec<_>>(),
    )
    .bind(
        attempts
            .iter()
            .map(|a| a.unless_invited)
            .collect::<Vec<_>>(),
    )
    .bind(
        attempts
            .iter()
            .map(|a| a.item.job_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        attempts
            .iter()
            .map(|a| a.item.candidate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(column(&|a| Some(a.item.batch_id)))
    .bind(
        attempts
            .iter()
            .map(|a| a.item.duration_minutes)
            .collect::<Vec<_>>(),
    )
    .bind(queued_batches)
    .bind(i32::try_from(ttl_hours).unwrap_or(i32::MAX))
    .fetch_all(&mut *tx)
    .await
}

/// What to write for one item's outcome (phase 3).
pub struct Record<'a> {
    pub item: Uuid,
    /// The task that made the attempt: the outcome applies only while the item is
    /// still pending under that task (not cancelled, not handed to another).
    pub task_id: &'a str,
    /// The item's new status: `pending` for a retry.
    pub status: ItemStatus,
    pub reason: Option<ItemReason>,
    pub last_error: Option<&'a str>,
    /// A retry: the item moves to this new task, due at this time.
    pub retry: Option<(&'a str, DateTime<Utc>)>,
    /// A warning for the batch, as JSON (`{candidate_id, code, message}`); added unless
    /// the batch has one with that candidate and code already.
    pub warning: Option<String>,
}

/// Phase 3 in one statement: moves each item still pending under its task (locked in
/// id order), the invitations (sent: the expiry starts now; ended otherwise: revoked),
/// each batch's tally and warnings (batch rows locked in id order, after every item),
/// and marks every task of the group `Done`, so a task is finished exactly when its
/// outcome is written. Returns the items the outcomes applied to; the others were
/// stale.
///
/// (The batch rows are locked by sorting the aggregate of the updated items, which
/// reads all of them before the first batch lock. Rows are found by primary key only
/// (`= ANY` of the ids; the item's status and task are checked on the locked row,
/// which is its latest version): with a status condition on the scan, stale
/// statistics on a fast-growing table made the planner AND in the partial index of
/// all pending items, 20,000 entries read per statement.)
pub async fn record(conn: &mut PgConnection, records: &[Record<'_>]) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "WITH t AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::timestamptz[], $8::text[])
                AS t(id, task_id, status, reason, last_error, new_task_id, run_at, warning)),
         locked AS MATERIALIZED (
            SELECT id, status, task_id FROM batch_items
             WHERE id = ANY($1)
             ORDER BY id
               FOR UPDATE),
         applied AS (
            UPDATE batch_items i
               SET status = t.status, reason = t.reason,
                   last_error = coalesce(t.last_error, i.last_error),
                   task_id = coalesce(t.new_task_id, i.task_id), next_attempt_at = t.run_at,
                   sending_at = NULL, updated_at = now(),
                   sent_at = CASE WHEN t.status = 'sent' THEN now() ELSE i.sent_at END
              FROM t
              JOIN locked l ON l.id = t.id
             WHERE i.id = t.id AND l.status = 'pending' AND l.task_id = t.task_id
            RETURNING i.id, i.batch_id, i.invitation_id, t.status, t.warning),
         sent_invitations AS (
            UPDATE invitations v
               SET sent_at = now(), expires_at = now() + (v.expires_at - v.created_at)
             WHERE v.id IN (SELECT invitation_id FROM applied WHERE status = 'sent')),
         revoked_invitations AS (
            UPDATE invitations v SET status = 'REVOKED', revoked_at = now()
             WHERE v.id IN (SELECT invitation_id FROM applied
                             WHERE status IN ('failed', 'skipped'))
               AND v.status = 'PENDING'),
         counts AS (
            SELECT batch_id,
                   count(*) FILTER (WHERE status = 'sent')::int AS sent,
                   count(*) FILTER (WHERE status = 'failed')::int AS failed,
                   count(*) FILTER (WHERE status = 'skipped')::int AS skipped,
                   coalesce(jsonb_agg(warning::jsonb) FILTER (WHERE warning IS NOT NULL),
                            '[]'::jsonb) AS warnings
              FROM applied
             GROUP BY batch_id),
         locked_batches AS MATERIALIZED (
            SELECT id FROM batches WHERE id IN (SELECT batch_id FROM counts)
             ORDER BY id
               FOR UPDATE),
         tally AS (
            UPDATE batches b
               SET pending = b.pending - (c.sent + c.failed + c.skipped),
                   sent = b.sent + c.sent, failed = b.failed + c.failed,
                   skipped = b.skipped + c.skipped,
                   status = CASE WHEN b.pending = c.sent + c.failed + c.skipped
                                 THEN 'completed' ELSE 'running' END,
                   completed_at = CASE WHEN b.pending = c.sent + c.failed + c.skipped
                                       THEN now() ELSE NULL END,
                   warnings = b.warnings || (
                       SELECT coalesce(jsonb_agg(w), '[]'::jsonb)
                         FROM jsonb_array_elements(c.warnings) AS w
                        WHERE NOT b.warnings @> jsonb_build_array(jsonb_build_object(
                                  'candidate_id', w -> 'candidate_id', 'code', w -> 'code')))
              FROM counts c
             WHERE b.id = c.batch_id AND b.id IN (SELECT id FROM locked_batches)),
         finished AS (
            UPDATE apalis.jobs
               SET status = 'Done', done_at = now(), lock_by = NULL,
                   attempts = attempts + 1, last_result = '{\"Ok\":null}'
             WHERE id = ANY($2) AND status IN ('Pending', 'Queued', 'Running'))
         SELECT id FROM applied",
    )
    .bind(records.iter().map(|r| r.item).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.task_id).collect::<Vec<_>>())
    .bind(
        records
            .iter()
            .map(|r| r.status.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|r| r.reason.map(ItemReason::as_str))
            .collect::<Vec<_>>(),
    )
    .bind(records.iter().map(|r| r.last_error).collect::<Vec<_>>())
    .bind(
        records
            .iter()
            .map(|r| r.retry.map(|(t, _)| t))
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|r| r.retry.map(|(_, at)| at))
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|r| r.warning.as_deref())
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await
}

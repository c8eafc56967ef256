//! The worker's statements, each written for a whole group of items (see
//! `queue::group`), so a group costs a few round trips however large it is. They run
//! on the group writers' own connections, planned once (`db::writer_connection`), so
//! each is written to leave the planner one sane plan whatever it believes about table
//! sizes: every table is reached through an index condition on keys the statement is
//! given or has computed first (`= ANY($n)`, `= ANY(ARRAY(SELECT …))`, or a LATERAL
//! lookup by the outer row's key), never by a scan that grows with the table.
//!
//! Row locks are `FOR NO KEY UPDATE`: none of these statements changes a key, and a
//! plain `FOR UPDATE` on a batch row would conflict with the `FOR KEY SHARE` that the
//! foreign-key checks of new invitations take on their batch (in no particular order),
//! which deadlocked a prepare group against the recorder.
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

/// The statement of [`lock_for_prepare`] (`$1`: item ids).
pub const LOCK_FOR_PREPARE: &str = "WITH locked AS MATERIALIZED (
            SELECT id, batch_id, task_id, status, attempts, candidate_id, email, name,
                   invitation_id
              FROM batch_items
             WHERE id = ANY($1)
             ORDER BY id
               FOR NO KEY UPDATE),
         b AS MATERIALIZED (
            SELECT id, job_id, status, on_duplicate, duration_minutes FROM batches
             WHERE id = ANY(ARRAY(SELECT batch_id FROM locked))),
         j AS MATERIALIZED (
            SELECT id, title, status FROM jobs WHERE id = ANY(ARRAY(SELECT job_id FROM b))),
         items AS MATERIALIZED (
            SELECT i.*, b.job_id, j.title AS job_title, j.status AS job_status,
                   b.status AS batch_status, b.on_duplicate, b.duration_minutes
              FROM locked i
              JOIN b ON b.id = i.batch_id
              JOIN j ON j.id = b.job_id),
         pair_locks AS MATERIALIZED (
            SELECT pg_advisory_xact_lock(k)
              FROM (SELECT DISTINCT hashtextextended(job_id || '/' || candidate_id, 7141) AS k
                      FROM items
                     WHERE status = 'pending' AND invitation_id IS NULL
                       AND on_duplicate = 'skip' AND job_status <> 'closed'
                     ORDER BY k) AS keys)
         SELECT * FROM items WHERE (SELECT count(*) FROM pair_locks) >= 0";

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
    sqlx::query_as(LOCK_FOR_PREPARE)
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

/// The statement of [`begin_attempts`].
pub const BEGIN_ATTEMPTS: &str = "WITH t AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::bool[], $5::text[],
                                 $6::text[], $7::uuid[], $8::int[])
                AS t(item_id, mint_id, token_hash, unless_invited, job_id, candidate_id,
                     batch_id, duration_minutes)),
         running AS (
            UPDATE batches SET status = 'running'
             WHERE id = ANY(ARRAY(SELECT id FROM batches WHERE id = ANY($9) AND status = 'queued'
                                  ORDER BY id FOR NO KEY UPDATE))),
         minted AS (
            INSERT INTO invitations (id, item_id, token_hash, job_id, candidate_id, batch_id,
                                     duration_minutes, expires_at)
            SELECT t.mint_id, t.item_id, t.token_hash, t.job_id, t.candidate_id, t.batch_id,
                   t.duration_minutes, now() + make_interval(hours => $10)
              FROM t
              LEFT JOIN LATERAL (
                    SELECT 1 AS found FROM invitations v
                     WHERE v.job_id = t.job_id AND v.candidate_id = t.candidate_id
                       AND (v.status = 'IN_PROGRESS'
                            OR (v.status = 'PENDING' AND v.expires_at > now()))
                     LIMIT 1) live ON t.unless_invited
             WHERE t.mint_id IS NOT NULL AND live.found IS NULL
            RETURNING id, item_id)
         UPDATE batch_items i
            SET invitation_id = coalesce(m.id, i.invitation_id),
                attempts = i.attempts + 1, next_attempt_at = NULL, sending_at = now(),
                updated_at = now()
           FROM t
           LEFT JOIN minted m ON m.item_id = t.item_id
          WHERE i.id = ANY($1) AND i.id = t.item_id AND (t.mint_id IS NULL OR m.id IS NOT NULL)
         RETURNING i.id, i.attempts, i.invitation_id";

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
    sqlx::query_as(BEGIN_ATTEMPTS)
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

/// The statement of [`record`].
pub const RECORD: &str = "WITH t AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::timestamptz[], $8::text[])
                AS t(id, task_id, status, reason, last_error, new_task_id, run_at, warning)),
         locked AS MATERIALIZED (
            SELECT id, status, task_id FROM batch_items
             WHERE id = ANY($1)
             ORDER BY id
               FOR NO KEY UPDATE),
         applied AS (
            UPDATE batch_items i
               SET status = t.status, reason = t.reason,
                   last_error = coalesce(t.last_error, i.last_error),
                   task_id = coalesce(t.new_task_id, i.task_id), next_attempt_at = t.run_at,
                   sending_at = NULL, updated_at = now(),
                   sent_at = CASE WHEN t.status = 'sent' THEN now() ELSE i.sent_at END
              FROM t
              JOIN locked l ON l.id = t.id
             WHERE i.id = ANY($1) AND i.id = t.id
               AND l.status = 'pending' AND l.task_id = t.task_id
            RETURNING i.id, t.task_id, i.batch_id, i.invitation_id, t.status, t.warning),
         sent_invitations AS (
            UPDATE invitations v
               SET sent_at = now(), expires_at = now() + (v.expires_at - v.created_at)
             WHERE v.id = ANY(ARRAY(SELECT invitation_id FROM applied WHERE status = 'sent'))),
         revoked_invitations AS (
            UPDATE invitations v SET status = 'REVOKED', revoked_at = now()
             WHERE v.id = ANY(ARRAY(SELECT invitation_id FROM applied
                                     WHERE status IN ('failed', 'skipped')))
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
            SELECT id FROM batches WHERE id = ANY(ARRAY(SELECT batch_id FROM counts))
             ORDER BY id
               FOR NO KEY UPDATE),
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
             WHERE b.id = ANY(ARRAY(SELECT id FROM locked_batches)) AND b.id = c.batch_id),
         finished AS (
            UPDATE apalis.jobs
               SET status = 'Done', done_at = now(), lock_by = NULL,
                   attempts = attempts + 1, last_result = '{\"Ok\":null}'
             WHERE id = ANY($9) AND status IN ('Pending', 'Queued', 'Running'))
         SELECT id, task_id FROM applied";

/// Phase 3 in one statement: moves each item still pending under its task (locked in
/// id order), the invitations (sent: the expiry starts now; ended otherwise: revoked),
/// each batch's tally and warnings (batch rows locked in id order, after every item),
/// and marks `tasks` (every task of the group) `Done`, so a task is finished exactly
/// when its outcome is written. Returns the (item, task) pairs whose outcome applied;
/// the others were stale (a record applies only under the task the item names).
///
/// (The batch rows are locked by sorting the aggregate of the updated items, which
/// reads all of them before the first batch lock. Every table is reached through an
/// index condition (`= ANY` of keys given or computed first), whatever the planner
/// thinks of the tables' sizes; the item's status and task are checked on the locked
/// row, which is its latest version.)
pub async fn record(
    conn: &mut PgConnection,
    records: &[Record<'_>],
    tasks: &[&str],
) -> sqlx::Result<Vec<(Uuid, String)>> {
    sqlx::query_as(RECORD)
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
        .bind(tasks)
        .fetch_all(&mut *conn)
        .await
}

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

/// An item with what delivering it needs to know, read under the item's row lock (the
/// database type `prepare_item`).
#[derive(Debug, Clone, sqlx::Type)]
#[sqlx(type_name = "prepare_item")]
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
    /// Why the address cannot be sent to, decided when it was written.
    pub email_error: Option<String>,
    pub job_id: String,
    pub job_title: String,
    pub job_status: String,
    pub batch_status: String,
    pub on_duplicate: String,
    pub duration_minutes: i32,
}

/// One request of phase 1: the item, the task acting on it, and the invitation to mint
/// if the item has none yet (its id, from which the link is derived, and the SHA-256
/// of its token).
pub struct PrepareRequest<'a> {
    pub item: Uuid,
    pub task_id: &'a str,
    pub mint_id: Uuid,
    pub token_hash: [u8; 32],
}

/// What phase 1 decided for one request (see `prepare_items` in the migrations).
#[derive(Debug, sqlx::FromRow)]
pub struct PrepareRow {
    /// 1-based position of the request.
    pub ord: i32,
    /// `nothing`, `duplicate`, `job_closed`, `invalid_email`, `already_invited` or `send`.
    pub decision: String,
    /// For `invalid_email`: what is wrong with the address.
    pub detail: Option<String>,
    /// The item as locked (none for `nothing`).
    pub item: Option<LockedItem>,
    /// For `send`: the invitation every attempt carries, and the attempt's number.
    pub invitation_id: Option<Uuid>,
    pub attempts: Option<i32>,
}

/// Phase 1 for a group in one call, one round trip and one commit: the database
/// function `prepare_items` (in the migrations) locks the items, takes the pair locks,
/// decides, mints and counts. Run it outside a transaction: the commit is its own.
/// One row per request, in request order.
pub async fn prepare_items(
    conn: &mut PgConnection,
    requests: &[PrepareRequest<'_>],
    ttl_hours: u32,
) -> sqlx::Result<Vec<PrepareRow>> {
    sqlx::query_as("SELECT * FROM prepare_items($1, $2, $3, $4, $5)")
        .bind(requests.iter().map(|r| r.item).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.task_id).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.mint_id).collect::<Vec<_>>())
        .bind(
            requests
                .iter()
                .map(|r| r.token_hash.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(i32::try_from(ttl_hours).unwrap_or(i32::MAX))
        .fetch_all(&mut *conn)
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

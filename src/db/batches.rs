//! Batches and their items: reads, cancel and retry. (A batch is created with its queue
//! tasks, in `db::tasks::create_batch`.)

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor, types::Json};
use uuid::Uuid;

use crate::domain::{
    access::{Actor, AuditAction},
    ids::new_task_id,
    states::{BatchStatus, ItemReason, ItemStatus, JobStatus, OnDuplicate},
    warning::Warning,
};

/// A batch row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct BatchRow {
    pub(crate) id: Uuid,
    pub(crate) job_id: String,
    pub(crate) duration_minutes: i32,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) status: BatchStatus,
    pub(crate) total: i32,
    pub(crate) pending: i32,
    pub(crate) sent: i32,
    pub(crate) failed: i32,
    pub(crate) skipped: i32,
    pub(crate) warnings: Json<Vec<Warning>>,
    pub(crate) request_hash: Option<Vec<u8>>,
    /// The name of the API key that created it (none for batches from before names).
    pub(crate) created_by: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) cancelled_at: Option<DateTime<Utc>>,
}

/// One candidate of a new batch, as the request gave it.
#[derive(Debug, Clone)]
pub(crate) struct NewItem {
    pub(crate) id: Uuid,
    pub(crate) task_id: String,
    pub(crate) candidate_id: String,
    pub(crate) email: String,
    pub(crate) name: Option<String>,
    /// Why `email` cannot be sent to (the item will fail with `invalid_email`).
    pub(crate) email_error: Option<String>,
}

/// A warning for a new batch: always, or (`if_invited`) only if its candidate holds a
/// live invitation for the job when the batch is written.
#[derive(Debug, Clone)]
pub(crate) struct NewWarning {
    pub(crate) warning: Warning,
    pub(crate) if_invited: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct NewBatch {
    pub(crate) id: Uuid,
    pub(crate) job_id: String,
    pub(crate) duration_minutes: i32,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) items: Vec<NewItem>,
    pub(crate) warnings: Vec<NewWarning>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) request_hash: Option<Vec<u8>>,
    /// The `x-request-id` of the request that creates it, for the worker's logs.
    pub(crate) request_id: Option<String>,
    /// The name of the API key that creates it; its `Idempotency-Key` is that key's.
    pub(crate) created_by: String,
    /// Who the audit log says created it.
    pub(crate) actor: Actor,
}

pub(crate) async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as("SELECT * FROM batches WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The job's status and the candidates among `candidate_ids` who hold a live
/// invitation (PENDING and not expired, or IN_PROGRESS) for it; `None` when there is
/// no such job. A read without locks: `db::tasks::create_batch` checks the job again as
/// it writes.
pub(crate) async fn job_status_and_invited(
    conn: &mut PgConnection,
    job_id: &str,
    candidate_ids: &[&str],
) -> sqlx::Result<Option<(JobStatus, Vec<String>)>> {
    sqlx::query_as(
        "SELECT j.status,
                ARRAY(SELECT DISTINCT v.candidate_id::text FROM invitations v
                       WHERE v.job_id = $1 AND v.candidate_id = ANY($2::text[])
                         AND invitation_is_live(v.status, v.expires_at))
           FROM jobs j
          WHERE j.id = $1",
    )
    .bind(job_id)
    .bind(candidate_ids)
    .fetch_optional(&mut *conn)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct ItemView {
    pub(crate) candidate_id: String,
    pub(crate) email: String,
    pub(crate) name: Option<String>,
    pub(crate) status: ItemStatus,
    /// For `failed`: `invalid_email`, `rejected`, `retries_exhausted`; for `skipped`:
    /// `already_invited`, `job_closed`, `cancelled`; null otherwise.
    pub(crate) reason: Option<ItemReason>,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) invitation_id: Option<Uuid>,
    pub(crate) updated_at: DateTime<Utc>,
}

pub(crate) async fn items(
    db: impl PgExecutor<'_>,
    batch_id: Uuid,
    status: Option<ItemStatus>,
) -> sqlx::Result<Vec<ItemView>> {
    sqlx::query_as(
        "SELECT candidate_id, email, name, status, reason, attempts, last_error,
                invitation_id, updated_at
         FROM batch_items
         WHERE batch_id = $1 AND ($2::text IS NULL OR status = $2)
         ORDER BY position",
    )
    .bind(batch_id)
    .bind(status)
    .fetch_all(db)
    .await
}

/// Newest first, optionally filtered by job and status.
pub(crate) async fn list(
    db: impl PgExecutor<'_>,
    job_id: Option<&str>,
    status: Option<BatchStatus>,
    limit: i64,
) -> sqlx::Result<Vec<BatchRow>> {
    sqlx::query_as(
        "SELECT * FROM batches
         WHERE ($1::text IS NULL OR job_id = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id DESC
         LIMIT $3",
    )
    .bind(job_id)
    .bind(status)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The batch that the API key named `created_by` created with `key`: an
/// `Idempotency-Key` belongs to the API key that sent it.
pub(crate) async fn find_by_idempotency_key(
    db: impl PgExecutor<'_>,
    created_by: &str,
    key: &str,
) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as("SELECT * FROM batches WHERE created_by = $1 AND idempotency_key = $2")
        .bind(created_by)
        .bind(key)
        .fetch_optional(db)
        .await
}

/// True when `e` is the unique violation of (`created_by`, `idempotency_key`): another
/// request of the same API key with the same key committed first.
pub(crate) fn is_idempotency_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.constraint() == Some("batches_created_by_idempotency_key"))
}

/// What a cancel did.
pub(crate) enum Cancel {
    Cancelled(BatchRow),
    NotFound,
    /// The batch is `completed` or `cancelled` already.
    AlreadyFinished(BatchStatus),
    /// A send is on its way for one of the pending items: try again shortly.
    SendsInFlight,
}

/// Cancels a live batch: every pending item becomes `skipped`/`cancelled`, their links
/// (if minted) are revoked, the tally moves, the batch becomes `cancelled`. Sends that
/// are on their way (`sending_at` within `in_flight`) are waited for by the caller, so
/// each of those items ends as what really happened to it.
pub(crate) async fn cancel(
    pool: &sqlx::PgPool,
    id: Uuid,
    in_flight: std::time::Duration,
    actor: &Actor,
) -> sqlx::Result<Cancel> {
    let mut tx = pool.begin().await?;
    let status: Option<BatchStatus> =
        sqlx::query_scalar("SELECT status FROM batches WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match status {
        None => return Ok(Cancel::NotFound),
        Some(s @ (BatchStatus::Completed | BatchStatus::Cancelled)) => {
            return Ok(Cancel::AlreadyFinished(s));
        }
        Some(BatchStatus::Queued | BatchStatus::Running) => {}
    }
    // Items first, then the batch: the worker's lock order.
    let sending: Vec<bool> = sqlx::query_scalar(
        "SELECT coalesce(sending_at > now() - make_interval(secs => $2), false)
         FROM batch_items WHERE batch_id = $1 AND status = 'pending'
         ORDER BY id FOR UPDATE",
    )
    .bind(id)
    .bind(in_flight.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if sending.iter().any(|s| *s) {
        return Ok(Cancel::SendsInFlight);
    }
    sqlx::query(include_str!("sql/cancel_items.sql"))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let row: Option<BatchRow> = sqlx::query_as(
        "UPDATE batches
            SET skipped = skipped + pending, pending = 0, status = 'cancelled', cancelled_at = now()
          WHERE id = $1 AND status IN ('queued', 'running')
         RETURNING *",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some(row) => {
            let detail = serde_json::json!({ "skipped": sending.len() });
            let target = id.to_string();
            super::audit::record(&mut tx, actor, AuditAction::BatchCancelled, &target, detail)
                .await?;
            tx.commit().await?;
            Ok(Cancel::Cancelled(row))
        }
        None => match get(pool, id).await? {
            Some(batch) => Ok(Cancel::AlreadyFinished(batch.status)),
            None => Ok(Cancel::NotFound),
        },
    }
}

/// A failed item to put back through the queue, with its corrected address if any.
pub(crate) struct RetryItem {
    pub(crate) candidate_id: String,
    pub(crate) email: Option<String>,
}

/// What a retry did.
pub(crate) enum Retry {
    /// The batch after the retry, and the (item id, task id) pairs to push.
    Retried(BatchRow, Vec<(Uuid, String)>),
    NotFound,
    Cancelled,
    /// These candidates are not failed items of the batch.
    NotRetryable(Vec<String>),
}

/// Puts failed items back to `pending` (new task ids, attempts reset, a corrected
/// address replacing the item's) and the batch back to `running`.
/// `only` limits it to those candidates; `None` retries every failed item. The audit
/// log records `actor`'s retry. The caller pushes the tasks in the same transaction and
/// commits.
pub(crate) async fn retry(
    tx: &mut PgConnection,
    id: Uuid,
    only: Option<&[RetryItem]>,
    actor: &Actor,
) -> sqlx::Result<Retry> {
    let status: Option<BatchStatus> =
        sqlx::query_scalar("SELECT status FROM batches WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match status {
        None => return Ok(Retry::NotFound),
        Some(BatchStatus::Cancelled) => return Ok(Retry::Cancelled),
        Some(_) => {}
    }
    let rows: Vec<(Uuid, String, ItemStatus)> = sqlx::query_as(
        "SELECT id, candidate_id, status FROM batch_items
         WHERE batch_id = $1 ORDER BY id FOR UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    // Read again under the batch's lock (items first, then the batch: the lock order):
    // a cancel may have committed since the first read.
    let status: Option<BatchStatus> =
        sqlx::query_scalar("SELECT status FROM batches WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if status == Some(BatchStatus::Cancelled) {
        return Ok(Retry::Cancelled);
    }
    let failed = |cid: &str| {
        rows.iter()
            .find(|(_, c, s)| c == cid && *s == ItemStatus::Failed)
            .map(|(i, ..)| *i)
    };
    let chosen: Vec<(Uuid, Option<String>)> = match only {
        Some(list) => {
            let not: Vec<String> = list
                .iter()
                .filter(|r| failed(&r.candidate_id).is_none())
                .map(|r| r.candidate_id.clone())
                .collect();
            if !not.is_empty() {
                return Ok(Retry::NotRetryable(not));
            }
            list.iter()
                .filter_map(|r| failed(&r.candidate_id).map(|i| (i, r.email.clone())))
                .collect()
        }
        None => rows
            .iter()
            .filter(|(_, _, s)| *s == ItemStatus::Failed)
            .map(|(i, ..)| (*i, None))
            .collect(),
    };
    if chosen.is_empty() {
        return Ok(Retry::NotRetryable(Vec::new()));
    }
    let tasks: Vec<(Uuid, String)> = chosen.iter().map(|(i, ..)| (*i, new_task_id())).collect();
    sqlx::query(include_str!("sql/retry_items.sql"))
        .bind(tasks.iter().map(|(i, _)| *i).collect::<Vec<_>>())
        .bind(tasks.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>())
        .bind(chosen.iter().map(|(_, e)| e.as_deref()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    let n = i32::try_from(chosen.len()).unwrap_or(i32::MAX);
    let row: BatchRow = sqlx::query_as(
        "UPDATE batches
            SET failed = failed - $2, pending = pending + $2, status = 'running', completed_at = NULL,
                anonymized_at = NULL
          WHERE id = $1
         RETURNING *",
    )
    .bind(id)
    .bind(n)
    .fetch_one(&mut *tx)
    .await?;
    let corrected = chosen.iter().filter(|(_, e)| e.is_some()).count();
    let detail = serde_json::json!({ "items": n, "corrected_emails": corrected });
    super::audit::record(
        tx,
        actor,
        AuditAction::BatchRetried,
        &id.to_string(),
        detail,
    )
    .await?;
    Ok(Retry::Retried(row, tasks))
}

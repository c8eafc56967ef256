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
    webhook::EventType,
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

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub(crate) struct Counts {
    pub(crate) pending: i32,
    pub(crate) sent: i32,
    pub(crate) failed: i32,
    pub(crate) skipped: i32,
}

/// The batch resource.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct BatchView {
    pub(crate) id: Uuid,
    pub(crate) job_id: String,
    pub(crate) duration_minutes: i32,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) status: BatchStatus,
    pub(crate) total: i32,
    pub(crate) counts: Counts,
    /// `"{sent} sent, {failed} failed"`, plus `", {skipped} skipped"` when any were.
    pub(crate) summary: String,
    pub(crate) warnings: Vec<Warning>,
    /// The name of the API key that created the batch (`key:1`, `key:2`, … for keys
    /// given as a plain list); null for batches created before keys had names.
    pub(crate) created_by: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) cancelled_at: Option<DateTime<Utc>>,
}

/// The tally as people read it.
pub(crate) fn summary(sent: i32, failed: i32, skipped: i32) -> String {
    let mut s = format!("{sent} sent, {failed} failed");
    if skipped > 0 {
        s.push_str(&format!(", {skipped} skipped"));
    }
    s
}

impl From<BatchRow> for BatchView {
    fn from(b: BatchRow) -> Self {
        BatchView {
            summary: summary(b.sent, b.failed, b.skipped),
            counts: Counts {
                pending: b.pending,
                sent: b.sent,
                failed: b.failed,
                skipped: b.skipped,
            },
            id: b.id,
            job_id: b.job_id,
            duration_minutes: b.duration_minutes,
            on_duplicate: b.on_duplicate,
            status: b.status,
            total: b.total,
            warnings: b.warnings.0,
            created_by: b.created_by,
            created_at: b.created_at,
            completed_at: b.completed_at,
            cancelled_at: b.cancelled_at,
        }
    }
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
/// are on their way (`sending_at` within `in_flight`) are waited for, up to
/// `in_flight`, so each of those items ends as what really happened to it
/// ([`Cancel::SendsInFlight`] if they are still on their way then).
pub(crate) async fn cancel(
    pool: &sqlx::PgPool,
    id: Uuid,
    in_flight: std::time::Duration,
    actor: &Actor,
) -> sqlx::Result<Cancel> {
    let deadline = tokio::time::Instant::now() + in_flight;
    loop {
        match cancel_now(pool, id, in_flight, actor).await? {
            Cancel::SendsInFlight if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            done => return Ok(done),
        }
    }
}

/// One try of [`cancel`]: [`Cancel::SendsInFlight`] when a send is on its way.
async fn cancel_now(
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
            super::webhooks::emit_batch(&mut tx, EventType::BatchCancelled, id).await?;
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

/// Which failed items a retry puts back.
pub(crate) enum RetrySelection {
    /// Every failed item of the batch.
    All,
    /// These candidates, each of which must be a failed item of the batch.
    Candidates(Vec<RetryItem>),
    /// The failed items that failed for this reason.
    Reason(ItemReason),
}

impl RetrySelection {
    /// The failed items of `reason`, which must be a reason for failing.
    pub(crate) fn reason(reason: ItemReason) -> Result<Self, String> {
        if reason.status() == ItemStatus::Failed {
            return Ok(Self::Reason(reason));
        }
        Err(format!(
            "reason: {reason} is a reason for skipping, not failing; one of invalid_email, \
             rejected, retries_exhausted, suppressed"
        ))
    }
}

/// What a retry did.
pub(crate) enum Retry {
    /// The batch after the retry, and the (item id, task id) pairs to push.
    Retried(BatchRow, Vec<(Uuid, String)>),
    /// A dry run: the candidates a retry would put back, in the batch's order.
    DryRun(Vec<String>),
    NotFound,
    Cancelled,
    /// These candidates are not failed items of the batch (none listed: the batch has no
    /// failed item the selection names).
    NotRetryable(Vec<String>),
}

/// Puts failed items back to `pending` (new task ids, attempts reset, a corrected
/// address replacing the item's) and the batch back to `running`: the items
/// `selection` names. The audit log records `actor`'s retry. The caller pushes the
/// tasks in the same transaction and commits (`db::tasks::retry_batch`).
///
/// With `dry_run`, it only answers which candidates a retry would put back
/// ([`Retry::DryRun`], empty when there are none) and writes nothing.
pub(crate) async fn retry(
    tx: &mut PgConnection,
    id: Uuid,
    selection: &RetrySelection,
    dry_run: bool,
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
    // A dry run takes no lock: what it answers is what a retry would do now.
    let items = if dry_run {
        "SELECT id, candidate_id, status, reason FROM batch_items
          WHERE batch_id = $1 ORDER BY id"
    } else {
        "SELECT id, candidate_id, status, reason FROM batch_items
          WHERE batch_id = $1 ORDER BY id FOR UPDATE"
    };
    let rows: Vec<(Uuid, String, ItemStatus, Option<ItemReason>)> =
        sqlx::query_as(items).bind(id).fetch_all(&mut *tx).await?;
    if !dry_run {
        // Read again under the batch's lock (items first, then the batch: the lock
        // order): a cancel may have committed since the first read.
        let status: Option<BatchStatus> =
            sqlx::query_scalar("SELECT status FROM batches WHERE id = $1 FOR NO KEY UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if status == Some(BatchStatus::Cancelled) {
            return Ok(Retry::Cancelled);
        }
    }
    let failed = |cid: &str| {
        rows.iter()
            .find(|(_, c, s, _)| c == cid && *s == ItemStatus::Failed)
            .map(|(i, ..)| *i)
    };
    // (item id, candidate id, corrected address)
    let chosen: Vec<(Uuid, &str, Option<String>)> = match selection {
        RetrySelection::Candidates(list) => {
            let not: Vec<String> = list
                .iter()
                .filter(|r| failed(&r.candidate_id).is_none())
                .map(|r| r.candidate_id.clone())
                .collect();
            if !not.is_empty() {
                return Ok(Retry::NotRetryable(not));
            }
            list.iter()
                .filter_map(|r| {
                    failed(&r.candidate_id).map(|i| (i, r.candidate_id.as_str(), r.email.clone()))
                })
                .collect()
        }
        RetrySelection::All | RetrySelection::Reason(_) => rows
            .iter()
            .filter(|(_, _, s, reason)| {
                *s == ItemStatus::Failed
                    && match selection {
                        RetrySelection::Reason(wanted) => *reason == Some(*wanted),
                        _ => true,
                    }
            })
            .map(|(i, c, ..)| (*i, c.as_str(), None))
            .collect(),
    };
    // An item chosen twice (a repeated candidate id) is retried, and counted, once.
    let mut chosen = chosen;
    let mut seen = std::collections::HashSet::new();
    chosen.retain(|(item, ..)| seen.insert(*item));
    if dry_run {
        return Ok(Retry::DryRun(
            chosen.iter().map(|(_, c, _)| (*c).to_owned()).collect(),
        ));
    }
    if chosen.is_empty() {
        return Ok(Retry::NotRetryable(Vec::new()));
    }
    let tasks: Vec<(Uuid, String)> = chosen.iter().map(|(i, ..)| (*i, new_task_id())).collect();
    sqlx::query(include_str!("sql/retry_items.sql"))
        .bind(tasks.iter().map(|(i, _)| *i).collect::<Vec<_>>())
        .bind(tasks.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>())
        .bind(
            chosen
                .iter()
                .map(|(.., e)| e.as_deref())
                .collect::<Vec<_>>(),
        )
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
    let corrected = chosen.iter().filter(|(.., e)| e.is_some()).count();
    let mut detail = serde_json::json!({ "items": n, "corrected_emails": corrected });
    if let RetrySelection::Reason(reason) = selection {
        detail["reason"] = reason.as_str().into();
    }
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

/// The failed items of one batch that failed alike: the same reason and the same
/// server reply code.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct FailureGroup {
    #[schema(value_type = String, example = "rejected")]
    pub(crate) reason: ItemReason,
    /// The SMTP reply code and enhanced status code of the items' last reply
    /// (`550 5.1.1`), null when there was no reply.
    pub(crate) reply_code: Option<String>,
    pub(crate) count: i64,
    /// At most 20, in the batch's order.
    pub(crate) candidate_ids: Vec<String>,
}

/// The batch's failed items grouped by reason and reply code, largest group first.
/// Reads the batch's items through the (batch_id, candidate_id) index.
pub(crate) async fn failure_groups(
    db: impl PgExecutor<'_>,
    batch_id: Uuid,
) -> sqlx::Result<Vec<FailureGroup>> {
    sqlx::query_as(include_str!("sql/failure_groups.sql"))
        .bind(batch_id)
        .fetch_all(db)
        .await
}

/// How many batches are in each status (every status, zeros included).
pub(crate) async fn count_by_status(
    db: impl PgExecutor<'_>,
) -> sqlx::Result<Vec<(BatchStatus, i64)>> {
    let counted: Vec<(BatchStatus, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM batches GROUP BY status")
            .fetch_all(db)
            .await?;
    Ok(BatchStatus::ALL
        .iter()
        .map(|s| {
            let n = counted.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n);
            (*s, n)
        })
        .collect())
}

/// Items sent in the last minute, counted in the batches that were live in it.
pub(crate) async fn sent_last_minute(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar(include_str!("sql/sent_last_minute.sql"))
        .fetch_one(db)
        .await
}

//! Batches and their items: creation (one statement with the queue tasks), reads.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgConnection, PgExecutor, Row, types::Json};
use uuid::Uuid;

use crate::queue;

/// Something a person should read about one candidate of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Warning {
    pub candidate_id: String,
    /// `already_invited` or `invalid_email`.
    pub code: String,
    pub message: String,
}

/// A batch row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    pub id: Uuid,
    pub job_id: String,
    pub duration_minutes: i32,
    pub on_duplicate: String,
    pub status: String,
    pub total: i32,
    pub pending: i32,
    pub sent: i32,
    pub failed: i32,
    pub skipped: i32,
    pub warnings: Json<Vec<Warning>>,
    pub request_hash: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

const BATCH_COLUMNS: &str = "id, job_id, duration_minutes, on_duplicate, status, total, pending, \
     sent, failed, skipped, warnings, request_hash, created_at, completed_at, cancelled_at";

/// One candidate of a new batch, as the request gave it.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub id: Uuid,
    pub task_id: String,
    pub candidate_id: String,
    pub email: String,
    pub name: Option<String>,
    /// Why `email` cannot be sent to (the item will fail with `invalid_email`).
    pub email_error: Option<String>,
}

/// A warning for a new batch: always, or (`if_invited`) only if its candidate holds a
/// live invitation for the job when the batch is written.
#[derive(Debug, Clone)]
pub struct NewWarning {
    pub warning: Warning,
    pub if_invited: bool,
}

/// What [`insert`] did.
#[derive(Debug)]
pub enum Inserted {
    Batch(BatchRow),
    JobNotFound,
    /// Nothing written.
    JobClosed,
}

/// An invitation `v` that is live: it blocks another for its (job, candidate).
/// (`prepare_items`, a database function, has the same condition.)
const LIVE_INVITATION: &str =
    "(v.status = 'IN_PROGRESS' OR (v.status = 'PENDING' AND v.expires_at > now()))";

#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: Uuid,
    pub job_id: String,
    pub duration_minutes: i32,
    pub on_duplicate: String,
    pub items: Vec<NewItem>,
    pub warnings: Vec<NewWarning>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<Vec<u8>>,
}

/// Writes the batch, its items and one queue task per item if the job is open: one
/// statement, so all of it or nothing, and (run outside a transaction) one round trip
/// with its commit. The job row is locked `FOR SHARE` meanwhile, so a concurrent close
/// waits for the batch or the batch sees the close. The batch keeps the warnings that
/// apply: each unconditional one, and each `if_invited` one whose candidate holds a
/// live invitation for the job.
///
/// The tasks are written as apalis-postgres' own push writes them
/// (`queries/task/sink.sql`; `queue::push` uses it for retries); a test compares the two.
pub async fn insert(conn: &mut PgConnection, batch: &NewBatch) -> sqlx::Result<Inserted> {
    let total = i32::try_from(batch.items.len()).unwrap_or(i32::MAX);
    let (items, warnings) = (&batch.items, &batch.warnings);
    let payloads = items
        .iter()
        .map(|i| queue::payload(i.id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let max_attempts = i32::try_from(queue::TASK_MAX_ATTEMPTS).unwrap_or(i32::MAX);
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH job AS (
            SELECT id, status FROM jobs WHERE id = $2 FOR SHARE),
         warned AS (
            SELECT coalesce(jsonb_agg(jsonb_build_object('candidate_id', w.candidate_id,
                                                         'code', w.code,
                                                         'message', w.message)
                                      ORDER BY w.n), '[]') AS warnings
              FROM unnest($6::text[], $18::text[], $19::text[], $20::bool[])
                   WITH ORDINALITY AS w(candidate_id, code, message, if_invited, n)
             WHERE NOT w.if_invited
                OR EXISTS (SELECT 1 FROM invitations v
                            WHERE v.job_id = $2 AND v.candidate_id = w.candidate_id
                              AND {LIVE_INVITATION})),
         batch AS (
            INSERT INTO batches (id, job_id, duration_minutes, on_duplicate, total, pending,
                                 warnings, idempotency_key, request_hash)
            SELECT $1, job.id, $3, $4, $5, $5, warned.warnings, $7, $8
              FROM job, warned
             WHERE job.status <> 'closed'
            RETURNING {BATCH_COLUMNS}),
         items AS (
            INSERT INTO batch_items (id, batch_id, position, candidate_id, email, name, task_id,
                                     email_error)
            SELECT t.id, batch.id, t.position, t.candidate_id, t.email, t.name, t.task_id,
                   t.email_error
              FROM batch,
                   unnest($9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[],
                          $14::text[])
                   WITH ORDINALITY AS t(id, candidate_id, email, name, task_id, email_error,
                                        position)),
         tasks AS (
            INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                     priority, metadata)
            SELECT t.task_id, $15, t.payload, 'Pending', 0, $16, now(), 0, ''::hstore
              FROM batch, unnest($13::text[], $17::bytea[]) AS t(task_id, payload))
         SELECT job.status AS job_status, batch.* FROM job LEFT JOIN batch ON true"
    )))
    .bind(batch.id)
    .bind(&batch.job_id)
    .bind(batch.duration_minutes)
    .bind(&batch.on_duplicate)
    .bind(total)
    .bind(
        warnings
            .iter()
            .map(|w| w.warning.candidate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(&batch.idempotency_key)
    .bind(&batch.request_hash)
    .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| i.candidate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(items.iter().map(|i| i.email.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.name.as_deref()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.task_id.as_str()).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| i.email_error.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(queue::QUEUE)
    .bind(max_attempts)
    .bind(payloads)
    .bind(
        warnings
            .iter()
            .map(|w| w.warning.code.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        warnings
            .iter()
            .map(|w| w.warning.message.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(warnings.iter().map(|w| w.if_invited).collect::<Vec<_>>())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(Inserted::JobNotFound);
    };
    if row.try_get::<Option<Uuid>, _>("id")?.is_none() {
        return Ok(Inserted::JobClosed);
    }
    Ok(Inserted::Batch(BatchRow::from_row(&row)?))
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The job's status and the candidates among `candidate_ids` who hold a live
/// invitation (PENDING and not expired, or IN_PROGRESS) for it; `None` when there is
/// no such job. A read: [`insert`] checks the job again as it writes.
pub async fn job_and_invited(
    conn: &mut PgConnection,
    job_id: &str,
    candidate_ids: &[&str],
) -> sqlx::Result<Option<(String, Vec<String>)>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT j.status,
                ARRAY(SELECT DISTINCT v.candidate_id::text FROM invitations v
                       WHERE v.job_id = $1 AND v.candidate_id = ANY($2::text[])
                         AND {LIVE_INVITATION})
           FROM jobs j
          WHERE j.id = $1"
    )))
    .bind(job_id)
    .bind(candidate_ids)
    .fetch_optional(&mut *conn)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ItemView {
    pub candidate_id: String,
    pub email: String,
    pub name: Option<String>,
    /// `pending`, `sent`, `failed` or `skipped`.
    pub status: String,
    /// For `failed`: `invalid_email`, `rejected`, `retries_exhausted`; for `skipped`:
    /// `already_invited`, `job_closed`, `cancelled`; null otherwise.
    pub reason: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub invitation_id: Option<Uuid>,
    pub updated_at: DateTime<Utc>,
}

pub async fn items(
    db: impl PgExecutor<'_>,
    batch_id: Uuid,
    status: Option<&str>,
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
pub async fn list(
    db: impl PgExecutor<'_>,
    job_id: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<BatchRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches
         WHERE ($1::text IS NULL OR job_id = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id DESC
         LIMIT $3"
    )))
    .bind(job_id)
    .bind(status)
    .bind(limit)
    .fetch_all(db)
    .await
}

pub async fn find_by_idempotency_key(
    db: impl PgExecutor<'_>,
    key: &str,
) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE idempotency_key = $1"
    )))
    .bind(key)
    .fetch_optional(db)
    .await
}

/// True when `e` is the unique violation of `batches.idempotency_key`: another request
/// with the same key committed first.
pub fn is_idempotency_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.constraint() == Some("batches_idempotency_key_key"))
}

/// What a cancel did.
pub enum Cancel {
    Cancelled(BatchRow),
    NotFound,
    /// The batch is `completed` or `cancelled` already.
    NotLive(String),
    /// A send is on its way for one of the pending items: try again shortly.
    SendsInFlight,
}

/// Cancels a live batch: every pending item becomes `skipped`/`cancelled`, their links
/// (if minted) are revoked, the tally moves, the batch becomes `cancelled`. Sends that
/// are on their way (`sending_at` within `in_flight`) are waited for by the caller, so
/// each of those items ends as what really happened to it.
pub async fn cancel(
    pool: &sqlx::PgPool,
    id: Uuid,
    in_flight: std::time::Duration,
) -> sqlx::Result<Cancel> {
    let mut tx = pool.begin().await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM batches WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    match status.as_deref() {
        None => return Ok(Cancel::NotFound),
        Some(s @ ("completed" | "cancelled")) => return Ok(Cancel::NotLive(s.to_owned())),
        Some(_) => {}
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
    sqlx::query(
        "WITH cancelled AS (
            UPDATE batch_items
               SET status = 'skipped', reason = 'cancelled', sending_at = NULL,
                   next_attempt_at = NULL, updated_at = now()
             WHERE batch_id = $1 AND status = 'pending'
         RETURNING invitation_id)
         UPDATE invitations SET status = 'REVOKED', revoked_at = now()
          WHERE id IN (SELECT invitation_id FROM cancelled) AND status = 'PENDING'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let row: Option<BatchRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE batches
            SET skipped = skipped + pending, pending = 0, status = 'cancelled', cancelled_at = now()
          WHERE id = $1 AND status IN ('queued', 'running')
         RETURNING {BATCH_COLUMNS}"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some(row) => {
            tx.commit().await?;
            Ok(Cancel::Cancelled(row))
        }
        None => {
            let status = get(pool, id).await?.map(|b| b.status).unwrap_or_default();
            Ok(Cancel::NotLive(status))
        }
    }
}

/// A failed item to put back through the queue, with its corrected address if any.
pub struct RetryItem {
    pub candidate_id: String,
    pub email: Option<String>,
}

/// What a retry did.
pub enum Retry {
    /// The batch after the retry, and the (item id, task id) pairs to push.
    Retried(BatchRow, Vec<(Uuid, String)>),
    NotFound,
    Cancelled,
    /// These candidates are not failed items of the batch.
    NotRetryable(Vec<String>),
}

/// Puts failed items back to `pending` (new task ids, attempts reset, a corrected
/// address replacing the item's) and the batch back to `running`.
/// `only` limits it to those candidates; `None` retries every failed item. The caller
/// pushes the tasks in the same transaction and commits.
pub async fn retry(
    tx: &mut PgConnection,
    id: Uuid,
    only: Option<&[RetryItem]>,
) -> sqlx::Result<Retry> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM batches WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    match status.as_deref() {
        None => return Ok(Retry::NotFound),
        Some("cancelled") => return Ok(Retry::Cancelled),
        Some(_) => {}
    }
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, candidate_id, status FROM batch_items
         WHERE batch_id = $1 ORDER BY id FOR UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    // Read again under the batch's lock (items first, then the batch: the lock order):
    // a cancel may have committed since the first read.
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM batches WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if status.as_deref() == Some("cancelled") {
        return Ok(Retry::Cancelled);
    }
    let failed = |cid: &str| {
        rows.iter()
            .find(|(_, c, s)| c == cid && s == "failed")
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
            .filter(|(_, _, s)| s == "failed")
            .map(|(i, ..)| (*i, None))
            .collect(),
    };
    if chosen.is_empty() {
        return Ok(Retry::NotRetryable(Vec::new()));
    }
    let tasks: Vec<(Uuid, String)> = chosen
        .iter()
        .map(|(i, ..)| (*i, crate::queue::new_task_id()))
        .collect();
    sqlx::query(
        "UPDATE batch_items i
            SET status = 'pending', reason = NULL, attempts = 0, last_error = NULL,
                invitation_id = NULL, sending_at = NULL, next_attempt_at = NULL,
                task_id = t.task_id, email = coalesce(t.email, i.email),
                email_error = CASE WHEN t.email IS NULL THEN i.email_error END,
                updated_at = now()
           FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(id, task_id, email)
          WHERE i.id = t.id",
    )
    .bind(tasks.iter().map(|(i, _)| *i).collect::<Vec<_>>())
    .bind(tasks.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>())
    .bind(chosen.iter().map(|(_, e)| e.as_deref()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    let n = i32::try_from(chosen.len()).unwrap_or(i32::MAX);
    let row: BatchRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE batches
            SET failed = failed - $2, pending = pending + $2, status = 'running', completed_at = NULL
          WHERE id = $1
         RETURNING {BATCH_COLUMNS}"
    )))
    .bind(id)
    .bind(n)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Retry::Retried(row, tasks))
}

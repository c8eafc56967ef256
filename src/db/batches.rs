//! Batches and their items: creation (one transaction with the queue tasks), reads.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor, types::Json};
use uuid::Uuid;

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
}

#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: Uuid,
    pub job_id: String,
    pub duration_minutes: i32,
    pub on_duplicate: String,
    pub items: Vec<NewItem>,
    pub warnings: Vec<Warning>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<Vec<u8>>,
}

/// Writes the candidates (latest request wins), the batch and its items. The caller
/// pushes the queue tasks in the same transaction and commits.
pub async fn insert(tx: &mut PgConnection, batch: &NewBatch) -> sqlx::Result<BatchRow> {
    // Upsert candidates in id order so two batches sharing candidates cannot deadlock.
    let mut candidates: Vec<&NewItem> = batch.items.iter().collect();
    candidates.sort_by(|a, b| a.candidate_id.cmp(&b.candidate_id));
    sqlx::query(
        "INSERT INTO candidates (id, email, name)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
         ON CONFLICT (id) DO UPDATE
            SET email = EXCLUDED.email, name = EXCLUDED.name, updated_at = now()",
    )
    .bind(
        candidates
            .iter()
            .map(|i| i.candidate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        candidates
            .iter()
            .map(|i| i.email.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        candidates
            .iter()
            .map(|i| i.name.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;

    let total = i32::try_from(batch.items.len()).unwrap_or(i32::MAX);
    let row: BatchRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO batches (id, job_id, duration_minutes, on_duplicate, total, pending, \
                              warnings, idempotency_key, request_hash)
         VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8)
         RETURNING {BATCH_COLUMNS}"
    )))
    .bind(batch.id)
    .bind(&batch.job_id)
    .bind(batch.duration_minutes)
    .bind(&batch.on_duplicate)
    .bind(total)
    .bind(Json(&batch.warnings))
    .bind(&batch.idempotency_key)
    .bind(&batch.request_hash)
    .fetch_one(&mut *tx)
    .await?;

    sqlx::query(
        "INSERT INTO batch_items (id, batch_id, position, candidate_id, email, name, task_id)
         SELECT id, $1, position, candidate_id, email, name, task_id
         FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
              WITH ORDINALITY AS t(id, candidate_id, email, name, task_id, position)",
    )
    .bind(batch.id)
    .bind(batch.items.iter().map(|i| i.id).collect::<Vec<_>>())
    .bind(
        batch
            .items
            .iter()
            .map(|i| i.candidate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .items
            .iter()
            .map(|i| i.email.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .items
            .iter()
            .map(|i| i.name.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .items
            .iter()
            .map(|i| i.task_id.as_str())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(row)
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The candidates among `candidate_ids` that hold a live invitation (PENDING and not
/// expired, or IN_PROGRESS) for the job.
pub async fn already_invited(
    db: impl PgExecutor<'_>,
    job_id: &str,
    candidate_ids: &[&str],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT candidate_id FROM invitations
         WHERE job_id = $1 AND candidate_id = ANY($2::text[])
           AND (status = 'IN_PROGRESS' OR (status = 'PENDING' AND expires_at > now()))",
    )
    .bind(job_id)
    .bind(candidate_ids)
    .fetch_all(db)
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

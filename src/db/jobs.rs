//! Job openings.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::domain::{
    access::{Actor, AuditAction},
    states::JobStatus,
};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) status: JobStatus,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

/// Creates or updates a job, and records it in the audit log as `actor`'s; the flag
/// says whether it was created.
pub(crate) async fn upsert(
    pool: &PgPool,
    id: &str,
    title: &str,
    status: JobStatus,
    actor: &Actor,
) -> sqlx::Result<(Job, bool)> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        job: Job,
        created: bool,
    }
    let mut tx = pool.begin().await?;
    let row: Row = sqlx::query_as(
        "INSERT INTO jobs (id, title, status) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE
            SET title = EXCLUDED.title, status = EXCLUDED.status, updated_at = now()
         RETURNING id, title, status, created_at, updated_at, (xmax = 0) AS created",
    )
    .bind(id)
    .bind(title)
    .bind(status)
    .fetch_one(&mut *tx)
    .await?;
    let action = if row.created {
        AuditAction::JobCreated
    } else {
        AuditAction::JobUpdated
    };
    let detail = serde_json::json!({ "title": row.job.title, "status": row.job.status });
    super::audit::record(&mut tx, actor, action, id, detail).await?;
    tx.commit().await?;
    Ok((row.job, row.created))
}

pub(crate) async fn get(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<Job>> {
    sqlx::query_as("SELECT id, title, status, created_at, updated_at FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

//! The audit log: who changed what, written in the transaction of the change.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};

use crate::domain::access::{Actor, AuditAction};

/// One entry, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct AuditEntry {
    pub(crate) at: DateTime<Utc>,
    /// `key:<name>`, `operator:<name>` or `cli:<os user>`.
    pub(crate) actor: String,
    /// What was done, e.g. `batch.retried`.
    pub(crate) action: String,
    /// What it was done to: an id (a batch's, a job's, an invitation's) or a masked
    /// address.
    pub(crate) target: String,
    /// The particulars (e.g. how many items a retry put back).
    #[schema(value_type = Object)]
    pub(crate) detail: serde_json::Value,
}

/// Records that `actor` did `action` to `target`. Call it on the connection (the open
/// transaction) that makes the change, so the entry exists exactly when the change
/// does. `detail` must hold no personal data and no secret.
pub async fn record(
    conn: &mut PgConnection,
    actor: &Actor,
    action: AuditAction,
    target: &str,
    detail: serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO audit_log (actor, action, target, detail) VALUES ($1, $2, $3, $4)")
        .bind(actor.as_str())
        .bind(action.as_str())
        .bind(target)
        .bind(sqlx::types::Json(detail))
        .execute(conn)
        .await?;
    Ok(())
}

/// Newest first, at most `limit`, optionally one actor's and/or one action's.
pub(crate) async fn list(
    db: impl PgExecutor<'_>,
    actor: Option<&str>,
    action: Option<AuditAction>,
    limit: i64,
) -> sqlx::Result<Vec<AuditEntry>> {
    sqlx::query_as(
        "SELECT at, actor, action, target, detail FROM audit_log
          WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2)
          ORDER BY at DESC, id DESC
          LIMIT $3",
    )
    .bind(actor)
    .bind(action.map(AuditAction::as_str))
    .bind(limit)
    .fetch_all(db)
    .await
}

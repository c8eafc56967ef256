//! The suppression list: addresses a mail server refused as bad mailboxes. (Written by
//! phase 3, `sql/record_outcomes.sql`; read by phase 1, `prepare_items`.)

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::domain::{
    access::{Actor, AuditAction},
    email::mask,
};

/// One suppressed address.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Suppression {
    /// Lower-cased.
    pub(crate) email: String,
    /// The mail server's reply that put it here (e.g. `550 5.1.1 user unknown`).
    pub(crate) reply: String,
    /// The item whose send was refused.
    pub(crate) item_id: Option<Uuid>,
    pub(crate) created_at: DateTime<Utc>,
}

/// Newest first, at most `limit`.
pub(crate) async fn list(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<Suppression>> {
    sqlx::query_as(
        "SELECT email, reply, item_id, created_at FROM suppressions
          ORDER BY created_at DESC, email LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Takes `email` off the list, as `actor` (the audit log names the address masked);
/// false when it was not on it.
pub(crate) async fn delete(db: &PgPool, email: &str, actor: &Actor) -> sqlx::Result<bool> {
    let mut tx = db.begin().await?;
    let deleted: Option<String> = sqlx::query_scalar(
        "DELETE FROM suppressions WHERE email = lower(btrim($1)) RETURNING email",
    )
    .bind(email)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(deleted) = deleted else {
        return Ok(false);
    };
    let detail = serde_json::json!({});
    super::audit::record(
        &mut tx,
        actor,
        AuditAction::SuppressionDeleted,
        &mask(&deleted),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

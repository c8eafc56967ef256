//! The suppression list: addresses a mail server refused as bad mailboxes. (Written by
//! phase 3, `sql/record_outcomes.sql`; read by phase 1, `prepare_items`.)

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

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

/// Takes `email` off the list; false when it was not on it.
pub(crate) async fn delete(db: impl PgExecutor<'_>, email: &str) -> sqlx::Result<bool> {
    let deleted = sqlx::query("DELETE FROM suppressions WHERE email = lower(btrim($1))")
        .bind(email)
        .execute(db)
        .await?;
    Ok(deleted.rows_affected() > 0)
}

//! The attempt history of an item: one row per send attempt, written with the
//! attempt's outcome by `sql/record_outcomes.sql` (see the migration
//! `20261207100002_attempts_and_retention.sql`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::states::AttemptOutcome;

/// One attempt, as `GET /v1/batches/{id}/items/{candidate_id}/attempts` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Attempt {
    /// 1, 2, … for the item, continuing across a retry of the item.
    pub(crate) number: i32,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) finished_at: DateTime<Utc>,
    pub(crate) outcome: AttemptOutcome,
    /// The mail server's reply line, or the connection error, with addresses masked.
    pub(crate) smtp_reply: Option<String>,
    /// The process that made the attempt: `worker.name`, or host:pid.
    pub(crate) worker: String,
}

/// The attempts of the item of `candidate_id` in batch `batch_id`, oldest first;
/// `None` when the batch has no such item.
pub(crate) async fn of_item(
    conn: &mut PgConnection,
    batch_id: Uuid,
    candidate_id: &str,
) -> sqlx::Result<Option<Vec<Attempt>>> {
    let item: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM batch_items WHERE batch_id = $1 AND candidate_id = $2")
            .bind(batch_id)
            .bind(candidate_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(item) = item else {
        return Ok(None);
    };
    let attempts = sqlx::query_as(
        "SELECT number, started_at, finished_at, outcome, smtp_reply, worker
           FROM attempts WHERE item_id = $1 ORDER BY number",
    )
    .bind(item)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(attempts))
}

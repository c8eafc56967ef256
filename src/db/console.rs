//! What the operators' web console reads and writes beyond the API's own queries: its
//! sessions, and the overview's recent failures.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::domain::{access::OperatorRole, states::ItemReason};

/// The operator a sign-in names, with the password hash to check.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Credentials {
    pub(crate) id: i64,
    pub(crate) password_hash: String,
}

/// The operator named `name`, if there is one.
pub(crate) async fn credentials(
    db: impl PgExecutor<'_>,
    name: &str,
) -> sqlx::Result<Option<Credentials>> {
    sqlx::query_as("SELECT id, password_hash FROM operators WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await
}

/// A live session: who is signed in, and the token their forms carry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Session {
    pub(crate) name: String,
    pub(crate) role: OperatorRole,
    pub(crate) csrf_token: String,
}

/// Starts a session for operator `operator_id`, known by the SHA-256 of its cookie
/// token, until `expires_at`. Sessions that have expired are deleted on the way.
pub(crate) async fn start_session(
    pool: &PgPool,
    token_sha256: &[u8; 32],
    operator_id: i64,
    csrf_token: &str,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM console_sessions WHERE expires_at <= now()")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO console_sessions (token_sha256, operator_id, csrf_token, expires_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(token_sha256.as_slice())
    .bind(operator_id)
    .bind(csrf_token)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The live session whose cookie token hashes to `token_sha256`.
pub(crate) async fn session(
    db: impl PgExecutor<'_>,
    token_sha256: &[u8; 32],
) -> sqlx::Result<Option<Session>> {
    sqlx::query_as(
        "SELECT o.name, o.role, s.csrf_token
           FROM console_sessions s JOIN operators o ON o.id = s.operator_id
          WHERE s.token_sha256 = $1 AND s.expires_at > now()",
    )
    .bind(token_sha256.as_slice())
    .fetch_optional(db)
    .await
}

/// Ends the session (sign-out); a session that is gone already is no error.
pub(crate) async fn end_session(
    db: impl PgExecutor<'_>,
    token_sha256: &[u8; 32],
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM console_sessions WHERE token_sha256 = $1")
        .bind(token_sha256.as_slice())
        .execute(db)
        .await?;
    Ok(())
}

/// Failed items of the last 24 hours, in every batch, grouped like a batch's failure
/// groups (reason and reply code), largest first.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RecentFailures {
    pub(crate) reason: ItemReason,
    pub(crate) reply_code: Option<String>,
    pub(crate) count: i64,
}

/// Reads the failed items of the batches live in the last day (`sql/failures_last_day.sql`).
pub(crate) async fn failures_last_day(
    db: impl PgExecutor<'_>,
) -> sqlx::Result<Vec<RecentFailures>> {
    sqlx::query_as(include_str!("sql/failures_last_day.sql"))
        .fetch_all(db)
        .await
}

/// Batches queued or running, newest first (through `batches_live`, which holds only
/// those).
pub(crate) async fn live_batches(
    db: impl PgExecutor<'_>,
    limit: i64,
) -> sqlx::Result<Vec<super::batches::BatchRow>> {
    sqlx::query_as(
        "SELECT * FROM batches WHERE status IN ('queued', 'running')
          ORDER BY created_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

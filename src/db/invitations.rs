//! Invitations: reads (EXPIRED derived from `expires_at`), redeem, complete, revoke.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

/// The invitation resource.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Invitation {
    pub id: Uuid,
    pub job_id: String,
    pub candidate_id: String,
    pub batch_id: Uuid,
    /// `PENDING`, `IN_PROGRESS`, `COMPLETED`, `EXPIRED` or `REVOKED`.
    pub status: String,
    pub duration_minutes: i32,
    pub sent_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub redeemed_at: Option<DateTime<Utc>>,
}

/// The columns of [`Invitation`], with a PENDING link past its expiry read as EXPIRED.
const COLUMNS: &str = "id, job_id, candidate_id, batch_id, \
     CASE WHEN status = 'PENDING' AND expires_at <= now() THEN 'EXPIRED' ELSE status END AS status, \
     duration_minutes, sent_at, expires_at, redeemed_at";

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Invitation>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM invitations WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Newest first, filtered by job and/or candidate.
pub async fn list(
    db: impl PgExecutor<'_>,
    job_id: Option<&str>,
    candidate_id: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<Invitation>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM invitations
         WHERE ($1::text IS NULL OR job_id = $1) AND ($2::text IS NULL OR candidate_id = $2)
         ORDER BY created_at DESC, id DESC
         LIMIT $3"
    )))
    .bind(job_id)
    .bind(candidate_id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// What a redeem found.
pub enum Redeem {
    Redeemed(Invitation),
    Unknown,
    Used,
    ExpiredOrRevoked,
}

/// Consumes a live link in one atomic UPDATE: under any number of concurrent redeems
/// of one token exactly one matches `status = 'PENDING'`.
pub async fn redeem(db: &sqlx::PgPool, token_hash: &[u8; 32]) -> sqlx::Result<Redeem> {
    let redeemed: Option<Invitation> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE invitations SET status = 'IN_PROGRESS', redeemed_at = now()
         WHERE token_hash = $1 AND status = 'PENDING' AND expires_at > now()
         RETURNING {COLUMNS}"
    )))
    .bind(&token_hash[..])
    .fetch_optional(db)
    .await?;
    if let Some(invitation) = redeemed {
        return Ok(Redeem::Redeemed(invitation));
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM invitations WHERE token_hash = $1")
            .bind(&token_hash[..])
            .fetch_optional(db)
            .await?;
    Ok(match status.as_deref() {
        None => Redeem::Unknown,
        Some("IN_PROGRESS" | "COMPLETED") => Redeem::Used,
        Some(_) => Redeem::ExpiredOrRevoked,
    })
}

/// Moves an invitation `from` → `to` (a live one, for PENDING); `None` when it is not
/// in `from` (the caller answers 409) or does not exist.
pub async fn transition(
    db: impl PgExecutor<'_>,
    id: Uuid,
    from: &str,
    to: &str,
) -> sqlx::Result<Option<Invitation>> {
    let stamp = match to {
        "COMPLETED" => "completed_at",
        _ => "revoked_at",
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE invitations SET status = $3, {stamp} = now()
         WHERE id = $1 AND status = $2 AND ($2 <> 'PENDING' OR expires_at > now())
         RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(from)
    .bind(to)
    .fetch_optional(db)
    .await
}

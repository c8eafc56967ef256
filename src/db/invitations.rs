//! Invitations: reads (EXPIRED derived from `expires_at` until the sweep stores it),
//! redeem, complete, revoke; redeem and complete write their webhook events.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::domain::{
    access::{Actor, AuditAction},
    states::InvitationStatus,
    webhook::EventType,
};

/// The invitation resource.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Invitation {
    pub(crate) id: Uuid,
    pub(crate) job_id: String,
    pub(crate) candidate_id: String,
    pub(crate) batch_id: Uuid,
    pub(crate) status: InvitationStatus,
    pub(crate) duration_minutes: i32,
    pub(crate) sent_at: Option<DateTime<Utc>>,
    pub(crate) expires_at: DateTime<Utc>,
    pub(crate) redeemed_at: Option<DateTime<Utc>>,
}

pub(crate) async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Invitation>> {
    sqlx::query_as(
        "SELECT id, job_id, candidate_id, batch_id,
                invitation_status_now(status, expires_at) AS status,
                duration_minutes, sent_at, expires_at, redeemed_at
           FROM invitations WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Newest first, filtered by job and/or candidate.
pub(crate) async fn list(
    db: impl PgExecutor<'_>,
    job_id: Option<&str>,
    candidate_id: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<Invitation>> {
    sqlx::query_as(include_str!("sql/list_invitations.sql"))
        .bind(job_id)
        .bind(candidate_id)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// What a redeem found.
pub(crate) enum Redeem {
    Redeemed(Invitation),
    Unknown,
    Used,
    ExpiredOrRevoked,
}

/// Consumes a live link in one atomic UPDATE: under any number of concurrent redeems
/// of one token exactly one matches `status = 'PENDING'`. A redeem is `actor`'s in
/// the audit log.
pub(crate) async fn redeem(
    db: &PgPool,
    token_hash: &[u8; 32],
    actor: &Actor,
) -> sqlx::Result<Redeem> {
    let mut tx = db.begin().await?;
    let redeemed: Option<Invitation> = sqlx::query_as(include_str!("sql/redeem_invitation.sql"))
        .bind(&token_hash[..])
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(invitation) = redeemed {
        let (action, target) = (AuditAction::InvitationRedeemed, invitation.id.to_string());
        let detail = serde_json::json!({ "batch_id": invitation.batch_id });
        super::audit::record(&mut tx, actor, action, &target, detail).await?;
        let kind = EventType::InvitationRedeemed;
        super::webhooks::emit_invitation(&mut tx, kind, invitation.id).await?;
        tx.commit().await?;
        return Ok(Redeem::Redeemed(invitation));
    }
    tx.rollback().await?;
    let status: Option<InvitationStatus> =
        sqlx::query_scalar("SELECT status FROM invitations WHERE token_hash = $1")
            .bind(&token_hash[..])
            .fetch_optional(db)
            .await?;
    Ok(match status {
        None => Redeem::Unknown,
        Some(InvitationStatus::InProgress | InvitationStatus::Completed) => Redeem::Used,
        Some(InvitationStatus::Pending | InvitationStatus::Expired | InvitationStatus::Revoked) => {
            Redeem::ExpiredOrRevoked
        }
    })
}

/// The transitions of an invitation that the API offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// IN_PROGRESS → COMPLETED.
    Complete,
    /// PENDING (and not expired) → REVOKED.
    Revoke,
}

impl Transition {
    /// How the audit log names it.
    fn action(self) -> AuditAction {
        match self {
            Transition::Complete => AuditAction::InvitationCompleted,
            Transition::Revoke => AuditAction::InvitationRevoked,
        }
    }

    /// The state an invitation must be in, and the one it moves to.
    pub(crate) fn states(self) -> (InvitationStatus, InvitationStatus) {
        match self {
            Transition::Complete => (InvitationStatus::InProgress, InvitationStatus::Completed),
            Transition::Revoke => (InvitationStatus::Pending, InvitationStatus::Revoked),
        }
    }
}

/// Makes `transition` if the invitation is in its starting state, as `actor` (in the
/// audit log); `None` when it is not (the caller answers 409) or does not exist.
pub(crate) async fn transition(
    db: &PgPool,
    id: Uuid,
    transition: Transition,
    actor: &Actor,
) -> sqlx::Result<Option<Invitation>> {
    let sql = match transition {
        Transition::Complete => include_str!("sql/complete_invitation.sql"),
        Transition::Revoke => include_str!("sql/revoke_invitation.sql"),
    };
    let mut tx = db.begin().await?;
    let changed: Option<Invitation> = sqlx::query_as(sql)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(invitation) = &changed {
        let detail = serde_json::json!({ "batch_id": invitation.batch_id });
        let target = id.to_string();
        super::audit::record(&mut tx, actor, transition.action(), &target, detail).await?;
        if transition == Transition::Complete {
            let kind = EventType::InvitationCompleted;
            super::webhooks::emit_invitation(&mut tx, kind, id).await?;
        }
    }
    tx.commit().await?;
    Ok(changed)
}

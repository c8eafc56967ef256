//! The worker's statements. Lock order everywhere: the item row, then its batch row.
//! Every change to an item's status moves the batch tally in the same transaction.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::states::{ItemReason, ItemStatus};

/// An item with what delivering it needs to know, read under the item's row lock.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LockedItem {
    pub id: Uuid,
    pub batch_id: Uuid,
    pub task_id: String,
    pub status: String,
    pub attempts: i32,
    pub candidate_id: String,
    pub email: String,
    pub name: Option<String>,
    pub invitation_id: Option<Uuid>,
    pub job_id: String,
    pub job_title: String,
    pub job_status: String,
    pub batch_status: String,
    pub on_duplicate: String,
    pub duration_minutes: i32,
}

/// Locks the item (FOR UPDATE) and reads it with its batch and job.
pub async fn lock_item(tx: &mut PgConnection, item_id: Uuid) -> sqlx::Result<Option<LockedItem>> {
    Ok(lock_items(tx, &[item_id]).await?.pop())
}

/// `queued → running` on the first item a worker picks up.
pub async fn mark_batch_running(tx: &mut PgConnection, batch_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE batches SET status = 'running' WHERE id = $1 AND status = 'queued'")
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Serialises the duplicate check and the minting of an invitation for one
/// (job, candidate), so two batches racing for one candidate cannot both invite them.
pub async fn lock_candidate_for_job(
    tx: &mut PgConnection,
    job_id: &str,
    candidate_id: &str,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 7141))")
        .bind(job_id)
        .bind(candidate_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Whether the candidate holds a live invitation for the job other than `own`.
pub async fn has_other_live_invitation(
    tx: &mut PgConnection,
    job_id: &str,
    candidate_id: &str,
    own: Option<Uuid>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM invitations
            WHERE job_id = $1 AND candidate_id = $2 AND id IS DISTINCT FROM $3
              AND (status = 'IN_PROGRESS' OR (status = 'PENDING' AND expires_at > now())))",
    )
    .bind(job_id)
    .bind(candidate_id)
    .bind(own)
    .fetch_one(&mut *tx)
    .await
}

/// An invitation to mint for an item: its id (the link is derived from it) and the
/// SHA-256 of its token.
pub struct Mint {
    pub id: Uuid,
    pub token_hash: [u8; 32],
    pub ttl_hours: u32,
}

/// Counts one more send attempt for the item and marks its send as under way, minting
/// its invitation first when `mint` is given (one statement); returns the new count.
pub async fn begin_attempt(
    tx: &mut PgConnection,
    item: &LockedItem,
    mint: Option<&Mint>,
) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "WITH minted AS (
            INSERT INTO invitations (id, job_id, candidate_id, batch_id, item_id, token_hash,
                                     duration_minutes, expires_at)
            SELECT $2, $3, $4, $5, $1, $6, $7, now() + make_interval(hours => $8)
            WHERE $2::uuid IS NOT NULL
            RETURNING id)
         UPDATE batch_items
            SET invitation_id = coalesce((SELECT id FROM minted), invitation_id),
                attempts = attempts + 1, next_attempt_at = NULL, sending_at = now(),
                updated_at = now()
          WHERE id = $1
         RETURNING attempts",
    )
    .bind(item.id)
    .bind(mint.map(|m| m.id))
    .bind(&item.job_id)
    .bind(&item.candidate_id)
    .bind(item.batch_id)
    .bind(mint.map(|m| m.token_hash.to_vec()))
    .bind(item.duration_minutes)
    .bind(mint.map(|m| i32::try_from(m.ttl_hours).unwrap_or(i32::MAX)))
    .fetch_one(&mut *tx)
    .await
}

/// Adds a warning to the batch unless the same one is there already.
pub async fn add_warning(
    tx: &mut PgConnection,
    batch_id: Uuid,
    candidate_id: &str,
    code: &str,
    message: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE batches
            SET warnings = warnings || jsonb_build_array(
                    jsonb_build_object('candidate_id', $2::text, 'code', $3::text, 'message', $4::text))
          WHERE id = $1
            AND NOT warnings @> jsonb_build_array(
                    jsonb_build_object('candidate_id', $2::text, 'code', $3::text))",
    )
    .bind(batch_id)
    .bind(candidate_id)
    .bind(code)
    .bind(message)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What to write for one item of a recorded group.
#[derive(Debug, Clone)]
pub enum Change {
    /// The item ends: `sent` (no reason) or failed/skipped with a reason.
    Finish {
        item: Uuid,
        status: ItemStatus,
        reason: Option<ItemReason>,
        last_error: Option<String>,
    },
    /// A transient failure: the item moves to a new task due at `run_at`.
    Retry {
        item: Uuid,
        task_id: String,
        last_error: String,
        run_at: DateTime<Utc>,
    },
}

/// Locks the items of a group (in id order, like every other path) and reads them.
pub async fn lock_items(tx: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<LockedItem>> {
    sqlx::query_as(
        "SELECT i.id, i.batch_id, i.task_id, i.status, i.attempts, i.candidate_id, i.email,
                i.name, i.invitation_id, b.job_id, j.title AS job_title, j.status AS job_status,
                b.status AS batch_status, b.on_duplicate, b.duration_minutes
         FROM batch_items i
         JOIN batches b ON b.id = i.batch_id
         JOIN jobs j ON j.id = b.job_id
         WHERE i.id = ANY($1)
         ORDER BY i.id
         FOR UPDATE OF i",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
}

/// Writes a group of outcomes: item rows, their invitations (sent: the expiry starts
/// now; ended otherwise: revoked) and each batch's tally, one statement per kind, in
/// the caller's transaction. `items` are the locked rows the changes refer to.
pub async fn apply(
    tx: &mut PgConnection,
    items: &[LockedItem],
    changes: &[Change],
) -> sqlx::Result<()> {
    let invitation_of = |id: &Uuid| {
        items
            .iter()
            .find(|i| i.id == *id)
            .and_then(|i| i.invitation_id)
    };
    let batch_of = |id: &Uuid| items.iter().find(|i| i.id == *id).map(|i| i.batch_id);

    let mut fin_ids = Vec::new();
    let mut fin_status = Vec::new();
    let mut fin_reason = Vec::new();
    let mut fin_error = Vec::new();
    let mut sent_invitations = Vec::new();
    let mut revoked_invitations = Vec::new();
    // batch id → (sent, failed, skipped)
    let mut tally: std::collections::BTreeMap<Uuid, (i32, i32, i32)> = Default::default();
    let mut retry_ids = Vec::new();
    let mut retry_tasks = Vec::new();
    let mut retry_errors = Vec::new();
    let mut retry_at = Vec::new();
    for change in changes {
        match change {
            Change::Finish {
                item,
                status,
                reason,
                last_error,
            } => {
                fin_ids.push(*item);
                fin_status.push(status.as_str());
                fin_reason.push(reason.map(ItemReason::as_str));
                fin_error.push(last_error.as_deref());
                if let Some(invitation) = invitation_of(item) {
                    if *status == ItemStatus::Sent {
                        sent_invitations.push(invitation);
                    } else {
                        revoked_invitations.push(invitation);
                    }
                }
                if let Some(batch) = batch_of(item) {
                    let t = tally.entry(batch).or_default();
                    match status {
                        ItemStatus::Sent => t.0 += 1,
                        ItemStatus::Failed => t.1 += 1,
                        ItemStatus::Skipped => t.2 += 1,
                        ItemStatus::Pending => {}
                    }
                }
            }
            Change::Retry {
                item,
                task_id,
                last_error,
                run_at,
            } => {
                retry_ids.push(*item);
                retry_tasks.push(task_id.as_str());
                retry_errors.push(last_error.as_str());
                retry_at.push(*run_at);
            }
        }
    }

    if !fin_ids.is_empty() {
        sqlx::query(
            "UPDATE batch_items i
                SET status = t.status, reason = t.reason,
                    last_error = coalesce(t.last_error, i.last_error),
                    next_attempt_at = NULL, sending_at = NULL, updated_at = now(),
                    sent_at = CASE WHEN t.status = 'sent' THEN now() ELSE i.sent_at END
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                    AS t(id, status, reason, last_error)
              WHERE i.id = t.id",
        )
        .bind(&fin_ids)
        .bind(&fin_status)
        .bind(&fin_reason)
        .bind(&fin_error)
        .execute(&mut *tx)
        .await?;
    }
    if !sent_invitations.is_empty() {
        sqlx::query(
            "UPDATE invitations SET sent_at = now(), expires_at = now() + (expires_at - created_at)
              WHERE id = ANY($1)",
        )
        .bind(&sent_invitations)
        .execute(&mut *tx)
        .await?;
    }
    if !revoked_invitations.is_empty() {
        sqlx::query(
            "UPDATE invitations SET status = 'REVOKED', revoked_at = now()
              WHERE id = ANY($1) AND status = 'PENDING'",
        )
        .bind(&revoked_invitations)
        .execute(&mut *tx)
        .await?;
    }
    if !retry_ids.is_empty() {
        sqlx::query(
            "UPDATE batch_items i
                SET task_id = t.task_id, last_error = t.last_error, next_attempt_at = t.run_at,
                    sending_at = NULL, updated_at = now()
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
                    AS t(id, task_id, last_error, run_at)
              WHERE i.id = t.id",
        )
        .bind(&retry_ids)
        .bind(&retry_tasks)
        .bind(&retry_errors)
        .bind(&retry_at)
        .execute(&mut *tx)
        .await?;
    }
    if !tally.is_empty() {
        // BTreeMap: batch rows are locked in id order, so two groups cannot deadlock.
        let ids: Vec<Uuid> = tally.keys().copied().collect();
        let sent: Vec<i32> = tally.values().map(|t| t.0).collect();
        let failed: Vec<i32> = tally.values().map(|t| t.1).collect();
        let skipped: Vec<i32> = tally.values().map(|t| t.2).collect();
        sqlx::query("SELECT id FROM batches WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE batches b
                SET pending = b.pending - (t.sent + t.failed + t.skipped),
                    sent = b.sent + t.sent, failed = b.failed + t.failed,
                    skipped = b.skipped + t.skipped,
                    status = CASE WHEN b.pending = t.sent + t.failed + t.skipped
                                  THEN 'completed' ELSE 'running' END,
                    completed_at = CASE WHEN b.pending = t.sent + t.failed + t.skipped
                                        THEN now() ELSE NULL END
               FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[]) AS t(id, sent, failed, skipped)
              WHERE b.id = t.id",
        )
        .bind(&ids)
        .bind(&sent)
        .bind(&failed)
        .bind(&skipped)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

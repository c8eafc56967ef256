//! Retention (`[retention]`, operations.md §5): what is forgotten, deleted or
//! anonymized once it is old enough, and never while it is live (a pending item, a
//! queued or running batch, a live invitation).
//!
//! One pass is one transaction that first takes the transaction-level advisory lock
//! [`LOCK_KEY`] without waiting: a pass runs in one process at a time, and a process
//! that finds the lock taken skips its turn (see `queue::maintenance`). Each statement
//! does a bounded amount of work, so a large backlog is worked off over several passes
//! rather than in one long transaction.

use sqlx::PgPool;

use crate::config::RetentionSettings;

/// The advisory lock a retention pass holds (`pg_try_advisory_xact_lock`).
pub const LOCK_KEY: i64 = 0x696e_7669_7465_7201;

/// Batches anonymized per pass (each with up to `batch.max_size` items).
const BATCHES_PER_PASS: i64 = 100;
/// Idempotency keys forgotten, and attempts deleted, per pass.
const ROWS_PER_PASS: i64 = 10_000;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPass {
    pub forgotten_idempotency_keys: u64,
    pub deleted_attempts: u64,
    pub anonymized_batches: i64,
    pub anonymized_items: i64,
}

impl RetentionPass {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Runs one retention pass, unless another process is running one (`None`).
///
/// Anonymization goes first: it locks items, then their batches (the lock order of
/// `db::delivery`); the other two statements lock only batch rows (already held, or of
/// finished batches) and attempts, so no order of theirs can close a cycle.
pub async fn run_pass(
    pool: &PgPool,
    settings: &RetentionSettings,
) -> sqlx::Result<Option<RetentionPass>> {
    let mut tx = pool.begin().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(None);
    }
    let int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let mut pass = RetentionPass::default();
    if settings.finished_batches_days > 0 {
        let (batches, items): (i64, i64) =
            sqlx::query_as(include_str!("sql/anonymize_finished_batches.sql"))
                .bind(int(settings.finished_batches_days))
                .bind(BATCHES_PER_PASS)
                .fetch_one(&mut *tx)
                .await?;
        pass.anonymized_batches = batches;
        pass.anonymized_items = items;
    }
    pass.forgotten_idempotency_keys = sqlx::query(include_str!("sql/forget_idempotency_keys.sql"))
        .bind(int(settings.idempotency_hours))
        .bind(ROWS_PER_PASS)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    pass.deleted_attempts = sqlx::query(include_str!("sql/delete_old_attempts.sql"))
        .bind(int(settings.attempts_days))
        .bind(ROWS_PER_PASS)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(Some(pass))
}

//! Housekeeping that keeps the queue honest and small, run by every worker process.
//!
//! - **Sweep**: a pending item whose own task can no longer run (the task was killed,
//!   ran out of apalis attempts after repeated database errors, or is gone) gets a new
//!   task, unless a send of it is still on its way (`sending_at` within
//!   [`STUCK_AFTER`]). Without this, such an item would stay pending for ever.
//! - **Prune**: finished send-invite tasks older than `worker.task_retention_secs` are
//!   deleted. apalis never deletes rows, and its ack query slows down with every
//!   finished row a worker ever locked. Batches, items and invitations are kept.
//!
//! - **Release**: a task a live worker took more than [`STUCK_AFTER`] ago and never
//!   finished runs again. Tasks are finished by this crate (see `queue::worker`); if
//!   that write itself failed while the worker lived on, nothing else would free the
//!   task. No legitimate run comes near the bound (a send gives up after
//!   `smtp.timeout_secs`).
//!
//! All are safe to run from many processes at once.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::Settings,
    queue::{self, NewTask, QUEUE},
};

/// Runs the sweep and the prune every `worker.maintenance_interval_secs` until shutdown.
pub async fn run(pool: PgPool, settings: &Settings, shutdown: CancellationToken) {
    let every = Duration::from_secs(settings.worker.maintenance_interval_secs);
    let retention = Duration::from_secs(settings.worker.task_retention_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match sweep(&pool).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                items = n,
                "re-queued pending items whose task could not run"
            ),
            Err(e) => tracing::warn!(error = %e, "sweep failed; will try again"),
        }
        match release_stuck(&pool, STUCK_AFTER).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                tasks = n,
                "released tasks taken long ago and never finished"
            ),
            Err(e) => tracing::warn!(error = %e, "releasing stuck tasks failed; will try again"),
        }
        match prune(&pool, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(tasks = n, "pruned finished queue tasks"),
            Err(e) => tracing::warn!(error = %e, "prune failed; will try again"),
        }
    }
}

/// The condition that an item `i` is pending, written to find pending items through the
/// live batches (a batch is live exactly while it has some: the `batch_live_iff_pending`
/// check); no index of items reads their status.
const PENDING_ITEM: &str = "i.batch_id = ANY(ARRAY(SELECT id FROM batches
                                     WHERE status IN ('queued', 'running')))
         AND i.status = 'pending'";

/// Gives every stranded pending item a fresh task; returns how many.
pub async fn sweep(pool: &PgPool) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let stranded: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT i.id FROM batch_items i
         LEFT JOIN apalis.jobs j ON j.id = i.task_id
         WHERE {PENDING_ITEM}
           AND (j.id IS NULL
                OR j.status IN ('Done', 'Killed')
                OR (j.status = 'Failed' AND j.attempts >= j.max_attempts))
           -- a send still on its way is left to finish (and to be recorded)
           AND (i.sending_at IS NULL OR i.sending_at < now() - make_interval(secs => $1))
         ORDER BY i.id
         LIMIT 1000
         FOR UPDATE OF i SKIP LOCKED"
    )))
    .bind(STUCK_AFTER.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if stranded.is_empty() {
        return Ok(0);
    }
    let task_ids: Vec<String> = stranded.iter().map(|_| queue::new_task_id()).collect();
    sqlx::query(
        "UPDATE batch_items i SET task_id = t.task_id, sending_at = NULL, updated_at = now()
           FROM unnest($1::uuid[], $2::text[]) AS t(id, task_id) WHERE i.id = t.id",
    )
    .bind(&stranded)
    .bind(&task_ids)
    .execute(&mut *tx)
    .await?;
    let tasks: Vec<NewTask<'_>> = stranded
        .iter()
        .zip(&task_ids)
        .map(|(item_id, task_id)| NewTask {
            task_id,
            item_id: *item_id,
            run_after: None,
        })
        .collect();
    queue::push(&mut tx, &tasks).await?;
    tx.commit().await?;
    Ok(stranded.len())
}

/// How long a task may stay taken (`Queued` or `Running`) before it is released.
pub const STUCK_AFTER: Duration = Duration::from_secs(300);

/// Makes tasks of pending items that were taken more than `older_than` ago and never
/// finished runnable again; returns how many. (Found through the pending items, so
/// the cost does not grow with the finished tasks kept.)
pub async fn release_stuck(pool: &PgPool, older_than: Duration) -> anyhow::Result<u64> {
    let released = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE apalis.jobs j
            SET status = 'Pending', lock_by = NULL, lock_at = NULL, attempts = j.attempts + 1,
                last_result = '{{\"Err\": \"released: taken long ago and never finished\"}}'
           FROM batch_items i
          WHERE {PENDING_ITEM} AND j.id = i.task_id
            AND j.status IN ('Queued', 'Running')
            AND j.lock_at < now() - make_interval(secs => $1)"
    )))
    .bind(older_than.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(released.rows_affected())
}

/// Deletes send-invite tasks that finished more than `older_than` ago; returns how many.
pub async fn prune(pool: &PgPool, older_than: Duration) -> anyhow::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM apalis.jobs
         WHERE job_type = $1
           AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
           AND done_at < now() - make_interval(secs => $2)",
    )
    .bind(QUEUE)
    .bind(older_than.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

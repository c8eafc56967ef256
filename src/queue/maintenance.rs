//! Housekeeping that keeps the queue honest and small, run by every worker process.
//!
//! - **Requeue stranded items**: a pending item whose own task can no longer run (the
//!   task was killed, ran out of apalis attempts after repeated database errors, or is
//!   gone) gets a new task, unless a send of it is still on its way (`sending_at`
//!   within [`STUCK_AFTER`]). Without this, such an item would stay pending for ever.
//! - **Rescue stuck tasks**: a task a live worker took more than [`STUCK_AFTER`] ago
//!   and never finished runs again. Tasks are finished by this crate (see
//!   `queue::worker`); if that write itself failed while the worker lived on, nothing
//!   else would free the task. No legitimate run comes near the bound (a send gives up
//!   after `smtp.timeout_secs`).
//! - **Delete finished tasks**: finished send-invite tasks older than
//!   `worker.task_retention_secs` are deleted. apalis never deletes rows, and its ack
//!   query slows down with every finished row a worker ever locked. Batches, items and
//!   invitations are kept.
//!
//! - **Retention** (`[retention]`): forgets old idempotency keys, deletes old attempt
//!   history and anonymizes long-finished batches (`db::retention`). A pass takes a
//!   PostgreSQL advisory lock without waiting, so one process at a time runs it and the
//!   others skip their turn: a lock rather than an apalis cron task, because this loop
//!   already runs in every worker process on a timer, a lock needs no schedule table,
//!   task type or leader of its own, and a process that dies mid-pass releases it with
//!   its connection.
//!
//! - **Expire links**: PENDING links past their `expires_at` are marked EXPIRED, each
//!   with its `invitation.expired` webhook event, by one process at a time (an advisory
//!   lock, as retention's). Reads showed such links as EXPIRED before; storing it is
//!   what makes the event happen once.
//! - **Delete old webhook events**: events older than `webhooks.retention_days`, none
//!   of whose deliveries is still pending, go with their delivery log.
//!
//! All are safe to run from many processes at once; the statements are in `db::tasks`
//! and `db::retention`.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    db::{retention, tasks, webhooks},
};

/// Runs them every `worker.maintenance_interval_secs` until shutdown.
pub(crate) async fn run(pool: PgPool, settings: &Settings, shutdown: CancellationToken) {
    let every = Duration::from_secs(settings.worker.maintenance_interval_secs);
    let retention = Duration::from_secs(settings.worker.task_retention_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match tasks::requeue_stranded_items(&pool, STUCK_AFTER).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                items = n,
                "re-queued pending items whose task could not run"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "requeueing stranded items failed; will try again")
            }
        }
        match tasks::rescue_stuck_tasks(&pool, STUCK_AFTER).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(tasks = n, "rescued tasks taken long ago and never finished"),
            Err(e) => tracing::warn!(error = %e, "rescuing stuck tasks failed; will try again"),
        }
        match tasks::delete_finished_tasks(&pool, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(tasks = n, "deleted finished queue tasks"),
            Err(e) => tracing::warn!(error = %e, "deleting finished tasks failed; will try again"),
        }
        match webhooks::expire_invitations(&pool, SWEEP_BATCH).await {
            Ok(Some(n)) if n > 0 => tracing::info!(invitations = n, "expired links marked EXPIRED"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the link expiry sweep failed; will try again"),
        }
        match webhooks::delete_old_events(&pool, settings.webhooks.retention_days, SWEEP_BATCH)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "deleted old webhook events"),
            Err(e) => {
                tracing::warn!(error = %e, "deleting old webhook events failed; will try again")
            }
        }
        match retention::run_pass(&pool, &settings.retention).await {
            Ok(Some(pass)) if !pass.is_empty() => tracing::info!(
                forgotten_idempotency_keys = pass.forgotten_idempotency_keys,
                deleted_attempts = pass.deleted_attempts,
                anonymized_batches = pass.anonymized_batches,
                anonymized_items = pass.anonymized_items,
                "retention pass"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; will try again"),
        }
    }
}

/// Links marked EXPIRED, and old webhook events deleted, per pass.
const SWEEP_BATCH: i64 = 1_000;

/// How long a task may stay taken (`Queued` or `Running`) before it is rescued.
pub const STUCK_AFTER: Duration = Duration::from_secs(300);

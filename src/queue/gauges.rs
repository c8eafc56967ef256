//! The queue gauges of `/metrics`: `invite_queue_tasks{state}`,
//! `invite_queue_oldest_pending_seconds`, `invite_workers_alive`, `invite_batches{status}`.
//!
//! Every process (every role serves `/metrics`) looks every `metrics.refresh_secs`;
//! whichever first finds the stored figures older than that computes them, under an
//! advisory lock, and all publish what is stored (`db::gauges`). So the queue is
//! counted once per interval whatever the number of processes and scrapes, and every
//! process reports the same figures (dashboards take `max`).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    db::gauges::{self, QueueGauges},
};

/// Refreshes and publishes the gauges until `shutdown`.
pub async fn run(pool: PgPool, settings: &Settings, shutdown: CancellationToken) {
    let every = Duration::from_secs(settings.metrics.refresh_secs);
    let alive_within = Duration::from_secs(settings.worker.recover_after_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // Slightly less than the interval, so the process whose turn it is does not
        // find the figures a few milliseconds too young and leave them for a round.
        let stale_after = every.mul_f64(0.9);
        if let Err(e) = gauges::refresh_if_stale(&pool, stale_after, alive_within).await {
            tracing::warn!(error = %e, "computing the queue gauges failed; will try again");
        }
        match gauges::read(&pool).await {
            Ok(Some((figures, _age))) => publish(&figures),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading the queue gauges failed; will try again"),
        }
    }
}

fn publish(g: &QueueGauges) {
    for (state, n) in &g.tasks {
        metrics::gauge!("invite_queue_tasks", "state" => state.clone()).set(*n as f64);
    }
    metrics::gauge!("invite_queue_oldest_pending_seconds").set(g.oldest_pending_age_secs as f64);
    metrics::gauge!("invite_workers_alive").set(g.workers_alive as f64);
    for (status, n) in &g.batches {
        metrics::gauge!("invite_batches", "status" => status.clone()).set(*n as f64);
    }
}

//! The webhook delivery loop, run by every worker process.
//!
//! The queue is the `webhook_deliveries` table itself, polled with `FOR UPDATE SKIP
//! LOCKED` (`db::webhooks::claim`), not a second apalis task type: a delivery row
//! already has to hold its state, attempt count and next attempt for the delivery log
//! and replay, and apalis would add nothing durable on top (its retries are in memory
//! and its failed rows are re-run at once, see `queue`), while costing a task row per
//! attempt, a second worker with its heartbeat, and the poison-payload and
//! worker-name traps. A claim is a lease (`locked_until`, the attempt's timeout plus a
//! margin): if the process dies mid-attempt, any process claims the row again once
//! the lease has passed, so no event is lost and delivery is at least once.
//!
//! New deliveries wake the loop at once (`LISTEN webhook_deliveries`, notified by the
//! fan-out trigger on commit); retries that come due are found by a poll every
//! `webhooks.poll_interval_ms`. Each attempt runs in its own task, at most
//! `webhooks.concurrency` per process and `webhooks.per_endpoint_concurrency` per
//! endpoint, each bounded by `webhooks.timeout_secs`: a hanging endpoint holds only
//! its own slots, never another endpoint's deliveries.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    process::process_name,
    webhook_client::{WebhookClient, lease},
};
use crate::{
    config::Settings,
    db::webhooks::{self, Claimed, Recorded},
    domain::access::Actor,
};

/// Runs until `shutdown`; attempts in flight then get `worker.shutdown_timeout_secs`
/// to finish and be recorded (one cut short stays claimed until its lease passes, and
/// is made again).
pub(crate) async fn run(pool: PgPool, settings: Arc<Settings>, shutdown: CancellationToken) {
    let config = &settings.webhooks;
    let client = match WebhookClient::new(config) {
        Ok(client) => Arc::new(client),
        Err(e) => {
            tracing::error!(error = %e, "webhook delivery cannot start: no HTTP client");
            return;
        }
    };
    let schedule: Arc<[Duration]> = config
        .retry_schedule_secs
        .iter()
        .map(|s| Duration::from_secs(*s))
        .collect();
    let worker = Actor::worker(&process_name(&settings));
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let wake = Arc::new(tokio::sync::Notify::new());
    let listener = tokio::spawn(listen(pool.clone(), wake.clone(), shutdown.clone()));
    let poll = Duration::from_millis(config.poll_interval_ms);
    let lease = lease(config);
    let mut in_flight = JoinSet::new();
    loop {
        let free = slots.available_permits();
        let mut claimed_all = false;
        if free > 0 {
            match webhooks::claim(&pool, free, config.per_endpoint_concurrency, lease).await {
                Ok(claimed) => {
                    claimed_all = claimed.len() == free;
                    for delivery in claimed {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            break;
                        };
                        let (pool, client, schedule, worker) = (
                            pool.clone(),
                            client.clone(),
                            schedule.clone(),
                            worker.clone(),
                        );
                        in_flight.spawn(async move {
                            deliver(&pool, &client, &delivery, &schedule, &worker).await;
                            drop(slot);
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming webhook deliveries failed; will try again")
                }
            }
        }
        if claimed_all && !in_flight.is_empty() {
            // There may be more due: look again as soon as a slot frees.
            tokio::select! {
                Some(_) = in_flight.join_next() => continue,
                () = shutdown.cancelled() => break,
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(poll) => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            () = shutdown.cancelled() => break,
        }
    }
    listener.abort();
    let grace = Duration::from_secs(settings.worker.shutdown_timeout_secs);
    if tokio::time::timeout(grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("webhook attempts still in flight at shutdown; they will be made again");
        in_flight.abort_all();
    }
    tracing::info!("webhook delivery stopped");
}

/// Wakes the loop whenever new deliveries are committed. A lost connection is
/// re-established by the listener; meanwhile the poll finds the work.
async fn listen(pool: PgPool, wake: Arc<tokio::sync::Notify>, shutdown: CancellationToken) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "webhook listener cannot connect; polling only for now");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        if let Err(e) = listener.listen(webhooks::CHANNEL).await {
            tracing::warn!(error = %e, "webhook listener cannot LISTEN; polling only for now");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                () = shutdown.cancelled() => return,
            }
        }
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook listener lost its connection");
                        break;
                    }
                },
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// One attempt of one delivery, recorded. A failure to record leaves the claim to run
/// out and the attempt to be made again.
async fn deliver(
    pool: &PgPool,
    client: &WebhookClient,
    delivery: &Claimed,
    schedule: &[Duration],
    worker: &Actor,
) {
    let result = if delivery.disabled {
        webhooks::AttemptResult {
            started_at: chrono::Utc::now(),
            duration: Duration::ZERO,
            status_code: None,
            error: Some("not sent: the endpoint is disabled".into()),
        }
    } else {
        client.attempt(delivery).await
    };
    let host = webhooks::host_of(&delivery.url);
    let recorded = webhooks::record_attempt(pool, delivery, &result, schedule, worker).await;
    let duration_ms = u64::try_from(result.duration.as_millis()).unwrap_or(u64::MAX);
    let (event, endpoint, attempt) = (&delivery.event_id, delivery.endpoint_id, delivery.attempt);
    let error = result.error.as_deref().unwrap_or_default();
    match recorded {
        Ok(Recorded::Succeeded) => {
            metrics::counter!("webhook_deliveries_total", "outcome" => "succeeded").increment(1);
            tracing::debug!(%event, %endpoint, %host, attempt, duration_ms, "webhook delivered");
        }
        Ok(Recorded::RetryAfter(wait)) => {
            metrics::counter!("webhook_attempts_failed_total").increment(1);
            tracing::warn!(%event, %endpoint, %host, attempt, duration_ms, error,
                retry_in_secs = wait.as_secs(), "webhook attempt failed; retry scheduled");
        }
        Ok(Recorded::Failed) => {
            metrics::counter!("webhook_deliveries_total", "outcome" => "failed").increment(1);
            tracing::warn!(%event, %endpoint, %host, attempt, error,
                "webhook delivery failed: its retry schedule is used up");
        }
        Ok(Recorded::EndpointWasDisabled) => {
            metrics::counter!("webhook_deliveries_total", "outcome" => "failed").increment(1);
            tracing::warn!(%event, %endpoint, %host, attempt, error,
                "webhook delivery failed: its endpoint was disabled meanwhile");
        }
        Ok(Recorded::EndpointDisabled) => {
            metrics::counter!("webhook_deliveries_total", "outcome" => "gone").increment(1);
            tracing::warn!(%event, %endpoint, %host, "the endpoint answered 410 Gone: disabled");
        }
        Ok(Recorded::Stale) => {
            tracing::info!(%event, %endpoint, attempt,
                "webhook attempt not recorded: its claim had run out and was taken again");
        }
        Err(e) => {
            tracing::warn!(%event, %endpoint, error = %e,
                "recording a webhook attempt failed; it will be made again");
        }
    }
}

//! Recording send outcomes in groups.
//!
//! Every outcome must move its item, its invitation and its batch's tally in one
//! transaction. Done one item per transaction, the items of a batch queue up on the
//! batch row's lock and on a WAL flush each, so a batch of 100 is recorded one item
//! at a time. The recorder takes whatever outcomes have arrived while the previous
//! group was committing and writes them together: still one transaction for an item
//! and its tally (so the tally is always exact), but one commit and one batch-row
//! update per group rather than per item.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    config::RetrySettings,
    db::delivery::{self as sql, Change, LockedItem},
    domain::{
        email::mask,
        states::{ItemReason, ItemStatus},
    },
    mail::SendError,
    queue::{self, NewTask, deliver::Delivery, deliver::retry_delay},
};

/// The most outcomes written in one transaction.
const MAX_GROUP: usize = 128;

/// What one send attempt ended in, to be recorded.
#[derive(Debug)]
pub struct Outcome {
    pub item_id: Uuid,
    /// The task that made the attempt: if the item names another one now, the outcome
    /// is stale (the item was cancelled or handed over) and is dropped.
    pub task_id: String,
    pub attempt: i32,
    pub result: Result<(), SendError>,
}

struct Pending {
    outcome: Outcome,
    reply: oneshot::Sender<Result<Delivery, String>>,
}

/// The handle tasks record through. The writer task lives as long as a handle does.
#[derive(Clone)]
pub struct Recorder {
    sender: mpsc::Sender<Pending>,
}

impl Recorder {
    pub fn start(pool: PgPool, retry: RetrySettings) -> Self {
        let (sender, receiver) = mpsc::channel(1024);
        tokio::spawn(write_groups(pool, retry, receiver));
        Self { sender }
    }

    /// Records one outcome; returns once its group is committed.
    pub async fn record(&self, outcome: Outcome) -> anyhow::Result<Delivery> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Pending { outcome, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the outcome recorder has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the outcome recorder dropped an outcome"))?
            .map_err(anyhow::Error::msg)
    }
}

async fn write_groups(pool: PgPool, retry: RetrySettings, mut receiver: mpsc::Receiver<Pending>) {
    while let Some(first) = receiver.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let outcomes: Vec<&Outcome> = group.iter().map(|p| &p.outcome).collect();
        let results = match write_group(&pool, &retry, &outcomes).await {
            Ok(results) => results.into_iter().map(Ok).collect(),
            // One outcome the database refuses must not fail its neighbours (each
            // failure re-runs a task, and a re-run re-sends): write them one by one.
            Err(e) if outcomes.len() > 1 => {
                tracing::warn!(error = %format!("{e:#}"), outcomes = outcomes.len(),
                    "recording a group failed; recording its outcomes one by one");
                let mut results = Vec::with_capacity(outcomes.len());
                for outcome in &outcomes {
                    results.push(
                        write_group(&pool, &retry, std::slice::from_ref(outcome))
                            .await
                            .map(|mut r| r.remove(0))
                            .map_err(|e| format!("recording the outcome failed: {e:#}")),
                    );
                }
                results
            }
            Err(e) => vec![Err(format!("recording the outcome failed: {e:#}"))],
        };
        for (pending, result) in group.into_iter().zip(results) {
            // The task may be gone (shutdown); its outcome is committed regardless.
            let _ = pending.reply.send(result);
        }
    }
}

/// One transaction for the whole group; results in the order of `outcomes`.
async fn write_group(
    pool: &PgPool,
    retry: &RetrySettings,
    outcomes: &[&Outcome],
) -> anyhow::Result<Vec<Delivery>> {
    let ids: Vec<Uuid> = outcomes.iter().map(|o| o.item_id).collect();
    let mut tx = pool.begin().await?;
    let items = sql::lock_items(&mut tx, &ids).await?;
    let mut changes = Vec::with_capacity(outcomes.len());
    let mut tasks: Vec<(Uuid, String, Duration)> = Vec::new();
    let mut results = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let item = items.iter().find(|i| i.id == outcome.item_id);
        let (change, delivery) = match item {
            Some(item) => decide(item, outcome, retry),
            None => (None, Delivery::NothingToDo),
        };
        if let Some(Change::Retry { item, task_id, .. }) = &change
            && let Delivery::RetryScheduled { delay, .. } = &delivery
        {
            tasks.push((*item, task_id.clone(), *delay));
        }
        changes.extend(change);
        results.push(delivery);
    }
    sql::apply(&mut tx, &items, &changes).await?;
    if !tasks.is_empty() {
        let new: Vec<NewTask<'_>> = tasks
            .iter()
            .map(|(item_id, task_id, delay)| NewTask {
                task_id,
                item_id: *item_id,
                run_after: Some(*delay),
            })
            .collect();
        queue::push(&mut tx, &new).await?;
    }
    tx.commit().await?;
    for (outcome, result) in outcomes.iter().zip(&results) {
        if let Some(item) = items.iter().find(|i| i.id == outcome.item_id) {
            log(item, outcome, result);
        }
    }
    Ok(results)
}

/// What an outcome means for its (locked) item: 2xx → sent; 5xx → rejected; anything
/// transient → a retry after the backoff delay, or `retries_exhausted` at the limit.
fn decide(
    item: &LockedItem,
    outcome: &Outcome,
    retry: &RetrySettings,
) -> (Option<Change>, Delivery) {
    if item.status != "pending" || item.task_id != outcome.task_id {
        // Cancelled (or handed to another task) while the message was on its way.
        return (None, Delivery::NothingToDo);
    }
    let finish = |status, reason: Option<ItemReason>, last_error: Option<&str>| Change::Finish {
        item: item.id,
        status,
        reason,
        last_error: last_error.map(str::to_owned),
    };
    match &outcome.result {
        Ok(()) => (Some(finish(ItemStatus::Sent, None, None)), Delivery::Sent),
        Err(SendError::Permanent(detail)) => {
            let reason = ItemReason::Rejected;
            (
                Some(finish(ItemStatus::Failed, Some(reason), Some(detail))),
                Delivery::Ended(reason),
            )
        }
        Err(SendError::Transient(detail)) => {
            let max = i32::try_from(retry.max_attempts).unwrap_or(i32::MAX);
            if outcome.attempt >= max {
                let reason = ItemReason::RetriesExhausted;
                return (
                    Some(finish(ItemStatus::Failed, Some(reason), Some(detail))),
                    Delivery::Ended(reason),
                );
            }
            let delay = retry_delay(retry, outcome.attempt);
            let run_at =
                Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            let change = Change::Retry {
                item: item.id,
                task_id: queue::new_task_id(),
                last_error: detail.clone(),
                run_at,
            };
            (
                Some(change),
                Delivery::RetryScheduled {
                    attempt: outcome.attempt,
                    delay,
                },
            )
        }
    }
}

fn log(item: &LockedItem, outcome: &Outcome, result: &Delivery) {
    let to = mask(&item.email);
    match (result, &outcome.result) {
        (Delivery::Sent, _) => {
            metrics::counter!("invites_sent_total").increment(1);
            tracing::info!(item = %item.id, batch = %item.batch_id, %to, attempt = outcome.attempt, "sent");
        }
        (Delivery::RetryScheduled { delay, .. }, Err(e)) => {
            metrics::counter!("invite_send_retries_total").increment(1);
            tracing::warn!(item = %item.id, %to, attempt = outcome.attempt,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %e.detail(), "send failed; retry scheduled");
        }
        (Delivery::Ended(reason), Err(e)) => {
            metrics::counter!("invites_ended_total", "reason" => reason.as_str()).increment(1);
            tracing::info!(item = %item.id, batch = %item.batch_id, %to, status = %reason.status(),
                reason = %reason, detail = %e.detail(), "item failed");
        }
        (Delivery::NothingToDo, _) => {
            tracing::info!(item = %item.id, status = %item.status, "item ended during its send");
        }
        _ => {}
    }
}

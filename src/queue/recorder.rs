//! Recording what each attempt ended in, in groups (see [`super::group`]).
//!
//! Every outcome moves its item, its invitation, its batch's tally and its queue task
//! in one transaction. Done one item per transaction, the items of a batch queue up on
//! the batch row's lock and on a WAL flush each; grouped, a batch of 100 is recorded
//! in a few transactions with one batch-row update each, and the tally is still exact
//! after every commit.
//!
//! The queue task is marked `Done` by the same statement, so a task is finished
//! exactly when its outcome is written, and apalis needs no ack transaction of its own
//! (see `queue::worker`).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgPool, Postgres, pool::PoolConnection};
use uuid::Uuid;

use crate::{
    config::RetrySettings,
    db::{
        self,
        delivery::PreparedItem,
        tasks::{self, NewTask, OutcomeRecord},
    },
    domain::{
        email::{mask, mask_addresses},
        ids::new_task_id,
        states::{AttemptOutcome, ItemReason, ItemStatus, WarningCode},
        warning::Warning,
    },
    mail::SendError,
    queue::{
        group::GroupWrite,
        throttle::{is_throttling, retry_hint},
    },
};

/// What recording one attempt's outcome did with its item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The mail server accepted the message.
    Sent,
    /// The item ended without a send (`already_invited`, `job_closed`, …) or failed.
    Ended(ItemReason),
    /// A transient failure; the next attempt is queued to run after `delay`.
    RetryScheduled { attempt: i32, delay: Duration },
    /// Nothing to do: the item is terminal already, belongs to a newer task, or is gone.
    NothingToDo,
}

/// What one attempt ended in, to be recorded.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The item as phase 1 read it, under its lock.
    pub(crate) item: Box<PreparedItem>,
    /// The task that made the attempt: if the item names another one now, or is no
    /// longer pending, the outcome is stale (cancelled while the message was on its
    /// way) and is dropped.
    pub(crate) task_id: String,
    pub(crate) attempt: i32,
    pub(crate) result: Attempted,
}

/// What happened to the item.
#[derive(Debug)]
pub(crate) enum Attempted {
    /// The message was handed to the mail server: accepted (with the server's reply;
    /// none for the file transport), or refused with a reply.
    Sent(Result<Option<String>, SendError>),
    /// Phase 1 ended the item without a send (`job_closed`, `invalid_email`,
    /// `already_invited`), with the detail to keep as its last error.
    NotSent {
        reason: ItemReason,
        detail: Option<String>,
    },
    /// Not sent now: its recipient domain is paused (the server throttled it) or busy.
    /// It is tried again `after` this, and the attempt is given back.
    Deferred { after: Duration },
}

/// Writes groups of outcomes.
pub(crate) struct Recorder {
    pub(crate) pool: PgPool,
    pub(crate) retry: RetrySettings,
    /// `mail.suppress_rejected`: a bad-mailbox refusal puts the address on the list.
    pub(crate) suppress_rejected: bool,
    /// This process, as the attempt history names it (`worker.name`, or host:pid).
    pub(crate) worker: String,
}

impl GroupWrite for Recorder {
    type Request = Outcome;
    type Response = Delivery;
    type Conn = PoolConnection<Postgres>;
    const NAME: &'static str = "outcome";

    /// Outcomes for one item are decided together (see `write`).
    fn key(outcome: &Outcome) -> Option<u128> {
        Some(outcome.item.id.as_u128())
    }

    async fn connect(&self) -> anyhow::Result<Self::Conn> {
        Ok(db::writer_connection(&self.pool).await?)
    }

    /// One statement for the whole group, in its own transaction; with a retry among
    /// the outcomes, the retry's new queue task is pushed in the same transaction.
    async fn write(
        &self,
        conn: &mut PoolConnection<Postgres>,
        outcomes: &[Outcome],
    ) -> anyhow::Result<Vec<Delivery>> {
        // The same task's outcome twice in one group (the task ran twice) acts once.
        // Outcomes of different tasks for one item all go to the statement, which
        // applies only the one whose task the item names.
        // Of one task's outcomes, the one that says most: accepted, then refused, then
        // a transient failure (a duplicate run's 4xx must not schedule a retry for a
        // message the other run got accepted).
        let mut best: HashMap<(Uuid, &str), usize> = HashMap::with_capacity(outcomes.len());
        for (i, o) in outcomes.iter().enumerate() {
            let slot = best.entry((o.item.id, o.task_id.as_str())).or_insert(i);
            if rank(&o.result) < rank(&outcomes[*slot].result) {
                *slot = i;
            }
        }
        let decisions: Vec<Option<Decision>> = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                (best.get(&(o.item.id, o.task_id.as_str())) == Some(&i))
                    .then(|| decide(o, &self.retry, self.suppress_rejected))
            })
            .collect();
        let records: Vec<OutcomeRecord<'_>> = outcomes
            .iter()
            .zip(&decisions)
            .filter_map(|(o, d)| d.as_ref().map(|d| d.record(o)))
            .collect();
        let tasks: Vec<&str> = best.keys().map(|(_, task)| *task).collect();
        // (the outcome's task, the retry's new task)
        let retries: Vec<(&str, NewTask<'_>)> = outcomes
            .iter()
            .zip(&decisions)
            .filter_map(|(o, d)| {
                let (task_id, _, delay) = d.as_ref()?.retry.as_ref()?;
                let new = NewTask {
                    task_id,
                    item_id: o.item.id,
                    run_after: Some(*delay),
                };
                Some((o.task_id.as_str(), new))
            })
            .collect();

        let applied: HashSet<(Uuid, String)> = if retries.is_empty() {
            tasks::record_outcomes(conn, &records, &tasks, &self.worker).await?
        } else {
            let mut tx = conn.begin().await?;
            let applied = tasks::record_outcomes(&mut tx, &records, &tasks, &self.worker).await?;
            let due: Vec<NewTask<'_>> = retries
                .into_iter()
                .filter(|(task, new)| {
                    applied
                        .iter()
                        .any(|(item, t)| *item == new.item_id && t == task)
                })
                .map(|(_, new)| new)
                .collect();
            if !due.is_empty() {
                tasks::push(&mut tx, &due).await?;
            }
            tx.commit().await?;
            applied
        }
        .into_iter()
        .collect();

        Ok(outcomes
            .iter()
            .zip(decisions)
            .map(|(outcome, decision)| {
                let key = (outcome.item.id, outcome.task_id.clone());
                let delivery = match decision {
                    Some(d) if applied.contains(&key) => d.delivery,
                    _ => Delivery::NothingToDo,
                };
                log(outcome, &delivery);
                delivery
            })
            .collect())
    }
}

/// Which of a task's outcomes wins when it ran twice: lower is better.
fn rank(result: &Attempted) -> u8 {
    match result {
        Attempted::Sent(Ok(_)) => 0,
        Attempted::Sent(Err(SendError::Permanent(_))) | Attempted::NotSent { .. } => 1,
        Attempted::Sent(Err(SendError::Transient(_))) | Attempted::Deferred { .. } => 2,
    }
}

/// What an outcome will do to its item, if the item is still its task's.
struct Decision {
    status: ItemStatus,
    reason: Option<ItemReason>,
    last_error: Option<String>,
    /// New task id, when it is due, and the delay.
    retry: Option<(String, DateTime<Utc>, Duration)>,
    warning: Option<String>,
    /// Put the item's address on the suppression list.
    suppress: bool,
    /// The attempt phase 1 counted was not made (deferred): give it back.
    give_back_attempt: bool,
    /// The attempt's row in the history: its outcome (none if no attempt was made) and
    /// the server's reply, addresses masked.
    attempt: Option<AttemptOutcome>,
    reply: Option<String>,
    delivery: Delivery,
}

impl Decision {
    fn record<'a>(&'a self, outcome: &'a Outcome) -> OutcomeRecord<'a> {
        OutcomeRecord {
            item: outcome.item.id,
            task_id: &outcome.task_id,
            status: self.status,
            reason: self.reason,
            last_error: self.last_error.as_deref(),
            retry: self
                .retry
                .as_ref()
                .map(|(task, at, _)| (task.as_str(), *at)),
            warning: self.warning.clone(),
            suppress: self.suppress.then_some(outcome.item.email.as_str()),
            give_back_attempt: self.give_back_attempt,
            attempt: self.attempt,
            reply: self.reply.as_deref(),
        }
    }
}

/// What an outcome means: 2xx → sent; 5xx → rejected (a bad-mailbox reply, 5.1.x, also
/// puts the address on the suppression list when `suppress_rejected`); anything
/// transient → a retry after the backoff delay, or `retries_exhausted` at the limit; an
/// ending of phase 1 as it is (`already_invited` also warns on the batch).
fn decide(outcome: &Outcome, retry: &RetrySettings, suppress_rejected: bool) -> Decision {
    let end = |reason: ItemReason, last_error: Option<&str>| Decision {
        status: reason.status(),
        reason: Some(reason),
        last_error: last_error.map(str::to_owned),
        retry: None,
        warning: None,
        suppress: false,
        give_back_attempt: false,
        attempt: Some(AttemptOutcome::ending(reason)),
        reply: None,
        delivery: Delivery::Ended(reason),
    };
    // What the history keeps of a reply: the server's words, no one's address.
    let reply = |text: &str| Some(mask_addresses(text));
    match &outcome.result {
        Attempted::NotSent { reason, detail } => {
            let mut decision = end(*reason, detail.as_deref());
            if *reason == ItemReason::AlreadyInvited {
                decision.warning = Some(already_invited(&outcome.item));
            }
            decision
        }
        Attempted::Sent(Ok(accepted)) => Decision {
            status: ItemStatus::Sent,
            reason: None,
            last_error: None,
            retry: None,
            warning: None,
            suppress: false,
            give_back_attempt: false,
            attempt: Some(AttemptOutcome::Sent),
            reply: accepted.as_deref().and_then(reply),
            delivery: Delivery::Sent,
        },
        Attempted::Sent(Err(SendError::Permanent(detail))) => {
            let mut decision = end(ItemReason::Rejected, Some(detail));
            decision.suppress = suppress_rejected && is_bad_mailbox(detail);
            decision.reply = reply(detail);
            decision
        }
        Attempted::Deferred { after } => {
            let run_at =
                Utc::now() + chrono::Duration::from_std(*after).unwrap_or(chrono::Duration::MAX);
            Decision {
                status: ItemStatus::Pending,
                reason: None,
                last_error: None,
                retry: Some((new_task_id(), run_at, *after)),
                warning: None,
                suppress: false,
                give_back_attempt: true,
                attempt: None,
                reply: None,
                delivery: Delivery::RetryScheduled {
                    attempt: outcome.attempt - 1,
                    delay: *after,
                },
            }
        }
        Attempted::Sent(Err(SendError::Transient(detail))) => {
            let max = i32::try_from(retry.max_attempts).unwrap_or(i32::MAX);
            if outcome.attempt >= max {
                let mut decision = end(ItemReason::RetriesExhausted, Some(detail));
                decision.reply = reply(detail);
                return decision;
            }
            // A throttling reply paused the domain for its hint or the backoff; the
            // next attempt waits at least as long.
            let backoff = retry_delay(retry, outcome.attempt);
            let delay = match is_throttling(detail).then(|| retry_hint(detail)).flatten() {
                Some(hint) => hint.max(backoff),
                None => backoff,
            };
            let run_at =
                Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            Decision {
                status: ItemStatus::Pending,
                reason: None,
                last_error: Some(detail.clone()),
                retry: Some((new_task_id(), run_at, delay)),
                warning: None,
                suppress: false,
                give_back_attempt: false,
                attempt: Some(AttemptOutcome::Transient),
                reply: reply(detail),
                delivery: Delivery::RetryScheduled {
                    attempt: outcome.attempt,
                    delay,
                },
            }
        }
    }
}

/// A reply that says the recipient's mailbox is bad, by its enhanced status: 5.1.1 (no
/// such mailbox), 5.1.2 (no such domain), 5.1.3 (bad address syntax), 5.1.6 (moved)
/// or 5.1.10 (the domain accepts no mail). Other 5.1.x codes can be about the sender
/// (`550 5.1.0 <from>: Sender address rejected`): those must not suppress a candidate.
fn is_bad_mailbox(reply: &str) -> bool {
    let enhanced = reply.split_whitespace().nth(1).unwrap_or_default();
    matches!(enhanced, "5.1.1" | "5.1.2" | "5.1.3" | "5.1.6" | "5.1.10")
        && !reply.to_ascii_lowercase().contains("sender")
}

/// The batch warning for a candidate skipped as already invited, as JSON.
fn already_invited(item: &PreparedItem) -> String {
    let warning = Warning {
        candidate_id: item.candidate_id.clone(),
        code: WarningCode::AlreadyInvited,
        message: format!(
            "{} already holds a live invitation for {}; skipped (on_duplicate: skip)",
            item.candidate_id, item.job_id
        ),
    };
    serde_json::to_string(&warning).unwrap_or_default()
}

/// Logs an outcome (the address masked; with the item's batch and the id of the request
/// that created it) and counts it in the metrics.
fn log(outcome: &Outcome, result: &Delivery) {
    let item = &outcome.item;
    let to = mask(&item.email);
    let request_id = item.request_id.as_deref().unwrap_or_default();
    match (result, &outcome.result) {
        (Delivery::Sent, _) => {
            metrics::counter!("invites_sent_total").increment(1);
            tracing::info!(item = %item.id, batch = %item.batch_id, request_id = %request_id, %to,
                attempt = outcome.attempt, "sent");
        }
        (Delivery::RetryScheduled { delay, .. }, Attempted::Deferred { .. }) => {
            tracing::debug!(item = %item.id, batch = %item.batch_id, request_id = %request_id,
                %to, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "not sent now: the recipient's domain is paused or busy; deferred");
        }
        (Delivery::RetryScheduled { delay, .. }, Attempted::Sent(Err(e))) => {
            metrics::counter!("invite_send_retries_total").increment(1);
            tracing::warn!(item = %item.id, batch = %item.batch_id, request_id = %request_id, %to,
                attempt = outcome.attempt,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %mask_addresses(e.detail()), "send failed; retry scheduled");
        }
        (Delivery::Ended(reason), Attempted::Sent(Err(e))) => {
            metrics::counter!("invites_ended_total", "reason" => reason.as_str()).increment(1);
            tracing::info!(item = %item.id, batch = %item.batch_id, request_id = %request_id, %to,
                status = %reason.status(), reason = %reason, detail = %mask_addresses(e.detail()),
                "item failed");
        }
        (Delivery::Ended(reason), Attempted::NotSent { detail, .. }) => {
            metrics::counter!("invites_ended_total", "reason" => reason.as_str()).increment(1);
            tracing::info!(item = %item.id, batch = %item.batch_id, request_id = %request_id, %to,
                status = %reason.status(), reason = %reason,
                detail = %mask_addresses(detail.as_deref().unwrap_or("")),
                "item ended without a send");
        }
        (Delivery::NothingToDo, _) => {
            tracing::info!(item = %item.id, batch = %item.batch_id, request_id = %request_id,
                "outcome not recorded: the item was cancelled or taken by another task meanwhile");
        }
        _ => {}
    }
}

/// The wait before attempt `attempt + 1`: exponential from `initial_delay_ms` by
/// `multiplier`, capped at `max_delay_ms` (backon's schedule), then spread by
/// ±`jitter` so a burst of failures does not come back as a burst.
pub(crate) fn retry_delay(retry: &RetrySettings, attempt: i32) -> Duration {
    let nominal = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(retry.initial_delay_ms))
        .with_max_delay(Duration::from_millis(retry.max_delay_ms))
        .with_factor(retry.multiplier as f32)
        .without_max_times()
        .build()
        .nth(usize::try_from(attempt.max(1) - 1).unwrap_or(0))
        .unwrap_or(Duration::from_millis(retry.max_delay_ms));
    let spread = 1.0 + retry.jitter * (rand::random::<f64>() * 2.0 - 1.0);
    nominal.mul_f64(spread.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(jitter: f64) -> RetrySettings {
        RetrySettings {
            max_attempts: 8,
            initial_delay_ms: 5_000,
            max_delay_ms: 900_000,
            multiplier: 3.0,
            jitter,
        }
    }

    #[test]
    fn only_a_reply_about_the_recipients_mailbox_suppresses() {
        for bad in [
            "550 5.1.1 user unknown",
            "550 5.1.1 <gone@example.com>: Recipient address rejected",
            "550 5.1.2 host unknown",
            "553 5.1.3 bad address syntax",
            "551 5.1.6 mailbox moved",
            "556 5.1.10 domain accepts no mail",
        ] {
            assert!(is_bad_mailbox(bad), "{bad}");
        }
        for not in [
            "550 5.1.0 <interviews@example.com>: Sender address rejected: User unknown",
            "550 5.1.1 Sender unknown",
            "550 5.7.1 relaying denied",
            "552 5.2.2 mailbox full",
            "550 no enhanced code",
        ] {
            assert!(!is_bad_mailbox(not), "{not}");
        }
    }

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap() {
        let r = retry(0.0);
        let secs: Vec<u64> = (1..=8).map(|a| retry_delay(&r, a).as_secs()).collect();
        assert_eq!(secs, vec![5, 15, 45, 135, 405, 900, 900, 900]);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let r = retry(0.2);
        for _ in 0..200 {
            let d = retry_delay(&r, 2).as_secs_f64();
            assert!((12.0..=18.0).contains(&d), "{d}");
        }
    }
}

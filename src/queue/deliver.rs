//! Delivering one item: the core of a send-invite task, callable without the queue.
//!
//! Two short transactions around the send, none held while talking to the mail
//! server:
//! 1. lock the item; return early if it is terminal or no longer ours; skip it when the
//!    job is closed or the candidate already holds a live invitation (`on_duplicate:
//!    skip`); fail it when the address is invalid; otherwise mint its invitation (once:
//!    every attempt reuses it) and count the attempt;
//! 2. send;
//! 3. record the outcome with the batch tally, or schedule the next attempt as a new
//!    queue task, through the [`Recorder`], which writes outcomes in groups.
//!
//! Safe to run twice for one task: the second run finds the item terminal, or finds a
//! different `task_id` on it, and does nothing.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    config::{RetrySettings, Settings},
    db::delivery::{self as sql, Change, LockedItem},
    domain::{email::CandidateEmail, email::mask, states::ItemReason, token::LinkToken},
    mail::{
        Mailer, SendError,
        render::{InviteEmail, message_id},
    },
    queue::recorder::{Outcome, Recorder},
};

/// What one run of a task did with its item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The mail server accepted the message.
    Sent,
    /// The item ended without a send (`already_invited`, `job_closed`, …) or failed.
    Ended(ItemReason),
    /// A transient failure; the next attempt is queued to run after `delay`.
    RetryScheduled { attempt: i32, delay: Duration },
    /// Nothing to do: the item is terminal already, belongs to a newer task, or is gone.
    NothingToDo,
}

/// Everything a delivery needs; one per process, shared by all tasks.
pub struct Deliverer {
    pub pool: PgPool,
    pub mailer: Arc<Mailer>,
    pub settings: Arc<Settings>,
    /// Writes outcomes (phase 3) in groups.
    pub recorder: Recorder,
}

impl Deliverer {
    /// Runs one attempt for `item_id` on behalf of the queue task `task_id`.
    pub async fn deliver(&self, item_id: Uuid, task_id: &str) -> anyhow::Result<Delivery> {
        match self.prepare(item_id, task_id).await? {
            None => Ok(Delivery::NothingToDo),
            Some(Prepared::Done(outcome)) => Ok(outcome),
            Some(Prepared::Send {
                item,
                invitation_id,
                attempt,
            }) => {
                let result = self.send(&item, invitation_id).await;
                let outcome = Outcome {
                    item_id,
                    task_id: task_id.to_owned(),
                    attempt,
                    result,
                };
                self.recorder.record(outcome).await
            }
        }
    }

    /// Phase 1, in one transaction.
    async fn prepare(&self, item_id: Uuid, task_id: &str) -> anyhow::Result<Option<Prepared>> {
        let mut tx = self.pool.begin().await?;
        let Some(mut item) = sql::lock_item(&mut tx, item_id).await? else {
            return Ok(None);
        };
        if item.status != "pending" || item.task_id != task_id {
            return Ok(None);
        }
        if item.batch_status == "queued" {
            sql::mark_batch_running(&mut tx, item.batch_id).await?;
        }

        let ending = if item.job_status == "closed" {
            Some((ItemReason::JobClosed, None))
        } else if let Err(e) = CandidateEmail::parse(&item.email) {
            Some((ItemReason::InvalidEmail, Some(e.to_string())))
        } else if item.invitation_id.is_none()
            && item.on_duplicate == "skip"
            && self.already_invited(&mut tx, &item).await?
        {
            Some((ItemReason::AlreadyInvited, None))
        } else {
            None
        };
        if let Some((reason, why)) = ending {
            let change = Change::Finish {
                item: item.id,
                status: reason.status(),
                reason: Some(reason),
                last_error: why.clone(),
            };
            sql::apply(&mut tx, std::slice::from_ref(&item), &[change]).await?;
            tx.commit().await?;
            log_end(&item, reason, why.as_deref());
            return Ok(Some(Prepared::Done(Delivery::Ended(reason))));
        }

        // The invitation is minted once; every later attempt of the item reuses it, so
        // every attempt carries the same link.
        let (invitation_id, mint) = match item.invitation_id {
            Some(id) => (id, None),
            None => {
                let id = Uuid::now_v7();
                let token_hash = LinkToken::derive(self.secret(), id).hash();
                let ttl_hours = self.settings.invite.ttl_hours;
                (
                    id,
                    Some(sql::Mint {
                        id,
                        token_hash,
                        ttl_hours,
                    }),
                )
            }
        };
        let attempt = sql::begin_attempt(&mut tx, &item, mint.as_ref()).await?;
        item.invitation_id = Some(invitation_id);
        tx.commit().await?;
        Ok(Some(Prepared::Send {
            item: Box::new(item),
            invitation_id,
            attempt,
        }))
    }

    /// Phase 2: build the message from stored state and hand it to the mailer.
    async fn send(&self, item: &LockedItem, invitation_id: Uuid) -> Result<(), SendError> {
        let address: lettre::Address = item
            .email
            .trim()
            .parse()
            .map_err(|e| SendError::Permanent(format!("invalid address: {e}")))?;
        let token = LinkToken::derive(self.secret(), invitation_id);
        let link = format!("{}/{}", self.settings.invite.link_base_url, token.expose());
        let message_id = message_id(item.id, self.mailer.from());
        let email = InviteEmail {
            to: &address,
            to_name: item.name.as_deref(),
            job_title: &item.job_title,
            duration_minutes: item.duration_minutes,
            link: &link,
            ttl_hours: self.settings.invite.ttl_hours,
            message_id: &message_id,
        };
        let message = email
            .build(self.mailer.from())
            .map_err(|e| SendError::Permanent(format!("cannot build the message: {e}")))?;
        self.mailer.send(&message_id, &message).await
    }

    /// Whether the candidate already holds a live invitation for the job; if so, notes
    /// the warning on the batch. Holds a per-(job, candidate) lock until the
    /// transaction ends, so two batches racing for one candidate cannot both invite.
    async fn already_invited(
        &self,
        tx: &mut sqlx::PgConnection,
        item: &LockedItem,
    ) -> anyhow::Result<bool> {
        sql::lock_candidate_for_job(tx, &item.job_id, &item.candidate_id).await?;
        if !sql::has_other_live_invitation(tx, &item.job_id, &item.candidate_id, None).await? {
            return Ok(false);
        }
        let message = format!(
            "{} already holds a live invitation for {}; skipped (on_duplicate: skip)",
            item.candidate_id, item.job_id
        );
        let code = ItemReason::AlreadyInvited.as_str();
        sql::add_warning(tx, item.batch_id, &item.candidate_id, code, &message).await?;
        Ok(true)
    }

    fn secret(&self) -> &[u8] {
        self.settings.invite.token_secret.expose().as_bytes()
    }
}

enum Prepared {
    Send {
        item: Box<LockedItem>,
        invitation_id: Uuid,
        attempt: i32,
    },
    Done(Delivery),
}

fn log_end(item: &LockedItem, reason: ItemReason, detail: Option<&str>) {
    metrics::counter!("invites_ended_total", "reason" => reason.as_str()).increment(1);
    tracing::info!(
        item = %item.id, batch = %item.batch_id, to = %mask(&item.email),
        status = %reason.status(), reason = %reason, detail = detail.unwrap_or(""),
        "item ended without a send"
    );
}

/// The wait before attempt `attempt + 1`: exponential from `initial_delay_ms` by
/// `multiplier`, capped at `max_delay_ms` (backon's schedule), then spread by
/// ±`jitter` so a burst of failures does not come back as a burst.
pub fn retry_delay(retry: &RetrySettings, attempt: i32) -> Duration {
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

//! Delivering one item: the core of a send-invite task, callable without the queue.
//!
//! Three steps, no transaction held while talking to the mail server:
//! 1. prepare ([`super::prepare`]): lock the item, decide whether it ends without a
//!    send, mint its invitation and count the attempt; committed before anything is
//!    sent;
//! 2. send;
//! 3. record the outcome with the batch tally and the queue task, or schedule the next
//!    attempt as a new queue task ([`super::recorder`]).
//!
//! Steps 1 and 3 are written in groups with the other tasks in flight
//! ([`super::group`]): one transaction for many items, each item still exact.
//!
//! The task returns once step 3 is handed to the recorder, as apalis' own acks are
//! written after their handler returns: its slot among the `worker.concurrency` tasks
//! in flight goes to the next task while the outcome waits for its group (see
//! docs/performance.md). Messages sent and not yet recorded are bounded all the same
//! (`Deliverer::in_flight`), so a crash repeats at most `worker.concurrency` messages
//! per process.
//!
//! Safe to run twice for one task: the second run finds the item terminal, or finds a
//! different `task_id` on it, and does nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    config::Settings,
    db::{
        delivery::PreparedItem,
        tasks::{self, TaskEnd},
    },
    domain::{email::CandidateEmail, states::ItemReason, token::LinkToken},
    mail::{
        Mailer, SendError,
        render::{InviteEmail, message_id},
    },
    queue::{
        group::Grouped,
        prepare::{Prepare, Prepared, Preparer},
        recorder::{Attempted, Outcome, Recorder, retry_delay},
        throttle::{DomainGate, Entry, domain_of, is_throttling, retry_hint},
    },
};

/// How long a send waits for a place among its domain's sends. Short: the wait holds
/// one of the worker's task slots, and a slow domain must not hold them all.
const DOMAIN_PLACE_WAIT: Duration = Duration::from_secs(1);

/// How long an item waits, unsent and without using an attempt, when its domain's
/// places stayed taken for all of [`DOMAIN_PLACE_WAIT`].
const BUSY_DOMAIN_DEFER: Duration = Duration::from_secs(1);

/// How long after phase 1 stamped an attempt as on its way (`sending_at`) its send may
/// still start; later, the item is deferred instead (unsent, the attempt given back).
/// A cancel or an erasure waits for a send on its way for `smtp.timeout_secs` + 5 s
/// after that stamp ([`crate::config::Settings::cancel_window`]): a send that starts
/// within this budget has ended (the exchange is bounded by `smtp.timeout_secs`) before
/// that wait gives up, with time left to write its outcome. Only a wait for an
/// in-flight permit or a domain place can use it up (a server that stalls every send).
const SEND_START_BUDGET: Duration = Duration::from_secs(2);

/// The most items prepared, or outcomes recorded, in one transaction.
const MAX_GROUP: usize = 128;

/// Everything a delivery needs; one per process, shared by all tasks.
pub(crate) struct Deliverer {
    pub(crate) pool: PgPool,
    mailer: Arc<Mailer>,
    settings: Arc<Settings>,
    preparer: Grouped<Preparer>,
    recorder: Grouped<Recorder>,
    /// One permit per message in flight: from just before its send until its outcome is
    /// committed (also for an ending without a send, so a shutdown can wait for every
    /// outcome). `worker.concurrency` permits: a crash repeats at most that many
    /// messages per process, as when the task waited for its outcome.
    in_flight: Arc<Semaphore>,
    /// Per recipient domain: places in flight, and pauses after throttling replies.
    domains: DomainGate,
}

impl Deliverer {
    /// Starts the group writers of phases 1 and 3.
    pub(crate) fn start(pool: PgPool, mailer: Arc<Mailer>, settings: Arc<Settings>) -> Self {
        let preparer = Preparer {
            pool: pool.clone(),
            settings: settings.clone(),
        };
        let recorder = Recorder {
            pool: pool.clone(),
            retry: settings.retry.clone(),
            suppress_rejected: settings.mail.suppress_rejected,
            worker: super::process::process_name(&settings),
        };
        Self {
            pool,
            mailer,
            in_flight: Arc::new(Semaphore::new(max_in_flight(&settings) as usize)),
            domains: DomainGate::new(settings.mail.per_domain_concurrency),
            settings,
            preparer: Grouped::start(preparer, MAX_GROUP),
            recorder: Grouped::start(recorder, MAX_GROUP),
        }
    }

    /// Runs one attempt for `item_id` on behalf of the queue task `task_id`: phases 1
    /// and 2 here, phase 3 in the background ([`Self::record_in_background`]). Returns
    /// once the outcome is handed to the recorder, so the task's slot among the tasks in
    /// flight is free again while its outcome is written with the next group.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        item_id: Uuid,
        task_id: &str,
    ) -> anyhow::Result<()> {
        let task_id = task_id.to_owned();
        let prepare = Prepare {
            item_id,
            task_id: task_id.clone(),
        };
        // The rate limit before phase 1: phase 1 stamps the attempt as on its way
        // (`sending_at`), which a cancel or an erasure waits for, and a message queued
        // behind a low `mail.rate_per_second` is not on its way yet. (A place taken by
        // an item that then ends unsent is not given back: the rate is a ceiling.)
        let started = Instant::now();
        self.mailer.until_ready().await;
        let stamped = phase_done("rate", started);
        let prepared = self.preparer.submit(prepare).await?;
        let started = phase_done("prepare", stamped);
        // What the attempt does: send with this invitation, or end the item unsent.
        let (item, attempt, action) = match prepared {
            Prepared::NothingToDo => {
                self.finish_task(&task_id, TaskEnd::Done).await;
                return Ok(());
            }
            // The other run of this task in the group finishes it.
            Prepared::SameTaskTwice => return Ok(()),
            Prepared::NotSent {
                item,
                reason,
                detail,
            } => (item, 0, Err(Attempted::NotSent { reason, detail })),
            Prepared::Send {
                item,
                invitation_id,
                attempt,
            } => match CandidateEmail::parse(&item.email) {
                Ok(_) => (item, attempt, Ok(invitation_id)),
                // Only for an item written before addresses were checked at write time
                // (`batch_items.email_error`): an invalid address is never sent to.
                Err(e) => {
                    let detail = Some(e.to_string());
                    let reason = ItemReason::InvalidEmail;
                    (item, attempt, Err(Attempted::NotSent { reason, detail }))
                }
            },
        };
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| anyhow::anyhow!("the deliverer has stopped"))?;
        let started = phase_done("wait", started);
        let result = match action {
            Ok(invitation_id) => {
                let attempt = SendAttempt {
                    invitation_id,
                    task_id: &task_id,
                    attempt,
                    stamped,
                };
                self.send_unless_domain_waits(&item, attempt, started).await
            }
            Err(not_sent) => not_sent,
        };
        let outcome = Outcome {
            item,
            task_id,
            attempt,
            result,
        };
        self.record_in_background(outcome, permit);
        Ok(())
    }

    /// Phase 2 through the recipient domain's gate: sends when the domain has a place
    /// and is not paused, else defers the item (no send, the attempt given back); also
    /// defers it when the send could not start within [`SEND_START_BUDGET`] of phase 1.
    /// A throttling reply pauses the domain before its place is released, so a send
    /// waiting for the place sees the pause.
    async fn send_unless_domain_waits(
        &self,
        item: &PreparedItem,
        send: SendAttempt<'_>,
        started: Instant,
    ) -> Attempted {
        let SendAttempt {
            invitation_id,
            task_id,
            attempt,
            stamped,
        } = send;
        let domain = domain_of(&item.email);
        let place = match self.domains.enter(&domain, DOMAIN_PLACE_WAIT).await {
            Entry::Go(place) => place,
            Entry::Paused(left) => return Attempted::Deferred { after: left },
            Entry::Busy => {
                return Attempted::Deferred {
                    after: BUSY_DOMAIN_DEFER,
                };
            }
        };
        if stamped.elapsed() > SEND_START_BUDGET {
            tracing::warn!(task = %task_id, item = %item.id,
                "the send could not start soon enough after it was stamped as on its way; deferred");
            return Attempted::Deferred {
                after: BUSY_DOMAIN_DEFER,
            };
        }
        let span = tracing::info_span!("send", task = %task_id, item = %item.id,
            batch = %item.batch_id,
            request_id = %item.request_id.as_deref().unwrap_or_default());
        let sent = self.send(item, invitation_id).instrument(span).await;
        phase_done("send", started);
        if let Err(SendError::Transient(reply)) = &sent
            && is_throttling(reply)
        {
            let pause =
                retry_hint(reply).unwrap_or_else(|| retry_delay(&self.settings.retry, attempt));
            metrics::counter!("invite_smtp_throttled_total").increment(1);
            tracing::warn!(%domain, pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "the mail server throttles this domain: pausing it");
            self.domains.pause(&domain, pause);
        }
        drop(place);
        Attempted::Sent(sent)
    }

    /// Phase 3 without the task waiting for it, the way apalis' own acks are written
    /// after their handler has returned: the outcome joins the recorder's next group,
    /// and `permit` (see [`Self::in_flight`]) is let go once it is committed. If it
    /// cannot be written, the task is ended as failed and runs again (its item is
    /// still `pending`, so a message already accepted may go out twice: the same
    /// bound as a crash, at most `worker.concurrency` per process).
    fn record_in_background(self: &Arc<Self>, outcome: Outcome, permit: OwnedSemaphorePermit) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let (task, item) = (outcome.task_id.clone(), outcome.item.id);
            let started = Instant::now();
            let recorded = this.recorder.submit(outcome).await;
            phase_done("record", started);
            match recorded {
                Ok(delivery) => tracing::debug!(%task, %item, ?delivery, "task done"),
                Err(e) => {
                    // A database fault: the task runs again shortly (up to its max_attempts).
                    tracing::error!(%task, %item, error = %format!("{e:#}"), "task failed");
                    this.finish_task(&task, TaskEnd::Failed(&format!("{e:#}")))
                        .await;
                }
            }
            drop(permit);
        });
    }

    /// Waits, up to `timeout`, until every outcome handed to the recorder is written;
    /// false if some are not. For a clean shutdown, after the workers have stopped.
    pub(crate) async fn wait_for_outcomes(&self, timeout: Duration) -> bool {
        let all = max_in_flight(&self.settings);
        tokio::time::timeout(timeout, self.in_flight.acquire_many(all))
            .await
            .is_ok_and(|permits| permits.is_ok())
    }

    /// Ends a task the recorder did not finish ([`tasks::finish_task`]), trying a few
    /// times; if the database stays unreachable, maintenance rescues the task later.
    pub(crate) async fn finish_task(&self, task_id: &str, end: TaskEnd<'_>) {
        let attempts = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_times(4);
        let result = (|| async {
            let mut conn = self.pool.acquire().await?;
            tasks::finish_task(&mut conn, task_id, end).await
        })
        .retry(attempts)
        .await;
        if let Err(e) = result {
            tracing::error!(task = %task_id, ?end, error = %e,
                "could not write how the task ended; maintenance will rescue it");
        }
    }

    /// Phase 2: build the message from stored state and hand it to the mailer; answers
    /// the server's reply when it accepted the message.
    async fn send(
        &self,
        item: &PreparedItem,
        invitation_id: Uuid,
    ) -> Result<Option<String>, SendError> {
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
        self.mailer.send_for_reply(&message_id, &message).await
    }

    fn secret(&self) -> &[u8] {
        self.settings.invite.token_secret.expose().as_bytes()
    }
}

/// What phase 1 decided to send, for phase 2.
struct SendAttempt<'a> {
    invitation_id: Uuid,
    task_id: &'a str,
    attempt: i32,
    /// No later than the moment phase 1 stamped the attempt as on its way.
    stamped: Instant,
}

/// How many messages may be in flight at once (`Deliverer::in_flight`).
fn max_in_flight(settings: &Settings) -> u32 {
    u32::try_from(settings.worker.concurrency).unwrap_or(u32::MAX)
}

/// Records how long a phase of a delivery took (waiting for its group included);
/// returns when the next phase starts.
fn phase_done(phase: &'static str, started: Instant) -> Instant {
    let now = Instant::now();
    metrics::histogram!("invite_phase_seconds", "phase" => phase)
        .record(now.duration_since(started).as_secs_f64());
    now
}

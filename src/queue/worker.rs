//! Worker assembly: apalis-postgres workers that run send-invite tasks, woken by
//! LISTEN/NOTIFY for new tasks and by an interval poll for retries that come due.
//!
//! Traps of apalis 1.0 handled here (see docs/architecture.md):
//! - any database error ends a worker: a supervisor loop starts a new one after a
//!   backoff, under a **new name** (a restarted worker with the old name would leave
//!   the dead one's tasks `Running` for good);
//! - names are unique per process (host, pid, start time) so two processes never clash;
//! - orphan recovery is by heartbeat: `worker.heartbeat_secs` and
//!   `worker.recover_after_secs` bound how long a dead worker's tasks wait;
//! - payloads are decoded in the handler, so one bad row is killed, not fatal;
//! - no in-memory retry layer: retries are scheduled durably by the handler.
//!
//! Tasks are finished by this crate, not by apalis' acks (`persist_results(false)`,
//! `lock_tasks(false)`): the recorder marks a task `Done` in the transaction that
//! records its outcome, and `db::tasks::finish_task` ends the others (nothing to do,
//! undecodable, a database fault). apalis' ack and lock updates cost a transaction per
//! fetch; its ack query reads every index entry a worker's name ever had, live or
//! dead, and it stalls dispatch while it runs. If a task's end cannot be written,
//! maintenance rescues it after a while ([`super::maintenance`]).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::*;
use apalis_postgres::{Config, PostgresStorage, Pubsub};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    db::tasks::{QUEUE, SendInvite, TaskEnd},
    queue::{deliver::Deliverer, process},
};

/// Hands task payloads to the handler as the stored bytes. apalis decodes payloads
/// while fetching, and one that fails to decode there ends the worker and strands the
/// rest of its fetch; decoding in the handler instead lets a bad row be killed alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPayload;

impl Codec<Vec<u8>> for RawPayload {
    type Error = std::convert::Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, val: &Vec<u8>) -> Result<Vec<u8>, Self::Error> {
        Ok(val.clone())
    }

    fn decode(&self, val: &Vec<u8>) -> Result<Vec<u8>, Self::Error> {
        Ok(val.clone())
    }
}

/// The send-invite handler: a thin adapter from an apalis task to [`Deliverer::deliver`].
async fn send_invite(
    payload: Vec<u8>,
    task_id: TaskId,
    deliverer: Data<Arc<Deliverer>>,
) -> Result<(), BoxDynError> {
    let task = task_id.to_string();
    let payload: SendInvite = match serde_json::from_slice(&payload) {
        Ok(payload) => payload,
        Err(e) => {
            tracing::error!(%task, error = %e, "undecodable send-invite task: killed");
            let why = format!("undecodable payload: {e}");
            deliverer.finish_task(&task, TaskEnd::Killed(&why)).await;
            return Err(Box::new(AbortError::new(e)));
        }
    };
    match deliverer.deliver(payload.item_id, &task).await {
        // Its outcome is being recorded: the recorder finishes the task.
        Ok(()) => Ok(()),
        Err(e) => {
            // A database fault: the task runs again shortly (up to its max_attempts).
            tracing::error!(%task, item = %payload.item_id, error = %format!("{e:#}"), "task failed");
            deliverer
                .finish_task(&task, TaskEnd::Failed(&format!("{e:#}")))
                .await;
            Err(e.into())
        }
    }
}

/// How many tasks a worker claims per fetch: twice the tasks it runs at once, so the
/// next ones are at hand when a slot frees and a fetch interrupts dispatch half as
/// often. The extra tasks wait `Queued` under the worker's name; a shutdown puts them
/// back.
pub fn fetch_size(concurrency: usize) -> usize {
    concurrency.saturating_mul(2)
}

/// A name no other live worker has: `worker.name` (or the host), pid, start time and
/// generation.
fn worker_name(settings: &Settings, generation: u32) -> String {
    let host = match settings.worker.name.as_str() {
        "" => process::hostname(),
        name => name.to_owned(),
    };
    let pid = std::process::id();
    static STARTED: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let started = STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    });
    format!("invite-worker@{host}:{pid}:{started}:{generation}")
}

/// Runs the queue workers until `shutdown` is cancelled; then lets in-flight tasks
/// finish and their outcomes be written, all within `worker.shutdown_timeout_secs` of
/// the cancel. Tasks still running after that are recovered by another worker once
/// this one's heartbeat lapses.
pub(crate) async fn run(
    deliverer: Arc<Deliverer>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(settings.worker.shutdown_timeout_secs);
    let cancelled = shutdown.clone();
    let cancelled = cancelled.cancelled();
    tokio::pin!(cancelled);
    let workers = run_with_restarts(deliverer.clone(), settings, shutdown);
    tokio::pin!(workers);
    let mut deadline = None;
    let result = loop {
        tokio::select! {
            result = &mut workers => break result,
            () = &mut cancelled, if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + timeout);
            }
        }
    };
    let left = deadline.map_or(timeout, |d| {
        d.saturating_duration_since(tokio::time::Instant::now())
    });
    if !deliverer.wait_for_outcomes(left).await {
        tracing::warn!(
            timeout_secs = timeout.as_secs(),
            "shutdown timeout: some outcomes are not written; their tasks will run again"
        );
    }
    result
}

/// Runs one apalis worker after another, each under a new name, restarting after a
/// backoff when one fails (see the module notes), until `shutdown`.
async fn run_with_restarts(
    deliverer: Arc<Deliverer>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let w = &settings.worker;
    let heartbeat = Duration::from_secs(w.heartbeat_secs);
    let missed = usize::try_from(w.recover_after_secs / w.heartbeat_secs).unwrap_or(usize::MAX);
    let config = Config::default()
        .queue(QUEUE)
        .batch_size(fetch_size(w.concurrency))
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(missed.max(2))
        // Tasks are finished by us, not by apalis' acks: see the module notes. A task
        // stays `Queued` under its worker's name while it runs; orphan recovery
        // treats `Queued` and `Running` alike.
        .lock_tasks(false)
        .persist_results(false);
    let poll = Duration::from_millis(w.poll_interval_ms);
    let shutdown_timeout = Duration::from_secs(w.shutdown_timeout_secs);
    let restart_backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(10))
            .without_max_times()
            .build()
    };
    let mut restart_delays = restart_backoff();

    for generation in 0u32.. {
        let pool = deliverer.pool.clone();
        let backend = PostgresStorage::<Vec<u8>>::new(&pool)
            .with_config(config.clone())
            .with_codec(RawPayload)
            .poll_with_strategy(
                Strategy::new()
                    .stream(RepeatWake::new(
                        Pubsub::new(pool.clone(), QUEUE.to_owned()),
                        REPEAT_WAKE_AFTER,
                    ))
                    .interval(poll),
            );
        let name = worker_name(settings, generation);
        let worker = WorkerBuilder::new(name.as_str())
            .backend(backend)
            .concurrency(w.concurrency)
            .data(deliverer.clone())
            .build(send_invite);
        tracing::info!(worker = %name, concurrency = w.concurrency, "queue worker starting");
        let started = tokio::time::Instant::now();

        let stop = shutdown.clone();
        let run = worker.run_with_ctx(move |ctx| {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                ctx.stop()
            }
        });
        tokio::pin!(run);
        let result = tokio::select! {
            result = &mut run => result,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(shutdown_timeout, &mut run).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(worker = %name, timeout_secs = shutdown_timeout.as_secs(),
                            "shutdown timeout: unfinished tasks will be recovered by another worker");
                        return Ok(());
                    }
                }
            }
        };
        match result {
            Ok(()) if shutdown.is_cancelled() => {
                tracing::info!(worker = %name, "queue worker stopped");
                return Ok(());
            }
            Ok(()) => tracing::warn!(worker = %name, "queue worker ended by itself; restarting"),
            Err(e) => {
                tracing::error!(worker = %name, error = %e, "queue worker failed; restarting")
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            // It ran well for a while: the next failure starts the backoff afresh.
            restart_delays = restart_backoff();
        }
        let delay = restart_delays.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
    Ok(())
}

/// How long after a new-task notification the worker is woken once more.
const REPEAT_WAKE_AFTER: Duration = Duration::from_millis(20);

/// A wake-up stream that repeats its latest wake-up once, `delay` later.
///
/// apalis fetches when woken, and only an empty fetch puts it to sleep; but a
/// notification that arrives while a fetch is under way is used up by that fetch, which
/// may have started before the new tasks were committed and so return nothing: the
/// worker then sleeps until the next poll (`worker.poll_interval_ms`) with tasks
/// waiting. The repeated wake-up starts one more fetch after the one under way has
/// ended.
pub(crate) struct RepeatWake<S> {
    inner: S,
    delay: Duration,
    repeat: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> RepeatWake<S> {
    pub(crate) fn new(inner: S, delay: Duration) -> Self {
        Self {
            inner,
            delay,
            repeat: None,
        }
    }
}

impl<S: Stream + Unpin> Stream for RepeatWake<S> {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let this = self.get_mut();
        match this.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(_)) => {
                // (Re)armed, and polled once so that it wakes this task when due.
                let mut repeat = Box::pin(tokio::time::sleep(this.delay));
                let _ = repeat.as_mut().poll(cx);
                this.repeat = Some(repeat);
                Poll::Ready(Some(()))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.repeat.as_mut().map(|repeat| repeat.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    this.repeat = None;
                    Poll::Ready(Some(()))
                }
                _ => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use tokio::time::{Instant, timeout};

    use super::*;

    /// In paused (virtual) time: nothing here waits for a real clock.
    #[tokio::test(start_paused = true)]
    async fn a_wake_up_comes_again_once_after_the_delay_and_a_burst_repeats_once() {
        let (wake, wake_ups) = mpsc::unbounded::<u8>();
        let mut stream = RepeatWake::new(wake_ups, Duration::from_millis(20));

        wake.unbounded_send(1).expect("send");
        let start = Instant::now();
        assert_eq!(stream.next().await, Some(()), "the wake-up itself");
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(stream.next().await, Some(()), "its repeat");
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert!(
            timeout(Duration::from_secs(60), stream.next())
                .await
                .is_err(),
            "one repeat, not a ticker"
        );

        // Three at once: each passes through, and the repeat follows the last.
        for n in 0..3 {
            wake.unbounded_send(n).expect("send");
        }
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(stream.next().await, Some(()));
        }
        assert_eq!(stream.next().await, Some(()));
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert!(
            timeout(Duration::from_secs(60), stream.next())
                .await
                .is_err()
        );

        // The source ends: so does the stream.
        drop(wake);
        assert_eq!(stream.next().await, None);
    }
}

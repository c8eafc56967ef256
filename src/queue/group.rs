//! Group commit: the small writes of many tasks in one transaction.
//!
//! Each send-invite task writes twice (before its send and after it). Written one task
//! per transaction, those writes cost a commit, a round trip per statement and a turn
//! on the batch row each; PostgreSQL's CPU, not the mail server, then limits how many
//! invitations go out per second. A [`Grouped`] writer instead takes whatever requests
//! have arrived while its previous group was being written and writes them together:
//! each request still gets exactly the transaction semantics it needs (its rows and
//! its batch's tally move together), but a group of them shares one commit and one
//! statement per kind of change.
//!
//! Groups form by themselves: under light load a request is written at once, alone;
//! under heavy load requests queue while a group commits and the next group is larger.
//! If a group's transaction fails, its requests are written again one by one, so one
//! request the database refuses cannot fail its neighbours.

use std::{future::Future, panic::AssertUnwindSafe};

use futures::FutureExt;

use tokio::sync::{mpsc, oneshot};

/// One kind of grouped write.
pub(crate) trait GroupWrite: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Response: Send + 'static;
    /// What the writer holds from one group to the next (its database connection).
    type Conn: Send;

    /// A short name for logs.
    const NAME: &'static str;

    /// Requests with the same key are always written in one transaction, also when a
    /// failed group is split up: the writer may rely on seeing them together (a task
    /// that ran twice must act once). `None`: a request of its own.
    fn key(_request: &Self::Request) -> Option<u128> {
        None
    }

    /// Opens the writer's connection: at the first group, and after a failed one.
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;

    /// Writes `group` in one transaction; one response per request, in order.
    fn write(
        &self,
        conn: &mut Self::Conn,
        group: &[Self::Request],
    ) -> impl Future<Output = anyhow::Result<Vec<Self::Response>>> + Send;
}

struct QueuedRequest<W: GroupWrite> {
    request: W::Request,
    reply: oneshot::Sender<Result<W::Response, String>>,
}

/// The handle requests are submitted through. Its writer task ends when the last
/// handle is dropped.
pub(crate) struct Grouped<W: GroupWrite> {
    sender: mpsc::Sender<QueuedRequest<W>>,
}

impl<W: GroupWrite> Clone for Grouped<W> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

impl<W: GroupWrite> Grouped<W> {
    /// Starts the writer task; a group holds at most `max_group` requests. (One writer
    /// per kind: two halved the groups and cost more database CPU than their shorter
    /// waits saved; see docs/performance.md.)
    pub(crate) fn start(writer: W, max_group: usize) -> Self {
        let (sender, receiver) = mpsc::channel(max_group.max(1) * 8);
        tokio::spawn(write_groups(writer, max_group.max(1), receiver));
        Self { sender }
    }

    /// Submits one request; returns its response once its group is committed.
    pub(crate) async fn submit(&self, request: W::Request) -> anyhow::Result<W::Response> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(QueuedRequest { request, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the {} writer has stopped", W::NAME))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the {} writer dropped a request", W::NAME))?
            .map_err(anyhow::Error::msg)
    }
}

/// The writer: takes whatever has queued up (at least one request), writes it, again.
async fn write_groups<W: GroupWrite>(
    writer: W,
    max_group: usize,
    mut receiver: mpsc::Receiver<QueuedRequest<W>>,
) {
    let mut conn = None;
    let mut pending = Vec::with_capacity(max_group);
    let mut requests = Vec::with_capacity(max_group);
    let mut replies = Vec::with_capacity(max_group);
    while let Some(first) = receiver.recv().await {
        pending.push(first);
        while pending.len() < max_group {
            match receiver.try_recv() {
                Ok(next) => pending.push(next),
                Err(_) => break,
            }
        }
        // Same-key requests side by side, so a split keeps them together.
        pending.sort_by_key(|p: &QueuedRequest<W>| W::key(&p.request));
        for QueuedRequest { request, reply } in pending.drain(..) {
            requests.push(request);
            replies.push(reply);
        }
        metrics::histogram!("group_write_size", "kind" => W::NAME).record(requests.len() as f64);
        let started = std::time::Instant::now();
        let results = write_group(&writer, &mut conn, &requests).await;
        metrics::histogram!("group_write_seconds", "kind" => W::NAME)
            .record(started.elapsed().as_secs_f64());
        for (reply, result) in replies.drain(..).zip(results) {
            // The submitter may be gone (shutdown); its write is committed regardless.
            let _ = reply.send(result);
        }
        requests.clear();
    }
}

/// The group in one transaction; if that fails, once more on a fresh connection (one
/// the database dropped fails every statement until it is replaced); if that fails
/// too, each request (with those of its key) in a transaction of its own, so one
/// request the database refuses fails alone. When no connection can be had, the rest fail at once.
async fn write_group<W: GroupWrite>(
    writer: &W,
    conn: &mut Option<W::Conn>,
    requests: &[W::Request],
) -> Vec<Result<W::Response, String>> {
    let mut failure = None;
    for _ in 0..2 {
        match try_write(writer, conn, requests).await {
            Ok(responses) => return responses.into_iter().map(Ok).collect(),
            Err(Failure::Connect(e)) => return failed(requests.len(), &e),
            Err(Failure::Write(e)) => failure = Some(e),
        }
    }
    let e = failure.unwrap_or_else(|| anyhow::anyhow!("the {} writer failed", W::NAME));
    if requests.len() == 1 {
        return failed(1, &e);
    }
    tracing::warn!(kind = W::NAME, error = %format!("{e:#}"), requests = requests.len(),
        "a grouped write failed twice; writing its requests one by one");
    let mut results = Vec::with_capacity(requests.len());
    let mut start = 0;
    while start < requests.len() {
        let key = W::key(&requests[start]);
        let len = match key {
            None => 1,
            Some(_) => requests[start..]
                .iter()
                .take_while(|r| W::key(r) == key)
                .count(),
        };
        let part = &requests[start..start + len];
        match try_write(writer, conn, part).await {
            Ok(answers) => results.extend(answers.into_iter().map(Ok)),
            Err(Failure::Write(e)) => results.extend(failed(len, &e)),
            Err(Failure::Connect(e)) => {
                results.extend(failed(requests.len() - start, &e));
                break;
            }
        }
        start += len;
    }
    results
}

fn failed<T>(n: usize, e: &anyhow::Error) -> Vec<Result<T, String>> {
    (0..n).map(|_| Err(format!("{e:#}"))).collect()
}

enum Failure {
    /// No connection could be opened.
    Connect(anyhow::Error),
    /// The write failed (or panicked); the connection has been let go.
    Write(anyhow::Error),
}

/// One write on the writer's connection (opened if need be); after a failure the
/// connection is dropped, so a broken one is never reused. A panic in the writer is a
/// failed write, not the end of the writer.
async fn try_write<W: GroupWrite>(
    writer: &W,
    conn: &mut Option<W::Conn>,
    requests: &[W::Request],
) -> Result<Vec<W::Response>, Failure> {
    let open = match conn {
        Some(open) => open,
        None => conn.insert(writer.connect().await.map_err(Failure::Connect)?),
    };
    let written = AssertUnwindSafe(writer.write(open, requests))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the {} writer panicked", W::NAME)))
        .and_then(|responses| {
            anyhow::ensure!(
                responses.len() == requests.len(),
                "the {} writer answered {} of {} requests",
                W::NAME,
                responses.len(),
                requests.len()
            );
            Ok(responses)
        });
    written.map_err(|e| {
        *conn = None;
        Failure::Write(e)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Doubles numbers; refuses 13 (failing any group that holds it); remembers groups.
    #[derive(Default)]
    struct Doubler {
        groups: Mutex<Vec<Vec<u32>>>,
    }

    impl GroupWrite for Arc<Doubler> {
        type Request = u32;
        type Response = u32;
        type Conn = ();
        const NAME: &'static str = "doubler";

        async fn connect(&self) -> anyhow::Result<()> {
            Ok(())
        }

        async fn write(&self, _: &mut (), group: &[u32]) -> anyhow::Result<Vec<u32>> {
            self.groups.lock().unwrap().push(group.to_vec());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert!(!group.contains(&666), "666 panics the writer");
            anyhow::ensure!(!group.contains(&13), "13 refused");
            Ok(group.iter().map(|n| n * 2).collect())
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_groups_and_each_gets_its_own_answer() {
        let doubler = Arc::new(Doubler::default());
        let grouped = Grouped::start(doubler.clone(), 8);
        let mut tasks = tokio::task::JoinSet::new();
        // (13 is refused: none here.)
        for n in 100..140u32 {
            let grouped = grouped.clone();
            tasks.spawn(async move { (n, grouped.submit(n).await.unwrap()) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (n, doubled) = joined.unwrap();
            assert_eq!(doubled, n * 2);
        }
        let groups = doubler.groups.lock().unwrap();
        assert!(groups.iter().all(|g| g.len() <= 8), "{groups:?}");
        assert!(groups.len() < 40, "no request shared a group: {groups:?}");
        let mut all: Vec<u32> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (100..140).collect::<Vec<_>>(),
            "each request written once"
        );
    }

    #[tokio::test]
    async fn a_refused_request_fails_alone() {
        let doubler = Arc::new(Doubler::default());
        let grouped = Grouped::start(doubler.clone(), 64);
        let mut tasks = tokio::task::JoinSet::new();
        for n in 10..16u32 {
            let grouped = grouped.clone();
            tasks.spawn(async move { (n, grouped.submit(n).await) });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined.unwrap() {
                (13, result) => {
                    let e = result.unwrap_err().to_string();
                    assert!(e.contains("13 refused"), "{e}");
                }
                (n, result) => assert_eq!(result.unwrap(), n * 2),
            }
        }
    }

    #[tokio::test]
    async fn a_panicking_write_fails_its_request_and_the_writer_goes_on() {
        let doubler = Arc::new(Doubler::default());
        let grouped = Grouped::start(doubler.clone(), 64);
        let e = grouped.submit(666).await.unwrap_err().to_string();
        assert!(e.contains("panicked"), "{e}");
        assert_eq!(
            grouped.submit(21).await.unwrap(),
            42,
            "the writer still runs"
        );
    }

    /// The doubler, but requests of the same ten (20–29, …) share a key.
    struct ByTens(Arc<Doubler>);

    impl GroupWrite for ByTens {
        type Request = u32;
        type Response = u32;
        type Conn = ();
        const NAME: &'static str = "by-tens";

        fn key(n: &u32) -> Option<u128> {
            Some(u128::from(n / 10))
        }

        async fn connect(&self) -> anyhow::Result<()> {
            Ok(())
        }

        async fn write(&self, conn: &mut (), group: &[u32]) -> anyhow::Result<Vec<u32>> {
            self.0.write(conn, group).await
        }
    }

    #[tokio::test]
    async fn a_split_group_keeps_requests_of_one_key_together() {
        let doubler = Arc::new(Doubler::default());
        let grouped = Grouped::start(ByTens(doubler.clone()), 64);
        // Hold the writer with a first request so the next ones queue into one group.
        let first = {
            let grouped = grouped.clone();
            tokio::spawn(async move { grouped.submit(1).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let mut tasks = tokio::task::JoinSet::new();
        for n in [21u32, 13, 25, 22] {
            let grouped = grouped.clone();
            tasks.spawn(async move { (n, grouped.submit(n).await) });
        }
        assert_eq!(first.await.unwrap().unwrap(), 2);
        while let Some(joined) = tasks.join_next().await {
            match joined.unwrap() {
                (13, result) => assert!(result.is_err(), "13 is refused"),
                (n, result) => assert_eq!(result.unwrap(), n * 2),
            }
        }
        let groups = doubler.groups.lock().unwrap();
        assert!(
            groups.contains(&vec![21, 25, 22]),
            "the twenties written together after the split: {groups:?}"
        );
    }
}

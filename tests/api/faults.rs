//! Fault injection (issue "Nothing lost, nothing doubled"): a worker killed or stopped
//! mid-batch, several worker processes on one database, database connections cut, a
//! mail server that is down or stalls, the rate limit, and what logs must never show.
//!
//! Where a process must die, be signalled or run next to others, the real binary runs
//! as a child process (`process::Service`); otherwise the service runs in-process.
//! Every wait has a deadline, and no test asserts that anything is fast (the rate-limit
//! test has a lower bound only).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::{Duration, Instant},
};

use invite_worker::mail::Mailer;
use serde_json::{Value, json};
use smtp_testkit::{Received, SmtpServer, Step};
use sqlx::Connection;

use crate::{
    helpers::{
        KEY, TestApp, api_only_with_open_job, bounded_client, candidates, database_name, link_in,
        prepare_app_with, server_url, spawn_app_with, test_settings,
    },
    process::{Service, ServiceProcess},
};

/// How long a freshly started process may take to answer `/readyz`.
const READY: Duration = Duration::from_secs(30);

/// A batch's counts when every one of its `n` items was sent.
fn all_sent(n: usize) -> Value {
    json!({"pending": 0, "sent": n, "failed": 0, "skipped": 0})
}

/// The messages the SMTP server accepted, grouped by recipient (lowercased).
fn received_per_address(smtp: &SmtpServer) -> BTreeMap<String, Vec<Received>> {
    let mut by_address: BTreeMap<String, Vec<Received>> = BTreeMap::new();
    for m in smtp.messages() {
        assert_eq!(m.rcpt_to.len(), 1, "one recipient per message: {m:?}");
        by_address
            .entry(m.rcpt_to[0].to_lowercase())
            .or_default()
            .push(m);
    }
    by_address
}

/// The candidates' addresses, lowercased.
fn addresses(people: &[Value]) -> BTreeSet<String> {
    people
        .iter()
        .map(|p| p["email"].as_str().expect("an email").to_lowercase())
        .collect()
}

/// Checks the SMTP server's record against `people`: every candidate received at least
/// one message, no other address received any, and every repeat is the same message
/// (same Message-ID, same link), as the README promises. Returns how many candidates
/// received more than one.
fn check_everyone_received(app: &TestApp, people: &[Value]) -> usize {
    let by_address = received_per_address(&app.smtp);
    let got: BTreeSet<String> = by_address.keys().cloned().collect();
    let want = addresses(people);
    let missing: Vec<_> = want.difference(&got).collect();
    let strangers: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && strangers.is_empty(),
        "every candidate gets a message and nobody else does; missing: {missing:?}, \
         unexpected: {strangers:?}"
    );
    let base = &app.settings.invite.link_base_url;
    let mut repeated = 0;
    for (address, messages) in &by_address {
        if messages.len() < 2 {
            continue;
        }
        repeated += 1;
        let ids: HashSet<_> = messages.iter().map(|m| m.header("Message-ID")).collect();
        let links: HashSet<_> = messages.iter().map(|m| link_in(m.body(), base)).collect();
        assert_eq!(
            ids.len(),
            1,
            "a repeat to {address} keeps its Message-ID: {ids:?}"
        );
        assert_eq!(
            links.len(),
            1,
            "a repeat to {address} keeps its link: {links:?}"
        );
    }
    repeated
}

/// Asserts every item of the batch is `sent`; returns the items.
async fn assert_every_item_sent(app: &TestApp, id: &str, n: usize) -> Vec<Value> {
    let items = app.items(id, None).await;
    assert_eq!(items.len(), n, "the batch has {n} items");
    let not_sent: Vec<_> = items.iter().filter(|i| i["status"] != "sent").collect();
    assert!(not_sent.is_empty(), "every item is sent: {not_sent:?}");
    items
}

/// Starts a second `serve` on the same database, waits for the batch to complete,
/// checks every item sent; returns the process (kept alive by the caller) and how many
/// candidates received a message twice.
async fn finish_with_a_second_process(
    app: &mut TestApp,
    serve: &Service,
    id: &str,
    people: &[Value],
) -> (ServiceProcess, usize) {
    let mut second = serve.start("serve #2");
    second.wait_ready(READY).await;
    app.base = second.base();
    let batch = app
        .wait_for_status(id, "completed", Duration::from_secs(90))
        .await;
    assert_eq!(batch["counts"], all_sent(100), "{batch}");
    assert_every_item_sent(app, id, 100).await;
    (second, check_everyone_received(app, people))
}

/// One `serve` process part-way through a batch of 100 (sending at 25/s, so it takes
/// a few seconds): returns once `accepted` messages are accepted, with the batch id and
/// its candidates. A dead worker's tasks run again after 5 s.
async fn mid_batch(
    prefix: &str,
    accepted: usize,
    shutdown_timeout_secs: u64,
) -> (TestApp, Service, ServiceProcess, String, Vec<Value>) {
    let mut app = prepare_app_with(|s| {
        s.mail.rate_per_second = 25;
        s.worker.recover_after_secs = 5;
        s.worker.shutdown_timeout_secs = shutdown_timeout_secs;
    })
    .await;
    let serve = Service::new("serve", &app.settings);
    let mut first = serve.start("serve #1");
    first.wait_ready(READY).await;
    app.base = first.base();
    app.open_job("job-1").await;
    let people = candidates(prefix, 100);
    let id = app.create_batch("job-1", people.clone()).await;
    app.smtp
        .wait_for_messages(accepted, Duration::from_secs(60))
        .await;
    (app, serve, first, id, people)
}

/// A crash repeats at most the sends that were in flight.
fn assert_repeats_within_sends_in_flight(app: &TestApp, repeated: usize) {
    let concurrency = app.settings.worker.concurrency;
    assert!(
        repeated <= concurrency,
        "{repeated} candidates got a repeat; at most the {concurrency} sends in flight may"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_batch_loses_nothing_and_repeats_at_most_the_sends_in_flight() {
    let (mut app, serve, mut first, id, people) = mid_batch("kill", 30, 15).await;
    first.kill();
    let at_kill = app.smtp.accepted_count();
    assert!(
        (30..100).contains(&at_kill),
        "the process is killed mid-batch: {at_kill} messages accepted by then"
    );

    // The new process runs the pending tasks at once and the dead one's tasks once its
    // heartbeat has lapsed (recover_after_secs): a bound, not a speed check.
    let (_second, repeated) = finish_with_a_second_process(&mut app, &serve, &id, &people).await;
    eprintln!(
        "killed after {at_kill} accepted messages; {repeated} candidates received a \
         message twice (bound: worker.concurrency)"
    );
    assert_repeats_within_sends_in_flight(&app, repeated);
}

#[tokio::test]
async fn three_worker_processes_on_one_database_send_each_invite_exactly_once() {
    let mut app = prepare_app_with(|s| {
        // Four processes share the server with other tests: keep their pools small.
        s.database.max_connections = 8;
        s.worker.recover_after_secs = 5;
    })
    .await;
    let mut api = Service::new("api", &app.settings).start("api");
    let work = Service::new("work", &app.settings);
    let mut workers: Vec<_> = (1..=3).map(|n| work.start(&format!("work #{n}"))).collect();
    api.wait_ready(READY).await;
    for worker in &mut workers {
        worker.wait_ready(READY).await;
    }
    app.base = api.base();
    app.open_job("job-1").await;

    let mut people = Vec::new();
    let mut ids = Vec::new();
    for b in 0..10 {
        let batch = candidates(&format!("multi{b}"), 50);
        ids.push(app.create_batch("job-1", batch.clone()).await);
        people.extend(batch);
    }
    for id in &ids {
        let batch = app
            .wait_for_status(id, "completed", Duration::from_secs(90))
            .await;
        assert_eq!(batch["counts"], all_sent(50), "{batch}");
    }

    assert_eq!(addresses(&people).len(), 500, "500 distinct candidates");
    let repeated = check_everyone_received(&app, &people);
    let messages = app.smtp.messages().len();
    assert_eq!(
        (repeated, messages),
        (0, 500),
        "exactly one message per candidate"
    );
    let share: Vec<usize> = workers
        .iter()
        .map(|w| w.stderr().matches(": sent item=").count())
        .collect();
    eprintln!("messages sent per worker process (from their logs): {share:?}");

    // Six batches for the same 40 candidates of another job, posted at once: the three
    // processes prepare them side by side, and under `skip` each candidate is invited
    // once (the per-(job, candidate) lock is what holds across processes).
    // Three rounds: the race is a matter of timing.
    app.open_job("job-2").await;
    for round in 1..=3 {
        let same = candidates(&format!("race{round}"), 40);
        let posts = (0..6).map(|_| app.create_batch("job-2", same.clone()));
        let racing: Vec<String> = futures::future::join_all(posts).await;
        let mut sent = 0;
        for id in &racing {
            let batch = app
                .wait_for_status(id, "completed", Duration::from_secs(90))
                .await;
            sent += batch["counts"]["sent"].as_i64().expect("sent");
        }
        assert_eq!(
            sent, 40,
            "round {round}: one invitation per candidate across six batches"
        );
    }
    assert_eq!(app.smtp.messages().len(), 620, "and one message each");
}

#[tokio::test]
async fn an_invalid_address_written_before_addresses_were_checked_at_write_time_is_never_sent_to() {
    let (app, _api) = api_only_with_open_job("job-1").await;
    let mut people = candidates("old", 3);
    people[1]["email"] = json!("old.1@localhost");
    let id = app.create_batch("job-1", people).await;
    // As an item written by an earlier version: no stored address problem.
    let cleared = sqlx::query("UPDATE batch_items SET email_error = NULL")
        .execute(&app.pool)
        .await
        .expect("clear email_error")
        .rows_affected();
    assert_eq!(cleared, 3);

    let mut work = Service::new("work", &app.settings).start("work");
    work.wait_ready(READY).await;
    let batch = app
        .wait_for_status(&id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(batch["summary"], "2 sent, 1 failed", "{batch}");
    let failed = app.items(&id, Some("failed")).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["candidate_id"], "old-1");
    assert_eq!(failed[0]["reason"], "invalid_email", "{}", failed[0]);
    let to: BTreeSet<String> = received_per_address(&app.smtp).into_keys().collect();
    assert_eq!(
        to,
        BTreeSet::from([
            "old.0@example.com".to_owned(),
            "old.2@example.com".to_owned()
        ])
    );
}

#[tokio::test]
async fn a_batch_survives_its_database_connections_being_cut_mid_way() {
    let mut app = prepare_app_with(|s| {
        s.mail.rate_per_second = 25;
        s.worker.recover_after_secs = 5;
    })
    .await;
    let mut serve = Service::new("serve", &app.settings).start("serve");
    serve.wait_ready(READY).await;
    app.base = serve.base();
    app.open_job("job-1").await;
    let people = candidates("cut", 100);
    let id = app.create_batch("job-1", people.clone()).await;

    app.smtp
        .wait_for_messages(30, Duration::from_secs(60))
        .await;
    let at_cut = app.smtp.accepted_count();
    assert!(
        (30..100).contains(&at_cut),
        "the connections are cut mid-batch: {at_cut} messages accepted by then"
    );
    // Restarting the PostgreSQL server itself would disturb the other tests, which run
    // at the same time against the same server; terminating every backend of this
    // test's own database (pg_terminate_backend) cuts the service's connections the way
    // a server restart does, for this test alone. Three rounds a few hundred
    // milliseconds apart also hit the connections the service opens to recover.
    let db = database_name(&app.settings);
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("an admin connection");
    let mut terminated = Vec::new();
    for round in 0..3 {
        if round > 0 {
            // The spacing of the fault, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
                 SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()) t
             WHERE ok",
        )
        .bind(&db)
        .fetch_one(&mut admin)
        .await
        .expect("terminate the database's backends");
        terminated.push(n);
    }
    let _ = admin.close().await;
    eprintln!("backends terminated per round: {terminated:?} (after {at_cut} messages)");
    assert!(terminated[0] > 0, "the service's connections were cut");

    let batch = app
        .wait_for_status(&id, "completed", Duration::from_secs(90))
        .await;
    assert!(
        serve.try_exit().is_none(),
        "the process recovers by itself, without a restart"
    );
    assert_eq!(batch["counts"], all_sent(100), "{batch}");
    assert_every_item_sent(&app, &id, 100).await;
    let repeated = check_everyone_received(&app, &people);
    eprintln!("{repeated} candidates received a message twice after the connections were cut");
    // Each cut can cost at most the messages in flight (sent, outcome not yet committed:
    // `worker.concurrency` of them) if their outcomes' writes fail with the connection.
    // The group writer writes again on a fresh connection, so usually none repeats.
    let bound = terminated.len() * app.settings.worker.concurrency;
    assert!(
        repeated <= bound,
        "{repeated} candidates got a repeat; at most {bound} may ({} cuts × {} in flight)",
        terminated.len(),
        app.settings.worker.concurrency
    );

    // Tasks of a worker that died with its connection are recovered after
    // recover_after_secs; then none may stay Running or Queued.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let statuses = app.task_statuses_of_batch(&id).await;
        let stuck: i64 = ["Running", "Queued"]
            .iter()
            .filter_map(|s| statuses.get(*s))
            .sum();
        if stuck == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "send-invite tasks stay Running or Queued: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_mail_server_down_longer_than_the_first_retries_loses_no_invite() {
    let mut app = spawn_app_with(|s| {
        s.retry.max_attempts = 8;
        s.retry.initial_delay_ms = 200;
        s.retry.max_delay_ms = 1_000;
        s.retry.multiplier = 2.0;
    })
    .await;
    app.client = bounded_client();
    app.smtp.pause().await;
    app.open_job("job-1").await;
    let people = candidates("down", 10);
    let id = app.create_batch("job-1", people.clone()).await;

    let items = app
        .wait_for_items(
            &id,
            "three attempts per item (or a failure)",
            Duration::from_secs(60),
            |items| {
                items.iter().any(|i| i["status"] == "failed")
                    || items.iter().all(|i| i["attempts"].as_i64() >= Some(3))
            },
        )
        .await;
    assert!(
        items.iter().all(|i| i["status"] == "pending"),
        "no item fails while retries remain: {items:?}"
    );
    assert_eq!(
        app.smtp.accepted_count(),
        0,
        "nothing got through meanwhile"
    );

    app.smtp.resume().await.expect("the mail server comes back");
    let batch = app
        .wait_for_status(&id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(batch["counts"], all_sent(10), "{batch}");
    assert_every_item_sent(&app, &id, 10).await;
    let repeated = check_everyone_received(&app, &people);
    assert_eq!(repeated, 0, "one message per candidate");
}

#[tokio::test]
async fn a_send_stalled_after_data_is_retried_and_later_sends_get_their_own_replies() {
    let mut app = spawn_app_with(|s| {
        s.smtp.timeout_secs = 1;
        // One send at a time, so every send follows the stalled one through the same
        // transport (and would share its pooled connection if it were kept).
        s.worker.concurrency = 1;
    })
    .await;
    app.client = bounded_client();
    let a = "stall.a@example.com";
    let b = "unknown.b@example.com";
    let rest = [
        "fine.c@example.com",
        "fine.d@example.com",
        "fine.e@example.com",
        "fine.f@example.com",
    ];
    app.smtp
        .script(a, [Step::StallAfterData(Duration::from_secs(30))]);
    app.smtp
        .script(b, [Step::RcptReply(550, "5.1.1 user unknown".into())]);
    let person = |email: &str| json!({"id": email.split('@').next(), "email": email});
    app.open_job("job-1").await;
    let first = app.create_batch("job-1", vec![person(a)]).await;

    // The others are posted once A's message has been transferred and the server has
    // gone silent, so they queue up behind A's stalled send.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app.smtp.deliveries().iter().any(|d| d.rcpt_to == [a]) {
        assert!(Instant::now() < deadline, "A's first send reaches DATA");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let others: Vec<Value> = std::iter::once(b).chain(rest).map(person).collect();
    let second = app.create_batch("job-1", others).await;

    for id in [&first, &second] {
        app.wait_for_status(id, "completed", Duration::from_secs(60))
            .await;
    }
    let items_a = app.items(&first, None).await;
    assert_eq!(items_a[0]["status"], "sent", "{items_a:?}");
    assert_eq!(items_a[0]["attempts"], 2, "stalled once, then accepted");
    assert!(
        items_a[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timeout")),
        "A's first attempt timed out: {items_a:?}"
    );
    let items = app.items(&second, None).await;
    let item = |email: &str| {
        items
            .iter()
            .find(|i| i["email"] == email)
            .unwrap_or_else(|| panic!("an item for {email}"))
    };
    let rejected = item(b);
    assert_eq!(
        (&rejected["status"], &rejected["reason"]),
        (&json!("failed"), &json!("rejected")),
        "{rejected}"
    );
    // One attempt: a send that had inherited the stalled connection would have timed
    // out first.
    assert_eq!(rejected["attempts"], 1, "{rejected}");
    let last_error = rejected["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("550") && last_error.contains("5.1.1"),
        "B gets its own reply, not someone else's: {last_error:?}"
    );
    for email in rest {
        let i = item(email);
        assert_eq!(
            (&i["status"], &i["attempts"]),
            (&json!("sent"), &json!(1)),
            "{i}"
        );
    }

    // What the server accepted is exactly what is marked sent.
    let mut accepted: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| m.rcpt_to.join(","))
        .collect();
    accepted.sort();
    let mut marked_sent: Vec<String> = items_a
        .iter()
        .chain(&items)
        .filter(|i| i["status"] == "sent")
        .map(|i| i["email"].as_str().expect("email").to_owned())
        .collect();
    marked_sent.sort();
    assert_eq!(accepted, marked_sent);
}

#[tokio::test]
async fn sigterm_mid_batch_exits_cleanly_and_a_restart_finishes_the_batch() {
    let (mut app, serve, mut first, id, people) = mid_batch("term", 50, 10).await;
    first.terminate();
    // A bound: the shutdown timeout (10 s) plus a generous margin.
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "SIGTERM ends the process with 0: {status}"
    );
    let at_stop = app.smtp.accepted_count();
    assert!(
        at_stop < 100,
        "the process stopped mid-batch: {at_stop} messages accepted by then"
    );

    let (_second, repeated) = finish_with_a_second_process(&mut app, &serve, &id, &people).await;
    eprintln!(
        "SIGTERM after 50 accepted, {at_stop} accepted when the process exited; \
         {repeated} candidates received a message twice"
    );
    // A clean stop finishes its sends and writes every outcome (also those recorded
    // behind their tasks) before it exits: nothing it sent goes out again.
    assert_eq!(
        repeated, 0,
        "a clean stop repeats no message: every outcome is written before the exit"
    );
}

/// A task returns once its outcome is handed to the recorder (`queue::deliver`); a
/// clean stop must still wait until those outcomes are written. Here they cannot be
/// written while the test holds the batch row, so the stopping process must wait.
#[tokio::test]
async fn sigterm_waits_until_the_outcomes_of_its_last_sends_are_written() {
    let (mut app, serve, mut first, id, people) = mid_batch("settle", 30, 20).await;
    let mut hold = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM batches WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *hold)
        .await
        .expect("lock the batch row");
    first.terminate();
    // The sends in flight finish within a second at 25/s; their outcomes cannot commit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        first.try_exit().is_none(),
        "the process waits for the outcomes it has not written yet:\n{}",
        first.stderr()
    );
    hold.rollback().await.expect("release the batch row");
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "SIGTERM ends the process with 0: {status}"
    );

    let (_second, repeated) = finish_with_a_second_process(&mut app, &serve, &id, &people).await;
    assert_eq!(
        repeated, 0,
        "every outcome was written before the exit, so no message goes out again"
    );
}

#[tokio::test]
async fn sends_keep_to_the_configured_rate_after_the_initial_burst() {
    let mut app = spawn_app_with(|s| s.mail.rate_per_second = 20).await;
    app.client = bounded_client();
    app.open_job("job-1").await;
    // governor allows a burst equal to the rate (20 at once), then one message every
    // 1/20 s: the 60th may go out (60 - 20) / 20 = 2 s after the first. The clock starts
    // when the request is sent rather than when the 202 arrives, because a worker may
    // pick the batch up (and start sending) before its 202 reaches the client.
    let started = Instant::now();
    let id = app.create_batch("job-1", candidates("rate", 60)).await;
    let messages = app
        .smtp
        .wait_for_messages(60, Duration::from_secs(60))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(messages.len(), 60, "all 60 messages are accepted");
    eprintln!("60 messages at 20/s: the 60th accepted after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_secs(2),
        "the rate limit holds: 60 messages took {elapsed:?}"
    );
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["counts"], all_sent(60), "{batch}");
}

#[tokio::test]
async fn logs_show_masked_addresses_but_no_address_link_token_or_api_key() {
    let mut app = prepare_app_with(|s| {
        s.invite.token_secret =
            invite_worker::config::Secret::new("s3cret-for-the-log-test-0123456789abcdef");
    })
    .await;
    let mut serve = Service::new("serve", &app.settings)
        .env("RUST_LOG", "info,invite_worker=debug")
        .start("serve");
    serve.wait_ready(READY).await;
    app.base = serve.base();
    let mut people = candidates("private", 5);
    people[3]["email"] = json!("private.3@example"); // invalid: no top-level domain
    app.smtp.script(
        "private.1@example.com",
        [Step::RcptReply(550, "5.1.1 user unknown".into())],
    );
    app.open_job("job-1").await;
    let id = app.create_batch("job-1", people.clone()).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "3 sent, 2 failed", "{batch}");

    let base = &app.settings.invite.link_base_url;
    let tokens: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| {
            let link = link_in(m.body(), base).expect("a link in the message");
            link.rsplit('/').next().expect("a token").to_owned()
        })
        .collect();
    assert_eq!(tokens.len(), 3);

    // Stop it, so the log is complete.
    serve.terminate();
    serve.wait_exit(Duration::from_secs(60)).await;
    let log = serve.stderr();
    let lines_with = |needle: &str| -> Vec<&str> {
        let needle = needle.to_lowercase();
        log.lines()
            .filter(|l| l.to_lowercase().contains(&needle))
            .collect()
    };
    assert!(
        !lines_with("p***@example.com").is_empty(),
        "the log names recipients in masked form"
    );
    for address in addresses(&people) {
        let leaks = lines_with(&address);
        assert!(leaks.is_empty(), "{address} appears in the log: {leaks:#?}");
    }
    for token in &tokens {
        let leaks = lines_with(token);
        assert!(
            leaks.is_empty(),
            "a link token appears in the log: {leaks:#?}"
        );
    }
    let secret = app.settings.invite.token_secret.expose();
    for (what, value) in [("the API key", KEY), ("the token secret", secret)] {
        let leaks = lines_with(value);
        assert!(leaks.is_empty(), "{what} appears in the log: {leaks:#?}");
    }
}

/// One id follows a batch from its HTTP request to the worker's lines about its items:
/// the request id a client sends (or one the service makes up) is answered back,
/// names the request's span, and is carried by every outcome the worker logs for the
/// batch, in another process than the one that took the request.
#[tokio::test]
async fn the_request_id_of_a_batch_reaches_the_workers_log_lines_for_its_items() {
    let mut app = prepare_app_with(|_| {}).await;
    let mut api = Service::new("api", &app.settings)
        .env("RUST_LOG", "info")
        .start("api");
    api.wait_ready(READY).await;
    let mut work = Service::new("work", &app.settings)
        .env("RUST_LOG", "info")
        .start("work");
    app.base = api.base();
    app.open_job("job-1").await;

    let body =
        json!({"job_id": "job-1", "duration_minutes": 30, "candidates": candidates("traced", 3)});
    let response = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(KEY)
        .header("x-request-id", "req-trace-42")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-trace-42"),
        "the client's id is answered back"
    );
    let batch: Value = response.json().await.expect("json");
    let id = batch["id"].as_str().expect("an id").to_owned();
    let made_up = app.get("/v1/jobs/job-1").await;
    let generated = made_up
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&generated).is_ok(),
        "a request without an id gets one: {generated:?}"
    );
    app.wait_until_completed(&id).await;

    for process in [&mut api, &mut work] {
        process.terminate();
        process.wait_exit(Duration::from_secs(60)).await;
    }
    let api_log = api.stderr();
    assert!(
        api_log
            .lines()
            .any(|l| l.contains("req-trace-42") && l.contains("batch enqueued")),
        "the API's line about the batch names the request id:\n{api_log}"
    );
    let work_log = work.stderr();
    let sent: Vec<&str> = work_log
        .lines()
        .filter(|l| l.contains(" sent") && l.contains(&id))
        .collect();
    assert_eq!(sent.len(), 3, "one line per sent item:\n{work_log}");
    assert!(
        sent.iter().all(|l| l.contains("request_id=req-trace-42")),
        "every worker line about the batch names its request id: {sent:#?}"
    );
}

/// Found by the connection-cut test above: a database error ends the apalis worker,
/// which drops its in-flight handlers, so a send can be cancelled from outside in the
/// middle of its SMTP exchange. Its half-used connection must not serve the next send:
/// seen there as an innocent candidate failed `rejected` with "503 5.5.1 nested MAIL
/// command" (the server's answer to a MAIL FROM inside an unfinished transaction).
/// Here the cancellation is made deterministic: the first send is dropped while the
/// server sits on its DATA.
#[tokio::test]
async fn a_send_dropped_mid_exchange_does_not_leave_its_connection_to_the_next_send() {
    let smtp = SmtpServer::start().await.expect("SMTP server starts");
    let mut settings = test_settings(smtp.port());
    settings.worker.concurrency = 1; // the pool keeps one idle connection
    settings.smtp.timeout_secs = 5;
    let mailer = std::sync::Arc::new(Mailer::new(&settings).expect("a mailer"));
    let message = |to: &str| {
        lettre::Message::builder()
            .from(settings.mail.from.parse().expect("mail.from"))
            .to(to.parse().expect("an address"))
            .subject("Interview")
            .body("hello".to_owned())
            .expect("a message")
    };
    let first = "dropped.a@example.com";
    smtp.script(first, [Step::StallAfterData(Duration::from_secs(30))]);
    let sending = tokio::spawn({
        let (mailer, message) = (mailer.clone(), message(first));
        async move { mailer.send("a", &message).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !smtp.deliveries().iter().any(|d| d.rcpt_to == [first]) {
        assert!(Instant::now() < deadline, "the first send reaches DATA");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Dropped from outside, as a worker that fails drops its handlers.
    sending.abort();
    assert!(sending.await.is_err_and(|e| e.is_cancelled()));

    // Bounded by the mailer's own whole-command timeout.
    let next = "next.b@example.com";
    let result = mailer.send("b", &message(next)).await;
    assert_eq!(result, Ok(()), "the next send gets its own reply");
    assert_eq!(smtp.attempts(next), 1);
    assert!(smtp.messages().iter().any(|m| m.rcpt_to == [next]));
}

/// Connections the database dropped while they sat in the pool (a restart, a
/// failover, `pg_terminate_backend`) are found before use, not by the request that
/// gets one: requests right after the cut are answered as usual.
#[tokio::test]
async fn requests_right_after_the_database_cut_every_connection_are_answered_as_usual() {
    let (app, _api) = api_only_with_open_job("job-1").await;
    let post = |n: usize| {
        let app = &app;
        async move {
            let body = json!({"job_id": "job-1", "duration_minutes": 30,
                              "candidates": candidates(&format!("cut{n}"), 3)});
            app.post_batch(&body).await.status()
        }
    };
    // Eight at once, so the pool holds several connections, each just used.
    let warm = futures::future::join_all((0..8).map(post)).await;
    assert!(warm.iter().all(|s| s.as_u16() == 202), "{warm:?}");

    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("an admin connection");
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()) t
         WHERE ok",
    )
    .bind(database_name(&app.settings))
    .fetch_one(&mut admin)
    .await
    .expect("terminate the database's backends");
    let _ = admin.close().await;
    assert!(cut > 0, "the service's connections were cut");

    let after = futures::future::join_all((8..16).map(post)).await;
    assert!(
        after.iter().all(|s| s.as_u16() == 202),
        "every request after the cut is accepted: {after:?}"
    );
}

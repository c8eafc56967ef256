//! Candidate erasure (`DELETE /v1/candidates/{candidate_id}`), end to end: the
//! candidate's email and name leave every table, their live link stops working, their
//! pending item is never sent, and every tally stays exact.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::helpers::{KEY, TestApp, assert_counts_add_up, expect_problem, spawn_app_with};

const EMAIL: &str = "erin.x@example.com";

async fn erase(app: &TestApp, candidate: &str) -> reqwest::Response {
    app.client
        .delete(app.url(&format!("/v1/candidates/{candidate}")))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request")
}

/// Rows of every table of ours whose text holds `needle` (any case).
async fn rows_holding(app: &TestApp, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
            AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&app.pool)
    .await
    .expect("tables");
    assert!(tables.iter().any(|t| t == "attempts"), "{tables:?}");
    let mut found = Vec::new();
    for table in tables {
        // The names come from the catalogue, not from input.
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM \"{table}\" t WHERE t::text ILIKE '%' || $1 || '%'"
        )))
        .bind(needle)
        .fetch_all(&app.pool)
        .await
        .expect("a scan");
        found.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    found
}

#[tokio::test]
async fn erasure_forgets_the_candidate_everywhere_revokes_links_and_keeps_tallies_exact() {
    let app = spawn_app_with(|s| {
        // A transient failure waits a minute: a pending item to erase.
        s.retry.initial_delay_ms = 60_000;
        s.retry.max_delay_ms = 60_000;
    })
    .await;
    for job in ["job-1", "job-2", "job-3", "job-4"] {
        app.open_job(job).await;
    }
    let erin = |email: &str| json!({"id": "c-x", "email": email, "name": "Erin Example"});
    let other = |i: u32| json!({"id": format!("c-{i}"), "email": format!("other.{i}@example.com")});
    app.smtp.script(
        EMAIL,
        [
            Step::Accept,
            Step::RcptReply(451, format!("4.2.0 <{EMAIL}> mailbox busy")),
            Step::RcptReply(550, format!("5.1.1 <{EMAIL}>: Recipient address rejected")),
        ],
    );
    // Sent, with a live link.
    let sent = app.create_batch("job-1", vec![erin(EMAIL), other(1)]).await;
    app.wait_until_completed(&sent).await;
    let token = app.token_for(EMAIL);
    // Pending: a retry scheduled a minute from now.
    let pending = app.create_batch("job-3", vec![erin(EMAIL), other(3)]).await;
    app.wait_for_items(
        &pending,
        "a retry scheduled",
        Duration::from_secs(30),
        |items| {
            items
                .iter()
                .any(|i| i["candidate_id"] == "c-x" && i["attempts"] == 1)
                && items
                    .iter()
                    .any(|i| i["candidate_id"] == "c-3" && i["status"] == "sent")
        },
    )
    .await;
    // Refused, its reply quoting the address (suppressed too).
    let refused = app.create_batch("job-2", vec![erin(EMAIL)]).await;
    app.wait_until_completed(&refused).await;
    // Invalid: a warning that quotes the address as given.
    let invalid = app
        .create_batch("job-4", vec![erin(&format!("Erin <{EMAIL}>"))])
        .await;
    app.wait_until_completed(&invalid).await;
    assert!(!rows_holding(&app, "erin.x").await.is_empty());
    let sends_before = app.smtp.attempts(EMAIL);

    let r = erase(&app, "c-x").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"erased_items": 4})
    );
    // The erasure is in the audit log, naming the key and holding no personal data.
    let audit = app.get_json("/v1/audit?action=candidate.erased").await;
    let entries = audit["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["actor"], "key:key:1");
    assert_eq!(entries[0]["target"], "c-x");
    assert_eq!(entries[0]["detail"], json!({"erased_items": 4}));

    for needle in ["erin.x", "Erin Example", "e***@example.com"] {
        let left = rows_holding(&app, needle).await;
        assert!(left.is_empty(), "{needle} is still stored: {left:#?}");
    }
    // The live link no longer works.
    let r = app.redeem(&token).await;
    expect_problem(r, StatusCode::GONE, "token_expired").await;
    // Tallies: what was sent stays sent, what failed stays failed; the pending item is
    // skipped as cancelled, which completes its batch.
    for (batch, summary) in [
        (&sent, "2 sent, 0 failed"),
        (&refused, "0 sent, 1 failed"),
        (&pending, "1 sent, 0 failed, 1 skipped"),
        (&invalid, "0 sent, 1 failed"),
    ] {
        let b = app.batch(batch).await;
        assert_counts_add_up(&b);
        assert_eq!(b["summary"], summary, "{b}");
        assert_eq!(b["status"], "completed", "{b}");
    }
    let item = app
        .items(&pending, Some("skipped"))
        .await
        .pop()
        .expect("the skipped item");
    assert_eq!(item["reason"], "cancelled");
    assert_eq!(item["email"], "");
    assert_eq!(item["name"], Value::Null);
    // Other candidates keep their data.
    let items = app.items(&sent, None).await;
    assert!(items.iter().any(|i| i["email"] == "other.1@example.com"));
    // The refused attempt keeps its reply, without the address.
    let history = app
        .get_json(&format!("/v1/batches/{refused}/items/c-x/attempts"))
        .await;
    assert_eq!(
        history["attempts"][0]["smtp_reply"],
        "550 5.1.1 <[erased]>: Recipient address rejected"
    );

    // The erased item's retry comes due now: it finds nothing to send.
    sqlx::query(
        "UPDATE apalis.jobs SET run_at = now()
          WHERE status = 'Pending' AND run_at > now()",
    )
    .execute(&app.pool)
    .await
    .expect("due now");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.live_tasks_of_batch(&pending).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the retry ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.smtp.attempts(EMAIL),
        sends_before,
        "nothing more was sent"
    );

    // Again: nothing left to erase. Unknown or malformed: 404.
    let r = erase(&app, "c-x").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"erased_items": 0})
    );
    expect_problem(
        erase(&app, "c-nobody").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        erase(&app, "bad%20id").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

/// A cancel or an erasure waits for a send on its way (`sending_at`) up to the send
/// timeout + 5 s. If sends of the item keep starting all that time, it answers 409 and
/// changes nothing (it was a 500).
#[tokio::test]
async fn sends_still_starting_past_the_wait_make_cancel_and_erasure_409_with_no_change() {
    let mut app = crate::helpers::prepare_app_with(|_| {}).await;
    // The wait is smtp.timeout_secs + 5 s: 6 s here.
    let mut api = crate::process::Service::new("api", &app.settings)
        .env("INVITES_SMTP__TIMEOUT_SECS", "1")
        .start("api");
    api.wait_ready(Duration::from_secs(30)).await;
    app.base = api.base();
    app.open_job("job-d").await;
    let id = app
        .create_batch("job-d", crate::helpers::candidates("d", 2))
        .await;
    let batch_id = uuid::Uuid::parse_str(&id).expect("a uuid");
    // A send of d-0 starts (stamped as phase 1 stamps it), and again and again.
    let stamp = "UPDATE batch_items SET sending_at = now()
                  WHERE batch_id = $1 AND candidate_id = 'd-0'";
    sqlx::query(stamp)
        .bind(batch_id)
        .execute(&app.pool)
        .await
        .expect("stamp a send");
    let (pool, stop) = (
        app.pool.clone(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let stamping = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query(stamp)
                    .bind(batch_id)
                    .execute(&pool)
                    .await
                    .expect("stamp a send");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    let cancel_path = format!("/v1/batches/{id}/cancel");
    let (erased, cancelled) = tokio::join!(erase(&app, "d-0"), app.post_empty(&cancel_path));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stamping.await.expect("the stamping task");
    expect_problem(erased, StatusCode::CONFLICT, "invalid_transition").await;
    expect_problem(cancelled, StatusCode::CONFLICT, "invalid_transition").await;

    let batch = app.batch(&id).await;
    assert_eq!(batch["status"], "queued");
    assert_eq!(
        batch["counts"],
        json!({"pending": 2, "sent": 0, "failed": 0, "skipped": 0})
    );
    assert!(
        !rows_holding(&app, "d.0@example.com").await.is_empty(),
        "nothing was erased"
    );
    api.kill();
}

/// A message queued behind a low `mail.rate_per_second` is not on its way yet: an
/// erasure answered while it waits is never followed by a send to the candidate. (The
/// attempt used to be stamped as on its way before the rate limit; once that stamp
/// was older than the erasure's wait, the erasure went through and the message left
/// afterwards, to the erased address.)
#[tokio::test]
async fn an_erasure_answered_while_sends_wait_for_the_rate_limit_is_never_followed_by_a_send() {
    let mut app = spawn_app_with(|s| {
        // Long enough for a clean stop to let every waiting task end.
        s.worker.shutdown_timeout_secs = 60;
        // One message a second; an erasure waits smtp.timeout_secs + 5 s = 6 s for a
        // send on its way.
        s.mail.rate_per_second = 1;
        s.smtp.timeout_secs = 1;
        // Every item past its domain's gate at once: they all queue at the rate limit.
        s.mail.per_domain_concurrency = 32;
    })
    .await;
    app.open_job("job-r").await;
    let id = app
        .create_batch("job-r", crate::helpers::candidates("r", 12))
        .await;
    // Eight messages out: seven seconds on, longer than the erasure's wait.
    app.smtp.wait_for_messages(8, Duration::from_secs(60)).await;
    let waiting: Vec<(String, String)> = sqlx::query_as(
        "SELECT candidate_id, email FROM batch_items
          WHERE batch_id = $1 AND status = 'pending' ORDER BY candidate_id",
    )
    .bind(uuid::Uuid::parse_str(&id).expect("a uuid"))
    .fetch_all(&app.pool)
    .await
    .expect("the pending items");
    assert!(
        waiting.len() >= 2,
        "items still wait for the rate limit: {waiting:?}"
    );

    // Each erased while the others wait; one may be on its way, and is waited for.
    let mut answered = Vec::new();
    for (candidate, email) in &waiting {
        let erased = erase(&app, candidate).await;
        assert_eq!(erased.status(), StatusCode::OK);
        answered.push((candidate, email, app.smtp.attempts(email)));
    }
    let batch = app.wait_until_completed(&id).await;
    assert_counts_add_up(&batch);
    // The batch is complete; a clean stop lets every task still running end (a send
    // that would follow an erasure included) before the server's count is read.
    app.stop().await;
    for (candidate, email, sends_when_answered) in answered {
        assert_eq!(
            app.smtp.attempts(email),
            sends_when_answered,
            "a message to {candidate} left after the erasure answered"
        );
        assert!(
            rows_holding(&app, email).await.is_empty(),
            "the erased address is gone"
        );
    }
}

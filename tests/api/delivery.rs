//! Delivery against a real SMTP server: permanent refusals, deferrals, exhausted
//! retries, dropped connections, the duplicate rule, closing a job mid-batch, and
//! concurrent batches. Every wait polls a condition with a generous deadline.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::Duration,
};

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use smtp_testkit::{Received, Step};

use crate::helpers::{
    TestApp, assert_counts_add_up, candidates, link_in, spawn_app, spawn_app_with,
};

/// A generous bound for anything the service does in the background (a loaded 2-core box).
const PATIENCE: Duration = Duration::from_secs(60);

/// The item of `candidate_id` in a list from `GET /v1/batches/{id}/items`.
fn item_of<'a>(items: &'a [Value], candidate_id: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["candidate_id"] == candidate_id)
        .unwrap_or_else(|| panic!("an item for {candidate_id} in {items:?}"))
}

/// Every completed `DATA` transfer to `email`, accepted or not, in order.
fn deliveries_to(app: &TestApp, email: &str) -> Vec<Received> {
    app.smtp
        .deliveries()
        .into_iter()
        .filter(|m| m.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(email)))
        .collect()
}

/// The messages the SMTP server accepted for `email`.
fn messages_to(app: &TestApp, email: &str) -> Vec<Received> {
    deliveries_to(app, email)
        .into_iter()
        .filter(|m| m.accepted)
        .collect()
}

/// `(candidate_id, code)` of each warning of a batch, in order.
fn warning_pairs(batch: &Value) -> Vec<(String, String)> {
    batch["warnings"]
        .as_array()
        .unwrap_or_else(|| panic!("a warnings array: {batch}"))
        .iter()
        .map(|w| {
            (
                w["candidate_id"].as_str().unwrap_or_default().to_owned(),
                w["code"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A batch body with an explicit `on_duplicate`.
fn batch_body(job_id: &str, people: &[Value], on_duplicate: &str) -> Value {
    json!({"job_id": job_id, "duration_minutes": 30, "candidates": people,
           "on_duplicate": on_duplicate})
}

/// The status of an invitation, read from the `invitations` table.
async fn invitation_status_in_db(app: &TestApp, invitation: &Value) -> String {
    let id = invitation
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("an invitation id: {invitation}"));
    sqlx::query_scalar("SELECT status FROM invitations WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .expect("the invitation row")
}

/// Polls until no send-invite task of the batch can run any more, so nothing can reach
/// the SMTP server for it later (a bound, not a speed assertion).
async fn wait_until_no_live_tasks(app: &TestApp, batch_id: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let live = app.live_tasks_of_batch(batch_id).await;
        if live == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "batch {batch_id} still has {live} live queue tasks after {PATIENCE:?}: {:?}",
            app.task_statuses_of_batch(batch_id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_recipient_refused_with_550_fails_as_rejected_after_one_attempt_and_the_others_are_sent()
{
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let people = candidates("r", 5);
    let refused = "r.2@example.com";
    app.smtp
        .script(refused, [Step::RcptReply(550, "5.1.1 user unknown".into())]);

    let id = app.create_batch("job-1", people.clone()).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 4, "failed": 1, "skipped": 0}),
        "{batch}"
    );
    assert_eq!(batch["summary"], "4 sent, 1 failed");

    let items = app.items(&id, None).await;
    let failed = item_of(&items, "r-2");
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["reason"], "rejected", "{failed}");
    assert_eq!(failed["attempts"], 1, "one attempt only: {failed}");
    let last_error = failed["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("550") && last_error.contains("5.1.1"),
        "last_error carries the server's reply: {failed}"
    );
    assert_eq!(
        invitation_status_in_db(&app, &failed["invitation_id"]).await,
        "REVOKED",
        "the link of an item that failed for good never works"
    );

    wait_until_no_live_tasks(&app, &id).await;
    assert_eq!(
        app.smtp.attempts(refused),
        1,
        "the refused address was tried once"
    );
    assert!(messages_to(&app, refused).is_empty());
    for person in people.iter().filter(|p| p["id"] != "r-2") {
        let email = person["email"].as_str().expect("an email");
        let candidate = person["id"].as_str().expect("an id");
        assert_eq!(item_of(&items, candidate)["status"], "sent");
        assert_eq!(messages_to(&app, email).len(), 1, "one message to {email}");
    }
    assert_eq!(app.smtp.messages().len(), 4);
}

#[tokio::test]
async fn a_recipient_deferred_twice_is_sent_on_the_third_attempt_with_the_same_link_and_message_id()
{
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let people = candidates("d", 3);
    let deferred = "d.0@example.com";
    app.smtp.script(
        deferred,
        [
            Step::DataReply(451, "4.3.0 try again later".into()),
            Step::DataReply(451, "4.3.0 try again later".into()),
            Step::Accept,
        ],
    );

    let id = app.create_batch("job-1", people).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 3, "failed": 0, "skipped": 0}),
        "{batch}"
    );
    assert_eq!(batch["summary"], "3 sent, 0 failed");

    let items = app.items(&id, None).await;
    let item = item_of(&items, "d-0");
    assert_eq!(item["status"], "sent", "{item}");
    assert_eq!(item["reason"], Value::Null, "{item}");
    assert_eq!(item["attempts"], 3, "{item}");

    wait_until_no_live_tasks(&app, &id).await;
    assert_eq!(app.smtp.attempts(deferred), 3);
    let transfers = deliveries_to(&app, deferred);
    assert_eq!(
        transfers.iter().map(|m| m.accepted).collect::<Vec<_>>(),
        vec![false, false, true],
        "two deferred transfers, then the accepted one"
    );
    let base = &app.settings.invite.link_base_url;
    let links: HashSet<Option<String>> =
        transfers.iter().map(|m| link_in(m.body(), base)).collect();
    assert_eq!(
        links.len(),
        1,
        "every attempt carries the same link: {links:?}"
    );
    assert!(
        links.iter().all(Option::is_some),
        "every attempt carries a link: {links:?}"
    );
    let ids: HashSet<Option<String>> = transfers.iter().map(|m| m.header("Message-ID")).collect();
    assert_eq!(
        ids.len(),
        1,
        "every attempt has the same Message-ID: {ids:?}"
    );
    assert!(ids.iter().all(Option::is_some), "a Message-ID: {ids:?}");

    // The other candidates' links and Message-IDs are their own.
    let all_links: HashSet<Option<String>> = app
        .smtp
        .messages()
        .iter()
        .map(|m| link_in(m.body(), base))
        .collect();
    assert_eq!(all_links.len(), 3, "each item has its own link");
}

#[tokio::test]
async fn a_recipient_deferred_on_every_attempt_fails_as_retries_exhausted_and_its_link_is_revoked()
{
    let app = spawn_app().await;
    let max_attempts = app.settings.retry.max_attempts;
    assert_eq!(max_attempts, 4, "the test settings allow 4 attempts");
    app.open_job("job-1").await;
    let people = candidates("x", 2);
    let doomed = "x.1@example.com";
    // More deferrals than attempts: the item must stop at max_attempts by itself.
    let steps = (0..max_attempts + 3).map(|i| {
        if i % 2 == 0 {
            Step::DataReply(451, "4.3.0 mailbox busy".into())
        } else {
            Step::RcptReply(450, "4.2.1 try later".into())
        }
    });
    app.smtp.script(doomed, steps);

    let id = app.create_batch("job-1", people).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 1, "failed": 1, "skipped": 0}),
        "{batch}"
    );
    assert_eq!(batch["summary"], "1 sent, 1 failed");

    let items = app.items(&id, None).await;
    let item = item_of(&items, "x-1");
    assert_eq!(item["status"], "failed", "{item}");
    assert_eq!(item["reason"], "retries_exhausted", "{item}");
    assert_eq!(item["attempts"], max_attempts, "{item}");
    let last_error = item["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("45"),
        "last_error carries the last 4xx reply: {item}"
    );
    assert_eq!(
        invitation_status_in_db(&app, &item["invitation_id"]).await,
        "REVOKED",
        "the link of an item that failed for good is revoked"
    );
    let via_api = app
        .get_json(&format!(
            "/v1/invitations/{}",
            item["invitation_id"].as_str().expect("an invitation id")
        ))
        .await;
    assert_eq!(via_api["status"], "REVOKED", "{via_api}");

    wait_until_no_live_tasks(&app, &id).await;
    assert_eq!(
        app.smtp.attempts(doomed),
        usize::try_from(max_attempts).expect("a small number"),
        "exactly max_attempts delivery attempts"
    );
    assert!(messages_to(&app, doomed).is_empty());
    assert_eq!(messages_to(&app, "x.0@example.com").len(), 1);
}

#[tokio::test]
async fn a_connection_dropped_at_rcpt_is_transient_and_the_item_is_sent_on_a_later_attempt() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let people = candidates("p", 3);
    let dropped = "p.1@example.com";
    app.smtp.script(dropped, [Step::DropAtRcpt]);

    let id = app.create_batch("job-1", people.clone()).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 3, "failed": 0, "skipped": 0}),
        "{batch}"
    );

    let items = app.items(&id, None).await;
    let item = item_of(&items, "p-1");
    assert_eq!(item["status"], "sent", "{item}");
    assert_eq!(
        item["attempts"], 2,
        "the dropped attempt, then the one that went through: {item}"
    );

    wait_until_no_live_tasks(&app, &id).await;
    assert_eq!(app.smtp.attempts(dropped), 2);
    assert_eq!(messages_to(&app, dropped).len(), 1, "sent exactly once");
    for person in &people {
        let email = person["email"].as_str().expect("an email");
        assert_eq!(messages_to(&app, email).len(), 1, "one message to {email}");
    }
}

#[tokio::test]
async fn a_candidate_with_a_pending_invitation_is_skipped_with_a_warning_under_skip_and_sent_again_under_send()
 {
    let app = spawn_app().await;
    app.open_job("job-j").await;
    let x = json!({"id": "cand-x", "email": "x@example.com", "name": "Xavier"});
    let y = json!({"id": "cand-y", "email": "y@example.com"});
    let z = json!({"id": "cand-z", "email": "z@example.com"});

    // Batch 1: X is invited and holds a PENDING invitation.
    let first = app
        .create_batch_with(batch_body("job-j", &[x.clone(), y], "skip"))
        .await;
    let done = app.wait_until_completed(&first).await;
    assert_eq!(done["summary"], "2 sent, 0 failed", "{done}");
    let invitations = app
        .get_json("/v1/invitations?job_id=job-j&candidate_id=cand-x")
        .await;
    let list = invitations["invitations"]
        .as_array()
        .expect("an invitations list");
    assert_eq!(list.len(), 1, "{invitations}");
    assert_eq!(list[0]["status"], "PENDING", "{invitations}");
    assert_eq!(messages_to(&app, "x@example.com").len(), 1);

    // Batch 2, on_duplicate skip: the answer already warns, and X is skipped.
    let r = app
        .post_batch(&batch_body("job-j", &[x.clone(), z], "skip"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let accepted: Value = r.json().await.expect("the batch as JSON");
    assert_eq!(
        warning_pairs(&accepted),
        vec![("cand-x".to_owned(), "already_invited".to_owned())],
        "the 202 body warns about X only: {accepted}"
    );
    let second = accepted["id"].as_str().expect("an id").to_owned();
    let done = app.wait_until_completed(&second).await;
    assert_eq!(
        done["counts"],
        json!({"pending": 0, "sent": 1, "failed": 0, "skipped": 1}),
        "{done}"
    );
    assert_eq!(done["summary"], "1 sent, 0 failed, 1 skipped");
    assert_eq!(
        warning_pairs(&done),
        vec![("cand-x".to_owned(), "already_invited".to_owned())],
        "the completed batch lists the warning once: {done}"
    );
    let items = app.items(&second, None).await;
    let skipped = item_of(&items, "cand-x");
    assert_eq!(skipped["status"], "skipped", "{skipped}");
    assert_eq!(skipped["reason"], "already_invited", "{skipped}");
    assert_eq!(skipped["attempts"], 0, "{skipped}");
    assert_eq!(item_of(&items, "cand-z")["status"], "sent");
    wait_until_no_live_tasks(&app, &second).await;
    assert_eq!(
        messages_to(&app, "x@example.com").len(),
        1,
        "no second message to X under on_duplicate: skip"
    );
    assert_eq!(app.smtp.attempts("x@example.com"), 1);

    // Batch 3, on_duplicate send: X is warned about and sent a second message.
    let r = app.post_batch(&batch_body("job-j", &[x], "send")).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let accepted: Value = r.json().await.expect("the batch as JSON");
    assert_eq!(
        warning_pairs(&accepted),
        vec![("cand-x".to_owned(), "already_invited".to_owned())],
        "the warning is listed under send too: {accepted}"
    );
    let third = accepted["id"].as_str().expect("an id").to_owned();
    let done = app.wait_until_completed(&third).await;
    assert_eq!(
        done["counts"],
        json!({"pending": 0, "sent": 1, "failed": 0, "skipped": 0}),
        "{done}"
    );
    assert_eq!(
        warning_pairs(&done),
        vec![("cand-x".to_owned(), "already_invited".to_owned())],
        "{done}"
    );
    wait_until_no_live_tasks(&app, &third).await;
    let to_x = messages_to(&app, "x@example.com");
    assert_eq!(
        to_x.len(),
        2,
        "X got a second message under on_duplicate: send"
    );
    let base = &app.settings.invite.link_base_url;
    let links: HashSet<Option<String>> = to_x.iter().map(|m| link_in(m.body(), base)).collect();
    assert_eq!(
        links.len(),
        2,
        "the second invitation has its own link: {links:?}"
    );
}

#[tokio::test]
async fn closing_the_job_mid_batch_skips_its_unsent_items_as_job_closed_and_sends_them_nothing() {
    // How "before they are processed" is made deterministic:
    // - the SMTP server defers (451) every recipient but d and e, so a, b and c stay
    //   pending, each waiting for a retry that is RETRY_MS away (no jitter);
    // - the test waits until d and e are sent, a, b and c have made their first attempt,
    //   and the batch's only live tasks are a, b and c's scheduled retries (none queued
    //   or running), so no send is in flight;
    // - it reads the earliest `run_at` of those retries, closes the job, and checks that
    //   the database clock is still before that `run_at`: the close committed before any
    //   worker could pick a retry up. (A precondition, with seconds of margin; a failure
    //   there says the machine was too slow for this test, not that the service is wrong.)
    // - after the close the SMTP server accepts everything, so any send made after the
    //   close would show up as a message.
    const RETRY_MS: u64 = 5_000;
    let app = spawn_app_with(|s| {
        s.retry.initial_delay_ms = RETRY_MS;
        s.retry.max_delay_ms = RETRY_MS;
        s.retry.jitter = 0.0;
    })
    .await;
    app.open_job("job-c").await;
    app.smtp
        .set_default(Step::DataReply(451, "4.3.0 try again later".into()));
    app.smtp.script("d@example.com", [Step::Accept]);
    app.smtp.script("e@example.com", [Step::Accept]);
    let people: Vec<Value> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| json!({"id": format!("cand-{n}"), "email": format!("{n}@example.com")}))
        .collect();
    let slow = ["cand-a", "cand-b", "cand-c"];

    let id = app.create_batch("job-c", people).await;
    app.wait_for_items(
        &id,
        "d and e sent; a, b and c tried once with a retry scheduled",
        PATIENCE,
        |items| {
            items.len() == 5
                && items.iter().all(|i| {
                    if slow.contains(&i["candidate_id"].as_str().unwrap_or_default()) {
                        i["status"] == "pending"
                            && i["attempts"] == 1
                            && i["last_error"].is_string()
                    } else {
                        i["status"] == "sent"
                    }
                })
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let statuses = app.task_statuses_of_batch(&id).await;
        let live: i64 = ["Queued", "Running"]
            .iter()
            .filter_map(|s| statuses.get(*s))
            .sum();
        if live == 0 && statuses.get("Pending") == Some(&3) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch's tasks did not settle to 3 scheduled retries: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batch_uuid = uuid::Uuid::parse_str(&id).expect("a uuid");
    let first_due: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT min(j.run_at) FROM apalis.jobs j
         WHERE j.job_type = $2 AND j.status = 'Pending'
           AND (convert_from(j.job, 'UTF8')::jsonb ->> 'item_id')::uuid IN
               (SELECT i.id FROM batch_items i WHERE i.batch_id = $1)",
    )
    .bind(batch_uuid)
    .bind(invite_worker::db::tasks::QUEUE)
    .fetch_one(&app.pool)
    .await
    .expect("the earliest scheduled retry");
    assert_eq!(app.batch(&id).await["status"], "running");

    let r = app.put_job("job-c", "Backend Engineer", "closed").await;
    assert_eq!(r.status(), StatusCode::OK, "the job is closed");
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&app.pool)
        .await
        .expect("the database clock");
    assert!(
        now < first_due,
        "precondition: the job was closed ({now}) before any retry came due ({first_due})"
    );
    app.smtp.set_default(Step::Accept);

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 2, "failed": 0, "skipped": 3}),
        "{batch}"
    );
    assert_eq!(batch["summary"], "2 sent, 0 failed, 3 skipped");
    let items = app.items(&id, None).await;
    for candidate in slow {
        let item = item_of(&items, candidate);
        assert_eq!(item["status"], "skipped", "{item}");
        assert_eq!(item["reason"], "job_closed", "{item}");
        assert_eq!(item["attempts"], 1, "no attempt after the close: {item}");
    }
    wait_until_no_live_tasks(&app, &id).await;
    for who in ["a", "b", "c"] {
        let email = format!("{who}@example.com");
        assert_eq!(
            app.smtp.attempts(&email),
            1,
            "{email} was contacted only before the close"
        );
        assert!(
            messages_to(&app, &email).is_empty(),
            "no message to {email}"
        );
    }
    assert_eq!(app.smtp.messages().len(), 2, "only d and e got a message");
}

#[tokio::test]
async fn closing_the_job_while_items_wait_in_the_queue_skips_them_all_without_contacting_the_mail_server()
 {
    // How "before they are processed" is made deterministic: one task at a time
    // (`worker.concurrency = 1`) and a mail server that stalls after DATA for longer than
    // the test runs (with a send timeout longer still). Once the SMTP server has the first
    // transfer, that item's send holds the only worker slot, so the four other items
    // cannot have started: they wait in the queue. The job is closed then; only after
    // that is the stalled connection cut (`pause`), freeing the slot, with the server
    // accepting everything from then on, so any send after the close would be a message.
    let app = spawn_app_with(|s| {
        s.worker.concurrency = 1;
        s.smtp.timeout_secs = 300;
    })
    .await;
    app.open_job("job-q").await;
    app.smtp
        .set_default(Step::StallAfterData(Duration::from_secs(600)));
    let people = candidates("q", 5);

    let id = app.create_batch("job-q", people.clone()).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while app.smtp.deliveries().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first send did not reach the SMTP server within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stalled = app.smtp.deliveries()[0].rcpt_to[0].to_lowercase();
    let items = app.items(&id, None).await;
    let started: Vec<&Value> = items
        .iter()
        .filter(|i| i["attempts"] != 0 || i["status"] != "pending")
        .collect();
    assert_eq!(
        started.len(),
        1,
        "precondition: only the stalled item has started: {items:?}"
    );

    let r = app.put_job("job-q", "Backend Engineer", "closed").await;
    assert_eq!(r.status(), StatusCode::OK, "the job is closed");
    app.smtp.set_default(Step::Accept);
    app.smtp.pause().await; // cuts the stalled connection: a transient failure
    app.smtp
        .resume()
        .await
        .expect("the SMTP server serves again");

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 0, "failed": 0, "skipped": 5}),
        "{batch}"
    );
    assert_eq!(batch["summary"], "0 sent, 0 failed, 5 skipped");
    let items = app.items(&id, None).await;
    for item in &items {
        assert_eq!(item["status"], "skipped", "{item}");
        assert_eq!(item["reason"], "job_closed", "{item}");
        let expected_attempts = if item["email"] == stalled.as_str() {
            1
        } else {
            0
        };
        assert_eq!(item["attempts"], expected_attempts, "{item}");
    }
    wait_until_no_live_tasks(&app, &id).await;
    for person in &people {
        let email = person["email"].as_str().expect("an email");
        let expected = usize::from(email == stalled);
        assert_eq!(
            app.smtp.attempts(email),
            expected,
            "{email}: only the stalled send reached the SMTP server"
        );
    }
    assert!(app.smtp.messages().is_empty(), "no message was sent");
}

#[tokio::test]
async fn five_batches_of_100_posted_at_once_all_complete_with_one_message_per_address() {
    let app = spawn_app().await;
    app.open_job("job-5").await;
    let groups: Vec<Vec<Value>> = (0..5).map(|k| candidates(&format!("b{k}"), 100)).collect();

    let bodies: Vec<Value> = groups
        .iter()
        .map(|people| json!({"job_id": "job-5", "duration_minutes": 30, "candidates": people}))
        .collect();
    let responses = join_all(bodies.iter().map(|body| app.post_batch(body))).await;
    let mut ids = Vec::new();
    for r in responses {
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let body: Value = r.json().await.expect("the batch as JSON");
        assert_counts_add_up(&body);
        ids.push(body["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        5,
        "five different batches"
    );

    for id in &ids {
        let batch = app
            .wait_for_status(id, "completed", Duration::from_secs(180))
            .await;
        assert_eq!(
            batch["counts"],
            json!({"pending": 0, "sent": 100, "failed": 0, "skipped": 0}),
            "{batch}"
        );
        assert_eq!(batch["summary"], "100 sent, 0 failed");
    }
    for id in &ids {
        wait_until_no_live_tasks(&app, id).await;
    }

    let messages = app.smtp.messages();
    let mut per_address: BTreeMap<String, usize> = BTreeMap::new();
    for m in &messages {
        assert_eq!(m.rcpt_to.len(), 1, "one recipient per message");
        *per_address.entry(m.rcpt_to[0].to_lowercase()).or_default() += 1;
    }
    let repeated: Vec<_> = per_address.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "addresses sent to more than once: {repeated:?}"
    );
    let expected: BTreeSet<String> = groups
        .iter()
        .flatten()
        .map(|p| p["email"].as_str().expect("an email").to_lowercase())
        .collect();
    let got: BTreeSet<String> = per_address.keys().cloned().collect();
    assert_eq!(got, expected, "one message to each of the 500 addresses");
    assert_eq!(messages.len(), 500, "exactly 500 messages");
    assert_eq!(app.smtp.deliveries().len(), 500, "and no other transfer");
}

#[tokio::test]
async fn twelve_batches_racing_for_the_same_4_candidates_invite_each_of_them_once() {
    let app = spawn_app().await;
    app.open_job("job-race").await;
    // The same 4 people in 12 batches posted at once: 48 tasks for 4 people, so
    // items of one person meet in one prepare group (a fetch holds 16 tasks) as well
    // as in groups written one after the other; under `skip`, exactly one item per
    // person may mint and send, whichever batch it is in.
    let people = candidates("shared", 4);
    let body = json!({"job_id": "job-race", "duration_minutes": 30, "candidates": people});
    let responses = join_all((0..12).map(|_| app.post_batch(&body))).await;
    let mut ids = Vec::new();
    for r in responses {
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let body: Value = r.json().await.expect("the batch as JSON");
        ids.push(body["id"].as_str().expect("an id").to_owned());
    }

    let (mut sent, mut skipped) = (0, 0);
    for id in &ids {
        let batch = app
            .wait_for_status(id, "completed", Duration::from_secs(60))
            .await;
        assert_counts_add_up(&batch);
        assert_eq!(batch["counts"]["failed"], 0, "{batch}");
        sent += batch["counts"]["sent"].as_i64().expect("a count");
        let skips = batch["counts"]["skipped"].as_i64().expect("a count");
        skipped += skips;
        for item in app.items(id, Some("skipped")).await {
            assert_eq!(item["reason"], "already_invited", "{item}");
        }
        let warned = batch["warnings"]
            .as_array()
            .expect("warnings")
            .iter()
            .filter(|w| w["code"] == "already_invited")
            .count();
        assert_eq!(
            warned as i64, skips,
            "one already_invited warning per skipped item: {batch}"
        );
    }
    assert_eq!(
        (sent, skipped),
        (4, 44),
        "each person invited once, in one batch"
    );

    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM invitations WHERE job_id = 'job-race' AND status = 'PENDING'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(live, 4, "one live invitation per person");
    let mut per_address: BTreeMap<String, usize> = BTreeMap::new();
    for m in app.smtp.messages() {
        *per_address.entry(m.rcpt_to[0].to_lowercase()).or_default() += 1;
    }
    assert_eq!(per_address.len(), 4, "every person got a message");
    assert!(
        per_address.values().all(|n| *n == 1),
        "one message each: {per_address:?}"
    );
}

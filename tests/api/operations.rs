//! What an operator sees and does over the API (operations.md §3): failures grouped by
//! reason, retry by reason with a dry run, the queue's figures and its dead tasks.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::helpers::{TestApp, expect_problem, spawn_app};

/// A batch on `job-ops` whose items end in every way a failure can: 22 invalid
/// addresses (`bad-*`), three refused `550 5.1.1` (`gone-*`), one refused
/// `554 5.7.1` (`policy-0`), one out of retries after `451 4.3.0` (`busy-0`), and one
/// sent (`ok-0`). Returns its id once it is completed.
pub async fn batch_with_failures(app: &TestApp) -> String {
    app.open_job("job-ops").await;
    let mut people: Vec<Value> = (0..22)
        .map(|i| json!({"id": format!("bad-{i:02}"), "email": format!("bad-{i}-at-example.com")}))
        .collect();
    for i in 0..3 {
        let email = format!("gone.{i}@example.com");
        app.smtp
            .script(&email, [Step::RcptReply(550, "5.1.1 user unknown".into())]);
        people.push(json!({"id": format!("gone-{i}"), "email": email}));
    }
    app.smtp.script(
        "policy.0@example.com",
        [Step::RcptReply(554, "5.7.1 refused by policy".into())],
    );
    people.push(json!({"id": "policy-0", "email": "policy.0@example.com"}));
    let busy = Step::DataReply(451, "4.3.0 try again later".into());
    app.smtp.script(
        "busy.0@example.com",
        std::iter::repeat_n(busy, app.settings.retry.max_attempts as usize),
    );
    people.push(json!({"id": "busy-0", "email": "busy.0@example.com"}));
    people.push(json!({"id": "ok-0", "email": "ok.0@example.com"}));
    let id = app.create_batch("job-ops", people).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "1 sent, 27 failed", "{batch}");
    id
}

#[tokio::test]
async fn failures_are_grouped_by_reason_and_reply_code_largest_group_first() {
    let app = spawn_app().await;
    let id = batch_with_failures(&app).await;

    let body = app.get_json(&format!("/v1/batches/{id}/failures")).await;
    let groups = body["groups"].as_array().expect("groups");
    let first_20: Vec<String> = (0..20).map(|i| format!("bad-{i:02}")).collect();
    assert_eq!(
        groups[0],
        json!({"reason": "invalid_email", "reply_code": null, "count": 22,
               "candidate_ids": first_20}),
        "the largest group first, at most 20 ids, in the batch's order"
    );
    assert_eq!(
        groups[1..],
        [
            json!({"reason": "rejected", "reply_code": "550 5.1.1", "count": 3,
                   "candidate_ids": ["gone-0", "gone-1", "gone-2"]}),
            json!({"reason": "rejected", "reply_code": "554 5.7.1", "count": 1,
                   "candidate_ids": ["policy-0"]}),
            json!({"reason": "retries_exhausted", "reply_code": "451 4.3.0", "count": 1,
                   "candidate_ids": ["busy-0"]}),
        ],
        "{body}"
    );

    let unknown = app
        .get("/v1/batches/00000000-0000-7000-8000-000000000000/failures")
        .await;
    expect_problem(unknown, StatusCode::NOT_FOUND, "not_found").await;
}

/// The batch.retried entries of the audit log, newest first.
async fn retried_entries(app: &TestApp) -> Vec<Value> {
    let audit = app.get_json("/v1/audit?action=batch.retried").await;
    audit["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_dry_run_names_what_a_retry_by_reason_would_retry_and_changes_nothing() {
    let app = spawn_app().await;
    let id = batch_with_failures(&app).await;
    let path = format!("/v1/batches/{id}/retry");
    let before = app.batch(&id).await;

    let r = app
        .post_json(&path, &json!({"reason": "rejected", "dry_run": true}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        body,
        json!({"would_retry": 4, "candidate_ids": ["gone-0", "gone-1", "gone-2", "policy-0"]})
    );
    let r = app.post_json(&path, &json!({"dry_run": true})).await;
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["would_retry"], 27, "every failed item: {body}");
    let listed = json!({"candidates": [{"id": "busy-0"}], "dry_run": true});
    let body: Value = app
        .post_json(&path, &listed)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body, json!({"would_retry": 1, "candidate_ids": ["busy-0"]}));
    let none = json!({"reason": "suppressed", "dry_run": true});
    let body: Value = app
        .post_json(&path, &none)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body, json!({"would_retry": 0, "candidate_ids": []}));

    assert_eq!(app.batch(&id).await, before, "a dry run changes nothing");
    assert_eq!(app.live_tasks_of_batch(&id).await, 0, "and pushes no task");
    assert!(
        retried_entries(&app).await.is_empty(),
        "nor writes the audit log"
    );
}

#[tokio::test]
async fn a_retry_by_reason_puts_back_only_that_reasons_items_and_is_audited() {
    let app = spawn_app().await;
    let id = batch_with_failures(&app).await;
    let path = format!("/v1/batches/{id}/retry");

    let r = app
        .post_json(&path, &json!({"reason": "retries_exhausted"}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["summary"], "2 sent, 26 failed",
        "busy-0 went out: {batch}"
    );
    let items = app.items(&id, Some("failed")).await;
    assert!(
        items
            .iter()
            .all(|i| i["reason"] != "retries_exhausted" && i["attempts"] == 1
                || i["reason"] == "invalid_email"),
        "the other failures stayed as they were: {items:?}"
    );
    let entries = retried_entries(&app).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["actor"], "key:key:1");
    assert_eq!(entries[0]["target"], id);
    assert_eq!(
        entries[0]["detail"],
        json!({"items": 1, "corrected_emails": 0, "reason": "retries_exhausted"})
    );

    // Nothing of that reason is left: 409, and nothing written.
    let again = app
        .post_json(&path, &json!({"reason": "retries_exhausted"}))
        .await;
    expect_problem(again, StatusCode::CONFLICT, "not_retryable").await;
    for (body, what) in [
        (json!({"reason": "cancelled"}), "a reason for skipping"),
        (json!({"reason": "tired"}), "no such reason"),
        (
            json!({"reason": "rejected", "candidates": [{"id": "gone-0"}]}),
            "both forms",
        ),
        (json!({"dry_run": "yes"}), "dry_run not a boolean"),
    ] {
        let r = app.post_json(&path, &body).await;
        let problem =
            expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(problem["detail"].is_string(), "{what}: {problem}");
    }
    assert_eq!(retried_entries(&app).await.len(), 1);
}

/// Writes a send-invite task of the app's queue straight into apalis' table, with a
/// payload no handler can read: the worker kills it, a real dead task.
pub(crate) async fn push_undecodable_task(app: &TestApp, id: &str) {
    sqlx::query(
        "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at)
         VALUES ('not json'::bytea, $1, $2, 'Pending', 0, 10, now())",
    )
    .bind(id)
    .bind(invite_worker::db::tasks::QUEUE)
    .execute(&app.pool)
    .await
    .expect("insert a task");
}

pub(crate) async fn wait_for_dead(app: &TestApp, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = app.get_json("/v1/queue/dead").await;
        let tasks = body["tasks"].as_array().cloned().unwrap_or_default();
        if tasks.len() == n {
            return tasks;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} dead tasks: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_queue_shows_tasks_by_state_live_workers_and_the_last_minutes_sends() {
    let app = spawn_app().await;
    app.open_job("job-q").await;
    let id = app
        .create_batch("job-q", crate::helpers::candidates("q", 3))
        .await;
    app.wait_until_completed(&id).await;
    // A task due in an hour, which no worker takes yet.
    sqlx::query(
        "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at)
         VALUES ('{}'::bytea, '01KZZZZZZZZZZZZZZZZZZZZZZZ', $1, 'Pending', 0, 10,
                 now() + interval '1 hour')",
    )
    .bind(invite_worker::db::tasks::QUEUE)
    .execute(&app.pool)
    .await
    .expect("insert a scheduled task");
    push_undecodable_task(&app, "01J00000000000000000000001").await;
    wait_for_dead(&app, 1).await;

    let queue = app.get_json("/v1/queue").await;
    assert_eq!(
        queue["tasks"],
        json!({"pending": 0, "scheduled": 1, "running": 0, "done": 3, "dead": 1}),
        "{queue}"
    );
    assert_eq!(queue["oldest_pending_age_secs"], 0);
    assert_eq!(queue["sent_last_minute"], 3);
    let workers = queue["workers"].as_array().expect("workers");
    assert!(!workers.is_empty(), "this process's workers: {queue}");
    for w in workers {
        assert!(
            w["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("invite-worker@")),
            "{w}"
        );
        assert!(w["last_seen"].is_string() && w["in_flight"] == 0, "{w}");
    }
}

#[tokio::test]
async fn dead_tasks_are_listed_and_run_again_by_id_or_all_with_an_audit_entry() {
    let app = spawn_app().await;
    push_undecodable_task(&app, "01J00000000000000000000001").await;
    push_undecodable_task(&app, "01J00000000000000000000002").await;
    let dead = wait_for_dead(&app, 2).await;
    assert_eq!(dead[0]["id"], "01J00000000000000000000002", "newest first");
    assert_eq!(dead[0]["status"], "Killed");
    assert_eq!(dead[0]["item_id"], Value::Null, "the payload names no item");
    let one = app.get_json("/v1/queue/dead?limit=1").await;
    assert_eq!(one["tasks"].as_array().map(Vec::len), Some(1));

    let died_at = |t: &Value| {
        t["died_at"]
            .as_str()
            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
    };
    let first_death = died_at(&dead[1]);
    let r = app
        .post_json(
            "/v1/queue/dead/retry",
            &json!({"ids": ["01J00000000000000000000001", "01J0000000000000000000000Z"]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"retried": 1})
    );
    // It ran again and died again (its payload is still unreadable), later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let dead = wait_for_dead(&app, 2).await;
        if died_at(&dead[1]) > first_death {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ran again: {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `all` takes every dead one.
    let r = app
        .post_json("/v1/queue/dead/retry", &json!({"all": true}))
        .await;
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"retried": 2})
    );

    let audit = app.get_json("/v1/audit?action=tasks.retried").await;
    let entries = audit["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{audit}");
    assert_eq!(entries[0]["target"], "all");
    assert_eq!(entries[0]["detail"], json!({"tasks": 2}));
    assert_eq!(
        entries[1]["target"],
        "01J00000000000000000000001,01J0000000000000000000000Z"
    );

    for body in [
        json!({}),
        json!({"ids": []}),
        json!({"ids": ["not-a-task"]}),
        json!({"ids": ["01J00000000000000000000001"], "all": true}),
        json!({"all": false}),
    ] {
        let r = app.post_json("/v1/queue/dead/retry", &body).await;
        expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    let r = app.get("/v1/queue/dead?limit=0").await;
    expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}

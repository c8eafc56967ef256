//! The suppression list: a bad-mailbox refusal (5.1.x) suppresses the address; later
//! items to it fail `suppressed` without contacting the server; an explicit retry tries
//! the server again; the list is visible and editable over the API.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::helpers::{KEY, TestApp, expect_problem, spawn_app, spawn_app_with};

const ADDRESS: &str = "gone.0@example.com";

fn body(job: &str, id: &str, email: &str) -> Value {
    json!({"job_id": job, "duration_minutes": 30,
           "candidates": [{"id": id, "email": email},
                          {"id": format!("{id}-ok"), "email": format!("{id}.ok@example.com")}]})
}

async fn suppressions(app: &TestApp) -> Vec<Value> {
    app.get_json("/v1/suppressions").await["suppressions"]
        .as_array()
        .cloned()
        .expect("a list")
}

#[tokio::test]
async fn a_bad_mailbox_is_suppressed_later_items_fail_without_contact_and_a_retry_tries_again() {
    let app = spawn_app().await;
    app.open_job("job-s").await;
    app.smtp.script(
        ADDRESS,
        [
            Step::RcptReply(550, "5.1.1 <gone.0@example.com>: user unknown".into()),
            Step::Accept,
        ],
    );

    let first = app.create_batch_with(body("job-s", "c-1", ADDRESS)).await;
    let batch = app.wait_until_completed(&first).await;
    assert_eq!(batch["summary"], "1 sent, 1 failed", "{batch}");
    let listed = suppressions(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["email"], ADDRESS);
    assert!(
        listed[0]["reply"]
            .as_str()
            .is_some_and(|r| r.contains("5.1.1")),
        "{listed:?}"
    );

    // The same address, written differently, in a later batch: no server contact.
    let second = app
        .create_batch_with(body("job-s", "c-2", "  Gone.0@Example.COM "))
        .await;
    let batch = app.wait_until_completed(&second).await;
    assert_eq!(batch["summary"], "1 sent, 1 failed", "{batch}");
    let failed = app.items(&second, Some("failed")).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["reason"], "suppressed", "{failed:?}");
    assert_eq!(
        app.smtp.attempts(ADDRESS),
        1,
        "the server was not asked again"
    );

    // Someone retries it on purpose: the server is tried again (and accepts now).
    let r = app.post_empty(&format!("/v1/batches/{second}/retry")).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let batch = app.wait_until_completed(&second).await;
    assert_eq!(batch["summary"], "2 sent, 0 failed", "{batch}");
    assert_eq!(app.smtp.attempts(ADDRESS), 2);

    // Taken off the list, by any spelling; a second removal finds nothing.
    let delete = |email: &str| {
        app.client
            .delete(app.url(&format!("/v1/suppressions/{email}")))
            .bearer_auth(KEY)
            .send()
    };
    let r = delete("GONE.0@example.com").await.expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(suppressions(&app).await.is_empty());
    let r = delete(ADDRESS).await.expect("request");
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn with_suppression_off_a_refusal_suppresses_nothing() {
    let app = spawn_app_with(|s| s.mail.suppress_rejected = false).await;
    app.open_job("job-n").await;
    app.smtp
        .script(ADDRESS, [Step::RcptReply(550, "5.1.1 user unknown".into())]);
    let id = app.create_batch_with(body("job-n", "c-1", ADDRESS)).await;
    app.wait_for_status(&id, "completed", Duration::from_secs(60))
        .await;
    assert!(suppressions(&app).await.is_empty());
}

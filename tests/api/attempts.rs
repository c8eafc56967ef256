//! The attempt history (`GET /v1/batches/{id}/items/{candidate_id}/attempts`): one row
//! per attempt, written with its outcome, against a real SMTP server answering 4xx then
//! 250, and 550.

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::helpers::{TestApp, expect_problem, spawn_app_with};

async fn attempts(app: &TestApp, batch: &str, candidate: &str) -> Vec<Value> {
    let v = app
        .get_json(&format!("/v1/batches/{batch}/items/{candidate}/attempts"))
        .await;
    v["attempts"].as_array().cloned().expect("attempts")
}

fn field<'a>(attempts: &'a [Value], key: &str) -> Vec<&'a Value> {
    attempts.iter().map(|a| &a[key]).collect()
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().expect("a timestamp").parse().expect("RFC 3339")
}

#[tokio::test]
async fn every_attempt_is_kept_with_its_masked_reply_and_numbers_continue_after_a_retry() {
    let app = spawn_app_with(|s| s.worker.name = "worker-7".into()).await;
    app.open_job("job-1").await;
    app.smtp.script(
        "flaky@example.com",
        [Step::RcptReply(451, "4.3.0 try later".into()), Step::Accept],
    );
    app.smtp.script(
        "gone@example.com",
        [
            Step::RcptReply(
                550,
                "5.1.1 <gone@example.com>: Recipient address rejected".into(),
            ),
            Step::Accept,
        ],
    );
    app.smtp.script(
        "tired@example.com",
        vec![Step::RcptReply(451, "4.4.1 no answer".into()); 4],
    );
    let batch = app
        .create_batch(
            "job-1",
            vec![
                json!({"id": "c-flaky", "email": "flaky@example.com"}),
                json!({"id": "c-gone", "email": "gone@example.com"}),
                json!({"id": "c-tired", "email": "tired@example.com"}),
                json!({"id": "c-bad", "email": "not-an-email"}),
            ],
        )
        .await;
    app.wait_until_completed(&batch).await;

    let flaky = attempts(&app, &batch, "c-flaky").await;
    assert_eq!(field(&flaky, "number"), [&json!(1), &json!(2)], "{flaky:?}");
    assert_eq!(
        field(&flaky, "outcome"),
        [&json!("transient"), &json!("sent")]
    );
    assert_eq!(flaky[0]["smtp_reply"], "451 4.3.0 try later");
    assert!(
        flaky[1]["smtp_reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("250 ")),
        "the server's acceptance: {flaky:?}"
    );
    for a in &flaky {
        assert_eq!(a["worker"], "worker-7");
        assert!(time(&a["started_at"]) <= time(&a["finished_at"]), "{a}");
    }
    assert!(
        time(&flaky[0]["finished_at"]) <= time(&flaky[1]["started_at"]),
        "oldest first: {flaky:?}"
    );

    let tired = attempts(&app, &batch, "c-tired").await;
    assert_eq!(tired.len(), 4, "retry.max_attempts attempts: {tired:?}");
    assert!(
        tired.iter().all(|a| a["outcome"] == "transient"),
        "the last attempt of a retries_exhausted item is transient: {tired:?}"
    );

    let bad = attempts(&app, &batch, "c-bad").await;
    assert_eq!(field(&bad, "outcome"), [&json!("invalid_email")], "{bad:?}");
    assert_eq!(bad[0]["smtp_reply"], Value::Null, "no server was contacted");

    let gone = attempts(&app, &batch, "c-gone").await;
    assert_eq!(field(&gone, "outcome"), [&json!("rejected")], "{gone:?}");
    assert_eq!(
        gone[0]["smtp_reply"], "550 5.1.1 <g***@example.com>: Recipient address rejected",
        "the quoted recipient is masked"
    );

    // A retry of the item starts a fresh attempt budget; its attempts continue the
    // numbering.
    let r = app
        .post_json(
            &format!("/v1/batches/{batch}/retry"),
            &json!({"candidates": [{"id": "c-gone"}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    app.wait_until_completed(&batch).await;
    let gone = attempts(&app, &batch, "c-gone").await;
    assert_eq!(field(&gone, "number"), [&json!(1), &json!(2)], "{gone:?}");
    assert_eq!(
        field(&gone, "outcome"),
        [&json!("rejected"), &json!("sent")]
    );
    let items = app.items(&batch, Some("sent")).await;
    let item = items
        .iter()
        .find(|i| i["candidate_id"] == "c-gone")
        .expect("c-gone is sent");
    assert_eq!(item["attempts"], 1, "the item's own budget restarted");

    for path in [
        format!("/v1/batches/{batch}/items/c-nobody/attempts"),
        "/v1/batches/0193a5b0-0000-7000-8000-000000000000/items/c-flaky/attempts".to_owned(),
        "/v1/batches/not-a-uuid/items/c-flaky/attempts".to_owned(),
    ] {
        expect_problem(app.get(&path).await, StatusCode::NOT_FOUND, "not_found").await;
    }
}

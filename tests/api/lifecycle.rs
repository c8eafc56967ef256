//! The lifecycle of a batch and its invitations around the main path: preview,
//! idempotent create, retry with corrections, cancel, single-use links and their
//! transitions, and the list routes.

use std::{collections::HashMap, collections::HashSet, time::Duration};

use futures::future::join_all;
use reqwest::{StatusCode, header::HeaderValue};
use serde_json::{Value, json};

use crate::helpers::{
    KEY, TestApp, assert_counts_add_up, candidates, expect_problem, spawn_app, spawn_app_with,
};

/// A generous bound for anything the service does in the background (a loaded 2-core box).
const PATIENCE: Duration = Duration::from_secs(60);

fn batch_body(job_id: &str, people: &[Value]) -> Value {
    json!({"job_id": job_id, "duration_minutes": 30, "candidates": people})
}

/// A digest of every row of our own tables, to show that a request changed none of them
/// (not only that it added or removed none).
async fn fingerprint(app: &TestApp) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for table in ["jobs", "batches", "batch_items", "invitations"] {
        let digest: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"
        )))
        .fetch_one(&app.pool)
        .await
        .expect("table digest");
        out.push((table.to_owned(), digest));
    }
    out
}

/// `(candidate_id, code)` of each warning, in order.
fn warning_pairs(warnings: &Value) -> Vec<(String, String)> {
    warnings
        .as_array()
        .expect("warnings is an array")
        .iter()
        .map(|w| {
            assert!(
                w["message"].as_str().is_some_and(|m| !m.is_empty()),
                "every warning has a message: {w}"
            );
            (
                w["candidate_id"].as_str().expect("candidate_id").to_owned(),
                w["code"].as_str().expect("code").to_owned(),
            )
        })
        .collect()
}

fn ids_of(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is an array: {list}"))
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Messages the SMTP server accepted for this address.
fn messages_to(app: &TestApp, email: &str) -> usize {
    app.smtp
        .messages()
        .iter()
        .filter(|m| m.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(email)))
        .count()
}

/// candidate id → invitation id, from the batch's items.
async fn invitation_ids(app: &TestApp, batch_id: &str) -> HashMap<String, String> {
    app.items(batch_id, None)
        .await
        .iter()
        .map(|i| {
            (
                i["candidate_id"].as_str().expect("candidate_id").to_owned(),
                i["invitation_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("item has an invitation: {i}"))
                    .to_owned(),
            )
        })
        .collect()
}

/// `POST /v1/invitations/{id}/{action}` (`complete` or `revoke`).
async fn post_transition(app: &TestApp, invitation_id: &str, action: &str) -> reqwest::Response {
    app.post_empty(&format!("/v1/invitations/{invitation_id}/{action}"))
        .await
}

async fn invitation_status(app: &TestApp, id: &str) -> String {
    let inv = app.get_json(&format!("/v1/invitations/{id}")).await;
    inv["status"].as_str().expect("status").to_owned()
}

// 1 ------------------------------------------------------------------------------------

/// A create decides its warnings in the statement that writes the batch
/// (`db::tasks::create_batch`), a preview in the application: the same request gets the
/// same warnings, in candidate order, from both, and keeps them.
#[tokio::test]
async fn a_created_batch_has_exactly_the_warnings_its_preview_showed() {
    let app = spawn_app().await;
    app.open_job("job-w").await;
    // old-0 and old-1 hold live invitations for job-w.
    let earlier = app.create_batch("job-w", candidates("old", 2)).await;
    app.wait_until_completed(&earlier).await;

    let mut people = candidates("new", 3);
    people[1]["email"] = json!("not-an-email");
    people.insert(0, json!({"id": "old-1", "email": "old.1@example.com"}));
    people.push(json!({"id": "old-0", "email": "old.0@example.com"}));
    let body = batch_body("job-w", &people);
    let r = app.post_json("/v1/batches/preview", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let preview: Value = r.json().await.expect("json");
    assert_eq!(
        warning_pairs(&preview["warnings"]),
        [
            ("old-1", "already_invited"),
            ("new-1", "invalid_email"),
            ("old-0", "already_invited"),
        ]
        .map(|(id, code)| (id.to_owned(), code.to_owned())),
        "{preview}"
    );

    let r = app.post_batch(&body).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let created: Value = r.json().await.expect("json");
    assert_eq!(created["warnings"], preview["warnings"], "{created}");
    let id = created["id"].as_str().expect("id");
    assert_eq!(app.batch(id).await["warnings"], preview["warnings"]);
}

#[tokio::test]
async fn preview_writes_nothing_and_reports_sends_skips_failures_and_both_warning_kinds() {
    let app = spawn_app().await;
    app.open_job("job-p").await;
    // An earlier, completed batch gives old-0 a live (PENDING) invitation for job-p.
    let earlier = app.create_batch("job-p", candidates("old", 1)).await;
    app.wait_until_completed(&earlier).await;
    assert_eq!(app.smtp.messages().len(), 1);

    let mut people = candidates("new", 3);
    people[1]["email"] = json!("not-an-email");
    // A new address for old-0: a real create would store it; a preview must not.
    people.push(json!({"id": "old-0", "email": "old.0.changed@example.com"}));
    let body = batch_body("job-p", &people);

    let counts_before = app.row_counts().await;
    let rows_before = fingerprint(&app).await;
    let r = app.post_json("/v1/batches/preview", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let preview: Value = r.json().await.expect("json");
    assert_eq!(
        app.row_counts().await,
        counts_before,
        "row counts unchanged"
    );
    assert_eq!(fingerprint(&app).await, rows_before, "no row changed");

    assert_eq!(preview["total"], 4, "{preview}");
    assert_eq!(preview["to_send"], 2, "new-0 and new-2: {preview}");
    assert_eq!(preview["to_skip"], 1, "old-0 (already invited): {preview}");
    assert_eq!(preview["to_fail"], 1, "new-1 (invalid email): {preview}");
    let n = |k: &str| preview[k].as_i64().expect("a number");
    assert_eq!(n("total"), n("to_send") + n("to_skip") + n("to_fail"));
    let warnings: HashSet<_> = warning_pairs(&preview["warnings"]).into_iter().collect();
    let expected: HashSet<_> = [
        ("new-1".to_owned(), "invalid_email".to_owned()),
        ("old-0".to_owned(), "already_invited".to_owned()),
    ]
    .into_iter()
    .collect();
    assert_eq!(warnings, expected, "{preview}");

    // With on_duplicate: send the already-invited candidate would be sent, still warned.
    let mut send_anyway = body.clone();
    send_anyway["on_duplicate"] = json!("send");
    let r = app.post_json("/v1/batches/preview", &send_anyway).await;
    assert_eq!(r.status(), StatusCode::OK);
    let preview: Value = r.json().await.expect("json");
    assert_eq!(
        (
            &preview["total"],
            &preview["to_send"],
            &preview["to_skip"],
            &preview["to_fail"]
        ),
        (&json!(4), &json!(3), &json!(0), &json!(1)),
        "{preview}"
    );
    let warnings: HashSet<_> = warning_pairs(&preview["warnings"]).into_iter().collect();
    assert_eq!(warnings, expected, "{preview}");

    // A closed job: the same problem a create would answer.
    let r = app.put_job("job-closed", "Closed Role", "closed").await;
    assert!(
        r.status().is_success(),
        "closed job created: {}",
        r.status()
    );
    let counts_before = app.row_counts().await;
    let rows_before = fingerprint(&app).await;
    let r = app
        .post_json(
            "/v1/batches/preview",
            &batch_body("job-closed", &candidates("z", 2)),
        )
        .await;
    expect_problem(r, StatusCode::CONFLICT, "job_closed").await;

    // 101 candidates: over batch.max_size (100).
    let r = app
        .post_json(
            "/v1/batches/preview",
            &batch_body("job-p", &candidates("big", 101)),
        )
        .await;
    expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "batch_too_large").await;
    assert_eq!(app.row_counts().await, counts_before);
    assert_eq!(fingerprint(&app).await, rows_before);
    assert_eq!(app.smtp.messages().len(), 1, "a preview sends nothing");
}

// 2 ------------------------------------------------------------------------------------

#[tokio::test]
async fn eight_concurrent_creates_with_one_idempotency_key_make_one_batch_and_one_message_each() {
    let app = spawn_app().await;
    app.open_job("job-i").await;
    let people = candidates("idem", 5);
    let body = batch_body("job-i", &people);
    let post = |key: HeaderValue, body: Value| {
        app.client
            .post(app.url("/v1/batches"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };

    let responses =
        join_all((0..8).map(|_| post(HeaderValue::from_static("order-2026-42"), body.clone())))
            .await;
    let mut ids = HashSet::new();
    for r in responses {
        let r = r.expect("request");
        let status = r.status();
        let text = r.text().await.expect("body");
        // The contract allows 200 or 202 for a replay; the first create is 202.
        assert!(
            status == StatusCode::ACCEPTED || status == StatusCode::OK,
            "every racing request succeeds: {status} {text}"
        );
        let batch: Value = serde_json::from_str(&text).expect("a batch");
        assert_counts_add_up(&batch);
        ids.insert(batch["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(
        ids.len(),
        1,
        "all eight answers carry the same batch id: {ids:?}"
    );
    let id = ids.into_iter().next().expect("one id");

    let batches: i64 = sqlx::query_scalar("SELECT count(*) FROM batches")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(batches, 1, "exactly one batch row");
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM batch_items")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(items, 5, "one item per candidate, once");

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "5 sent, 0 failed");
    for p in &people {
        let email = p["email"].as_str().expect("email");
        assert_eq!(messages_to(&app, email), 1, "one message to {email}");
    }
    assert_eq!(app.smtp.messages().len(), 5);

    // Same key, different body.
    let mut other = body.clone();
    other["duration_minutes"] = json!(45);
    let r = post(HeaderValue::from_static("order-2026-42"), other)
        .await
        .expect("request");
    expect_problem(
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;

    // Keys that are not 1 to 255 printable ASCII characters.
    let too_long = HeaderValue::from_str(&"k".repeat(300)).expect("a header value");
    let non_ascii = HeaderValue::from_bytes("clé-1".as_bytes()).expect("a header value");
    let empty = HeaderValue::from_static("");
    for key in [too_long, non_ascii, empty] {
        let shown = format!("{key:?}");
        let r = post(key, batch_body("job-i", &candidates("fresh", 1)))
            .await
            .expect("request");
        let problem =
            expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("Idempotency-Key")),
            "the detail names the header for {shown}: {problem}"
        );
    }
    let batches: i64 = sqlx::query_scalar("SELECT count(*) FROM batches")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(batches, 1, "rejected requests wrote no batch");
}

// 3 ------------------------------------------------------------------------------------

#[tokio::test]
async fn retry_with_corrected_addresses_turns_8_sent_2_failed_into_10_sent() {
    let app = spawn_app().await;
    app.open_job("job-r").await;
    let mut people = candidates("r", 10);
    people[2]["email"] = json!("r.2-at-example.com");
    people[7]["email"] = json!("r.7@");
    let id = app.create_batch("job-r", people).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "8 sent, 2 failed");
    let failed: Vec<String> = app
        .items(&id, Some("failed"))
        .await
        .iter()
        .map(|i| i["candidate_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(failed, vec!["r-2", "r-7"]);
    let retry_path = format!("/v1/batches/{id}/retry");

    // A list naming a sent candidate is refused as a whole and changes nothing.
    let counts_before = app.row_counts().await;
    let rows_before = fingerprint(&app).await;
    let r = app
        .post_json(
            &retry_path,
            &json!({"candidates": [
                {"id": "r-2", "email": "fixed.r.2@example.com"},
                {"id": "r-0", "email": "other.r.0@example.com"}
            ]}),
        )
        .await;
    let problem = expect_problem(r, StatusCode::CONFLICT, "not_retryable").await;
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        detail.contains("r-0"),
        "the sent candidate is named: {detail}"
    );
    assert!(!detail.contains("r-2"), "the failed one is not: {detail}");
    assert_eq!(app.row_counts().await, counts_before);
    assert_eq!(fingerprint(&app).await, rows_before, "nothing changed");
    assert_eq!(app.batch(&id).await["counts"], batch["counts"]);

    // The real retry, with corrected addresses.
    let r = app
        .post_json(
            &retry_path,
            &json!({"candidates": [
                {"id": "r-2", "email": "fixed.r.2@example.com"},
                {"id": "r-7", "email": "fixed.r.7@example.com"}
            ]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let retried: Value = r.json().await.expect("json");
    assert_eq!(retried["id"], id.as_str());
    assert_eq!(retried["status"], "running", "{retried}");
    assert_eq!(
        retried["counts"],
        json!({"pending": 2, "sent": 8, "failed": 0, "skipped": 0})
    );
    assert!(retried["completed_at"].is_null(), "{retried}");

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 10, "failed": 0, "skipped": 0})
    );
    assert_eq!(batch["summary"], "10 sent, 0 failed");
    assert_eq!(messages_to(&app, "fixed.r.2@example.com"), 1);
    assert_eq!(messages_to(&app, "fixed.r.7@example.com"), 1);
    assert_eq!(app.smtp.messages().len(), 10);
    let items = app.items(&id, None).await;
    let by_id: HashMap<&str, &Value> = items
        .iter()
        .map(|i| (i["candidate_id"].as_str().expect("id"), i))
        .collect();
    for (cid, email) in [
        ("r-2", "fixed.r.2@example.com"),
        ("r-7", "fixed.r.7@example.com"),
    ] {
        let item = by_id[cid];
        assert_eq!(item["email"], email, "{item}");
        assert_eq!(item["status"], "sent", "{item}");
        assert!(item["reason"].is_null(), "{item}");
    }

    // A sent candidate alone.
    let before = app.batch(&id).await;
    let r = app
        .post_json(&retry_path, &json!({"candidates": [{"id": "r-0"}]}))
        .await;
    let problem = expect_problem(r, StatusCode::CONFLICT, "not_retryable").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("r-0")),
        "{problem}"
    );
    // No body: nothing is failed any more.
    let counts_before = app.row_counts().await;
    let r = app.post_empty(&retry_path).await;
    expect_problem(r, StatusCode::CONFLICT, "not_retryable").await;
    let after = app.batch(&id).await;
    assert_eq!(after["status"], "completed");
    assert_eq!(after["counts"], before["counts"]);
    assert_eq!(after["completed_at"], before["completed_at"]);
    assert_eq!(app.row_counts().await, counts_before);

    // Each candidate's email and name as last given: a corrected address counts, and a
    // later request wins.
    app.open_job("job-r-later").await;
    let later = app
        .create_batch(
            "job-r-later",
            vec![json!({"id": "r-0", "email": "new.r.0@example.com", "name": "Renamed"})],
        )
        .await;
    app.wait_until_completed(&later).await;
    let stored: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT id::text, email, name FROM candidates WHERE id IN ('r-0', 'r-1', 'r-2') ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .expect("candidates");
    assert_eq!(
        stored,
        vec![
            (
                "r-0".into(),
                "new.r.0@example.com".into(),
                Some("Renamed".into())
            ),
            (
                "r-1".into(),
                "r.1@example.com".into(),
                Some("Candidate 1".into())
            ),
            (
                "r-2".into(),
                "fixed.r.2@example.com".into(),
                Some("Candidate 2".into())
            ),
        ]
    );
}

// 4 ------------------------------------------------------------------------------------

#[tokio::test]
async fn cancelling_while_the_mail_server_is_down_skips_every_item_revokes_links_and_sends_nothing()
{
    // Retries a few seconds apart, and many of them, so that the items are still waiting
    // for their next attempt when the cancel arrives.
    let app = spawn_app_with(|s| {
        s.retry.initial_delay_ms = 3_000;
        s.retry.max_delay_ms = 5_000;
        s.retry.max_attempts = 8;
    })
    .await;
    app.open_job("job-x").await;
    app.smtp.pause().await;
    let people = candidates("x", 10);
    let id = app.create_batch("job-x", people.clone()).await;

    app.wait_for_items(
        &id,
        "every item tried once and its retry scheduled",
        PATIENCE,
        |items| {
            items.len() == 10
                && items.iter().all(|i| {
                    i["status"] == "pending"
                        && i["attempts"].as_i64().is_some_and(|a| a >= 1)
                        && i["last_error"].is_string()
                })
        },
    )
    .await;

    let r = app.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let cancelled: Value = r.json().await.expect("json");
    assert_counts_add_up(&cancelled);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(
        cancelled["counts"],
        json!({"pending": 0, "sent": 0, "failed": 0, "skipped": 10})
    );
    assert_eq!(cancelled["summary"], "0 sent, 0 failed, 10 skipped");

    let items = app.items(&id, None).await;
    assert_eq!(items.len(), 10);
    for i in &items {
        assert_eq!(i["status"], "skipped", "{i}");
        assert_eq!(i["reason"], "cancelled", "{i}");
    }
    // Every item minted its link at its first attempt; all of them are revoked now.
    let batch_uuid = uuid::Uuid::parse_str(&id).expect("uuid");
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM invitations WHERE batch_id = $1 GROUP BY status",
    )
    .bind(batch_uuid)
    .fetch_all(&app.pool)
    .await
    .expect("invitation statuses");
    assert_eq!(statuses, vec![("REVOKED".to_owned(), 10)]);
    for (_, inv) in invitation_ids(&app, &id).await {
        assert_eq!(invitation_status(&app, &inv).await, "REVOKED");
    }

    // The retries scheduled before the cancel are still in the queue; let them come due
    // with the mail server back, and check that none of them sends anything.
    assert!(
        app.live_tasks_of_batch(&id).await > 0,
        "scheduled retries are still queued after the cancel"
    );
    app.smtp.resume().await.expect("SMTP server resumes");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let live = app.live_tasks_of_batch(&id).await;
        if live == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{live} send-invite tasks of the batch still waiting after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in &people {
        let email = p["email"].as_str().expect("email");
        assert_eq!(
            app.smtp.attempts(email),
            0,
            "no delivery attempt to {email}"
        );
    }
    assert!(
        app.smtp.deliveries().is_empty(),
        "the mail server received nothing: {:?}",
        app.smtp.deliveries()
    );
    let after = app.batch(&id).await;
    assert_eq!(after["status"], "cancelled");
    assert_eq!(after["counts"], cancelled["counts"]);

    let r = app.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    expect_problem(r, StatusCode::CONFLICT, "invalid_transition").await;

    let done = app.create_batch("job-x", candidates("y", 2)).await;
    app.wait_until_completed(&done).await;
    let r = app.post_empty(&format!("/v1/batches/{done}/cancel")).await;
    expect_problem(r, StatusCode::CONFLICT, "invalid_transition").await;
    assert_eq!(app.batch(&done).await["status"], "completed");
}

// 5 ------------------------------------------------------------------------------------

#[tokio::test]
async fn fifty_concurrent_redeems_of_one_token_let_exactly_one_through() {
    let app = spawn_app().await;
    app.open_job("job-t").await;
    let id = app.create_batch("job-t", candidates("t", 1)).await;
    app.wait_until_completed(&id).await;
    let token = app.token_for("t.0@example.com");

    let answers = join_all((0..50).map(|_| async {
        let r = app.redeem(&token).await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        (status, body)
    }))
    .await;
    // (status, code) of every answer, for failure messages.
    let outcomes: Vec<(u16, String)> = answers
        .iter()
        .map(|(s, b)| (s.as_u16(), b["code"].as_str().unwrap_or("-").to_owned()))
        .collect();
    let ok: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(ok.len(), 1, "exactly one redeem succeeds: {outcomes:?}");
    assert_eq!(ok[0]["status"], "IN_PROGRESS", "{}", ok[0]);
    assert_eq!(ok[0]["candidate_id"], "t-0");
    assert!(ok[0]["redeemed_at"].is_string());
    let used = answers
        .iter()
        .filter(|(s, b)| *s == StatusCode::GONE && b["code"] == "token_used")
        .count();
    assert_eq!(used, 49, "every other redeem is token_used: {outcomes:?}");

    let inv = ok[0]["id"].as_str().expect("id");
    assert_eq!(invitation_status(&app, inv).await, "IN_PROGRESS");

    let r = app.redeem("no-such-token").await;
    expect_problem(r, StatusCode::NOT_FOUND, "token_invalid").await;
    let mut tampered = token.clone();
    let last = tampered.pop().expect("a non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let r = app.redeem(&tampered).await;
    expect_problem(r, StatusCode::NOT_FOUND, "token_invalid").await;
}

// 6 ------------------------------------------------------------------------------------

#[tokio::test]
async fn expired_and_revoked_links_are_refused_and_invitations_move_only_along_their_states() {
    let app = spawn_app().await;
    app.open_job("job-e").await;
    let id = app.create_batch("job-e", candidates("e", 3)).await;
    app.wait_until_completed(&id).await;
    let invitations = invitation_ids(&app, &id).await;

    // Expiry. ttl_hours is a whole number of hours, so a test cannot wait for a link to
    // expire; moving expires_at into the past in the database is the simple way.
    let expired = &invitations["e-0"];
    sqlx::query("UPDATE invitations SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(expired).expect("uuid"))
        .execute(&app.pool)
        .await
        .expect("expire the invitation");
    let r = app.redeem(&app.token_for("e.0@example.com")).await;
    expect_problem(r, StatusCode::GONE, "token_expired").await;
    assert_eq!(invitation_status(&app, expired).await, "EXPIRED");
    expect_problem(
        post_transition(&app, expired, "revoke").await,
        StatusCode::CONFLICT,
        "invalid_transition",
    )
    .await;

    // Revocation.
    let revoked = &invitations["e-1"];
    let r = post_transition(&app, revoked, "revoke").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["status"], "REVOKED", "{body}");
    let r = app.redeem(&app.token_for("e.1@example.com")).await;
    expect_problem(r, StatusCode::GONE, "token_expired").await;
    assert_eq!(invitation_status(&app, revoked).await, "REVOKED");
    expect_problem(
        post_transition(&app, revoked, "revoke").await,
        StatusCode::CONFLICT,
        "invalid_transition",
    )
    .await;

    // PENDING → IN_PROGRESS → COMPLETED, and nothing else.
    let live = &invitations["e-2"];
    expect_problem(
        post_transition(&app, live, "complete").await,
        StatusCode::CONFLICT,
        "invalid_transition",
    )
    .await;
    assert_eq!(invitation_status(&app, live).await, "PENDING");
    let token = app.token_for("e.2@example.com");
    let r = app.redeem(&token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["id"], live.as_str());
    assert_eq!(body["status"], "IN_PROGRESS");
    let r = post_transition(&app, live, "complete").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert_eq!(invitation_status(&app, live).await, "COMPLETED");
    expect_problem(
        post_transition(&app, live, "revoke").await,
        StatusCode::CONFLICT,
        "invalid_transition",
    )
    .await;
    expect_problem(
        post_transition(&app, live, "complete").await,
        StatusCode::CONFLICT,
        "invalid_transition",
    )
    .await;
    expect_problem(app.redeem(&token).await, StatusCode::GONE, "token_used").await;
    assert_eq!(invitation_status(&app, live).await, "COMPLETED");
}

// 7 ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_completed_interview_allows_a_new_invite_but_one_in_progress_is_skipped_with_a_warning() {
    let app = spawn_app().await;
    app.open_job("job-a").await;
    let first = app.create_batch("job-a", candidates("a", 2)).await;
    app.wait_until_completed(&first).await;
    let invitations = invitation_ids(&app, &first).await;

    // a-0 finishes the interview; a-1 is in the middle of it.
    let r = app.redeem(&app.token_for("a.0@example.com")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post_empty(&format!("/v1/invitations/{}/complete", invitations["a-0"]))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.redeem(&app.token_for("a.1@example.com")).await;
    assert_eq!(r.status(), StatusCode::OK);

    let again = [json!({"id": "a-0", "email": "a.0@example.com"})];
    let r = app.post_batch(&batch_body("job-a", &again)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let created: Value = r.json().await.expect("json");
    assert_eq!(created["warnings"], json!([]), "{created}");
    let id = created["id"].as_str().expect("id");
    let batch = app.wait_until_completed(id).await;
    assert_eq!(batch["summary"], "1 sent, 0 failed");
    assert_eq!(batch["warnings"], json!([]), "{batch}");
    let item = &app.items(id, None).await[0];
    assert_eq!(item["status"], "sent", "{item}");
    assert_eq!(messages_to(&app, "a.0@example.com"), 2);

    let busy = [json!({"id": "a-1", "email": "a.1@example.com"})];
    let r = app.post_batch(&batch_body("job-a", &busy)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let created: Value = r.json().await.expect("json");
    assert_eq!(
        warning_pairs(&created["warnings"]),
        vec![("a-1".to_owned(), "already_invited".to_owned())],
        "{created}"
    );
    let id = created["id"].as_str().expect("id");
    let batch = app.wait_until_completed(id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 0, "failed": 0, "skipped": 1})
    );
    assert_eq!(batch["summary"], "0 sent, 0 failed, 1 skipped");
    let item = &app.items(id, None).await[0];
    assert_eq!(item["status"], "skipped", "{item}");
    assert_eq!(item["reason"], "already_invited", "{item}");
    assert_eq!(messages_to(&app, "a.1@example.com"), 1, "no second message");
    assert_eq!(
        invitation_status(&app, &invitations["a-1"]).await,
        "IN_PROGRESS"
    );
}

// 8 ------------------------------------------------------------------------------------

#[tokio::test]
async fn batches_and_invitations_list_newest_first_and_filter_by_job_status_and_candidate() {
    // Slow retries keep the last batch live (mail server down) until it is cancelled.
    let app = spawn_app_with(|s| {
        s.retry.initial_delay_ms = 3_000;
        s.retry.max_delay_ms = 5_000;
        s.retry.max_attempts = 8;
    })
    .await;
    app.open_job("job-a").await;
    app.open_job("job-b").await;
    let p0 = json!({"id": "p-0", "email": "p.0@example.com"});
    let p1 = json!({"id": "p-1", "email": "p.1@example.com"});

    let b1 = app.create_batch("job-a", vec![p0.clone(), p1]).await;
    app.wait_until_completed(&b1).await;
    let b2 = app.create_batch("job-b", vec![p0.clone()]).await;
    app.wait_until_completed(&b2).await;
    let mut body = batch_body("job-a", &[p0]);
    body["on_duplicate"] = json!("send");
    let r = app.post_batch(&body).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let b3 = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.wait_until_completed(&b3).await;
    app.smtp.pause().await;
    let b4 = app.create_batch("job-a", candidates("q", 2)).await;
    let r = app.post_empty(&format!("/v1/batches/{b4}/cancel")).await;
    assert_eq!(r.status(), StatusCode::OK);

    let list = |query: &'static str| {
        let app = &app;
        async move {
            let v = app.get_json(&format!("/v1/batches{query}")).await;
            for b in v["batches"].as_array().expect("batches") {
                assert_counts_add_up(b);
            }
            ids_of(&v, "batches")
        }
    };
    assert_eq!(
        list("").await,
        [b4.as_str(), b3.as_str(), b2.as_str(), b1.as_str()]
    );
    assert_eq!(
        list("?job_id=job-a").await,
        [b4.as_str(), b3.as_str(), b1.as_str()]
    );
    assert_eq!(
        list("?job_id=job-a&status=completed").await,
        [b3.as_str(), b1.as_str()]
    );
    assert_eq!(list("?status=cancelled").await, [b4.as_str()]);
    assert_eq!(list("?status=completed&job_id=job-b").await, [b2.as_str()]);
    assert!(list("?job_id=job-b&status=cancelled").await.is_empty());
    assert_eq!(list("?limit=2").await, [b4.as_str(), b3.as_str()]);
    assert_eq!(list("?job_id=job-a&limit=1").await, [b4.as_str()]);
    assert_eq!(
        list("?limit=500").await,
        [b4.as_str(), b3.as_str(), b2.as_str(), b1.as_str()]
    );
    for bad in ["?limit=0", "?limit=501", "?limit=-1", "?limit=ten"] {
        let r = app.get(&format!("/v1/batches{bad}")).await;
        let problem =
            expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("limit")),
            "{bad}: the detail names limit: {problem}"
        );
    }

    // Invitations of p-0: one per batch that sent to it (b1, b2, b3), newest first.
    let invitations = |query: &'static str| {
        let app = &app;
        async move {
            let v = app.get_json(&format!("/v1/invitations{query}")).await;
            v["invitations"]
                .as_array()
                .expect("invitations")
                .iter()
                .map(|i| {
                    (
                        i["batch_id"].as_str().expect("batch_id").to_owned(),
                        i["job_id"].as_str().expect("job_id").to_owned(),
                        i["candidate_id"].as_str().expect("candidate_id").to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let row = |b: &str, job: &str, c: &str| (b.to_owned(), job.to_owned(), c.to_owned());
    assert_eq!(
        invitations("?job_id=job-a&candidate_id=p-0").await,
        [row(&b3, "job-a", "p-0"), row(&b1, "job-a", "p-0")]
    );
    assert_eq!(
        invitations("?candidate_id=p-0").await,
        [
            row(&b3, "job-a", "p-0"),
            row(&b2, "job-b", "p-0"),
            row(&b1, "job-a", "p-0")
        ]
    );
    assert_eq!(
        invitations("?job_id=job-b").await,
        [row(&b2, "job-b", "p-0")]
    );
    assert_eq!(
        invitations("?candidate_id=p-1").await,
        [row(&b1, "job-a", "p-1")]
    );
    app.smtp.resume().await.expect("SMTP server resumes");
}

/// Addresses an ordinary mail server may not carry (a quoted local part, non-ASCII
/// characters without SMTPUTF8) count as failures in the preview and fail as
/// `invalid_email` without any contact with the mail server.
#[tokio::test]
async fn quoted_and_non_ascii_addresses_fail_as_invalid_email_without_server_contact() {
    let app = spawn_app().await;
    app.open_job("job-q").await;
    let mut people = candidates("q", 3);
    people[0]["email"] = json!("\"ada lovelace\"@example.com");
    people[1]["email"] = json!("adá@example.com");
    let body = batch_body("job-q", &people);

    let r = app.post_json("/v1/batches/preview", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let preview: Value = r.json().await.expect("json");
    assert_eq!(preview["to_fail"], 2, "{preview}");
    assert_eq!(preview["to_send"], 1, "{preview}");

    let id = app.create_batch_with(body).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "1 sent, 2 failed", "{batch}");
    let failed = app.items(&id, Some("failed")).await;
    assert!(
        failed.iter().all(|i| i["reason"] == "invalid_email"),
        "{failed:?}"
    );
    for address in ["\"ada lovelace\"@example.com", "adá@example.com"] {
        assert_eq!(
            app.smtp.attempts(address),
            0,
            "{address} never reached the server"
        );
    }
    assert_eq!(app.smtp.messages().len(), 1);
}

//! Access (operations.md §1): named keys with scopes, 401 before routing, 403 naming
//! the scope, `created_by`, idempotency keys per API key, and the audit log (§3).

use std::{path::Path, time::Duration};

use invite_worker::{
    config::{ApiKey, Settings},
    domain::access::Scope,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::helpers::{KEY, TestApp, candidates, expect_problem, spawn_app_with};

const READER: &str = "reader-key-0123456789-abcdefghij";
const WRITER: &str = "writer-key-0123456789-abcdefghij";
const INTERVIEWS: &str = "interviews-key-0123456789-abcdefg";
const OPS: &str = "ops-key-0123456789-abcdefghijklmn";

/// The helpers' `KEY` (every scope, `key:1`) and four named keys.
async fn spawn_with_named_keys() -> TestApp {
    spawn_app_with(|s| {
        s.api.keys = vec![
            ApiKey::new("key:1", KEY, &Scope::ALL),
            ApiKey::new("reader", READER, &[Scope::BatchesRead]),
            ApiKey::new("writer", WRITER, &[Scope::BatchesWrite, Scope::BatchesRead]),
            ApiKey::new("interviews", INTERVIEWS, &[Scope::InvitationsRedeem]),
            ApiKey::new("ops", OPS, &[Scope::Admin]),
        ];
    })
    .await
}

impl TestApp {
    /// A request with `key` as the bearer token and an optional JSON body.
    async fn call_as(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self.client.request(method, self.url(path)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request")
    }

    /// `GET /v1/audit{query}` as the all-scopes key: its entries.
    async fn audit(&self, query: &str) -> Vec<Value> {
        let v = self.get_json(&format!("/v1/audit{query}")).await;
        v["entries"].as_array().cloned().expect("entries")
    }
}

fn job() -> Value {
    json!({"title": "Backend Engineer", "status": "open"})
}

#[tokio::test]
async fn a_key_without_the_routes_scope_is_forbidden_and_told_which_scope() {
    let app = spawn_with_named_keys().await;

    let r = app
        .call_as(READER, Method::PUT, "/v1/jobs/job-1", Some(job()))
        .await;
    let problem = expect_problem(r, StatusCode::FORBIDDEN, "forbidden").await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("batches:write"), "{problem}");
    let r = app.get("/v1/jobs/job-1").await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the refused PUT wrote nothing"
    );

    let r = app
        .call_as(WRITER, Method::PUT, "/v1/jobs/job-1", Some(job()))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .call_as(READER, Method::GET, "/v1/jobs/job-1", None)
        .await;
    assert_eq!(r.status(), StatusCode::OK, "reading needs batches:read");

    let r = app
        .call_as(INTERVIEWS, Method::GET, "/v1/batches", None)
        .await;
    let problem = expect_problem(r, StatusCode::FORBIDDEN, "forbidden").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("batches:read")
    );
    let r = app
        .call_as(
            INTERVIEWS,
            Method::POST,
            "/v1/invitations/redeem",
            Some(json!({"token": "nope"})),
        )
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "token_invalid").await;

    // The failure groups are batches:read; the queue's routes need admin.
    let r = app
        .call_as(
            READER,
            Method::GET,
            "/v1/batches/00000000-0000-7000-8000-000000000000/failures",
            None,
        )
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    for path in [
        "/v1/suppressions",
        "/v1/audit",
        "/v1/queue",
        "/v1/queue/dead",
    ] {
        let r = app.call_as(WRITER, Method::GET, path, None).await;
        let problem = expect_problem(r, StatusCode::FORBIDDEN, "forbidden").await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("admin"),
            "{problem}"
        );
        let r = app.call_as(OPS, Method::GET, path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "admin: {path}");
    }
    // admin implies every other scope.
    let r = app
        .call_as(OPS, Method::PUT, "/v1/jobs/job-2", Some(job()))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn authentication_comes_before_routing_and_the_scheme_word_has_any_case() {
    let app = spawn_with_named_keys().await;
    for auth in [
        None,
        Some("Bearer not-a-key"),
        Some(&*format!("Basic {READER}")),
    ] {
        let mut request = app.client.get(app.url("/v1/no/such/route"));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let r = request.send().await.expect("request");
        let challenge = r
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        expect_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert_eq!(challenge.as_deref(), Some("Bearer"), "{auth:?}");
    }
    let r = app
        .call_as(READER, Method::GET, "/v1/no/such/route", None)
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app
        .call_as(READER, Method::DELETE, "/v1/batches", None)
        .await;
    expect_problem(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;

    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = app
            .client
            .get(app.url("/v1/batches"))
            .header("Authorization", format!("{scheme} {READER}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
}

#[tokio::test]
async fn a_batch_names_the_key_that_created_it_list_keys_by_position() {
    const SECOND: &str = "second-listed-key-0123456789-abc";
    let app = spawn_app_with(|s| {
        let env = [("INVITES_API__KEYS".to_owned(), format!("{KEY},{SECOND}"))];
        s.api.keys = Settings::load_from(Path::new("/nonexistent.toml"), false, env)
            .expect("loads")
            .api
            .keys;
        s.api
            .keys
            .push(ApiKey::new("writer", WRITER, &[Scope::BatchesWrite]));
    })
    .await;
    app.open_job("job-1").await;
    let body = |n: usize| json!({"job_id": "job-1", "duration_minutes": 30, "candidates": candidates(&format!("p{n}"), 1)});
    for (key, n, name) in [
        (SECOND, 1, "key:2"),
        (WRITER, 2, "writer"),
        (KEY, 3, "key:1"),
    ] {
        let r = app
            .call_as(key, Method::POST, "/v1/batches", Some(body(n)))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let created: Value = r.json().await.expect("json");
        assert_eq!(created["created_by"], name, "{created}");
        let id = created["id"].as_str().expect("id");
        assert_eq!(app.batch(id).await["created_by"], name);
    }
    let listed = app.get_json("/v1/batches").await;
    let names: Vec<&Value> = listed["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .map(|b| &b["created_by"])
        .collect();
    assert_eq!(names, [&json!("key:1"), &json!("writer"), &json!("key:2")]);
}

#[tokio::test]
async fn the_same_idempotency_key_from_two_api_keys_names_two_requests() {
    let app = spawn_with_named_keys().await;
    app.open_job("job-1").await;
    let body = json!({"job_id": "job-1", "duration_minutes": 30, "candidates": candidates("c", 2)});
    let post = |key: &'static str| {
        app.client
            .post(app.url("/v1/batches"))
            .bearer_auth(key)
            .header("Idempotency-Key", "order-66")
            .json(&body)
            .send()
    };
    let first: Value = post(KEY)
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let r = post(WRITER).await.expect("request");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        r.headers().get("idempotent-replayed").is_none(),
        "not a replay"
    );
    let second: Value = r.json().await.expect("json");
    assert_ne!(first["id"], second["id"], "two keys, two batches");

    // Each key's repeat is its own request again.
    for (key, original) in [(KEY, &first), (WRITER, &second)] {
        let r = post(key).await.expect("request");
        assert_eq!(
            r.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        let again: Value = r.json().await.expect("json");
        assert_eq!(again["id"], original["id"], "{key}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM batches")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(n, 2);
}

/// The entries' (actor, action, target), newest first.
fn summarize(entries: &[Value]) -> Vec<(String, String, String)> {
    entries
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("actor"), s("action"), s("target"))
        })
        .collect()
}

#[tokio::test]
async fn job_and_batch_changes_are_in_the_audit_log_newest_first_with_their_key() {
    let app = spawn_app_with(|s| {
        s.api.keys = vec![
            ApiKey::new("key:1", KEY, &Scope::ALL),
            ApiKey::new("writer", WRITER, &[Scope::BatchesWrite, Scope::BatchesRead]),
        ];
        s.retry.initial_delay_ms = 3_000;
        s.retry.max_delay_ms = 5_000;
        s.retry.max_attempts = 8;
    })
    .await;
    let r = app.put_job("job-1", "Backend Engineer", "open").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .call_as(
            WRITER,
            Method::PUT,
            "/v1/jobs/job-1",
            Some(json!({"title": "Backend Engineer II", "status": "open"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    // One item fails at once (invalid address); a retry with a corrected one.
    let mut people = candidates("a", 2);
    people[1]["email"] = json!("a.1@example");
    let body = json!({"job_id": "job-1", "duration_minutes": 30, "candidates": people});
    let r = app
        .call_as(WRITER, Method::POST, "/v1/batches", Some(body))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let first: Value = r.json().await.expect("json");
    let first = first["id"].as_str().expect("id").to_owned();
    app.wait_until_completed(&first).await;
    let fix = json!({"candidates": [{"id": "a-1", "email": "a.1@example.com"}]});
    let r = app
        .call_as(
            WRITER,
            Method::POST,
            &format!("/v1/batches/{first}/retry"),
            Some(fix),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    app.wait_until_completed(&first).await;

    // A batch still waiting on a mail server that is down, cancelled.
    app.smtp.pause().await;
    let second = app.create_batch("job-1", candidates("b", 3)).await;
    app.wait_for_items(&second, "tried once", Duration::from_secs(30), |items| {
        items
            .iter()
            .all(|i| i["attempts"].as_i64().is_some_and(|a| a >= 1))
    })
    .await;
    let r = app
        .post_empty(&format!("/v1/batches/{second}/cancel"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let entries = app.audit("").await;
    let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        summarize(&entries),
        [
            s("key:key:1", "batch.cancelled", &second),
            s("key:key:1", "batch.created", &second),
            s("key:writer", "batch.retried", &first),
            s("key:writer", "batch.created", &first),
            s("key:writer", "job.updated", "job-1"),
            s("key:key:1", "job.created", "job-1"),
        ]
    );
    assert_eq!(entries[2]["detail"]["items"], 1, "{}", entries[2]);
    assert_eq!(entries[0]["detail"]["skipped"], 3, "{}", entries[0]);
    assert_eq!(entries[4]["detail"]["title"], "Backend Engineer II");
    assert!(entries[0]["at"].is_string());

    // Filters and the bound.
    let by_writer = summarize(&app.audit("?actor=key:writer").await);
    assert_eq!(by_writer.len(), 3);
    assert_eq!(
        summarize(&app.audit("?action=batch.created&limit=1").await),
        [s("key:key:1", "batch.created", &second)]
    );
    for bad in [
        "?limit=0",
        "?limit=501",
        "?action=batch.exploded",
        "?actor=%00",
    ] {
        let r = app.get(&format!("/v1/audit{bad}")).await;
        expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
}

#[tokio::test]
async fn a_refused_change_leaves_no_audit_entry() {
    let app = spawn_with_named_keys().await;
    app.open_job("job-1").await;
    let id = app.create_batch("job-1", candidates("c", 2)).await;
    app.wait_until_completed(&id).await;
    let before = app.audit("").await.len();
    let r = app.post_empty(&format!("/v1/batches/{id}/retry")).await;
    expect_problem(r, StatusCode::CONFLICT, "not_retryable").await;
    let r = app.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    expect_problem(r, StatusCode::CONFLICT, "invalid_transition").await;
    let r = app
        .call_as(
            READER,
            Method::POST,
            &format!("/v1/batches/{id}/cancel"),
            None,
        )
        .await;
    expect_problem(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = app
        .client
        .delete(app.url("/v1/suppressions/nobody@example.com"))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("request");
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.audit("").await.len(), before, "nothing recorded");
}

#[tokio::test]
async fn invitation_and_suppression_changes_are_in_the_audit_log_without_addresses() {
    let app = spawn_with_named_keys().await;
    app.open_job("job-1").await;
    app.smtp.script(
        "gone@example.com",
        [Step::RcptReply(550, "5.1.1 user unknown".into())],
    );
    let mut people = candidates("c", 2);
    people.push(json!({"id": "c-gone", "email": "gone@example.com"}));
    let id = app.create_batch("job-1", people).await;
    app.wait_until_completed(&id).await;
    let items = app.items(&id, None).await;
    let invitation = |n: usize| {
        items[n]["invitation_id"]
            .as_str()
            .expect("an invitation")
            .to_owned()
    };
    let (first, second) = (invitation(0), invitation(1));

    let token = app.token_for("c.0@example.com");
    let r = app
        .call_as(
            INTERVIEWS,
            Method::POST,
            "/v1/invitations/redeem",
            Some(json!({"token": token})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .call_as(
            INTERVIEWS,
            Method::POST,
            &format!("/v1/invitations/{first}/complete"),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post_empty(&format!("/v1/invitations/{second}/revoke"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .delete(app.url("/v1/suppressions/gone@example.com"))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    let entries = app.audit("?limit=4").await;
    let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        summarize(&entries),
        [
            s("key:ops", "suppression.deleted", "g***@example.com"),
            s("key:key:1", "invitation.revoked", &second),
            s("key:interviews", "invitation.completed", &first),
            s("key:interviews", "invitation.redeemed", &first),
        ]
    );
    let all = serde_json::to_string(&app.audit("?limit=500").await).expect("json");
    for secret in [
        "gone@example.com",
        "c.0@example.com",
        token.as_str(),
        KEY,
        INTERVIEWS,
    ] {
        assert!(!all.contains(secret), "the audit log holds no {secret:?}");
    }
}

//! Webhooks (operations.md §4): endpoints over the API, events written with the change
//! that causes them, signed deliveries checked by an independent implementation of
//! Standard Webhooks (the `standardwebhooks` Python package), durable retries, 410,
//! the SSRF guard, replay, and a kill -9 of the real binary mid-delivery.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use reqwest::Response;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    helpers::{
        KEY, TestApp, candidates, expect_problem, prepare_app_with, spawn_app, spawn_app_with,
    },
    process::Service,
};

/// What the receiver answers to one request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Never answers (until the connection is dropped by the sender).
    Hang,
    /// Answers this status once the test calls [`Receiver::release`].
    HoldThen(u16),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("the body is JSON")
    }
}

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    plan: Mutex<VecDeque<Answer>>,
    arrived: Notify,
    released: tokio::sync::watch::Sender<bool>,
    /// Where a 3xx answer points.
    location: Mutex<Option<String>>,
}

/// A webhook receiver over real HTTP on 127.0.0.1: answers each request by its plan
/// (then 200) and records what it got.
struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(plan: impl IntoIterator<Item = Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener, plan)
    }

    /// On a given port (a receiver that comes up where one was down).
    async fn start_on(addr: SocketAddr, plan: impl IntoIterator<Item = Answer>) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind the same port");
        Self::serve(listener, plan)
    }

    fn serve(listener: TcpListener, plan: impl IntoIterator<Item = Answer>) -> Self {
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(Inner::default());
        *inner.plan.lock().expect("lock") = plan.into_iter().collect();
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.inner.received.lock().expect("lock").clone()
    }

    /// Waits until `done` holds for what was received (a bound, not a speed assertion).
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.inner.arrived.notified();
            let got = self.received();
            if done(&got) {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver did not get {what} within 60 s; it got {} requests",
                got.len()
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    fn release(&self) {
        let _ = self.inner.released.send(true);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    inner.received.lock().expect("lock").push(Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    inner.arrived.notify_waiters();
    let answer = inner
        .plan
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or(Answer::Status(200));
    match answer {
        Answer::Status(code) => {
            let status = StatusCode::from_u16(code).expect("a status");
            match inner.location.lock().expect("lock").clone() {
                Some(to) if status.is_redirection() => {
                    (status, [(header::LOCATION, to)]).into_response()
                }
                _ => status.into_response(),
            }
        }
        Answer::Hang => std::future::pending().await,
        Answer::HoldThen(code) => {
            let mut released = inner.released.subscribe();
            let _ = released.wait_for(|r| *r).await;
            StatusCode::from_u16(code)
                .expect("a status")
                .into_response()
        }
    }
}

/// Verifies a delivery with the `standardwebhooks` Python package (an implementation
/// of the scheme written by others): Ok, or the verifier's complaint.
fn verify_independently(secret: &str, r: &Received) -> Result<(), String> {
    run_verifier(secret, r, false)
}

/// Like [`verify_independently`], with `r` first signed anew by the package itself
/// (for its own timestamp), so that only the timestamp can be wrong.
fn verify_resigned(secret: &str, r: &Received) -> Result<(), String> {
    run_verifier(secret, r, true)
}

fn run_verifier(secret: &str, r: &Received, resign: bool) -> Result<(), String> {
    const SCRIPT: &str = r#"
import json, sys
from datetime import datetime, timezone
from standardwebhooks.webhooks import Webhook
req = json.load(sys.stdin)
hook, headers = Webhook(req["secret"]), req["headers"]
if req["resign"]:
    at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), timezone.utc)
    headers["webhook-signature"] = hook.sign(headers["webhook-id"], at, req["body"].encode())
try:
    hook.verify(req["body"].encode(), headers)
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(1)
"#;
    let input = json!({
        "secret": secret,
        "resign": resign,
        "body": r.body,
        "headers": {
            "webhook-id": r.id,
            "webhook-timestamp": r.timestamp,
            "webhook-signature": r.signature,
        },
    });
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs standardwebhooks)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("the verifier ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "the standardwebhooks package is installed: {stderr}"
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl TestApp {
    async fn create_webhook(&self, url: &str, events: &[&str]) -> (String, String) {
        let r = self
            .post_json("/v1/webhooks", &json!({"url": url, "events": events}))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let body: Value = r.json().await.expect("json");
        (
            body["id"].as_str().expect("id").to_owned(),
            body["secret"].as_str().expect("secret").to_owned(),
        )
    }

    async fn deliveries(&self, webhook: &str, status: Option<&str>) -> Vec<Value> {
        let q = status.map(|s| format!("?status={s}")).unwrap_or_default();
        let v = self
            .get_json(&format!("/v1/webhooks/{webhook}/deliveries{q}"))
            .await;
        v["deliveries"].as_array().cloned().expect("deliveries")
    }

    async fn delete_path(&self, path: &str) -> Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("request")
    }

    async fn audit_actions(&self) -> Vec<String> {
        let v = self.get_json("/v1/audit?limit=500").await;
        v["entries"]
            .as_array()
            .or_else(|| v["audit"].as_array())
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["action"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Polls `check` until it gives `Some` (a bound, not a speed assertion).
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, check: impl Fn() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn of_type<'a>(got: &'a [Received], kind: &str) -> Vec<&'a Received> {
    got.iter().filter(|r| r.json()["type"] == kind).collect()
}

#[tokio::test]
async fn endpoints_are_created_with_a_one_time_secret_listed_rotated_and_deleted() {
    let app = spawn_app().await;
    let r = app
        .post_json(
            "/v1/webhooks",
            &json!({"url": "https://hooks.example.com/in", "events": ["batch.completed", "item.failed"],
                    "description": "recruiting web app"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(created["url"], "https://hooks.example.com/in");
    assert_eq!(created["events"], json!(["batch.completed", "item.failed"]));
    assert!(created["created_at"].is_string());

    let one = app.get_json(&format!("/v1/webhooks/{id}")).await;
    assert!(one.get("secret").is_none(), "the secret is shown only once");
    assert_eq!(one["enabled"], true);
    let list = app.get_json("/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().map(Vec::len), Some(1));
    assert!(!list.to_string().contains(&secret));

    let r = app
        .post_empty(&format!("/v1/webhooks/{id}/rotate-secret"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let rotated: Value = r.json().await.expect("json");
    let new_secret = rotated["secret"].as_str().expect("secret");
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);

    let r = app.delete_path(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app.get(&format!("/v1/webhooks/{id}")).await;
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.delete_path(&format!("/v1/webhooks/{id}")).await;
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.get("/v1/webhooks/not-a-uuid/deliveries").await;
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;

    for bad in [
        json!({"url": "https://hooks.example.com/in", "events": []}),
        json!({"url": "https://hooks.example.com/in", "events": ["batch.exploded"]}),
        json!({"url": "hooks.example.com", "events": ["item.failed"]}),
        json!({"url": "ftp://hooks.example.com/in", "events": ["item.failed"]}),
        json!({"events": ["item.failed"]}),
    ] {
        let r = app.post_json("/v1/webhooks", &bad).await;
        expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }

    let actions = app.audit_actions().await;
    for action in [
        "webhook.created",
        "webhook.secret_rotated",
        "webhook.deleted",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} is in the audit log: {actions:?}"
        );
    }
}

#[tokio::test]
async fn events_are_signed_so_an_independent_verifier_accepts_them_and_rejects_tampering() {
    let app = spawn_app().await;
    let receiver = Receiver::start([]).await;
    let (webhook, secret) = app
        .create_webhook(&receiver.url(), &["batch.completed", "item.failed"])
        .await;
    app.open_job("job-wh").await;
    let mut people = candidates("c", 3);
    people[1]["email"] = json!("not-an-email");
    let batch = app.create_batch("job-wh", people).await;
    let done = app.wait_until_completed(&batch).await;

    let got = receiver
        .wait_for("item.failed and batch.completed", |got| {
            !of_type(got, "batch.completed").is_empty() && !of_type(got, "item.failed").is_empty()
        })
        .await;
    let completed = of_type(&got, "batch.completed");
    assert_eq!(completed.len(), 1, "one batch.completed");
    let event = completed[0].json();
    assert_eq!(event["data"]["id"], done["id"]);
    assert_eq!(event["data"]["status"], "completed");
    assert_eq!(event["data"]["counts"], done["counts"]);
    assert_eq!(event["data"]["summary"], done["summary"]);
    assert_eq!(event["data"]["completed_at"], done["completed_at"]);
    assert!(event["timestamp"].is_string());
    let failed = of_type(&got, "item.failed");
    assert_eq!(failed.len(), 1);
    let item = failed[0].json();
    assert_eq!(item["data"]["candidate_id"], "c-1");
    assert_eq!(item["data"]["reason"], "invalid_email");
    assert_eq!(item["data"]["batch_id"], done["id"]);
    for r in [completed[0], failed[0]] {
        assert!(
            !r.body.contains("not-an-email") && !r.body.contains("@example.com"),
            "an event carries no address: {}",
            r.body
        );
    }
    assert_eq!(
        event["data"]["warnings"][0]["code"], "invalid_email",
        "the warning is there, without the address: {event}"
    );

    for r in &got {
        assert!(r.id.starts_with("msg_"), "{}", r.id);
        assert!(r.signature.starts_with("v1,"), "{}", r.signature);
        verify_independently(&secret, r).expect("the signature verifies");
    }
    let genuine = completed[0];
    let mut tampered = genuine.clone();
    tampered.body = tampered.body.replacen("completed", "cancelled", 1);
    assert!(
        verify_independently(&secret, &tampered).is_err(),
        "a tampered body is rejected"
    );
    // Signed correctly an hour ago (a replayed capture): refused for its age alone.
    let mut old = genuine.clone();
    verify_resigned(&secret, &old).expect("signed anew for its own time, it verifies");
    let ts: i64 = old.timestamp.parse().expect("unix seconds");
    old.timestamp = (ts - 3600).to_string();
    let refused = verify_resigned(&secret, &old).expect_err("an old timestamp is refused");
    assert!(
        refused.contains("too old"),
        "refused for its age: {refused}"
    );
    let wrong_key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    assert!(verify_independently(wrong_key, genuine).is_err());

    let deliveries = eventually("both deliveries recorded as succeeded", || async {
        let d = app.deliveries(&webhook, Some("succeeded")).await;
        (d.len() == 2).then_some(d)
    })
    .await;
    assert!(deliveries.iter().all(|d| d["attempts"] == 1
        && d["last_status_code"] == 200
        && d["attempts_made"][0]["status_code"] == 200));
}

/// A rotation takes effect at once: the next attempt is signed with the new secret,
/// and the old one no longer verifies it.
#[tokio::test]
async fn after_a_rotation_events_are_signed_with_the_new_secret() {
    let app = spawn_app().await;
    let receiver = Receiver::start([]).await;
    let (webhook, old_secret) = app
        .create_webhook(&receiver.url(), &["batch.completed"])
        .await;
    app.open_job("job-rot").await;
    let first = app.create_batch("job-rot", candidates("ro", 1)).await;
    app.wait_until_completed(&first).await;
    let got = receiver
        .wait_for("the first event", |g| !g.is_empty())
        .await;
    verify_independently(&old_secret, &got[0]).expect("signed with the first secret");

    let r = app
        .post_empty(&format!("/v1/webhooks/{webhook}/rotate-secret"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let rotated: Value = r.json().await.expect("json");
    let new_secret = rotated["secret"].as_str().expect("secret").to_owned();
    let second = app.create_batch("job-rot", candidates("rn", 1)).await;
    app.wait_until_completed(&second).await;
    let got = receiver
        .wait_for("the second event", |g| g.len() >= 2)
        .await;
    verify_independently(&new_secret, &got[1]).expect("signed with the new secret");
    assert!(
        verify_independently(&old_secret, &got[1]).is_err(),
        "the old secret no longer verifies"
    );
}

#[tokio::test]
async fn a_receiver_down_answering_500_or_hanging_gets_the_event_later_with_the_same_id() {
    let app = spawn_app().await;
    // Down: nothing listens on this port until later.
    let down_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let failing = Receiver::start([Answer::Status(500), Answer::Status(503)]).await;
    let hanging = Receiver::start([Answer::Hang]).await;
    let (down_hook, _) = app
        .create_webhook(&format!("http://{down_addr}/hook"), &["batch.completed"])
        .await;
    app.create_webhook(&failing.url(), &["batch.completed"])
        .await;
    app.create_webhook(&hanging.url(), &["batch.completed"])
        .await;
    app.open_job("job-r").await;
    let batch = app.create_batch("job-r", candidates("r", 2)).await;
    app.wait_until_completed(&batch).await;

    let got = failing
        .wait_for("a 2xx after two failures", |g| g.len() >= 3)
        .await;
    assert!(
        got.iter().all(|r| r.id == got[0].id),
        "one webhook-id on every attempt"
    );
    let got = hanging
        .wait_for("a second attempt after a timeout", |g| g.len() >= 2)
        .await;
    assert_eq!(got[0].id, got[1].id);

    // The down receiver's failed attempts are in the log, with the error and the next
    // attempt; when it comes up, it gets the event with the id the log shows.
    let logged = eventually("two failed attempts to the down receiver", || async {
        let d = app.deliveries(&down_hook, None).await;
        (d.len() == 1 && d[0]["attempts"].as_i64() >= Some(2)).then(|| d[0].clone())
    })
    .await;
    assert!(logged["attempts_made"][0]["status_code"].is_null());
    assert!(
        logged["attempts_made"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection")),
        "{logged}"
    );
    let up = Receiver::start_on(down_addr, []).await;
    let got = up.wait_for("the event, once up", |g| !g.is_empty()).await;
    assert_eq!(got[0].id, logged["event_id"].as_str().expect("event id"));
    eventually("the delivery succeeded", || async {
        let d = app.deliveries(&down_hook, Some("succeeded")).await;
        (d.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_delay_events_to_another() {
    let app = spawn_app_with(|s| {
        s.webhooks.timeout_secs = 60;
        s.webhooks.concurrency = 4;
        s.webhooks.per_endpoint_concurrency = 2;
    })
    .await;
    let held = Receiver::start(std::iter::repeat_n(Answer::HoldThen(200), 20)).await;
    let fast = Receiver::start([]).await;
    app.create_webhook(&held.url(), &["item.failed"]).await;
    app.create_webhook(&fast.url(), &["item.failed"]).await;
    app.open_job("job-h").await;
    let mut people = candidates("h", 10);
    for p in &mut people {
        p["email"] = json!("nobody");
    }
    let batch = app.create_batch("job-h", people).await;
    app.wait_until_completed(&batch).await;

    // Every event reaches the fast endpoint while the held one has answered nothing.
    let got = fast.wait_for("ten item.failed", |g| g.len() >= 10).await;
    assert_eq!(got.len(), 10);
    assert!(
        held.received().len() <= 2,
        "the held endpoint has at most its own slots"
    );
    held.release();
    held.wait_for("all ten once released", |g| g.len() >= 10)
        .await;
}

#[tokio::test]
async fn an_endpoint_answering_410_is_disabled_and_gets_nothing_more() {
    let app = spawn_app().await;
    let gone = Receiver::start([Answer::Status(410)]).await;
    let (webhook, _) = app.create_webhook(&gone.url(), &["batch.completed"]).await;
    app.open_job("job-g").await;
    let first = app.create_batch("job-g", candidates("g", 1)).await;
    app.wait_until_completed(&first).await;
    let endpoint = eventually("the endpoint is disabled", || async {
        let e = app.get_json(&format!("/v1/webhooks/{webhook}")).await;
        (e["enabled"] == false).then_some(e)
    })
    .await;
    assert!(
        endpoint["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("410"))
    );
    let failed = app.deliveries(&webhook, Some("failed")).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["last_status_code"], 410);
    assert!(
        app.audit_actions()
            .await
            .iter()
            .any(|a| a == "webhook.disabled")
    );

    let second = app.create_batch("job-g", candidates("g2", 1)).await;
    app.wait_until_completed(&second).await;
    assert_eq!(
        app.deliveries(&webhook, None).await.len(),
        1,
        "no new delivery"
    );
    assert_eq!(gone.received().len(), 1);
    let delivery = failed[0]["id"].as_str().expect("id");
    let r = app
        .post_empty(&format!(
            "/v1/webhooks/{webhook}/deliveries/{delivery}/replay"
        ))
        .await;
    expect_problem(r, StatusCode::CONFLICT, "invalid_transition").await;
}

/// A delivery in flight when another one to the same endpoint gets 410 is not retried:
/// the endpoint is disabled, so its failure is final, and nothing more is sent there.
#[tokio::test]
async fn a_410_also_ends_the_deliveries_in_flight_to_that_endpoint() {
    let app = spawn_app_with(|s| s.webhooks.retry_schedule_secs = vec![1, 1, 1]).await;
    let gone = Receiver::start([Answer::HoldThen(500), Answer::Status(410)]).await;
    let (webhook, _) = app.create_webhook(&gone.url(), &["item.failed"]).await;
    app.open_job("job-g2").await;
    let mut people = candidates("g2", 2);
    for p in &mut people {
        p["email"] = json!("nobody");
    }
    let batch = app.create_batch("job-g2", people).await;
    app.wait_until_completed(&batch).await;
    // One attempt held, the other answered 410.
    gone.wait_for("both attempts", |g| g.len() >= 2).await;
    eventually("the endpoint is disabled", || async {
        let e = app.get_json(&format!("/v1/webhooks/{webhook}")).await;
        (e["enabled"] == false).then_some(())
    })
    .await;
    gone.release();
    let failed = eventually("both deliveries failed", || async {
        let d = app.deliveries(&webhook, Some("failed")).await;
        (d.len() == 2).then_some(d)
    })
    .await;
    let mut codes: Vec<i64> = failed
        .iter()
        .filter_map(|d| d["last_status_code"].as_i64())
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, [410, 500], "{failed:?}");
    assert!(failed.iter().all(|d| d["attempts"] == 1), "{failed:?}");
    // A retry would have come a second after the 500.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gone.received().len(), 2, "nothing more was sent");
}

/// Redirects are not followed: a 307 is a failed attempt, retried at the endpoint's own
/// URL, and the place it points to hears nothing.
#[tokio::test]
async fn redirects_are_not_followed() {
    let app = spawn_app_with(|s| s.webhooks.retry_schedule_secs = vec![1]).await;
    let elsewhere = Receiver::start([]).await;
    let redirecting = Receiver::start([Answer::Status(307)]).await;
    *redirecting.inner.location.lock().expect("lock") = Some(elsewhere.url());
    let (webhook, _) = app
        .create_webhook(&redirecting.url(), &["batch.completed"])
        .await;
    app.open_job("job-307").await;
    let batch = app.create_batch("job-307", candidates("r7", 1)).await;
    app.wait_until_completed(&batch).await;
    let done = eventually("the delivery succeeded on its second attempt", || async {
        let d = app.deliveries(&webhook, Some("succeeded")).await;
        (d.len() == 1).then(|| d[0].clone())
    })
    .await;
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(done["attempts_made"][0]["status_code"], 307, "{done}");
    assert_eq!(redirecting.received().len(), 2);
    assert!(
        elsewhere.received().is_empty(),
        "the redirect was not followed"
    );
}

/// `webhooks.max_endpoints` bounds the endpoints (each event is fanned out to each one
/// in the transaction that writes it): one more is a 422 that writes nothing.
#[tokio::test]
async fn endpoints_are_bounded_by_max_endpoints() {
    let app = spawn_app_with(|s| s.webhooks.max_endpoints = 2).await;
    let (first, _) = app
        .create_webhook("http://127.0.0.1:9/a", &["batch.completed"])
        .await;
    app.create_webhook("http://127.0.0.1:9/b", &["batch.completed"])
        .await;
    let r = app
        .post_json(
            "/v1/webhooks",
            &json!({"url": "http://127.0.0.1:9/c", "events": ["batch.completed"]}),
        )
        .await;
    let problem = expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("max_endpoints")),
        "{problem}"
    );
    let listed = app.get_json("/v1/webhooks").await;
    assert_eq!(listed["webhooks"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        app.delete_path(&format!("/v1/webhooks/{first}"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    app.create_webhook("http://127.0.0.1:9/c", &["batch.completed"])
        .await;
}

#[tokio::test]
async fn a_replay_sends_the_event_again_with_the_same_id() {
    // Every send fails for now and its retry is a minute away: the batch can be
    // cancelled between attempts.
    let app = spawn_app_with(|s| {
        s.retry.initial_delay_ms = 60_000;
        s.retry.max_delay_ms = 60_000;
    })
    .await;
    app.smtp
        .set_default(smtp_testkit::Step::DataReply(451, "4.3.0 try later".into()));
    let receiver = Receiver::start([]).await;
    let (webhook, _) = app
        .create_webhook(&receiver.url(), &["batch.cancelled"])
        .await;
    app.open_job("job-c").await;
    let batch = app.create_batch("job-c", candidates("x", 2)).await;
    eventually("the cancel", || async {
        let r = app.post_empty(&format!("/v1/batches/{batch}/cancel")).await;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    let got = receiver
        .wait_for("batch.cancelled", |g| !g.is_empty())
        .await;
    assert_eq!(got[0].json()["data"]["status"], "cancelled");
    let first = eventually("the delivery is recorded as succeeded", || async {
        let d = app.deliveries(&webhook, Some("succeeded")).await;
        (d.len() == 1).then_some(d)
    })
    .await;
    let delivery = first[0]["id"].as_str().expect("id");
    let r = app
        .post_empty(&format!(
            "/v1/webhooks/{webhook}/deliveries/{delivery}/replay"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let replayed: Value = r.json().await.expect("json");
    assert_eq!(replayed["event_id"], first[0]["event_id"]);
    let got = receiver.wait_for("the replay", |g| g.len() >= 2).await;
    assert_eq!(got[0].id, got[1].id, "a replay carries the same webhook-id");
    assert_eq!(got[0].body, got[1].body);
    let r = app
        .post_empty(&format!(
            "/v1/webhooks/{webhook}/deliveries/{}/replay",
            uuid::Uuid::new_v4()
        ))
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
    assert!(
        app.audit_actions()
            .await
            .iter()
            .any(|a| a == "webhook.delivery_replayed")
    );
}

#[tokio::test]
async fn invitation_events_follow_redeem_complete_and_the_expiry_sweep() {
    let app = spawn_app().await;
    let receiver = Receiver::start([]).await;
    app.create_webhook(
        &receiver.url(),
        &[
            "invitation.redeemed",
            "invitation.completed",
            "invitation.expired",
        ],
    )
    .await;
    app.open_job("job-i").await;
    let batch = app.create_batch("job-i", candidates("i", 2)).await;
    app.wait_until_completed(&batch).await;
    let token = app.token_for("i.0@example.com");
    let r = app.redeem(&token).await;
    assert!(r.status().is_success(), "{}", r.status());
    let redeemed: Value = r.json().await.expect("json");
    let invitation = redeemed["id"]
        .as_str()
        .or_else(|| redeemed["invitation"]["id"].as_str())
        .expect("invitation id")
        .to_owned();
    let r = app
        .post_empty(&format!("/v1/invitations/{invitation}/complete"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // The other link passes its expiry: the sweep marks it EXPIRED and says so, once.
    sqlx::query(
        "UPDATE invitations SET expires_at = now() - interval '1 minute'
          WHERE status = 'PENDING'",
    )
    .execute(&app.pool)
    .await
    .expect("update");
    let got = receiver
        .wait_for("three invitation events", |g| g.len() >= 3)
        .await;
    let types: HashMap<String, Value> = got
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["type"].as_str().unwrap_or_default().to_owned(),
                v["data"].clone(),
            )
        })
        .collect();
    assert_eq!(types["invitation.redeemed"]["id"], invitation.as_str());
    assert_eq!(types["invitation.redeemed"]["status"], "IN_PROGRESS");
    assert_eq!(types["invitation.completed"]["status"], "COMPLETED");
    let expired = &types["invitation.expired"];
    assert_eq!(expired["status"], "EXPIRED");
    assert_eq!(expired["candidate_id"], "i-1");
    let shown = app
        .get_json(&format!(
            "/v1/invitations/{}",
            expired["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(shown["status"], "EXPIRED");
    let stored: String =
        sqlx::query_scalar("SELECT status FROM invitations WHERE candidate_id = 'i-1'")
            .fetch_one(&app.pool)
            .await
            .expect("status");
    assert_eq!(stored, "EXPIRED");
    // Stored EXPIRED, the link is not the sweep's again: one event for it.
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE type = 'invitation.expired'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(events, 1);
}

#[tokio::test]
async fn batch_completed_is_sent_once_per_completion_under_concurrency_and_again_after_a_retry() {
    let mut app = spawn_app_with(|s| s.worker.concurrency = 32).await;
    let receiver = Receiver::start([]).await;
    app.create_webhook(&receiver.url(), &["batch.completed"])
        .await;
    // A second worker process settles items of the same batches at the same moments.
    let mut second = Service::new("work", &app.settings).start("work #2");
    second.wait_ready(Duration::from_secs(30)).await;
    app.open_job("job-x").await;
    app.smtp.pause().await;
    let mut batches = Vec::new();
    for b in 0..10 {
        let mut people = candidates(&format!("x{b}"), 4);
        people[3]["email"] = json!("broken");
        batches.push(app.create_batch("job-x", people).await);
    }
    app.smtp.resume().await.expect("resume");
    for b in &batches {
        app.wait_until_completed(b).await;
    }
    let got = receiver
        .wait_for("ten batch.completed", |g| g.len() >= 10)
        .await;
    // Let any duplicate that would come arrive: every delivery is finished.
    eventually("no delivery left pending", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_deliveries WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(&app.pool)
        .await
        .expect("count");
        (n == 0).then_some(())
    })
    .await;
    let got = if got.len() > 10 {
        got
    } else {
        receiver.received()
    };
    let mut per_batch: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *per_batch
            .entry(
                r.json()["data"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    for b in &batches {
        assert_eq!(
            per_batch.get(b),
            Some(&1),
            "exactly one batch.completed for {b}"
        );
    }
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE type = 'batch.completed'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(events, 10);

    // A retry completes the batch anew: one more event for it.
    let first = &batches[0];
    let r = app
        .post_json(
            &format!("/v1/batches/{first}/retry"),
            &json!({"candidates": [{"id": "x0-3", "email": "x0.3@example.com"}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    app.wait_until_completed(first).await;
    let got = receiver
        .wait_for("the second completion", |g| g.len() >= 11)
        .await;
    let again: Vec<Value> = got
        .iter()
        .map(Received::json)
        .filter(|v| v["data"]["id"] == first.as_str())
        .collect();
    assert_eq!(again.len(), 2);
    assert_eq!(again[1]["data"]["counts"]["sent"], 4);
    second.terminate();
    app.stop().await;
}

/// The collision the exactly-once rule is about, made to happen rather than hoped for:
/// two group writers record the last two items of one batch at once. The first holds
/// the batch row; the second waits for it (seen waiting on a lock), then finds its
/// item the last one. One `batch.completed` is written, with both items sent.
#[tokio::test]
async fn two_writers_settling_the_last_two_items_at_once_write_one_batch_completed() {
    let app = prepare_app_with(|_| {}).await;
    sqlx::raw_sql(
        "INSERT INTO jobs (id, title, status) VALUES ('job-1', 'Engineer', 'open');
         INSERT INTO batches (id, job_id, duration_minutes, on_duplicate, total, pending,
                              status)
              VALUES ('00000000-0000-0000-0000-0000000000b1', 'job-1', 30, 'skip', 2, 2,
                      'running');
         INSERT INTO batch_items (id, batch_id, position, candidate_id, email, task_id)
              VALUES ('00000000-0000-0000-0000-0000000000a1',
                      '00000000-0000-0000-0000-0000000000b1', 1, 'c-1', 'c1@example.com',
                      '01J00000000000000000000001'),
                     ('00000000-0000-0000-0000-0000000000a2',
                      '00000000-0000-0000-0000-0000000000b1', 2, 'c-2', 'c2@example.com',
                      '01J00000000000000000000002');
         INSERT INTO invitations (id, job_id, candidate_id, batch_id, item_id, token_hash,
                                  duration_minutes, expires_at)
              SELECT gen_random_uuid(), 'job-1', candidate_id, batch_id, id,
                     sha256(convert_to(candidate_id, 'UTF8')), 30, now() + interval '1 day'
                FROM batch_items;
         UPDATE batch_items i SET invitation_id = v.id FROM invitations v WHERE v.item_id = i.id;
         INSERT INTO webhook_endpoints (id, url, events, secret, created_by)
              VALUES ('00000000-0000-0000-0000-0000000000e1', 'https://hooks.example.com/',
                      ARRAY['batch.completed'], 'whsec_dGVzdA==', 'key:test');",
    )
    .execute(&app.pool)
    .await
    .expect("a running batch with two pending items");
    let record = |item: u8| {
        let pool = app.pool.clone();
        async move {
            let mut conn = pool.acquire().await.expect("a connection");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "PREPARE record (uuid[], text[], text[], text[], text[], text[], \
                 timestamptz[], text[], text[], text[], bool[], text[], text[], text) AS {}",
                invite_worker::db::tasks::RECORD_OUTCOMES
            )))
            .execute(&mut *conn)
            .await
            .expect("prepare");
            let execute = format!(
                "EXECUTE record (ARRAY['00000000-0000-0000-0000-0000000000a{item}']::uuid[],
                                 ARRAY['01J0000000000000000000000{item}'], ARRAY['sent'],
                                 ARRAY[NULL]::text[], ARRAY[NULL]::text[], ARRAY[NULL]::text[],
                                 ARRAY[NULL]::timestamptz[], ARRAY[NULL]::text[],
                                 ARRAY['01J0000000000000000000000{item}'], ARRAY[NULL]::text[],
                                 ARRAY[false], ARRAY['sent'], ARRAY['250 ok'], 'w{item}')"
            );
            (conn, execute)
        }
    };
    let (mut first, first_sql) = record(1).await;
    let (mut second, second_sql) = record(2).await;
    let second_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *second)
        .await
        .expect("pid");
    sqlx::raw_sql("BEGIN")
        .execute(&mut *first)
        .await
        .expect("begin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(first_sql))
        .execute(&mut *first)
        .await
        .expect("the first item recorded, its transaction open");
    let waiting = tokio::spawn(async move {
        sqlx::raw_sql(sqlx::AssertSqlSafe(second_sql))
            .execute(&mut *second)
            .await
            .expect("the second item recorded");
    });
    eventually("the second writer waits for the batch row", || async {
        let lock: Option<String> =
            sqlx::query_scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1")
                .bind(second_pid)
                .fetch_one(&app.pool)
                .await
                .expect("activity");
        (lock.as_deref() == Some("Lock")).then_some(())
    })
    .await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut *first)
        .await
        .expect("commit");
    waiting.await.expect("the second writer ends");

    let events: Vec<Value> =
        sqlx::query_scalar("SELECT payload FROM webhook_events WHERE type = 'batch.completed'")
            .fetch_all(&app.pool)
            .await
            .expect("events");
    assert_eq!(events.len(), 1, "exactly one batch.completed: {events:?}");
    assert_eq!(events[0]["data"]["counts"]["sent"], 2, "{}", events[0]);
    assert_eq!(events[0]["data"]["counts"]["pending"], 0, "{}", events[0]);
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&app.pool)
        .await
        .expect("deliveries");
    assert_eq!(deliveries, 1);
}

#[tokio::test]
async fn a_kill_9_of_the_worker_mid_delivery_loses_no_event() {
    let app = crate::helpers::prepare_app_with(|_| {}).await;
    let receiver = Receiver::start([Answer::Hang]).await;
    let service = Service::new("serve", &app.settings);
    let mut first = service.start("serve #1");
    first.wait_ready(Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/webhooks", first.base()))
        .bearer_auth(KEY)
        .json(&json!({"url": receiver.url(), "events": ["batch.completed"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .put(format!("{}/v1/jobs/job-k", first.base()))
        .bearer_auth(KEY)
        .json(&json!({"title": "Backend Engineer", "status": "open"}))
        .send()
        .await
        .expect("request");
    assert!(r.status().is_success());
    let r = client
        .post(format!("{}/v1/batches", first.base()))
        .bearer_auth(KEY)
        .json(&json!({"job_id": "job-k", "duration_minutes": 30, "candidates": candidates("k", 2)}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // The first attempt is on its way (the receiver holds it) when the process dies.
    let got = receiver
        .wait_for("the first attempt", |g| !g.is_empty())
        .await;
    first.kill();
    let sending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'sending'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(sending, 1, "the attempt was cut short by the kill");

    let mut second = service.start("serve #2");
    second.wait_ready(Duration::from_secs(30)).await;
    let again = receiver.wait_for("the event again", |g| g.len() >= 2).await;
    assert_eq!(again[1].id, got[0].id, "the same webhook-id");
    assert_eq!(again[1].body, got[0].body);
    eventually("the delivery succeeded", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded'",
        )
        .fetch_one(&app.pool)
        .await
        .expect("count");
        (n == 1).then_some(())
    })
    .await;
    second.terminate();
}

#[tokio::test]
async fn the_ssrf_guard_refuses_private_targets_after_resolution_unless_allowed() {
    let app = spawn_app_with(|s| s.webhooks.allow_private_targets = false).await;
    // A name that resolves to 127.0.0.1, with something listening there that must never
    // be reached.
    let bait = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = bait.local_addr().expect("addr").port();
    let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = reached.clone();
    let bait_task = tokio::spawn(async move {
        while let Ok((_socket, _)) = bait.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    for refused in [
        format!("http://localhost:{port}/hook"),
        format!("https://127.0.0.1:{port}/hook"),
        "https://169.254.169.254/latest/meta-data".to_owned(),
        "https://[::1]/hook".to_owned(),
    ] {
        let r = app
            .post_json(
                "/v1/webhooks",
                &json!({"url": refused, "events": ["batch.completed"]}),
            )
            .await;
        expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    // A host name passes at creation; what it resolves to is checked at send time.
    let (webhook, _) = app
        .create_webhook(
            &format!("https://localhost:{port}/hook"),
            &["batch.completed"],
        )
        .await;
    app.open_job("job-s").await;
    let batch = app.create_batch("job-s", candidates("s", 1)).await;
    app.wait_until_completed(&batch).await;
    let delivery = eventually("a refused attempt", || async {
        let d = app.deliveries(&webhook, None).await;
        (d.len() == 1 && d[0]["attempts"].as_i64() >= Some(1) && d[0]["status"] != "sending")
            .then(|| d[0].clone())
    })
    .await;
    let error = delivery["attempts_made"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("SSRF guard"), "{delivery}");
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no connection was made"
    );
    bait_task.abort();
}

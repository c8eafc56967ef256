//! `spawn_app()`: a migrated database of its own, the service (API and workers) on a
//! random port, and a scriptable SMTP server the service sends to.

#![allow(dead_code)]

use std::{path::Path, time::Duration};

use invite_worker::{
    app::{self, RunningApp},
    config::{ApiKey, MailTransport, Settings},
    domain::access::Scope,
    http::Role,
};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use smtp_testkit::SmtpServer;
use sqlx::PgPool;
use tokio::net::TcpListener;

/// The tests' API key (every scope), and token secret: strong enough for `serve`.
pub const KEY: &str = "test-key-0123456789-abcdefghij";
pub const TOKEN_SECRET: &str = "test-token-secret-0123456789-abcdefghij";

/// The server tests connect to; `TEST_DATABASE_URL` overrides (no database name).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Settings for a test: shipped defaults, a fresh database name, SMTP to `smtp_port`,
/// and retries short enough for a test (backoff in hundreds of milliseconds).
pub fn test_settings(smtp_port: u16) -> Settings {
    let mut s = Settings::load_from(Path::new("/nonexistent/worker.toml"), false, Vec::new())
        .expect("the shipped defaults load");
    let db = format!("iw_test_{}", uuid::Uuid::now_v7().simple());
    s.database.url = invite_worker::config::Secret::new(format!("{}/{db}", server_url()));
    s.database.max_connections = 12;
    s.api.keys = vec![ApiKey::new("key:1", KEY, &Scope::ALL)];
    s.invite.token_secret = invite_worker::config::Secret::new(TOKEN_SECRET);
    s.mail.transport = MailTransport::Smtp;
    s.mail.rate_per_second = 10_000;
    s.smtp.port = smtp_port;
    s.smtp.timeout_secs = 2;
    s.worker.poll_interval_ms = 100;
    s.worker.heartbeat_secs = 1;
    s.worker.recover_after_secs = 3;
    s.worker.shutdown_timeout_secs = 5;
    s.worker.maintenance_interval_secs = 1;
    s.retry.initial_delay_ms = 200;
    s.retry.max_delay_ms = 1_000;
    s.retry.multiplier = 2.0;
    s.retry.jitter = 0.1;
    s.retry.max_attempts = 4;
    // Webhook receivers in tests listen on 127.0.0.1 over http; retries come quickly.
    s.webhooks.allow_private_targets = true;
    s.webhooks.timeout_secs = 2;
    s.webhooks.retry_schedule_secs = vec![1, 1, 2, 2, 2, 2, 2, 2];
    s.webhooks.poll_interval_ms = 100;
    // Tests that fuzz or race many requests from one address; the limits' own tests
    // set them low.
    s.limits.auth_failures_per_minute = 1_000_000;
    s.limits.redeems_per_minute = 1_000_000;
    s
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub smtp: SmtpServer,
    pub pool: PgPool,
    pub settings: Settings,
    pub running: Option<RunningApp>,
    /// Last, so it is dropped after everything that uses the database.
    pub database: TestDatabase,
}

/// The test's own database, dropped when the test ends, also when it fails: dropping
/// this (on a panic too, while the stack unwinds) drops the database, with `FORCE`, so
/// connections a service of the test still holds do not keep it.
pub struct TestDatabase {
    pub name: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = format!("{}/postgres", server_url());
        // A runtime of its own on a thread of its own: `drop` may run inside the test's
        // runtime, which must not be blocked on, or while it unwinds.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                // The name is ours (iw_test_ and a UUID), not input.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await?;
                Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: test database {} not dropped: {e:#}", self.name),
            Err(_) => eprintln!("warning: test database {} not dropped", self.name),
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let smtp = SmtpServer::start().await.expect("SMTP server starts");
    let mut settings = test_settings(smtp.port());
    configure(&mut settings);
    let database = TestDatabase {
        name: database_name(&settings),
    };
    app::migrate(&settings).await.expect("migrations apply");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let running = app::start(settings.clone(), Role::All, listener)
        .await
        .expect("service starts");
    let base = format!("http://{}", running.addr);
    let pool = running.pool.clone();
    TestApp {
        base,
        client: reqwest::Client::new(),
        smtp,
        pool,
        settings,
        running: Some(running),
        database,
    }
}

/// `n` candidates with valid, distinct addresses: `{prefix}-{i}` at `{prefix}.{i}@example.com`.
pub fn candidates(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"id": format!("{prefix}-{i}"), "email": format!("{prefix}.{i}@example.com"), "name": format!("Candidate {i}")}))
        .collect()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn put_job(&self, id: &str, title: &str, status: &str) -> Response {
        self.client
            .put(self.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(KEY)
            .json(&json!({"title": title, "status": status}))
            .send()
            .await
            .expect("request")
    }

    pub async fn open_job(&self, id: &str) {
        let r = self.put_job(id, "Backend Engineer", "open").await;
        assert!(r.status().is_success(), "job created: {}", r.status());
    }

    pub async fn post_batch(&self, body: &Value) -> Response {
        self.client
            .post(self.url("/v1/batches"))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Posts a batch that must be accepted; returns its id.
    pub async fn create_batch(&self, job_id: &str, candidates: Vec<Value>) -> String {
        let r = self
            .post_batch(
                &json!({"job_id": job_id, "duration_minutes": 30, "candidates": candidates}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let body: Value = r.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("request")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    pub async fn batch(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/batches/{id}")).await
    }

    pub async fn items(&self, id: &str, status: Option<&str>) -> Vec<Value> {
        let q = status.map(|s| format!("?status={s}")).unwrap_or_default();
        let v = self.get_json(&format!("/v1/batches/{id}/items{q}")).await;
        v["items"].as_array().cloned().expect("items")
    }

    /// Polls until the batch reaches `status` (a bound, not a speed assertion).
    pub async fn wait_for_status(&self, id: &str, status: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let batch = self.batch(id).await;
            assert_counts_add_up(&batch);
            if batch["status"] == status {
                return batch;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "batch {id} did not reach {status} within {within:?}: {batch}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_until_completed(&self, id: &str) -> Value {
        self.wait_for_status(id, "completed", Duration::from_secs(60))
            .await
    }

    /// Rows in each of our tables and in the queue.
    pub async fn row_counts(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for table in [
            "jobs",
            "batches",
            "batch_items",
            "invitations",
            "apalis.jobs",
        ] {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&self.pool)
                    .await
                    .expect("count");
            out.push((table.to_owned(), n));
        }
        out
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("service stops cleanly");
        }
    }
}

pub fn assert_counts_add_up(batch: &Value) {
    let c = &batch["counts"];
    let sum: i64 = ["pending", "sent", "failed", "skipped"]
        .iter()
        .map(|k| c[k].as_i64().expect("count"))
        .sum();
    assert_eq!(Some(sum), batch["total"].as_i64(), "counts add up: {batch}");
}

/// The link in a message's text part (the line that starts with the link base).
pub fn link_in(body: &str, base: &str) -> Option<String> {
    body.lines()
        .map(str::trim)
        .find(|l| l.starts_with(base))
        .map(str::to_owned)
}

// ---- Requests the lifecycle tests make ----

impl TestApp {
    /// `POST {path}` with a JSON body and the bearer key.
    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// `POST {path}` with no body at all (no `Content-Type`) and the bearer key.
    pub async fn post_empty(&self, path: &str) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("request")
    }

    /// `POST /v1/invitations/redeem` with `{"token": token}`.
    pub async fn redeem(&self, token: &str) -> Response {
        self.post_json("/v1/invitations/redeem", &json!({ "token": token }))
            .await
    }

    /// The link token in the one accepted message to `email` (the last path segment of
    /// the link line). Panics unless exactly one message went to that address.
    pub fn token_for(&self, email: &str) -> String {
        let base = &self.settings.invite.link_base_url;
        let to_them: Vec<_> = self
            .smtp
            .messages()
            .into_iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(email)))
            .collect();
        assert_eq!(to_them.len(), 1, "exactly one message to {email}");
        let link = link_in(to_them[0].body(), base).expect("a link line in the message");
        link.rsplit('/')
            .next()
            .filter(|t| !t.is_empty())
            .expect("a token after the last slash")
            .to_owned()
    }

    /// Send-invite tasks in `apalis.jobs` for the items of `batch_id` that may still run:
    /// Pending, Queued or Running, or Failed with attempts left.
    pub async fn live_tasks_of_batch(&self, batch_id: &str) -> i64 {
        let id = uuid::Uuid::parse_str(batch_id).expect("a batch id is a uuid");
        sqlx::query_scalar(
            "SELECT count(*) FROM apalis.jobs j
             WHERE j.job_type = $2
               AND (j.status IN ('Pending', 'Queued', 'Running')
                    OR (j.status = 'Failed' AND j.attempts < j.max_attempts))
               AND (convert_from(j.job, 'UTF8')::jsonb ->> 'item_id')::uuid IN
                   (SELECT i.id FROM batch_items i WHERE i.batch_id = $1)",
        )
        .bind(id)
        .bind(invite_worker::db::tasks::QUEUE)
        .fetch_one(&self.pool)
        .await
        .expect("count live tasks")
    }

    /// Polls the items of a batch until `done` holds for them (a bound, not a speed
    /// assertion); returns them.
    pub async fn wait_for_items(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let items = self.items(id, None).await;
            if done(&items) {
                return items;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "items of batch {id}: {what} did not happen within {within:?}: {items:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Asserts that `r` is a problem+json with this status and code; returns the problem.
pub async fn expect_problem(r: Response, status: StatusCode, code: &str) -> Value {
    let got = r.status();
    let content_type = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = r.text().await.expect("a response body");
    assert_eq!(got, status, "status (body: {body})");
    assert!(
        content_type.starts_with("application/problem+json"),
        "problem+json content type, got {content_type:?} (body: {body})"
    );
    let problem: Value = serde_json::from_str(&body).expect("a JSON problem");
    assert_eq!(problem["code"], code, "problem code: {problem}");
    assert_eq!(
        problem["status"],
        status.as_u16(),
        "problem status: {problem}"
    );
    problem
}

impl TestApp {
    /// Posts a batch body that must be accepted; returns its id.
    pub async fn create_batch_with(&self, body: Value) -> String {
        let r = self.post_batch(&body).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let body: Value = r.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }
}

// ---- Services run as child processes (the fault tests) ----

/// An HTTP client whose every request gives up after 10 s, so a hung service fails the
/// test instead of hanging it.
pub fn bounded_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client")
}

/// A migrated database of its own and an SMTP server, for a service the test runs as
/// child processes (`process::Service`): a `TestApp` with no in-process service. Its
/// `base` is empty until the test points it at a running process (`app.base =
/// process.base()`); its pool is the test's own view of the database.
pub async fn prepare_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let smtp = SmtpServer::start().await.expect("SMTP server starts");
    let mut settings = test_settings(smtp.port());
    configure(&mut settings);
    let database = TestDatabase {
        name: database_name(&settings),
    };
    app::migrate(&settings).await.expect("migrations apply");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(settings.database.url.expose())
        .await
        .expect("the test connects to its database");
    TestApp {
        base: String::new(),
        client: bounded_client(),
        smtp,
        pool,
        settings,
        running: None,
        database,
    }
}

/// The name of the test's database (the last path segment of `database.url`).
pub fn database_name(settings: &Settings) -> String {
    let url = settings.database.url.expose();
    url.rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .expect("a database name in the URL")
        .to_owned()
}

impl TestApp {
    /// Send-invite tasks of the items of `batch_id`, counted per apalis status.
    pub async fn task_statuses_of_batch(
        &self,
        batch_id: &str,
    ) -> std::collections::BTreeMap<String, i64> {
        let id = uuid::Uuid::parse_str(batch_id).expect("a batch id is a uuid");
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT j.status, count(*) FROM apalis.jobs j
             WHERE j.job_type = $2
               AND (convert_from(j.job, 'UTF8')::jsonb ->> 'item_id')::uuid IN
                   (SELECT i.id FROM batch_items i WHERE i.batch_id = $1)
             GROUP BY j.status",
        )
        .bind(id)
        .bind(invite_worker::db::tasks::QUEUE)
        .fetch_all(&self.pool)
        .await
        .expect("count tasks per status");
        rows.into_iter().collect()
    }
}

/// A migrated database served by the API alone (`invite-worker api` as a child
/// process: no worker takes its tasks), with `job_id` open. Keep the process alive.
pub async fn api_only_with_open_job(job_id: &str) -> (TestApp, crate::process::ServiceProcess) {
    let mut app = prepare_app_with(|_| {}).await;
    let mut api = crate::process::Service::new("api", &app.settings).start("api");
    api.wait_ready(Duration::from_secs(30)).await;
    app.base = api.base();
    app.open_job(job_id).await;
    (app, api)
}

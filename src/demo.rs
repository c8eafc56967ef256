//! `invite-worker demo`: the main job, end to end, in one process and one command.
//!
//! Migrates the configured database (creating it if missing), starts the API and the
//! workers with the `file` mail transport, registers a job, submits one batch of 100
//! candidates (6 with invalid addresses) through the HTTP API, shows progress until the
//! batch completes, prints the tally and where the messages went, then exits.
//!
//! The demo's requests go through the very router the listener serves (every layer,
//! extractor and handler, authentication included), called in-process, so the product
//! needs no HTTP client of its own.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::{
    app,
    config::{self, ApiKey, MailTransport, Scope, Secret, Settings},
    http::Role,
};

const FIRST: [&str; 10] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Leslie",
];
const LAST: [&str; 10] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman",
    "Lamport",
];
/// Six addresses no mail server will ever see.
const INVALID: [&str; 6] = [
    "not-an-email",
    "ada.lovelace@",
    "@example.com",
    "grace..hopper@example.com",
    "alan turing@example.com",
    "edsger@localhost",
];

/// The candidates of the demo batch: 100, every 16th or so with an invalid address.
pub(crate) fn candidates(run: &str) -> Vec<Value> {
    (0..100)
        .map(|i| {
            let first = FIRST[i % FIRST.len()];
            let last = LAST[(i / FIRST.len()) % LAST.len()];
            let email = if i % 17 == 5 && i / 17 < INVALID.len() {
                INVALID[i / 17].to_owned()
            } else {
                format!("{}.{}.{i}@example.com", first.to_lowercase(), last.to_lowercase())
            };
            json!({"id": format!("{run}-c{i:03}"), "email": email, "name": format!("{first} {last}")})
        })
        .collect()
}

pub async fn run(mut settings: Settings) -> anyhow::Result<()> {
    settings.mail.transport = MailTransport::File;
    let outbox =
        std::path::absolute(&settings.mail.outbox_dir).unwrap_or(settings.mail.outbox_dir.clone());
    println!("invite-worker demo");
    println!("  database  {}", redact_url(settings.database.url.expose()));
    app::migrate(&settings).await?;
    println!("  migrated  (app and queue schemas)");

    let listener = match TcpListener::bind(settings.http.bind).await {
        Ok(l) => l,
        Err(e) => {
            println!(
                "  note      {} is busy ({e}); using a free port instead",
                settings.http.bind
            );
            TcpListener::bind((settings.http.bind.ip(), 0)).await?
        }
    };
    let key = demo_key(&mut settings);
    let service = app::start(settings, Role::All, listener).await?;
    let base = format!("http://{}", service.addr);
    println!("  serving   {base} (API and workers in this process)");

    let api = Api {
        router: service.router.clone(),
        key: key.clone(),
    };
    let outcome = drive(&api).await;
    let stopped = service.stop().await;
    let (tally, batch_id, job_id) = outcome?;
    stopped?;

    println!();
    println!("Result: {tally}");
    println!(
        "  messages  written to {} (one .eml per candidate)",
        outbox.display()
    );
    println!();
    println!("Try it by hand (serve refuses the shipped key and secret; make your own):");
    println!(
        "  export INVITES_API__KEYS=$(cargo run -q -- secret) INVITES_INVITE__TOKEN_SECRET=$(cargo run -q -- secret)"
    );
    println!("  cargo run --release -- serve &");
    println!("  KEY=$INVITES_API__KEYS");
    println!("  curl -s -H \"Authorization: Bearer $KEY\" {base}/v1/batches/{batch_id}");
    println!(
        "  curl -s -H \"Authorization: Bearer $KEY\" '{base}/v1/batches/{batch_id}/items?status=failed'"
    );
    println!(
        "  curl -s -X PUT -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' \\"
    );
    println!(
        "       -d '{{\"title\": \"Data Engineer\", \"status\": \"open\"}}' {base}/v1/jobs/job-1"
    );
    println!("  (the job of this run is {job_id}; see README.md for every route)");
    if tally != "94 sent, 6 failed" {
        bail!("the demo batch ended with {tally:?}, expected \"94 sent, 6 failed\"");
    }
    Ok(())
}

/// The key the demo calls its API with, saying where it comes from. Shipped or weak
/// values are fine on loopback, where nobody else can reach the demo; on any other
/// address the demo makes a key and a token secret of its own for this run.
fn demo_key(settings: &mut Settings) -> String {
    let needed = [Scope::BatchesWrite, Scope::BatchesRead];
    let usable = |k: &ApiKey| needed.iter().all(|s| k.allows(*s));
    if settings.refuse_insecure().is_err() {
        if settings.http.bind.ip().is_loopback() {
            println!(
                "  secrets   the shipped development key and secret: fine on loopback, \
                 refused by serve, api and work"
            );
        } else {
            settings.api.keys = vec![ApiKey::new("demo", &config::generate_secret(), &needed)];
            settings.invite.token_secret = Secret::new(config::generate_secret());
            println!(
                "  secrets   a key and token secret made for this run ({} is not loopback)",
                settings.http.bind
            );
        }
    }
    if let Some(key) = settings
        .api
        .keys
        .iter()
        .filter(|k| usable(k))
        .find_map(|k| k.key().map(|s| s.expose().to_owned()))
    {
        return key;
    }
    // Only digests (or no key that may send): a key of the demo's own for this run.
    let key = config::generate_secret();
    settings.api.keys.push(ApiKey::new("demo", &key, &needed));
    println!("  secrets   a key made for this run (no configured key can send batches)");
    key
}

/// The API as the demo calls it: the service's router, with the demo's key.
struct Api {
    router: Router,
    key: String,
}

impl Api {
    /// One request; answers the status and the JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key));
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body)?))?,
            None => request.body(Body::empty())?,
        };
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024).await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, body))
    }
}

/// Registers the job, submits the batch and waits for it, through the API.
async fn drive(api: &Api) -> anyhow::Result<(String, String, String)> {
    let run = format!("demo-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let job_id = format!("{run}-job");
    let job = json!({"title": "Backend Engineer", "status": "open"});
    let (status, body) = api
        .call(Method::PUT, &format!("/v1/jobs/{job_id}"), Some(job))
        .await?;
    if !status.is_success() {
        bail!("registering the job failed: {status} {body}");
    }
    println!("  job       {job_id} (Backend Engineer, open)");

    let started = Instant::now();
    let batch = json!({
        "job_id": job_id, "duration_minutes": 30,
        "candidates": candidates(&run), "expected_count": 100,
    });
    let (status, batch) = api.call(Method::POST, "/v1/batches", Some(batch)).await?;
    if status != StatusCode::ACCEPTED {
        bail!("submitting the batch failed: {status} {batch}");
    }
    let batch_id = batch["id"]
        .as_str()
        .context("the batch has no id")?
        .to_owned();
    println!("  batch     {batch_id}: 100 candidates, 6 with invalid addresses");

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, batch) = api
            .call(Method::GET, &format!("/v1/batches/{batch_id}"), None)
            .await?;
        if status != StatusCode::OK {
            bail!("reading the batch failed: {status} {batch}");
        }
        let counts = &batch["counts"];
        print!(
            "\r  progress  {:>3} pending, {:>3} sent, {:>3} failed, {:>3} skipped  [{:.1} s]   ",
            counts["pending"],
            counts["sent"],
            counts["failed"],
            counts["skipped"],
            started.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
        if batch["status"] == "completed" {
            println!();
            let summary = batch["summary"].as_str().unwrap_or_default().to_owned();
            return Ok((summary, batch_id, job_id));
        }
        if Instant::now() > deadline {
            println!();
            bail!("the batch did not complete within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

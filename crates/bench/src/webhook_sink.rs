//! `--webhooks`: a webhook receiver in the bench, registered with the service for
//! `item.failed` and `batch.completed`, so the sustained figure includes writing,
//! fanning out and delivering those events. It answers 204 to everything and counts
//! events by type.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The receiver: where it listens and what it got.
pub struct Sink {
    pub url: String,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let counts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let seen = counts.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let seen = seen.clone();
                async move {
                    let kind = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["type"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    if let Ok(mut counts) = seen.lock() {
                        *counts.entry(kind).or_default() += 1;
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, counts, task })
    }

    /// Events of `kind` received so far.
    pub fn count(&self, kind: &str) -> u64 {
        self.counts
            .lock()
            .map(|c| c.get(kind).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Registers this receiver with the service at `base`.
    pub async fn register(&self, base: &str, key: &str) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/webhooks"))
            .bearer_auth(key)
            .json(
                &json!({"url": self.url, "events": ["item.failed", "batch.completed"],
                          "description": "invite-bench"}),
            )
            .send()
            .await?;
        if !r.status().is_success() {
            let status = r.status();
            bail!("POST /v1/webhooks: {status}: {}", r.text().await?);
        }
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

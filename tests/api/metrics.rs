//! The queue gauges of `/metrics` (operations.md §3, "Metrics"): right figures, from
//! every process, computed once per interval however many processes there are; and the
//! shipped dashboard and alert rules use only metrics the service exports.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{
    helpers::{candidates, prepare_app_with},
    process::Service,
};

/// The value of the sample `name` (exact series, labels included) in a Prometheus text
/// exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

async fn scrape(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

async fn refreshes(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT refreshes FROM queue_gauges")
        .fetch_optional(pool)
        .await
        .expect("read refreshes")
        .unwrap_or(0)
}

#[tokio::test]
async fn two_processes_show_the_same_queue_gauges_computed_once_per_interval() {
    let mut app = prepare_app_with(|_| {}).await;
    // Two API processes: no worker takes the tasks, so they stay pending.
    let service = Service::new("api", &app.settings).env("INVITES_METRICS__REFRESH_SECS", "1");
    let (mut one, mut two) = (service.start("api-1"), service.start("api-2"));
    one.wait_ready(Duration::from_secs(30)).await;
    two.wait_ready(Duration::from_secs(30)).await;
    app.base = one.base();
    app.open_job("job-m").await;
    let body = json!({"job_id": "job-m", "duration_minutes": 30,
        "candidates": candidates("m", 3)});
    let r = app.post_batch(&body).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());

    // Both processes come to show 3 pending tasks and 1 queued batch.
    let deadline = Instant::now() + Duration::from_secs(20);
    for base in [one.base(), two.base()] {
        loop {
            let text = scrape(&app.client, &base).await;
            let pending = sample(&text, "invite_queue_tasks{state=\"pending\"}");
            let queued = sample(&text, "invite_batches{status=\"queued\"}");
            if pending == Some(3.0) && queued == Some(1.0) {
                for series in [
                    "invite_queue_tasks{state=\"running\"}",
                    "invite_queue_tasks{state=\"dead\"}",
                    "invite_workers_alive",
                    "invite_batches{status=\"completed\"}",
                ] {
                    assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
                }
                assert!(
                    sample(&text, "invite_queue_oldest_pending_seconds").is_some(),
                    "{text}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{base}/metrics never showed the batch:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Over 4 s at a 1 s interval, the two processes computed the figures about 4
    // times between them, not twice each per second.
    let before = refreshes(&app.pool).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let computed = refreshes(&app.pool).await - before;
    assert!(
        (2..=6).contains(&computed),
        "the figures were computed {computed} times in 4 s by two processes"
    );
    one.kill();
    two.kill();
}

/// Every metric name the dashboard and the alert rules query.
fn names_used(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let word = &text[start..i];
        if (word.starts_with("invite_") || word.starts_with("invites_") || word.ends_with("_total"))
            && !names.iter().any(|n| n == word)
        {
            names.push(word.to_owned());
        }
        i += 1;
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_metrics_the_service_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/invite-worker.json"))
        .expect("the dashboard");
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml"))
        .expect("the alert rules");

    // The names the code records (a metric appears in /metrics only once recorded).
    let mut source = String::new();
    for dir in ["src/queue", "src/http", "src/mail", "src/db"] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).expect("a source dir") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                source.push_str(&std::fs::read_to_string(&path).expect("a source file"));
            }
        }
    }
    let recorded: Vec<&str> = source
        .match_indices("metrics::")
        .filter_map(|(at, _)| {
            let rest = &source[at..];
            let open = rest.find("!(\"")? + 3;
            let close = rest[open..].find('"')? + open;
            Some(&rest[open..close])
        })
        .collect();
    assert!(recorded.contains(&"invite_queue_tasks"), "{recorded:?}");

    // The queries: each panel target's `expr`, and each rule's `expr:` up to its `for:`.
    let panels: serde_json::Value = serde_json::from_str(&dashboard).expect("JSON");
    let mut queries = String::new();
    for panel in panels["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push_str(target["expr"].as_str().expect("an expr"));
            queries.push('\n');
        }
    }
    for rule in alerts.split("expr:").skip(1) {
        queries.push_str(rule.split("\n        for:").next().unwrap_or_default());
    }
    let used = names_used(&queries);
    assert!(used.len() >= 8, "{used:?}");
    for name in &used {
        assert!(
            recorded.contains(&name.as_str()),
            "{name} is queried but the service never records it (recorded: {recorded:?})"
        );
    }
}
